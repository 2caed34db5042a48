"""Crash-safe output directories: build beside the target, rename into place only when complete."""

from __future__ import annotations

import os
import shutil
import uuid
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
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
    os.rename(tmp, out)
    if trash is not None:
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:  # --overwrite of a plain file: rmtree would fail (silently) and leave it behind
            trash.unlink(missing_ok=True)


def copy_aux_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy tokenizer / generation / template files (everything but weights and rewritten configs)."""
    copied = []
    for p in sorted(Path(src_dir).iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in REWRITTEN and not p.name.startswith("."):
            shutil.copy2(p, Path(dst_dir) / p.name)
            copied.append(p.name)
    return copied
