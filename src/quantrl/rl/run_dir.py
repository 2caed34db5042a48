"""A run directory: config, per-step metrics (JSONL), checkpoints that survive crashes.

    RUN/config.json                 the RLConfig the run started with
    RUN/metrics.jsonl               one JSON object per step
    RUN/checkpoints/step_000010/    BF16 HF checkpoint + trainer_state.pt (optimizer, data cursor, step)
    RUN/checkpoints/latest          name of the newest complete checkpoint

A checkpoint directory is built beside its final name and renamed into place, and ``latest`` is replaced
atomically after that, so a crash at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt_root = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"

    def check_usable(self, resume: bool) -> None:
        if self.path.exists() and any(self.path.iterdir()) and not resume:
            raise FileExistsError(f"run directory {self.path} is not empty: pass --resume to continue it, or choose another")

    def prepare(self, config: dict, resume: bool) -> None:
        self.check_usable(resume)
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        if not resume or self.latest_checkpoint() is None:  # a resume before the first checkpoint starts over
            (self.path / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
            self.metrics_path.unlink(missing_ok=True)

    def checkpoint_dir(self, step: int) -> Path:
        return self.ckpt_root / f"step_{step:06d}"

    def latest_checkpoint(self) -> Path | None:
        ptr = self.ckpt_root / "latest"
        if not ptr.exists():
            return None
        path = self.ckpt_root / ptr.read_text().strip()
        return path if (path / "trainer_state.pt").exists() else None

    def mark_latest(self, ckpt: Path) -> None:
        tmp = self.ckpt_root / ".latest.tmp"
        tmp.write_text(ckpt.name + "\n")
        os.replace(tmp, self.ckpt_root / "latest")

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, last_step: int) -> None:
        """Drop rows after ``last_step`` (written after the checkpoint a resume restarts from)."""
        if not self.metrics_path.exists():
            return
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if r["step"] <= last_step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.metrics_path)

    def metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
