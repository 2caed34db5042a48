"""Trainer core: training mode (BF16 / FP8 blockwise / INT4 QAT), micro-batches with (fp32) gradient
accumulation, token-level loss normalization, clipping, fp32-master AdamW, BF16 HF checkpoints; data-parallel
replicas, with the optimizer state optionally sharded over them (``quantrl.train.data_parallel``).

Training never stores FP8 or INT4 weights: checkpoints hold the bf16 model parameters (the masters'
rounding), and quantized formats are derived from them at weight sync or conversion.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantrl.checkpoint.output_dir import atomic_output_dir, copy_aux_files
from quantrl.checkpoint.safetensors_io import ShardedWriter, TensorSpec
from quantrl.model.moe import KEEP_FP32
from quantrl.train.data_parallel import DEFAULT_BUCKET_ELEMS, broadcast_from_owners, comm_device, sum_gradients
from quantrl.train.fp8_linear import prepare_fp8_training
from quantrl.train.optimizer import MasterAdamW
from quantrl.train.qat import QATConfig, prepare_qat

MODES = ("bf16", "fp8", "int4-qat", "nvfp4-qat", "mxfp8-qat")
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "bf16"
    "bf16 | fp8 (blockwise FP8 GEMMs) | int4-qat (fake-quantized INT4 forward, STE) | nvfp4-qat | mxfp8-qat (W8A8)"
    lr: float = 1e-6
    "AdamW learning rate"
    betas: tuple[float, float] = (0.9, 0.98)
    "AdamW betas"
    eps: float = 1e-8
    "AdamW epsilon"
    weight_decay: float = 0.0
    "decoupled weight decay (not on norms, biases, embeddings)"
    grad_clip: float = 1.0
    "global gradient-norm clip (0: off)"
    micro_batch_size: int = 8
    "sequences per forward/backward; gradients accumulate over the batch"
    qat_group_size: int = 128
    "int4-qat: group size (OPEN_TRAINING_INT4_GROUP_SIZE)"
    qat_qmax: int = 7
    "int4-qat: 7 (absmax/7, [-7, 7]) or 8 (absmax/7.5, [-8, 7])"
    fp8_format: str = "e4m3"
    "fp8: element format (--fp8-format); e4m3 only"
    fp8_recipe: str = "blockwise"
    "fp8: scaling recipe (--fp8-recipe); blockwise only (1x128 activations, 128x128 weights)"
    fp8_param_gather: bool = False
    "fp8: keep the FP8 copy of each weight for the whole step (reused by micro-batches and sync)"
    optimizer_cpu_offload: bool = False
    "fp32 masters and Adam moments in CPU memory, step on the CPU (12 B/param off the GPU)"
    distributed_optimizer: bool = False
    "with data-parallel replicas: each steps (and keeps the masters and moments of) ~1/N of the parameters"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"training mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "fp8" and (self.fp8_format, self.fp8_recipe) != ("e4m3", "blockwise"):
            raise ValueError(f"FP8 training supports --fp8-format e4m3 --fp8-recipe blockwise, got {self.fp8_format} {self.fp8_recipe}")
        if self.micro_batch_size <= 0:
            raise ValueError("micro_batch_size must be positive")


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig = TrainConfig(), dp_group=None):
        """``dp_group``: a ``torch.distributed`` group of data-parallel replicas (None: this process alone).
        Each replica gets its own rows of every batch; gradients, token counts and metric sums are summed
        over the group, so every replica takes the same step as one trainer given the whole batch."""
        self.model, self.cfg, self.dp_group = model, cfg, dp_group
        # the distributed optimizer shards over the replicas; with one there is nothing to shard
        self.sharded = cfg.distributed_optimizer and dp_group is not None
        dtype = next(model.parameters()).dtype
        if cfg.mode == "int4-qat":
            self.swapped = prepare_qat(model, QATConfig(group_size=cfg.qat_group_size, qmax=cfg.qat_qmax, dtype=dtype))
        elif cfg.mode in ("nvfp4-qat", "mxfp8-qat"):
            self.swapped = prepare_qat(model, QATConfig(fmt=cfg.mode.removesuffix("-qat"), dtype=dtype))
        elif cfg.mode == "fp8":
            self.swapped = prepare_fp8_training(model, cfg.fp8_param_gather)
        else:
            self.swapped = []
        self.optimizer = MasterAdamW(model.named_parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, offload=cfg.optimizer_cpu_offload,
                                     shard=self._shard())  # fmt: skip
        self.step_count = 0
        self.bucket_elems = DEFAULT_BUCKET_ELEMS  # elements per gradient / weight collective

    def train_step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over ``batch`` (tensors with the batch on dim 0, incl. ``loss_mask``).

        ``loss_fn(model, micro_batch)`` returns the *sum* of its per-token losses and metrics; the sum over
        all micro-batches is divided by the batch's total ``loss_mask`` tokens (token-level aggregation),
        so the result does not depend on how the batch is split.
        """
        if "loss_mask" not in batch:
            raise KeyError("train_step: batch needs a 'loss_mask' [B, T] marking the tokens that carry loss")
        n = batch["loss_mask"].shape[0]
        total_tokens = self.dp_sum([float(batch["loss_mask"].sum())])[0]
        if total_tokens <= 0:
            raise ValueError("train_step: loss_mask selects no tokens")
        self.model.train()
        loss_total = 0.0
        sums: dict[str, float] = {}
        try:
            with self.optimizer.accumulating():  # micro-batch gradients summed in fp32
                for i in range(0, n, self.cfg.micro_batch_size):
                    micro = {k: v[i : i + self.cfg.micro_batch_size] for k, v in batch.items()}
                    loss_sum, metrics = loss_fn(self.model, micro)
                    (loss_sum / total_tokens).backward()
                    loss_total += float(loss_sum.detach())
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
            if self.dp_group is not None:
                sum_gradients(self.optimizer, self.dp_group, to_owners=self.sharded, bucket_elems=self.bucket_elems)
                keys = sorted(sums)
                loss_total, *vals = self.dp_sum([loss_total] + [sums[k] for k in keys])
                sums = dict(zip(keys, vals))
            grad_norm = self.optimizer.grad_norm_and_clip(self.cfg.grad_clip or None,
                                                          group=self.dp_group if self.sharded else None)  # fmt: skip
            self.optimizer.step()
            if self.sharded:  # every replica needs every stepped weight; each was stepped by its owner only
                broadcast_from_owners(self.optimizer, self.dp_group, bucket_elems=self.bucket_elems)
        finally:  # a step that fails (a NaN gradient norm, an OOM in a micro-batch) leaves no gradient behind
            self.optimizer.zero_grad()
        self.step_count += 1
        return {"loss": loss_total / total_tokens, "grad_norm": grad_norm, "lr": self.optimizer.lr, **sums}

    def _shard(self) -> tuple[int, int] | None:
        if not self.sharded:
            return None
        import torch.distributed as dist

        return dist.get_rank(self.dp_group), dist.get_world_size(self.dp_group)

    def dp_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the data-parallel replicas (float64; a collective every replica calls)."""
        if self.dp_group is None:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=comm_device(self.dp_group))
        dist.all_reduce(t, group=self.dp_group)
        return t.tolist()

    def bf16_state(self) -> dict[str, torch.Tensor]:
        """HF-named parameters in bf16 (those the model keeps in fp32, DeepSeek-V3's router, in fp32), tied
        weights once (as HF saves them)."""
        out = {}
        for name, p in self.model.named_parameters():  # named_parameters() already drops tied duplicates
            out[name] = p.detach().to(torch.float32 if getattr(p, KEEP_FP32, False) else torch.bfloat16)
        return out

    def save_checkpoint(self, out_dir: str | Path, source_dir: str | Path, *, overwrite: bool = True) -> Path:
        """A BF16 HF checkpoint (config, tokenizer files from ``source_dir``), written atomically; FP8
        KV-cache scales the model was loaded with (``k_scale`` / ``v_scale``) are kept."""
        state = {**self.bf16_state(), **{n: t.detach().clone() for n, t in self.model.kv_scale_tensors().items()}}
        config = json.loads((Path(source_dir) / "config.json").read_text())
        config.pop("quantization_config", None)
        config.pop("quantrl_quantization", None)
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
            config[key] = "bfloat16"
        with atomic_output_dir(out_dir, input_dir=source_dir, overwrite=overwrite) as tmp:
            writer = ShardedWriter(tmp, [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items()])
            for n, t in state.items():
                writer.write(n, t)
            writer.close()
            copy_aux_files(source_dir, tmp)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return Path(out_dir)
