"""Prompt data for RL: JSONL / parquet rows -> ``Prompt`` records, a resumable shuffled stream, a held-out split.

Rows are read with slime's ``--input-key`` / ``--label-key`` (defaults ``prompt`` / ``label``; a dotted key
such as verl's ``reward_model.ground_truth`` reads a nested field). The input is
a string, or a list of chat messages (``[{"role": ..., "content": ...}]``); with ``apply_chat_template`` a
string becomes one user message and the tokenizer's template renders the text with the generation prompt.
Templated text already holds the template's special tokens (BOS etc.): encode it with
``add_special_tokens=False`` (``encode_prompt`` does the right thing for each record).

``PromptDataset`` hands out batches in epoch order: epoch ``e`` is a permutation seeded by ``(seed, e)``
alone, and the position is ``(epoch, cursor)``. ``state_dict()`` saves exactly that (plus a fingerprint of
the data), so a run restored with ``load_state_dict`` draws the same prompts in the same order as one that
never stopped. A batch that runs past the end of an epoch continues into the next epoch's order (as slime's
data source does), so every batch is full and no prompt is skipped.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARQUET_SUFFIXES = (".parquet", ".pq")


class DataError(ValueError):
    """Bad prompt data; the message names the file, the row and what was expected."""


@dataclass(frozen=True)
class Prompt:
    text: str
    "what the rollout engine is given: the raw input, or the chat-template rendering of it"
    label: str | None
    "the reference answer (label_key), as a string; None when no label_key is used"
    index: int
    "row number in the source file (0-based), stable across shuffles and splits"
    templated: bool = False
    "text came from a chat template and already holds its special tokens"
    metadata: dict[str, Any] | None = None
    "other columns of the row, when asked for (metadata_keys)"


@dataclass(frozen=True)
class DataConfig:
    prompt_data: str = ""
    "JSONL (.jsonl/.json, one object a line) or parquet file of training prompts (slime --prompt-data)"
    input_key: str = "prompt"
    "column holding the prompt text or chat messages (slime --input-key)"
    label_key: str | None = "label"
    "column holding the reference answer (slime --label-key); None: no labels"
    apply_chat_template: bool = False
    "render prompts with the tokenizer's chat template, generation prompt added (slime --apply-chat-template)"
    shuffle: bool = True
    "shuffle prompts each epoch (slime --rollout-shuffle)"
    seed: int = 0
    "seed of the epoch permutations and of the held-out split (slime --rollout-seed)"
    eval_data: str | None = None
    "separate held-out file (slime --eval-prompt-data); None: split eval_size rows off prompt_data"
    eval_size: float = 0.0
    "held-out rows taken from prompt_data when eval_data is None: a count (>= 1) or a fraction (< 1)"
    metadata_keys: tuple[str, ...] = ()
    "columns kept with each prompt (Prompt.metadata), e.g. for a custom reward function"


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, row) pairs; the location ("line 3", "row 2") is what errors quote."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'quantrl[data]')") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own types for a corrupt file
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"row {i}", row
        return
    with path.open(encoding="utf-8-sig") as f:  # -sig: a byte-order mark, as some editors write, is skipped
        first = f.read(1 << 16).lstrip()[:1]
        f.seek(0)
        if first == "[":  # a .json file holding one array of objects
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON ({e})") from None
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise DataError(f"{path}: item {i} is a {type(row).__name__}, expected an object")
                yield f"item {i}", row
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno} is a JSON {type(row).__name__}, expected an object")
            yield f"line {lineno}", row


def _lookup(row: dict, key: str, where: str) -> Any:
    """``row[key]``, or for a dotted key absent as such a nested field (verl's ``reward_model.ground_truth``)."""
    if key in row:
        return row[key]
    value: Any = row
    for i, part in enumerate(parts := key.split(".")):
        if not isinstance(value, dict) or part not in value:
            at = "" if i == 0 else f" (no {part!r} in {'.'.join(parts[:i])!r})"
            raise DataError(f"{where} has no key {key!r}{at}; its keys are {sorted(row)}")
        value = value[part]
    return value


def _as_messages(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    raise DataError(f"{where}: input must be a string or a list of {{role, content}} messages, got {value!r:.80}")


def load_prompts(
    path: str | Path,
    input_key: str = "prompt",
    label_key: str | None = "label",
    *,
    tokenizer: Any = None,
    apply_chat_template: bool = False,
    metadata_keys: Sequence[str] = (),
) -> list[Prompt]:
    """Every row of a JSONL / JSON-array / parquet file as a ``Prompt`` (see the module note)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found" + (" (it is a directory)" if path.is_dir() else ""))
    if apply_chat_template and tokenizer is None:
        raise DataError(f"{path}: apply_chat_template needs a tokenizer")
    if apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}: apply_chat_template is set but the tokenizer has no chat template")
    out: list[Prompt] = []
    for i, (loc, row) in enumerate(_rows(path)):
        where = f"{path}: {loc}"
        value = _lookup(row, input_key, where)
        label = None if label_key is None else _lookup(row, label_key, where)
        meta = {k: _lookup(row, k, where) for k in metadata_keys} or None
        if label_key is not None and label is None:
            raise DataError(f"{where}: {label_key!r} is null; every prompt needs its reference answer")
        if apply_chat_template:
            text = tokenizer.apply_chat_template(
                _as_messages(value, where), add_generation_prompt=True, tokenize=False
            )
        elif isinstance(value, str):
            text = value
        else:
            kind = type(value).__name__
            raise DataError(f"{where}: {input_key!r} is a {kind}; chat messages need apply_chat_template")
        if label is not None and not isinstance(label, str):
            label = json.dumps(label) if isinstance(label, (dict, list)) else str(label)
        out.append(Prompt(text, label, i, apply_chat_template, meta))
    if not out:
        raise DataError(f"{path}: no prompts (the file has no rows)")
    return out


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: special tokens added by the tokenizer unless a chat template already did."""
    return list(tokenizer(prompt.text, add_special_tokens=not prompt.templated)["input_ids"])


def train_eval_split(prompts: Sequence[Prompt], eval_size: float, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): ``eval_size`` rows (a count >= 1, or a fraction < 1) chosen by ``seed``; both keep
    file order, so the held-out set is the same whatever the training order."""
    if eval_size < 0 or (eval_size >= 1 and eval_size != int(eval_size)):
        raise DataError(f"eval_size must be a count >= 1 or a fraction in [0, 1), got {eval_size}")
    n = len(prompts)
    k = int(eval_size) if eval_size >= 1 else round(eval_size * n)
    if k >= n:
        raise DataError(f"eval_size {eval_size} leaves no training prompts out of {n}")
    held = set(random.Random(f"quantrl-holdout:{seed}").sample(range(n), k))
    return [p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held]


def _fingerprint(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.text, p.label]).encode())
    return h.hexdigest()[:16]


class PromptDataset:
    """Prompts in per-epoch seeded order with a saveable position (see the module note)."""

    def __init__(self, prompts: Sequence[Prompt], *, seed: int = 0, shuffle: bool = True):
        if not prompts:
            raise DataError("PromptDataset: no prompts")
        self.prompts = list(prompts)
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, []
        self._fp: str | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    def epoch_order(self, epoch: int) -> list[int]:
        """Positions of ``self.prompts`` in the order epoch ``epoch`` visits them (a function of seed, epoch)."""
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(f"quantrl-prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def _current_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        return self._order

    def next_batch(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts, crossing into the next epoch's order when this one runs out."""
        if n <= 0:
            raise ValueError(f"next_batch: n must be positive, got {n}")
        out = []
        while len(out) < n:
            order = self._current_order()
            take = min(n - len(out), len(order) - self.cursor)
            out.extend(self.prompts[j] for j in order[self.cursor : self.cursor + take])
            self.cursor += take
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    @property
    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = _fingerprint(self.prompts)
        return self._fp

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable position: restore it into a dataset built from the same data and seed."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "shuffle": self.shuffle,
                "num_prompts": len(self.prompts), "fingerprint": self.fingerprint}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses data or a seed that would give a different order."""
        for key, mine in (("num_prompts", len(self.prompts)), ("seed", self.seed), ("shuffle", self.shuffle),
                          ("fingerprint", self.fingerprint)):  # fmt: skip
            if state.get(key) != mine:
                raise DataError(
                    f"PromptDataset.load_state_dict: saved {key}={state.get(key)!r} but this dataset has {mine!r}: "
                    "resuming would not see the same data order"
                )
        if not (0 <= state["cursor"] < len(self.prompts)) or state["epoch"] < 0:
            pos = f"epoch={state['epoch']} cursor={state['cursor']}"
            raise DataError(f"PromptDataset.load_state_dict: bad position {pos}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def load_data(cfg: DataConfig, tokenizer: Any = None) -> tuple[PromptDataset, list[Prompt]]:
    """The training stream and the held-out prompts (empty when neither eval_data nor eval_size is set)."""
    if not cfg.prompt_data:
        raise DataError("DataConfig.prompt_data is empty: give a JSONL or parquet file of prompts")
    kw = dict(input_key=cfg.input_key, label_key=cfg.label_key, tokenizer=tokenizer,
              apply_chat_template=cfg.apply_chat_template, metadata_keys=cfg.metadata_keys)  # fmt: skip
    train = load_prompts(cfg.prompt_data, **kw)
    if cfg.eval_data:
        held = load_prompts(cfg.eval_data, **kw)
    elif cfg.eval_size:
        train, held = train_eval_split(train, cfg.eval_size, cfg.seed)
    else:
        held = []
    return PromptDataset(train, seed=cfg.seed, shuffle=cfg.shuffle), held
