"""Checkpoint IO and offline conversion (BF16 <-> FP8 / INT4 / INT8), streaming with bounded memory."""
