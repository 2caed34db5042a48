"""SwiGLU MLP and the mixture-of-experts block of Qwen3-MoE / Qwen2-MoE / DeepSeek-V3, with HF's module names.

    model.layers.{i}.mlp.gate                        router, [E, H], always high precision (a Bf16Linear)
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj
                                                     one SwiGLU per expert: ordinary Linear variants, so
                                                     FP8 / INT4 storage, conversion, QAT and weight sync
                                                     treat each expert like any dense Linear
    model.layers.{i}.mlp.shared_expert.*             Qwen2-MoE only: an always-on SwiGLU ...
    model.layers.{i}.mlp.shared_expert_gate          ... scaled by sigmoid of this [1, H] Linear
    model.layers.{i}.mlp.shared_experts.*            DeepSeek-V3: an always-on SwiGLU, ungated
    model.layers.{i}.mlp.gate.e_score_correction_bias DeepSeek-V3: [E] fp32, added to the scores for choosing

Routing is transformers'. Qwen (``route``): router logits in the model dtype, softmax in fp32, top-k,
optional renormalisation, weights cast back to the model dtype. DeepSeek-V3 (``route_grouped``): an fp32
router (weight kept fp32 whatever the model dtype), sigmoid scores; experts are chosen by score + bias
among the ``topk_group`` best of ``n_group`` groups, weighted by their plain scores (renormalised, times
``routed_scaling_factor``), in fp32. Each expert's output is multiplied by its weight, rounded to the
model dtype and summed into the token in ascending expert order.

Routing replay (R3, slime's ``--use-rollout-routing-replay``): the engine records the experts it chose for
every token it fed (``Routing(record=True)``), and the trainer's forward takes those experts instead of
its own top-k (``Routing(replay=...)``). The mixing weights are still the trainer's router probabilities
at the replayed experts, so the router keeps its gradient. A near-tie in the router is then no longer a
source of train-rollout mismatch (quantized rollouts move the router's inputs; one flipped expert for a
prompt token shifts every later token's logprob).

Three dispatches compute that same sum:
  grouped  tokens sorted by expert, each expert runs only on its tokens. Needs the per-expert counts on
           the host (one sync), so it is the eager path: training, prefill, CPU.
  dense    every expert runs on every row, the rows not routed to it zeroed (so a per-call FP8 activation
           scale sees only its tokens, as in grouped) and its output weighted 0 there. Static shapes, so it
           is what a CUDA graph captures. Exact zeros leave the sum unchanged; the one difference left is
           a GEMM's rounding that depends on the row count (cuBLAS and our W4A16 kernels pick tiles by M,
           so on GPU the two agree to bf16 rounding, not bit for bit). It costs E/k times the FLOPs and
           reads every expert's weights each step: for many experts and small batches (Qwen3-30B-A3B:
           128 experts, top 8) graphed decode is a correctness path, not a fast one.
  grouped  INT4 (W4A16), NVFP4 or FP8-block experts on CUDA (``grouped_kernel``; ``kernels.moe_w4a16`` /
  kernels  ``kernels.moe_fp8``): the routed pairs sorted by expert on the device and three grouped GEMMs
           (gate, up, down) over them, each pair through its own expert's weights: no host sync, static
           shapes, k/E of the dense dispatch's work. The experts' kernel tensors become views of one stack
           per projection, so weight sync refills the stack in place. The sum is the loop's
           (``sum_in_expert_order``); checked once against the loop, dropped with a warning if it disagrees.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from quantrl.model.config import ModelConfig
from quantrl.model.linear import Bf16Linear
from quantrl.model.quant_scheme import QuantScheme
from quantrl.model.tensor_parallel import COLUMN, ROW, SINGLE, TPContext, parallel_linear


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, prefix: str, scheme: QuantScheme, dtype: torch.dtype,
                 device: torch.device | str, intermediate_size: int | None = None, tp: TPContext = SINGLE,
                 reduce: bool = True):  # fmt: skip
        """With ``tp``, this rank's slice of the width; ``reduce=False``: return the partial sum (a MoE block
        reduces its experts' sum once)."""
        super().__init__()
        i = cfg.intermediate_size if intermediate_size is None else intermediate_size
        h, bias, args = cfg.hidden_size, cfg.mlp_bias, (scheme, dtype, device)
        self.gate_proj = parallel_linear(COLUMN, tp, f"{prefix}.gate_proj", h, i, bias, *args)
        self.up_proj = parallel_linear(COLUMN, tp, f"{prefix}.up_proj", h, i, bias, *args)
        self.down_proj = parallel_linear(ROW, tp, f"{prefix}.down_proj", i, h, bias, *args)
        self.tp, self.reduce = tp, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.tp.all_reduce(out) if self.reduce else out


FREE = -1  # a replay row all FREE: route this token by its own top-k (e.g. a sample's last token)
# Set on parameters the model keeps in fp32 whatever its dtype (DeepSeek-V3's router): sync and checkpoints keep them fp32
KEEP_FP32 = "_quantrl_keep_fp32"


@dataclass
class Routing:
    """What one forward does with expert choices.

    ``replay`` [B, T, L_moe, k] (integer): experts to use per token and MoE layer (in MoE-layer order), rows of
    ``FREE`` route freely. ``record``: append each MoE layer's chosen experts [B*T, k] to ``recorded``.
    Under replay, ``flips`` / ``decisions`` count the replayed (token, layer) choices whose expert set
    differs from this router's own top-k: how often the two sides route apart.
    """

    replay: torch.Tensor | None = None
    record: bool = False
    recorded: list[torch.Tensor] = field(default_factory=list)
    flips: torch.Tensor | int = 0
    decisions: torch.Tensor | int = 0
    balance_mask: torch.Tensor | None = None
    "[B, T] (1 = real token): collect what ``balance_loss`` needs over these tokens"
    _balance: list[torch.Tensor] = field(default_factory=list)  # per layer: [top-k counts [E], prob sums [E]]

    def stacked(self, b: int, t: int) -> torch.Tensor:
        """The recorded experts as [B, T, L_moe, k]."""
        return torch.stack(self.recorded, 1).view(b, t, len(self.recorded), -1)

    def layer_replay(self, moe_index: int) -> torch.Tensor | None:
        return None if self.replay is None else self.replay[:, :, moe_index]

    def balance_loss(self) -> torch.Tensor:
        """Switch-Transformer load-balancing loss as transformers' Qwen-MoE computes it (its
        ``router_aux_loss_coef`` term): E * sum_e f_e * p_e, where f_e is the number of top-k slots given
        to expert e and p_e the summed router probability of e, both pooled over layers and divided by
        (layers x real tokens). 1 * k when routing is uniform; grows as experts are favoured."""
        if not self._balance:
            raise ValueError("balance_loss: no MoE layer ran with balance_mask set")
        counts, probs = torch.stack(self._balance).sum(0)  # [E] each, over layers
        rows = self.balance_mask.sum() * len(self._balance)
        return counts.shape[0] * ((counts / rows) * (probs / rows)).sum()

    def note(self, used: torch.Tensor, own: torch.Tensor, replay: torch.Tensor | None,
             logits: torch.Tensor) -> None:  # fmt: skip
        """One MoE layer's choices: ``used`` (replayed or own) and ``own`` top-k, both [N, k]; router
        ``logits`` [N, E]."""
        if self.record:
            self.recorded.append(used)
        if self.balance_mask is not None:
            mask = self.balance_mask.reshape(-1, 1).to(torch.float32)  # [N, 1]
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            slots = torch.zeros_like(probs).scatter_add_(1, used, mask.expand_as(used))  # [N, E]
            self._balance.append(torch.stack([slots.sum(0), (probs * mask).sum(0)]))
        if replay is not None:
            fixed = replay[:, 0] != FREE
            differ = (own.sort(-1).values != used.sort(-1).values).any(-1)
            self.flips = self.flips + (differ & fixed).sum()
            self.decisions = self.decisions + fixed.sum()


def _replayed(replay: torch.Tensor | None, own: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The experts to use: ``replay`` [N, k] where given (rows of ``FREE``: ``own``), checked."""
    if replay is None:
        return own
    if replay.shape != own.shape:
        raise ValueError(f"routing replay has shape {list(replay.shape)} for {list(own.shape)} router choices")
    free = replay == FREE
    ordered = replay.sort(-1).values
    bad = ((replay < FREE) | (replay >= num_experts)).any() | (free.any(-1) & ~free.all(-1)).any()
    bad |= ((ordered[:, 1:] == ordered[:, :-1]) & ~free[:, 1:]).any()
    if bool(bad):  # one host sync per layer (training)
        raise ValueError(f"routing replay rows must name {own.shape[-1]} distinct experts in [0, {num_experts}) "
                         f"or be all {FREE} (route freely)")  # fmt: skip
    return torch.where(replay[:, :1] == FREE, own, replay.to(own.dtype))


def route(logits: torch.Tensor, top_k: int, normalize: bool,
          replay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Router logits [N, E] -> (weights [N, k] in the logits' dtype, expert ids used [N, k], own top-k [N, k]).

    ``replay`` [N, k]: these experts instead of the top-k (rows of ``FREE`` keep the top-k); their
    weights are this router's probabilities, renormalised like the top-k's."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, own = probs.topk(top_k, dim=-1)
    experts = _replayed(replay, own, logits.shape[-1])
    if replay is not None:
        weights = probs.gather(1, experts)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts, own


def route_grouped(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                  normalize: bool, scaling: float,
                  replay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """DeepSeek-V3's noaux_tc routing of fp32 logits [N, E] -> (fp32 weights [N, k], experts used, own top-k)."""
    n, e = logits.shape
    scores = logits.sigmoid()
    choice = scores + bias
    group_scores = choice.view(n, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [N, G]
    groups = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores).scatter_(1, groups, 1).bool()  # [N, G]
    choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    own = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    experts = _replayed(replay, own, e)
    weights = scores.gather(1, experts)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, experts, own


class Fp32Router(nn.Module):
    """DeepSeek-V3's router: an fp32 weight [E, H] (kept fp32 in a bf16 model, as transformers keeps it) and
    the fp32 ``e_score_correction_bias`` [E] (load balancing moves it outside the gradient: never trained)."""

    def __init__(self, hidden: int, experts: int, device: torch.device | str):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, hidden, dtype=torch.float32, device=device))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(experts, dtype=torch.float32, device=device),
                                                    requires_grad=False)  # fmt: skip
        for p in (self.weight, self.e_score_correction_bias):
            setattr(p, KEEP_FP32, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)  # [N, E] fp32


class SparseMoeBlock(nn.Module):
    dense_dispatch = False  # set by the dense_dispatch() context below (CUDA-graph warm-up, tests)
    grouped_kernel = True  # class switch: INT4 / NVFP4 / FP8 experts run grouped (kernels.moe_w4a16 / moe_fp8)
    FUSED_PROBE_RTOL = 1e-2  # the grouped kernel vs the expert loop: fp32 sums in another order, bf16 outputs

    def __init__(self, cfg: ModelConfig, prefix: str, scheme: QuantScheme, dtype: torch.dtype,
                 device: torch.device | str, tp: TPContext = SINGLE):  # fmt: skip
        super().__init__()
        h, e = cfg.hidden_size, cfg.num_experts
        self.tp = tp
        part = {"tp": tp, "reduce": False}  # every expert split like a dense MLP; the block reduces their sum once
        self.top_k, self.normalize, self.cfg = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg
        self.gate = Fp32Router(h, e, device) if cfg.router == "sigmoid" else Bf16Linear(h, e, False, dtype, device)
        self.prefix, self.num_experts = prefix, e
        owned = tp.owned_experts(e)
        ep = len(owned) < e
        # the shared expert: split like a dense MLP; with expert parallelism whole on every rank, added by rank 0
        shared = {"reduce": False} if ep else part
        self._adds_shared = not ep or tp.lead
        if ep:  # expert parallelism: this rank's experts whole, keyed by their global index
            self.experts = nn.ModuleDict({str(j): MLP(cfg, f"{prefix}.experts.{j}", scheme, dtype, device,
                                                      cfg.moe_intermediate_size, reduce=False) for j in owned})  # fmt: skip
            self._owned = [(j, self.experts[str(j)]) for j in owned]
        else:
            self.experts = nn.ModuleList(
                MLP(cfg, f"{prefix}.experts.{j}", scheme, dtype, device, cfg.moe_intermediate_size, **part) for j in range(e)
            )
            self._owned = list(enumerate(self.experts))
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, f"{prefix}.shared_expert", scheme, dtype, device,
                                     cfg.shared_expert_intermediate_size, **shared)  # fmt: skip
            self.shared_expert_gate = Bf16Linear(h, 1, False, dtype, device)
        self.shared_experts = None
        if cfg.shared_experts_intermediate_size:
            self.shared_experts = MLP(cfg, f"{prefix}.shared_experts", scheme, dtype, device,
                                      cfg.shared_experts_intermediate_size, **shared)  # fmt: skip
        # per projection (kind, the experts' kernel tensors stacked..., group size); None: not built yet,
        # False: the experts cannot take a grouped kernel
        self._stack: dict[str, tuple] | bool | None = None
        self._fused_ok: bool | None = None  # None: not yet checked against the expert loop
        self._local: torch.Tensor | None = None  # expert -> its slot in the stack, -1 on another rank

    def forward(self, x: torch.Tensor, routing: Routing | None = None, moe_index: int = 0) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]; ``routing`` replays and/or records this layer's (number ``moe_index``
        among the MoE layers) expert choices."""
        flat = x.reshape(-1, x.shape[-1])  # [N = B*T, H]
        replay = None if routing is None else routing.layer_replay(moe_index)
        if replay is not None:
            replay = replay.reshape(flat.shape[0], -1)  # [N, k]
        logits = self.gate(flat)  # [N, E]
        if self.cfg.router == "sigmoid":
            c = self.cfg
            weights, experts, own = route_grouped(logits, self.gate.e_score_correction_bias, self.top_k, c.n_group,
                                                  c.topk_group, self.normalize, c.routed_scaling_factor, replay)  # fmt: skip
        else:
            weights, experts, own = route(logits, self.top_k, self.normalize, replay)  # [N, k] each
        if routing is not None:
            routing.note(experts, own, replay, logits)
        capturing = flat.is_cuda and torch.cuda.is_current_stream_capturing()
        if self._fused_usable(flat, capturing):
            out = self._fused(flat, weights, experts) if self._fused_ok else self._probe_fused(flat, weights, experts)
        else:
            dispatch = self._dense if (self.dense_dispatch or capturing) else self._grouped
            out = dispatch(flat, weights, experts)
        if self.shared_expert is not None and self._adds_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        if self.shared_experts is not None and self._adds_shared:
            out = out + self.shared_experts(flat)
        return self.tp.all_reduce(out).view(x.shape)

    def foreign(self) -> list[str]:
        """Module names of the experts other ranks hold (expert parallelism); empty otherwise."""
        mine = {j for j, _ in self._owned}
        return [f"{self.prefix}.experts.{j}" for j in range(self.num_experts) if j not in mine]

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        k = self.top_k
        order = experts.reshape(-1).argsort(stable=True)  # [N*k] assignments sorted by expert
        tokens = order // k  # token of each sorted assignment
        w = weights.reshape(-1)[order, None]  # [N*k, 1]
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts).tolist()  # host sync
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        out = torch.zeros_like(x)
        for j, expert in self._owned:  # every expert, or this rank's with expert parallelism
            a, b = starts[j], starts[j + 1]
            if b > a:
                rows = tokens[a:b]
                out.index_add_(0, rows, (expert(x[rows]) * w[a:b]).to(out.dtype))
        return out

    # ---- the grouped kernels (INT4, NVFP4 and FP8 experts) --------------------------------------------
    def _fused_usable(self, x: torch.Tensor, capturing: bool) -> bool:
        """Every expert INT4 (W4A16), NVFP4 or FP8-block with its kernel on (the stack is built outside CUDA-graph
        capture, at the first eager call: a prefill precedes any captured decode), checked once against
        the expert loop."""
        if not self.grouped_kernel or self._fused_ok is False or x.dtype not in (torch.bfloat16, torch.float16):
            return False
        if self._stack is None and not capturing:
            self._stack = self._stack_experts()
        return bool(self._stack) and (self._fused_ok or not capturing)

    def grouped_kernel_possible(self) -> bool:
        """Whether this block can take a grouped kernel once loaded (INT4, NVFP4 or FP8-block experts, kernels on)."""
        kinds = {_grouped_kind(getattr(e, n)) for _, e in self._owned for n in PROJECTIONS}
        return self.grouped_kernel and len(kinds) == 1 and None not in kinds

    def _stack_experts(self) -> dict | bool:
        """Stack each projection's kernel tensors over the experts (W4A16: qweight_t [E, K/8, N], scale_t
        [E, K/G, N]; NVFP4: those and the decode tables [E, 2, 256, 4]; FP8: weight [E, N, K],
        weight_scale_inv [E, N/128, K/128]) and make every expert's
        tensors views into the stack (no second copy; loads and post-processing write in place, so updates
        land in the stack). False when some expert is another format or has its kernel off. With expert
        parallelism the stack holds this rank's experts; ``_local`` maps every expert to its slot or -1."""
        if not self.grouped_kernel_possible():
            return False
        dev = _grouped_tensors(self._owned[0][1].gate_proj)[0].device
        self._local = torch.full((self.num_experts,), -1, dtype=torch.long, device=dev)
        self._local[torch.tensor([j for j, _ in self._owned], device=dev)] = torch.arange(len(self._owned), device=dev)
        stack = {}
        for name in PROJECTIONS:
            lins = [getattr(e, name) for _, e in self._owned]
            kind = _grouped_kind(lins[0])
            if kind == "w4a16" and not all(lin.group_size == lins[0].group_size for lin in lins):
                return False
            parts = [torch.stack(ts) for ts in zip(*(_grouped_tensors(lin) for lin in lins), strict=True)]
            for j, lin in enumerate(lins):
                _set_grouped_tensors(lin, tuple(p[j] for p in parts))
            stack[name] = (kind, *parts, getattr(lins[0], "group_size", None))
        return stack

    def after_weight_update(self) -> None:
        """A post-process that reallocated an expert's kernel tensors, or skipped them (its kernel is off),
        leaves the stack stale: rebuild it (or fall back) at the next eager call."""
        if isinstance(self._stack, dict):
            for name, (_, first, *_rest) in self._stack.items():
                lins = [getattr(e, name) for _, e in self._owned]
                if any(_grouped_kind(lin) is None or _grouped_tensors(lin)[0].data_ptr() != first[j].data_ptr()
                       for j, lin in enumerate(lins)):  # fmt: skip
                    self._stack = None
                    return
        elif self._stack is False:
            self._stack = None  # an update may have turned the experts' kernels on

    def _fused(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The expert loop's sum, from three grouped GEMMs over the routed pairs (rows in pair order t*k + j)."""
        from quantrl.kernels.moe_routing import align_pairs, block_rows

        k, n_pairs, held = self.top_k, experts.numel(), len(self._owned)
        foreign = None
        if held < self.num_experts:  # expert parallelism: other ranks' pairs go to a bucket no block computes
            local = self._local[experts]
            foreign = local < 0
            bm = block_rows(n_pairs, held + 1)
            ids, blocks = align_pairs(torch.where(foreign, held, local), held + 1, bm)
            blocks = torch.where(blocks == held, -1, blocks)
        else:
            bm = block_rows(n_pairs, self.num_experts)
            ids, blocks = align_pairs(experts, self.num_experts, bm)

        def gemm(name: str, a, div: int, a_fp8=None):
            kind, *parts, group = self._stack[name]
            if kind == "fp8":
                from quantrl.kernels.moe_fp8 import moe_fp8_gemm

                aq, asc = a_fp8 if a_fp8 is not None else _quantize_rows(a)
                return moe_fp8_gemm(aq, asc, *parts, ids, blocks, n_pairs, div, bm, a.dtype)
            from quantrl.kernels.moe_w4a16 import moe_w4a16_gemm

            table = parts[2] if kind == "nvfp4" else None
            return moe_w4a16_gemm(a, parts[0], parts[1], group or 16, ids, blocks, n_pairs, div, bm, table=table)

        xq = _quantize_rows(x) if self._stack["gate_proj"][0] == "fp8" else None  # gate and up share it
        h = F.silu(gemm("gate_proj", x, k, xq)) * gemm("up_proj", x, k, xq)  # [N*k, I], as MLP.forward rounds it
        y = (gemm("down_proj", h, 1).view(x.shape[0], k, -1) * weights[..., None]).to(x.dtype)  # [N, k, H]
        if foreign is not None:  # rows never written (another rank's experts): exact zeros in the sum
            y = y.masked_fill(foreign[..., None], 0)
        return sum_in_expert_order(y, experts)

    def _probe_fused(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """First call: keep the grouped kernel only if it agrees with the expert loop here."""
        ref = self._grouped(x, weights, experts)
        try:
            out = self._fused(x, weights, experts)
            err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
            self._fused_ok, why = err <= self.FUSED_PROBE_RTOL, f"relative error {err:.2e} against the expert loop"
        except (RuntimeError, ValueError) as e:  # a Triton compile / launch failure
            self._fused_ok, why = False, str(e).splitlines()[0] if str(e) else type(e).__name__
        if not self._fused_ok:
            warnings.warn(f"{self.prefix}: grouped MoE kernel disabled ({why}); looping over experts", stacklevel=3)
            return ref
        return out

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        gates = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        gates.scatter_(1, experts, weights)  # [N, E]: weight 0 for experts not chosen
        out = torch.zeros_like(x)
        for j, expert in self._owned:
            g = gates[:, j : j + 1]  # [N, 1]
            out = out + (expert(x * (g != 0)) * g).to(out.dtype)
        return out


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _grouped_kind(lin) -> str | None:
    """Which grouped kernel an expert Linear can join: "w4a16" (INT4 with its kernel layout), "nvfp4" (the
    same kernel with the e2m1 table decode), "fp8" (128x128 blocks, 1x128 activations, fp32 scales), or None."""
    from quantrl.kernels import triton_available
    from quantrl.model.linear import Fp8Linear, Nvfp4Linear, W4A16Linear

    if lin.bias is not None or not triton_available():
        return None
    if isinstance(lin, (W4A16Linear, Nvfp4Linear)):
        if not (lin._kernel_valid and lin._kernel_ok is not False):
            return None
        return "nvfp4" if isinstance(lin, Nvfp4Linear) else "w4a16" if lin.num_bits == 4 else None
    if isinstance(lin, Fp8Linear) and lin._blockwise_recipe and lin.weight_scale_tensor.dtype == torch.float32:
        return "fp8" if lin.weight.is_cuda or lin.kernel_backend == "triton" else None
    return None


def _grouped_tensors(lin) -> tuple[torch.Tensor, ...]:
    """The tensors a grouped kernel reads from one expert Linear (see ``_grouped_kind``)."""
    return (lin.weight, lin.weight_scale_tensor) if _grouped_kind(lin) == "fp8" else lin._kernel_weights


def _set_grouped_tensors(lin, views: tuple[torch.Tensor, ...]) -> None:
    """Point an expert Linear's tensors at its slices of the stack (same values; loads copy in place)."""
    if _grouped_kind(lin) != "fp8":
        lin._kernel_weights = views
    else:
        lin.weight, lin._buffers[lin.scale_name] = views


def _quantize_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 e4m3 codes and scales of each row (an FP8 expert's activation quantization; no host check)."""
    from quantrl.kernels import quantize_fp8_activation

    backend = "triton" if not a.is_cuda else "auto"  # CPU: only the interpreter's tests stack FP8 experts
    return quantize_fp8_activation(a, 128, backend=backend, check=False)


def sum_in_expert_order(y: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """y [N, k, H] (each token's weighted expert outputs, in routing order) -> [N, H] summed in ascending
    expert order with one rounding per addition: the numbers of the expert loop's ``index_add_``."""
    y = y.gather(1, experts.argsort(dim=1, stable=True)[..., None].expand_as(y))
    out = y[:, 0]
    for j in range(1, y.shape[1]):
        out = out + y[:, j]
    return out


@contextmanager
def dense_dispatch():
    """Every MoE block takes the dense dispatch while inside (CUDA-graph warm-up: every expert's Linears
    then see a call, and run their fast-path probes, before capture), unless it runs a grouped kernel,
    which it then warms up instead (the path the graph captures)."""
    before = SparseMoeBlock.dense_dispatch
    SparseMoeBlock.dense_dispatch = True
    try:
        yield
    finally:
        SparseMoeBlock.dense_dispatch = before
