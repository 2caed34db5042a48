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

Sharded (``shard=(rank, world)``, the distributed optimizer of ``quantrl.train.data_parallel``): this
replica keeps masters and moments only for the parameters it owns (``owner[i] == rank``, about 1/world of
the elements) and steps only those; every parameter still gets an fp32 gradient accumulator during the
backward. ``state_dict`` holds the owned parameters' state by name, so the shards of N replicas merge into
the state of one (``merge_state_dicts``), and any state loads into any sharding.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from quantrl.train.data_parallel import owners, sharded_grad_norm

NO_DECAY_HINTS = ("norm", "bias", "embed")
# Set on each parameter while the optimizer accumulates (``accumulating``): a callable adding an fp32 gradient
# to its accumulator, for backwards that have one (FP8 training's wgrad GEMM; Megatron's gradient-accumulation
# fusion), so it is never rounded to bf16 on the way.
FP32_GRAD_SINK = "_quantrl_fp32_grad_sink"
STATE_FORMAT = "quantrl.MasterAdamW/by-name"


class MasterAdamW:
    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        offload: bool = False,
        shard: tuple[int, int] | None = None,
    ):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not named:
            raise ValueError("MasterAdamW: no trainable parameters")
        self.names: list[str] = [n for n, _ in named]
        self.params: list[nn.Parameter] = [p for _, p in named]
        self.rank, world = shard or (0, 1)
        self.owner = owners([p.numel() for p in self.params], world)  # the replica that steps each parameter
        self.masters: list[torch.Tensor | None] = []  # None: another replica's
        self.offload = offload
        pin = offload and torch.cuda.is_available()
        decay, no_decay = [], []
        for name, p, owner in zip(self.names, self.params, self.owner):
            if owner != self.rank:
                master = None
            elif offload:
                master = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin)
                master.copy_(p.detach()).requires_grad_(True)
            elif p.dtype == torch.float32:
                master = p
            else:
                master = p.detach().float().clone().requires_grad_(True)
            self.masters.append(master)
            if master is not None:
                (no_decay if p.ndim < 2 or any(h in name for h in NO_DECAY_HINTS) else decay).append(master)
        # fp32 gradients on the parameters' devices (a parameter that is its own master keeps its .grad)
        self._grads: list[torch.Tensor | None] = [None] * len(self.params)
        self._host_grads: list[torch.Tensor | None] = [None] * len(self.params)  # offload: pinned, reused
        self._versions = [p._version for p in self.params]  # what each master was last synced at
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self._lr = lr
        # None: a replica owning no parameter (more replicas than parameters) still takes part in the collectives
        self.opt = (torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, foreach=False)
                    if decay or no_decay else None)  # fmt: skip

    @property
    def lr(self) -> float:
        return self._lr

    def set_lr(self, lr: float) -> None:
        self._lr = lr
        for g in self.opt.param_groups if self.opt is not None else ():
            g["lr"] = lr

    def zero_grad(self) -> None:
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            p.grad = None
            if m is not None:
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

    def set_master_grad(self, i: int, g: torch.Tensor | None) -> None:
        """Replace parameter ``i``'s fp32 gradient (``g`` on its device; None drops it)."""
        if self.params[i] is self.masters[i]:
            self.params[i].grad = g
        else:
            self._grads[i] = g

    def grad_norm_and_clip(self, max_norm: float | None, group=None) -> float:
        """Global L2 norm of the gradients (fp32), clipped in place to ``max_norm`` if given. Sharded, with
        the gradients reduced to their owners, ``group`` (the replicas) assembles the whole model's norm."""
        every = self.master_grads()
        grads = [g for g in every if g is not None]
        if group is not None:
            norm = sharded_grad_norm(every, group)
        elif grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        else:
            norm = None
        if norm is None:
            return 0.0
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
            if p is m or m is None:
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
        if self.opt is not None:
            self.opt.step()
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            if m is not None and p is not m:
                p.copy_(m)  # round-to-nearest-even into the model dtype; bumps p._version (QAT/FP8 caches follow)
                self._versions[i] = p._version

    def state_dict(self) -> dict:
        """The owned parameters' fp32 masters and AdamW state, by parameter name (CPU copies), and the lr."""
        params = {}
        for name, m in zip(self.names, self.masters):
            if m is not None:
                saved = {k: v.detach().to("cpu", copy=True) for k, v in self.opt.state.get(m, {}).items()}
                params[name] = {"master": m.detach().to("cpu", copy=True), **saved}
        return {"format": STATE_FORMAT, "lr": self.lr, "params": params}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a state of this model's parameters (one optimizer's, or merged shards of any sharding);
        this optimizer takes the parameters it owns."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"MasterAdamW.load_state_dict: not a {STATE_FORMAT!r} optimizer state (written by "
                             "another version of quantrl?)")  # fmt: skip
        saved = state["params"]
        if set(saved) != set(self.names):
            missing, extra = sorted(set(self.names) - set(saved)), sorted(set(saved) - set(self.names))
            raise ValueError(f"MasterAdamW.load_state_dict: parameter names differ from this model's "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")  # fmt: skip
        for name, p, m in zip(self.names, self.params, self.masters):
            if m is None:
                continue
            entry = saved[name]
            m.copy_(entry["master"])
            if p is not m:
                p.copy_(m)
            moments = {k: v for k, v in entry.items() if k != "master"}
            if moments:  # "step" stays a CPU scalar (torch's non-capturable AdamW); the moments follow the master
                self.opt.state[m] = {k: v.clone() if k == "step" else v.to(m.device, m.dtype, copy=True)
                                     for k, v in moments.items()}  # fmt: skip
            else:
                self.opt.state.pop(m, None)
        self._versions = [p._version for p in self.params]
        self.set_lr(state["lr"])


def merge_state_dicts(shards: Iterable[dict]) -> dict:
    """The shards of a distributed optimizer (one ``state_dict`` per replica) as one optimizer's state."""
    shards = list(shards)
    params: dict = {}
    for s in shards:
        if s.get("format") != STATE_FORMAT:
            raise ValueError(f"merge_state_dicts: not a {STATE_FORMAT!r} optimizer state")
        if set(params) & set(s["params"]):
            raise ValueError(f"merge_state_dicts: parameters in two shards: {sorted(set(params) & set(s['params']))[:5]}")
        params.update(s["params"])
    return {"format": STATE_FORMAT, "lr": shards[0]["lr"], "params": params}
