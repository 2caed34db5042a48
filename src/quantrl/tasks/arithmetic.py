"""Synthetic arithmetic: the embedded default task (small enough for a tiny model on CPU, graded exactly).

A problem is one binary operation on non-negative integers; the prompt and the worked solution are

    what is 47*36?\\n                                                        prompt
    47*36=47*30+47*6=1410+282=1692\\n\\boxed{1692}                           solution (multiplication)
    347-58=289\\n\\boxed{289}                                                solution (addition / subtraction)

Multiplication is worked by splitting the second factor into its non-zero digit places: one partial
product per digit, then their sum, which is the short chain of steps a small model can learn to follow.
Subtraction may go negative (``58-347=-289``). Everything is drawn from ``random.Random`` seeded by a string,
so ``make_problems(n, seed, difficulty)`` is the same on every machine and Python version, and a longer
list extends a shorter one with the same seed (``make_problems(10, s)[:5] == make_problems(5, s)``).
All characters are in ``tasks.tokenizer.CHARS``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from quantrl.rl.rewards import math_reward

OPS = ("+", "-", "*")


@dataclass(frozen=True)
class Difficulty:
    min_digits: int = 1
    "fewest digits of an operand"
    max_digits: int = 2
    "most digits of an operand (each operand draws its digit count uniformly in [min, max])"
    ops: tuple[str, ...] = OPS
    "operations drawn uniformly: any of '+', '-', '*'"
    mul_max_digits: int = 1
    "most digits of the second factor of '*' (one partial product per digit in the worked answer)"

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            got = f"{self.min_digits}, {self.max_digits}"
            raise ValueError(f"Difficulty: need 1 <= min_digits <= max_digits, got {got}")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ValueError(f"Difficulty: ops must be a non-empty subset of {OPS}, got {self.ops!r}")
        if self.mul_max_digits < 1:
            raise ValueError(f"Difficulty: mul_max_digits must be >= 1, got {self.mul_max_digits}")


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(1, 2, ("+", "-")),
    "medium": Difficulty(1, 3, OPS, mul_max_digits=1),
    "hard": Difficulty(2, 4, OPS, mul_max_digits=2),
}


@dataclass(frozen=True)
class Problem:
    prompt: str
    "the question given to the model, ending in a newline"
    answer: str
    "the exact result as a decimal integer (the reward label)"
    solution: str
    "a short worked answer ending in \\boxed{answer} (the supervised warm-start target)"

    def to_record(self) -> dict[str, str]:
        """A JSONL row for ``rl.data.load_prompts`` (keys 'prompt' and 'label', plus 'solution')."""
        return {"prompt": self.prompt, "label": self.answer, "solution": self.solution}


def _difficulty(d: Difficulty | str) -> Difficulty:
    if isinstance(d, Difficulty):
        return d
    if d not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {d!r}; presets: {sorted(DIFFICULTIES)}")
    return DIFFICULTIES[d]


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _worked_product(a: int, b: int) -> str:
    """``a*b=a*b1+a*b2=p1+p2=result`` over the non-zero digit places of b; fewer steps when there is one."""
    places = [int(c) * 10 ** (len(str(b)) - 1 - i) for i, c in enumerate(str(b)) if c != "0"]
    result = a * b
    if len(places) <= 1:
        return f"{a}*{b}={result}"
    terms = "+".join(f"{a}*{p}" for p in places)
    partial = "+".join(str(a * p) for p in places)
    return f"{a}*{b}={terms}={partial}={result}"


def make_problem(rng: random.Random, difficulty: Difficulty) -> Problem:
    op = rng.choice(difficulty.ops)
    a = _operand(rng, rng.randint(difficulty.min_digits, difficulty.max_digits))
    if op == "*":
        b = _operand(rng, rng.randint(1, min(difficulty.mul_max_digits, difficulty.max_digits)))
    else:
        b = _operand(rng, rng.randint(difficulty.min_digits, difficulty.max_digits))
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    work = _worked_product(a, b) if op == "*" else f"{a}{op}{b}={result}"
    return Problem(prompt=f"what is {a}{op}{b}?\n", answer=str(result), solution=f"{work}\n\\boxed{{{result}}}")


def make_problems(n: int, seed: int, difficulty: Difficulty | str = "medium") -> list[Problem]:
    """``n`` problems, a pure function of (n, seed, difficulty); prefixes agree across ``n``."""
    if n < 0:
        raise ValueError(f"make_problems: n must be >= 0, got {n}")
    rng = random.Random(f"quantrl-arithmetic:{seed}")
    d = _difficulty(difficulty)
    return [make_problem(rng, d) for _ in range(n)]


def make_split(
    n_train: int, n_eval: int, seed: int, difficulty: Difficulty | str = "medium"
) -> tuple[list[Problem], list[Problem]]:
    """Training problems and held-out problems whose prompts never occur in the training list."""
    train = make_problems(n_train, seed, difficulty)
    seen = {p.prompt for p in train}
    rng = random.Random(f"quantrl-arithmetic-eval:{seed}")
    d = _difficulty(difficulty)
    held: list[Problem] = []
    for _ in range(50 * n_eval + 1000):  # bounded: a tiny problem space must fail loudly, not spin
        if len(held) == n_eval:
            break
        p = make_problem(rng, d)
        if p.prompt not in seen:
            seen.add(p.prompt)
            held.append(p)
    if len(held) < n_eval:
        raise ValueError(f"make_split: only {len(held)} of {n_eval} held-out problems are new for this difficulty")
    return train, held


def reward(response: str, problem: Problem) -> float:
    """1.0 when the response's final answer (``\\boxed{}`` first) equals the problem's answer, else 0.0."""
    return math_reward(response, problem.answer)


def write_jsonl(problems: Sequence[Problem], path: str | Path) -> Path:
    """Problems as JSONL rows that ``rl.data.load_prompts(path)`` reads with the default keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.to_record()) + "\n" for p in problems), encoding="utf-8")
    return path
