"""Streaming safetensors IO with bounded memory.

A safetensors file is ``u64 little-endian header length | JSON header | raw little-endian data``; the
header maps each tensor name to ``{dtype, shape, data_offsets: [begin, end]}`` relative to the data start.

Reading: we parse the header ourselves (so a corrupt file is an error naming the file, not a panic) and
``readinto`` one tensor at a time into a fresh buffer: resident memory is the tensors the caller holds,
never a whole shard.

Writing: a converter knows every output tensor's name, dtype and shape before computing any of them
(they follow from the input headers), so the writer lays out each shard up front, writes its header, and
each tensor is written with ``os.pwrite`` at its final offset the moment it is ready, from any thread.
Nothing is buffered beyond the tensor being written.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed or not what the operation expects."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {hlen} header bytes, file has {size})")
            header = json.loads(f.read(hlen))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r} ({e!r})") from None
        if end - begin != _nbytes(dtype, shape) or begin < 0 or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({meta['dtype']} {list(shape)}) has data offsets [{begin}, {end}] "
                f"that do not fit its size or the file ({size - data_start} data bytes)"
            )
        out[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    return out


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into fresh memory (CPU)."""
    t = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes:
        buf = memoryview(t.view(-1).view(torch.uint8).numpy())
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(buf)
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: tensor {info.name!r} truncated ({got} of {info.nbytes} bytes)")
    return t


class SafetensorsDir:
    """All tensors of a HF model directory (``model.safetensors`` or a sharded index), read lazily."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        index = self.dir / INDEX_NAME
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).exists()]
            if missing:
                raise CheckpointError(f"{index}: lists shard(s) that do not exist: {missing}")
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = {}
            if not files:
                extra = " (found PyTorch .bin weights: convert them to safetensors first)" if any(self.dir.glob("*.bin")) else ""
                raise CheckpointError(f"{self.dir}: no *.safetensors weights{extra}")
        self.infos: dict[str, TensorInfo] = {}
        for fname in files:
            for name, info in read_header(self.dir / fname).items():
                if name in self.infos:
                    raise CheckpointError(f"{self.dir}: tensor {name!r} appears in both {self.infos[name].file.name} and {fname}")
                self.infos[name] = info
        for name, fname in weight_map.items():
            if name not in self.infos:
                raise CheckpointError(f"{index}: tensor {name!r} is mapped to {fname} but not stored there")

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.infos:
            raise CheckpointError(f"{self.dir}: no tensor named {name!r}")
        return read_tensor(self.infos[name])

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())


@dataclass(frozen=True)
class TensorSpec:
    """What the writer will be given for one name: planned before any data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)


class ShardedWriter:
    """Write a planned set of tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards + index.

    Tensors may be written in any order from several threads; ``close()`` fails if any is missing,
    so an incomplete checkpoint can never be finished by accident.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        specs: Iterable[TensorSpec],
        max_shard_bytes: int = 5 * 1024**3,
        metadata: dict[str, str] | None = None,
    ):
        self.dir = Path(out_dir)
        specs = list(specs)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate output tensor names: {dup[:5]}")
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            if shards[-1] and size + s.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += s.nbytes
        n = len(shards)
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (fd, offset, spec)
        self._fds: list[int] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = sum(s.nbytes for s in specs)
        for i, shard in enumerate(shards):
            fname = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
            offsets = []
            pos = 0
            for s in shard:
                header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
                offsets.append(pos)
                pos += s.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * ((-len(blob)) % 8)  # data start aligned to 8 bytes
            fd = os.open(self.dir / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.write(fd, struct.pack("<Q", len(blob)) + blob)
            data_start = 8 + len(blob)
            os.ftruncate(fd, data_start + pos)
            for s, off in zip(shard, offsets):
                self._where[s.name] = (fd, data_start + off, s)
                self.weight_map[s.name] = fname
        self._pending = set(self._where)
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} was not planned for this checkpoint")
        fd, offset, spec = self._where[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r}: planned {spec.dtype} {list(spec.shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
        with self._lock:
            if name not in self._pending:
                raise ValueError(f"tensor {name!r} written twice")
            self._pending.discard(name)
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)

    def close(self) -> None:
        """Flush, check completeness and write the index (for more than one shard)."""
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if self._pending:
            missing = sorted(self._pending)
            raise CheckpointError(f"{self.dir}: {len(missing)} planned tensor(s) never written, e.g. {missing[:3]}")
        if len(set(self.weight_map.values())) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
