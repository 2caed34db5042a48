"""quantrl: low-precision RL post-training of LLMs (FP8 / INT4 rollout, FP8 training, INT4 QAT)."""

__version__ = "0.1.0"
