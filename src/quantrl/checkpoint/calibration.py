"""Calibration data for GPTQ: read texts, tokenize, cut into fixed-length windows.

Sources (``load_calibration_texts``), a single file or the supported files directly inside a directory
(not recursive, sorted by name, so that pointing at a dataset root never pulls in every config/split):

- ``.parquet``: a text column (``text``, as in wikitext-2-raw-v1's ``train-00000-of-00001.parquet``);
  one row = one text. Needs pyarrow (the ``data`` extra).
- ``.jsonl``: one JSON object per line, text under ``text_key``.
- ``.txt``: documents separated by one or more blank lines; each paragraph is one text.

Empty and whitespace-only texts are dropped (wikitext has many empty rows); the rest are kept verbatim.

Windows (``build_calibration_batches``) follow GPTQ's wikitext-2 recipe: the texts are tokenized
without special tokens and concatenated into one stream (joined by ``"\\n\\n"``, as the reference joins
rows), and each sample is a window of ``max_sequence_length`` tokens at a seeded random offset. When the
stream holds at least ``num_samples`` windows, the windows are distinct and non-overlapping (random
slots of a randomly shifted grid); when it holds fewer, offsets are drawn independently and windows may
overlap (the reference always does this), with a warning.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".txt")
_TEXT_SEPARATOR = "\n\n"
_TOKENIZE_CHUNK = 1024  # texts per tokenizer call: batched for speed, bounded for memory


def load_calibration_texts(data_dir_or_file: str | Path, *, text_key: str = "text") -> list[str]:
    """Non-empty texts from a ``.parquet`` / ``.jsonl`` / ``.txt`` file or a directory of them.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a directory without supported
    files, a parquet file without the column, a malformed JSONL line, or when no non-empty text is found.
    """
    path = Path(data_dir_or_file)
    if not path.exists():
        raise FileNotFoundError(f"calibration data: {path} does not exist")
    files = _calibration_files(path)
    texts: list[str] = []
    for f in files:
        texts.extend(t for t in _read_file(f, text_key) if t.strip())
    if not texts:
        where = ", ".join(str(f) for f in files)
        raise ValueError(f"calibration data: no non-empty text found in {where}")
    return texts


def _calibration_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"calibration data: {path} has unsupported type {path.suffix!r}; expected one of {SUPPORTED_SUFFIXES}"
            )
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
    # a Hugging Face dataset folder (wikitext-2-raw-v1/) holds train-*, validation-* and test-* files:
    # calibrating on the test split would flatter every later test-set perplexity
    train = [p for p in files if p.name.lower().startswith("train")]
    if train and len(train) < len(files):
        left = [p.name for p in files if p not in train]
        warnings.warn(f"calibration data: {path} holds dataset splits; using the train files {[p.name for p in train]}, "
                      f"not {left} (pass a file to choose another)", stacklevel=3)  # fmt: skip
        files = train
    if not files:
        subdirs = sorted(p.name for p in path.iterdir() if p.is_dir())
        hint = f" (subdirectories are not searched; found {subdirs[:8]})" if subdirs else ""
        raise ValueError(
            f"calibration data: no {'/'.join(SUPPORTED_SUFFIXES)} files directly in directory {path}{hint}"
        )
    return files


def _read_file(path: Path, text_key: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, text_key)
    if suffix == ".jsonl":
        return _read_jsonl(path, text_key)
    return _read_txt(path)


def _read_parquet(path: Path, text_key: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # optional dependency
        raise ImportError(f"reading {path} needs pyarrow: pip install 'quantrl[data]'") from e
    columns = pq.read_schema(path).names
    if text_key not in columns:
        raise ValueError(f"calibration data: {path} has no column {text_key!r}; columns present: {columns}")
    values = pq.read_table(path, columns=[text_key]).column(text_key).to_pylist()
    return [v for v in values if isinstance(v, str)]


def _read_jsonl(path: Path, text_key: str) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"calibration data: {path}:{lineno} is not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or text_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"calibration data: {path}:{lineno} has no field {text_key!r} (found {keys})")
            value = record[text_key]
            if not isinstance(value, str):
                raise ValueError(
                    f"calibration data: {path}:{lineno} field {text_key!r} is {type(value).__name__}, not a string"
                )
            texts.append(value)
    return texts


def _read_txt(path: Path) -> list[str]:
    # Paragraphs: split on lines that are empty or whitespace only.
    return [p.strip() for p in re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8-sig"))]


def _token_stream(texts: Sequence[str], tokenizer: Any) -> list[int]:
    """All texts tokenized without special tokens and concatenated (joined by ``_TEXT_SEPARATOR``)."""
    joined = [t + _TEXT_SEPARATOR for t in texts[:-1]] + [texts[-1]]
    ids: list[int] = []
    for start in range(0, len(joined), _TOKENIZE_CHUNK):
        for row in tokenizer(joined[start : start + _TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
    return ids


def _window_offsets(num_tokens: int, length: int, num_samples: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    slots = num_tokens // length
    if slots >= num_samples:
        # Shift the grid of whole windows by a random amount so the tail is not always excluded.
        shift = rng.randint(0, num_tokens - slots * length)
        return [shift + i * length for i in rng.sample(range(slots), num_samples)]
    warnings.warn(
        f"calibration data: {num_tokens} tokens hold only {slots} non-overlapping windows of {length}; "
        f"sampling {num_samples} windows with overlap",
        stacklevel=3,
    )
    return [rng.randint(0, num_tokens - length) for _ in range(num_samples)]


def build_calibration_batches(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    num_samples: int = 256,
    max_sequence_length: int = 2048,
    seed: int = 0,
) -> list[torch.LongTensor]:
    """``num_samples`` token windows ``[1, max_sequence_length]`` (int64) from the concatenated texts.

    Deterministic for a given seed, texts and tokenizer. Raises ``ValueError`` when the texts do not
    hold even one window of ``max_sequence_length`` tokens.
    """
    if num_samples <= 0:
        raise ValueError(f"build_calibration_batches: num_samples must be positive, got {num_samples}")
    if max_sequence_length <= 0:
        raise ValueError(f"build_calibration_batches: max_sequence_length must be positive, got {max_sequence_length}")
    if isinstance(texts, str) or not texts:
        raise ValueError("build_calibration_batches: expected a non-empty list of texts")
    ids = _token_stream(texts, tokenizer)
    if len(ids) < max_sequence_length:
        raise ValueError(
            f"calibration data too short: found {len(ids)} tokens in {len(texts)} texts, need at least "
            f"{max_sequence_length} (max_sequence_length) for one sample; add more text or lower "
            f"--max-sequence-length"
        )
    stream = torch.tensor(ids, dtype=torch.long)  # [T]
    offsets = _window_offsets(len(ids), max_sequence_length, num_samples, seed)
    return [stream[o : o + max_sequence_length].unsqueeze(0).clone() for o in offsets]  # each [1, L]


_NOUNS = ("apples", "coins", "books", "marbles", "stones", "tickets", "cards", "boxes")
_NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi")


def _sentence(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    kind = rng.randrange(6)
    if kind == 0:
        return f"The sum of {a} and {b} is {a + b}."
    if kind == 1:
        return f"The product of {a} and {b} is {a * b}, which is {'even' if a * b % 2 == 0 else 'odd'}."
    if kind == 2:
        hi, lo = max(a, b), min(a, b)
        return f"The difference between {hi} and {lo} is {hi - lo}."
    if kind == 3:
        name, other, noun = rng.choice(_NAMES), rng.choice(_NAMES), rng.choice(_NOUNS)
        return f"{name} has {a} {noun} and gives {min(a, b)} of them to {other}, keeping {a - min(a, b)}."
    if kind == 4:
        return f"When {a} is divided by {b}, the quotient is {a // b} and the remainder is {a % b}."
    return f"Twice {a} is {2 * a}, and half of {2 * b} is {b}."


def default_calibration_texts(num_texts: int = 256, *, seed: int = 0) -> list[str]:
    """A small deterministic corpus of templated arithmetic prose, for demos and tests (no downloads).

    Each text is a paragraph of 4-10 sentences; the default 256 paragraphs are about 80k characters.
    Real calibration should use text like the model's training data (e.g. wikitext-2).
    """
    if num_texts <= 0:
        raise ValueError(f"default_calibration_texts: num_texts must be positive, got {num_texts}")
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(4, 10))) for _ in range(num_texts)]


CALIB_BATCH = 8  # windows per calibration batch: one decoder-layer call per 8 windows, not per window


@dataclass(frozen=True)
class GptqCalibrationOptions:
    """The GPTQ options every weight converter shares (INT4/INT8, NVFP4)."""

    data_dir: str | None = None
    "calibration texts: wikitext-style parquet (text column), .txt or .jsonl; 'synthetic' for built-in text"
    num_calibration_samples: int = 256
    "calibration windows"
    max_sequence_length: int = 2048
    "tokens per calibration window"
    dampening_frac: float = 0.01
    "GPTQ: fraction of mean(diag H) added to the Hessian diagonal"
    act_order: bool = False
    "GPTQ: process columns by decreasing Hessian diagonal (groups stay static)"
    seed: int = 0
    "calibration window sampling seed"


def gptq_calibration_batches(model_dir: str | Path, opts: GptqCalibrationOptions) -> list[torch.Tensor]:
    """The converters' GPTQ calibration: texts from ``opts.data_dir`` (or ``"synthetic"``: the built-in
    text), tokenized with the model's own tokenizer, cut into windows, stacked into ``[B, L]`` batches.
    Every failure is a ``CheckpointError`` naming what to pass instead."""
    from quantrl.checkpoint.safetensors_io import CheckpointError

    data_dir = opts.data_dir

    if not data_dir:
        raise CheckpointError(
            "GPTQ needs calibration text: pass --data-dir (wikitext-style parquet, .txt or .jsonl), "
            "--data-dir synthetic for the built-in text, or --method rtn"
        )
    texts = default_calibration_texts() if data_dir == "synthetic" else load_calibration_texts(data_dir)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer needed to tokenize calibration text ({e})") from None
    if not tokenizer(texts[0], add_special_tokens=False)["input_ids"]:
        # transformers builds an empty tokenizer for some model types when the dir has no tokenizer files
        raise CheckpointError(f"{model_dir}: the tokenizer loaded from it turns text into no tokens (are its tokenizer files missing?)")
    try:
        windows = build_calibration_batches(texts, tokenizer, num_samples=opts.num_calibration_samples,
                                            max_sequence_length=opts.max_sequence_length, seed=opts.seed)  # fmt: skip
    except ValueError as e:  # e.g. too short: name the data the user passed
        raise CheckpointError(f"{data_dir}: {e}") from None
    # equal-length [1, L] windows -> [B, L] batches
    return [torch.cat(windows[i : i + CALIB_BATCH]) for i in range(0, len(windows), CALIB_BATCH)]
