"""AdamW on fp32 master weights for a model that computes in bf16.

The model keeps bf16 parameters (what the forward, QAT fake quant, FP8 quantization and weight sync read);
the optimizer keeps an fp32 master copy of each and fp32 Adam states. A step steps the masters and writes
them back rounded to bf16. Small updates that bf16 cannot represent accumulate in the master instead of
being lost. fp32 parameters are their own masters (unless offloaded). A parameter written in place
through itself since the last step (``model.load_state_dict`` or ``p.copy_`` after the optimizer was
built: its ``_version`` moved) replaces its master before the next step; writes through ``p.data`` bypass
the version counter and are overwritten by the master.

Gradients are fp32, on the parameters' device: inside ``accumulating()`` each backward's bf16 gradient is
added to an fp32 accumulator and freed at once (Megatron's fp32 ``main_grad``), so a step over many
micro-batches sums them in fp32; summed in bf16, each of n additions rounds to 8 bits and the error grows
with n. FP8 training's wgrad hands its fp32 output over directly (``FP32_GRAD_SINK``), with no bf16 step
at all. A gradient left on a parameter outside that context (``p.grad = ...``) is moved over at the step.
The norm, the clipping and the data-parallel all-reduce work on these fp32 gradients.

CPU offload (``offload=True``, Megatron/slime's ``--optimizer-cpu-offload``): masters and both Adam
moments live in CPU memory and the step runs on the CPU, so the GPU holds only the bf16 parameters and
the fp32 gradients: 6 B/param instead of 18. Each step copies the gradients into pinned host buffers
(4 B/param, allocated once) and the stepped weights back in the parameters' dtype. The update is the
same arithmetic as on the device; on a CPU-only machine offloaded and resident optimizers give the same
bits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
from torch import nn

NO_DECAY_HINTS = ("norm", "bias", "embed")
# Set on each parameter while the optimizer accumulates (``accumulating``): a callable adding an fp32 gradient
# to its accumulator, for backwards that have one (FP8 training's wgrad GEMM; Megatron's gradient-accumulation
# fusion), so it is never rounded to bf16 on the way.
FP32_GRAD_SINK = "_quantrl_fp32_grad_sink"


class MasterAdamW:
    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        offload: bool = False,
    ):
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        self.offload = offload
        pin = offload and torch.cuda.is_available()
        decay, no_decay = [], []
        for name, p in named_params:
            if not p.requires_grad:
                continue
            if offload:
                master = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin)
                master.copy_(p.detach()).requires_grad_(True)
            elif p.dtype == torch.float32:
                master = p
            else:
                master = p.detach().float().clone().requires_grad_(True)
            self.names.append(name)
            self.params.append(p)
            self.masters.append(master)
            (no_decay if p.ndim < 2 or any(h in name for h in NO_DECAY_HINTS) else decay).append(master)
        if not self.params:
            raise ValueError("MasterAdamW: no trainable parameters")
        # fp32 gradients on the parameters' devices (a parameter that is its own master keeps its .grad)
        self._grads: list[torch.Tensor | None] = [None] * len(self.params)
        self._host_grads: list[torch.Tensor | None] = [None] * len(self.params)  # offload: pinned, reused
        self._versions = [p._version for p in self.params]  # what each master was last synced at
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, foreach=False)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def zero_grad(self) -> None:
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            p.grad = None
            m.grad = None
            self._grads[i] = None

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Backward passes inside add each gradient to its fp32 accumulator (and free it). A layer whose
        backward has an fp32 weight gradient (FP8 training's wgrad GEMM) hands it over unrounded through
        the parameter's ``FP32_GRAD_SINK`` attribute, set only inside."""
        own = [i for i, (p, m) in enumerate(zip(self.params, self.masters)) if p is not m]
        handles = [self.params[i].register_post_accumulate_grad_hook(self._mover(i)) for i in own]
        for i in own:
            setattr(self.params[i], FP32_GRAD_SINK, functools.partial(self._add, i))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for i in own:
                delattr(self.params[i], FP32_GRAD_SINK)

    @torch.no_grad()
    def _add(self, i: int, g: torch.Tensor) -> None:
        if self._grads[i] is None:
            self._grads[i] = g.to(torch.float32, copy=True)
        else:
            self._grads[i].add_(g)

    def _mover(self, i: int):
        def move(p: torch.Tensor) -> None:
            g, p.grad = p.grad, None
            if g is not None:  # None: the gradient went through FP32_GRAD_SINK
                self._add(i, g)

        return move

    def master_grads(self) -> list[torch.Tensor | None]:
        """Every parameter's fp32 gradient, on its device (None where it has none); a ``p.grad`` left on a
        parameter is moved to its accumulator first. In-place changes (clipping, all-reduce) are what the
        step uses; ``set_master_grad`` replaces one."""
        out = []
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            if p is m:
                out.append(p.grad)
                continue
            if p.grad is not None:
                self._mover(i)(p)
            out.append(self._grads[i])
        return out

    def set_master_grad(self, i: int, g: torch.Tensor) -> None:
        """Replace parameter ``i``'s fp32 gradient (``g`` on its device)."""
        if self.params[i] is self.masters[i]:
            self.params[i].grad = g
        else:
            self._grads[i] = g

    def grad_norm_and_clip(self, max_norm: float | None) -> float:
        """Global L2 norm of the gradients (fp32), clipped in place to ``max_norm`` if given."""
        grads = [g for g in self.master_grads() if g is not None]
        if not grads:
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not torch.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {float(norm)}; refusing to step")
        if max_norm is not None and max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef)
        return float(norm)

    @torch.no_grad()
    def step(self) -> None:
        grads = self.master_grads()
        copying: set[torch.device] = set()
        for i, (p, m, g) in enumerate(zip(self.params, self.masters, grads)):
            if p is m:
                continue
            if p._version != self._versions[i]:
                m.copy_(p)  # written since the last step (model.load_state_dict, a broadcast): the model is right
            if g is None or g.device == m.device:
                m.grad = g
                continue
            if self._host_grads[i] is None:
                self._host_grads[i] = torch.empty(m.shape, dtype=torch.float32, pin_memory=m.is_pinned())
            m.grad = self._host_grads[i].copy_(g, non_blocking=True)
            copying.add(g.device)
        for dev in copying:  # the device-to-host copies must be done before the CPU step reads them
            torch.cuda.synchronize(dev)
        self.opt.step()
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            if p is not m:
                p.copy_(m)  # round-to-nearest-even into the model dtype; bumps p._version (QAT/FP8 caches follow)
                self._versions[i] = p._version

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
        self._versions = [p._version for p in self.params]
        self.opt.load_state_dict(state["opt"])
