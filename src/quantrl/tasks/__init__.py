"""Built-in tasks for the embedded default: synthetic arithmetic and its character-level tokenizer."""

from quantrl.tasks.arithmetic import DIFFICULTIES, Difficulty, Problem, make_problems, make_split, reward, write_jsonl
from quantrl.tasks.tokenizer import build_tokenizer

__all__ = ["DIFFICULTIES", "Difficulty", "Problem", "build_tokenizer", "make_problems", "make_split", "reward",
           "write_jsonl"]  # fmt: skip
