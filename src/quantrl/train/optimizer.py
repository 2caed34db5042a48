"""AdamW on fp32 master weights for a model that computes in bf16.

The model keeps bf16 parameters (what the forward, QAT fake quant, FP8 quantization and weight sync read);
the optimizer keeps an fp32 master copy of each and fp32 Adam states. A step copies the bf16 gradients
into the masters, steps them, and writes the masters back rounded to bf16. Small updates that bf16 cannot
represent accumulate in the master instead of being lost. fp32 parameters are their own masters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

NO_DECAY_HINTS = ("norm", "bias", "embed")


class MasterAdamW:
    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        decay, no_decay = [], []
        for name, p in named_params:
            if not p.requires_grad:
                continue
            master = p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
            self.names.append(name)
            self.params.append(p)
            self.masters.append(master)
            (no_decay if p.ndim < 2 or any(h in name for h in NO_DECAY_HINTS) else decay).append(master)
        if not self.params:
            raise ValueError("MasterAdamW: no trainable parameters")
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, foreach=False)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = None
            m.grad = None

    def grad_norm_and_clip(self, max_norm: float | None) -> float:
        """Global L2 norm of the model gradients (fp32), clipped in place to ``max_norm`` if given."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if not torch.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {float(norm)}; refusing to step")
        if max_norm is not None and max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return float(norm)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            if p is not m:
                m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        for p, m in zip(self.params, self.masters):
            if p is not m:
                p.copy_(m)  # round-to-nearest-even into the model dtype; bumps p._version (QAT/FP8 caches follow)

    def state_dict(self) -> dict:
        return {"names": self.names, "masters": [m.detach().clone() for m in self.masters], "opt": self.opt.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError("MasterAdamW.load_state_dict: parameter names differ from this model's")
        for p, m, saved in zip(self.params, self.masters, state["masters"]):
            m.copy_(saved)
            if p is not m:
                p.copy_(m)
        self.opt.load_state_dict(state["opt"])
