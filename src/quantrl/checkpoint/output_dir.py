"""Crash-safe output directories: build beside the target, rename into place only when complete."""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantrl.checkpoint.safetensors_io import CheckpointError

# Files a converter re-creates itself; everything else small in a model dir (tokenizer, generation config,
# chat template, custom code) is copied as it is.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
REWRITTEN = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, input_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``; on success it becomes ``out_dir`` in one rename.

    On any exception (or a kill) ``out_dir`` is untouched: the hidden ``.NAME.tmp-*`` directory is all
    that is left, and it is removed on a clean failure.
    """
    out = Path(out_dir).resolve()
    if input_dir is not None and Path(input_dir).resolve() == out:
        raise CheckpointError(f"output directory {out} is the input directory; choose another")
    if input_dir is not None and out in Path(input_dir).resolve().parents:
        raise CheckpointError(
            f"input directory {Path(input_dir).resolve()} is inside output directory {out}; replacing {out} would delete it"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.parent.glob(f".{out.name}.tmp-*"))
    if stale:  # a conversion that was killed (a clean failure removes its own)
        warnings.warn(f"{len(stale)} unfinished output(s) of an earlier, killed conversion next to {out}: "
                      f"{[p.name for p in stale]}; delete them to free the space", stacklevel=3)  # fmt: skip
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)  # on disk before the rename makes it look complete (a power loss keeps either)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    if trash is not None:
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:  # --overwrite of a plain file: rmtree would fail (silently) and leave it behind
            trash.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse to fsync a directory; the files themselves are synced
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def copy_aux_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy tokenizer / generation / template files (everything but weights and rewritten configs)."""
    copied = []
    for p in sorted(Path(src_dir).iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in REWRITTEN and not p.name.startswith("."):
            shutil.copy2(p, Path(dst_dir) / p.name)
            copied.append(p.name)
    return copied
