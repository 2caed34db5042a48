"""Layer-by-layer GPTQ over a HF decoder-only checkpoint, with bounded memory.

The driver walks the decoder the way the GPTQ paper does ("sequential" over layers, not within a layer):

    h⁰ = embed(calibration tokens)                       (all batches, kept resident)
    for each decoder layer i:
        load layer i from the safetensors reader
        run hⁱ through it, hooks collect H = 2/n Σ xᵀx for every target Linear's (and routed expert's) input
        GPTQ-quantize each target with its H; yield (weight name, q, scale) (NVFP4: codes, scale, gs)
        put the *dequantized* weights into the layer and run hⁱ through it again -> hⁱ⁺¹
        free the layer and its Hessians

so the Hessians of layer i see the outputs of layers 0..i-1 *as quantized* (the inputs the rollout engine
will produce), while inside one layer every Linear's Hessian comes from the unquantized layer (the
reference implementation's default, ``true_sequential=False``).

Memory. The transformers model is built on the ``meta`` device (no weight memory). Resident on
``device`` are: the embedding (only while the calibration tokens are embedded), one decoder layer, the
calibration hidden states (``num_samples × seq_len × hidden`` in the compute dtype, plus one batch while
a layer's outputs replace its inputs) and that layer's Hessians (fp32 ``K × K`` each; Linears fed the very
same input tensor, q/k/v and gate/up, share one accumulator, and each is freed once its Linears are
quantized; routed experts: two per expert, see below). Layers after the last one holding a target are
never loaded.

Precision. The calibration forward runs in ``compute_dtype``: fp32 by default (the checkpoint's bf16
weights convert exactly, and fp32 activations make H as good as the data allows; on CPU there is no
speed reason for anything else). On CUDA ``compute_dtype=torch.bfloat16`` halves the hidden-state
memory and is what the reference implementations do. H is always accumulated in fp32 and GPTQ itself
always works in fp32/fp64 (``checkpoint.gptq``). The dequantized weights written back into a layer are
``dequantize_int(q, s, dtype=checkpoint dtype)`` (``dequantize_nvfp4`` for NVFP4) -- exactly the weights
the engine will use.

Layer calling convention (transformers 5.x): ``layer(hidden_states, attention_mask=..., position_ids=...,
position_embeddings=(cos, sin), use_cache=False)`` returns a tensor (4.x returned a
tuple; both are accepted). ``(cos, sin)`` come from the model-level rotary module, which is re-created
on the real device from the config (its ``inv_freq`` is a non-persistent buffer, so a meta-built module
has no values). The mask is what the model's own forward would build: ``create_causal_mask`` (or
``create_sliding_window_causal_mask`` for sliding-window layers) with no padding mask; with SDPA and no
padding that is ``None`` and SDPA runs with ``is_causal=True``.

Scope. Decoder-only models whose CausalLM has ``model.embed_tokens``, ``model.layers[i]`` and
``model.rotary_emb`` and whose checkpoint names are the module names (Llama, Mistral, Qwen2, Qwen3
families, their MoE variants Qwen2-MoE / Qwen3-MoE; verified against the full transformers forward in
``tests/test_gptq_model.py``). Anything the
model's forward does between embedding and the first layer other than position embeddings and the
causal/sliding mask (e.g. Gemma's embedding scaling) is not reproduced; such model types get a warning.
Targets outside the decoder layers (``lm_head``, ...) are not yielded: the caller quantizes them
round-to-nearest.

Routed MoE experts. Checkpoints (Qwen3-MoE, Qwen2-MoE) store one tensor per expert while transformers 5
fuses them into ``experts.gate_up_proj`` [E, 2I, H] / ``experts.down_proj`` [E, H, I]; the driver stacks
the per-expert tensors into those. The fused module holds no ``nn.Linear`` to hook, so a pre-hook on it
takes the tokens the router sent to each expert (``top_k_index``) and accumulates, per expert, H of its
gate/up input (those tokens' hidden states) and of its down input (``_apply_gate`` of the expert's own
gate/up output, with the unquantized weights like every other Hessian in the layer). Every per-expert
checkpoint tensor is then GPTQ'd on its expert's H (gate and up separately: NVFP4's global scale is per
tensor) and its dequantized value written back into the fused parameter, so later layers see quantized
experts too. An expert no calibration token reached gets ``H = I``: GPTQ is then round-to-nearest bit for
bit (``checkpoint.gptq``), where a zero H would zero the weights; one reached by only a few tokens gets
a low-rank H that the dampening regularizes, which for a tiny calibration set can be no better than
round-to-nearest (use enough samples that every expert sees hundreds of tokens). Memory: one fp32
``H×H`` and one ``I×I`` per expert of the current layer (Qwen3-30B-A3B: 128 × (2048² + 768²) × 4 B =
2.4 GB; Qwen3-235B-A22B: ~10 GB), and the hook recomputes each expert's gate/up projection. Fused layouts
other than concatenated [gate; up], untransposed, gated and bias-free (``use_experts_implementation``'s
flags) are not driven: their experts are not yielded and the caller rounds them to nearest.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantrl.checkpoint.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_nvfp4
from quantrl.checkpoint.safetensors_io import SafetensorsDir
from quantrl.formats.int4 import dequantize_int, int_range
from quantrl.formats.nvfp4 import GROUP as NVFP4_GROUP
from quantrl.formats.nvfp4 import dequantize_nvfp4

# Model types whose layer-by-layer forward is checked against transformers' full forward in the tests.
VERIFIED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "deepseek_v3"})
_FLOAT_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Old Llama checkpoints store a per-layer rotary buffer that current modules compute instead.
_IGNORED_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------------
# The meta skeleton and what can be driven


@dataclass
class _FusedExperts:
    module: nn.Module  # has gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    name: str  # module name, e.g. "model.layers.0.mlp.experts"
    gate_up: list[list[str]]  # per expert: the checkpoint names of its gate_proj and up_proj weights
    down: list[list[str]]  # per expert: [its down_proj weight]

    @property
    def weight_names(self) -> list[str]:
        return [n for group in self.gate_up + self.down for n in group]


@dataclass
class _Skeleton:
    config: Any
    model: nn.Module  # the CausalLM, every parameter on meta
    base: nn.Module  # model.model: embed_tokens, layers, rotary_emb
    prefix: str  # checkpoint/module name of ``base`` plus "." ("model.")
    # layer index -> [(linear module, module name, weight name)] for the targets inside that layer
    plan: dict[int, list[tuple[nn.Linear, str, str]]] = field(default_factory=dict)
    # layer index -> the fused routed-expert modules inside that layer whose every expert is a target
    experts: dict[int, list[_FusedExperts]] = field(default_factory=dict)

    @property
    def layers_with_targets(self) -> set[int]:
        return set(self.plan) | set(self.experts)

    @property
    def num_layers(self) -> int:
        return len(self.base.layers)


def _build_skeleton(model_dir: str | Path) -> _Skeleton:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        except ValueError as e:  # no CausalLM class / no SDPA support for this architecture
            raise ValueError(
                f"gptq: cannot build a causal LM with SDPA attention from {model_dir}/config.json: {e}"
            ) from e
    model.eval().requires_grad_(False)
    base = getattr(model, "model", None)
    missing = [a for a in ("embed_tokens", "layers", "rotary_emb") if base is None or not hasattr(base, a)]
    if missing or not isinstance(base.layers, nn.ModuleList):
        arch = getattr(config, "architectures", None) or type(model).__name__
        raise ValueError(
            f"gptq: architecture {arch} (model_type {config.model_type!r}) cannot be driven layer by layer: "
            f"its model has no model.{'/model.'.join(missing or ['layers'])} (expected a decoder-only model with "
            "model.embed_tokens, model.layers[i] and model.rotary_emb, e.g. Llama/Mistral/Qwen2/Qwen3)"
        )
    if config.model_type not in VERIFIED_MODEL_TYPES:
        warnings.warn(
            f"gptq: model_type {config.model_type!r} is driven layer by layer but only "
            f"{sorted(VERIFIED_MODEL_TYPES)} are verified against the full transformers forward; model-level "
            "operations other than embedding lookup, rotary embeddings and the causal mask are not reproduced",
            stacklevel=3,
        )
    return _Skeleton(config, model, base, "model.")


def _plan(sk: _Skeleton, targets: set[str]) -> None:
    for i, layer in enumerate(sk.base.layers):
        prefix = f"{sk.prefix}layers.{i}."
        entries = []
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and f"{prefix}{name}.weight" in targets:
                entries.append((mod, prefix + name, f"{prefix}{name}.weight"))
        if entries:
            sk.plan[i] = entries
        fused = [e for e in (_fused_experts(prefix + n, m) for n, m in layer.named_modules()) if e is not None]
        for e in fused:
            n_targeted = sum(w in targets for w in e.weight_names)
            if 0 < n_targeted < len(e.weight_names):
                warnings.warn(
                    f"gptq: {n_targeted} of the {len(e.weight_names)} expert weights of {e.name} are targets; the "
                    "experts are driven all or none, so none of them is yielded (the caller rounds them to nearest)",
                    stacklevel=3,
                )
        fused = [e for e in fused if all(w in targets for w in e.weight_names)]
        if fused:
            sk.experts[i] = fused


def _fused_experts(name: str, mod: nn.Module) -> _FusedExperts | None:
    """``mod`` as a fused routed-experts module the Hessian hook understands, or None."""
    gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.ndim == down.ndim == 3):
        return None
    layout = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
              "has_post_expert_norm": False}  # fmt: skip
    if any(getattr(mod, k, v) != v for k, v in layout.items()) or not hasattr(mod, "act_fn"):
        return None
    params = list(inspect.signature(mod.forward).parameters)
    if params[:2] != ["hidden_states", "top_k_index"]:
        return None
    src_gu = _fused_sources(f"{name}.gate_up_proj", tuple(gu.shape))
    src_down = _fused_sources(f"{name}.down_proj", tuple(down.shape))
    return _FusedExperts(mod, name, src_gu, src_down) if src_gu and src_down else None


def gptq_layer_targets(model_dir: str | Path, targets: set[str]) -> set[str]:
    """The subset of ``targets`` that ``gptq_quantize_layers`` will yield (no weights are read)."""
    sk = _build_skeleton(model_dir)
    _plan(sk, set(targets))
    experts = {w for fused in sk.experts.values() for e in fused for w in e.weight_names}
    return {w for entries in sk.plan.values() for _, _, w in entries} | experts


# ----------------------------------------------------------------------------------------------------
# Materializing modules from the reader


def _fused_sources(name: str, shape: tuple[int, ...]) -> list[list[str]] | None:
    """transformers 5 fuses MoE experts on load (``experts.gate_up_proj`` [E, 2I, H] = per expert
    cat(gate_proj, up_proj); ``experts.down_proj`` [E, H, I]) while checkpoints keep one tensor per expert:
    the checkpoint names behind a fused parameter, per expert, or None if ``name`` is not one."""
    head, _, leaf = name.rpartition(".")
    if not head.endswith(".experts") or leaf not in ("gate_up_proj", "down_proj") or len(shape) != 3:
        return None
    parts = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
    return [[f"{head}.{e}.{p}.weight" for p in parts] for e in range(shape[0])]


def _layout(module: nn.Module, prefix: str, reader: SafetensorsDir) -> dict[str, list[list[str]]]:
    """Check that the checkpoint holds exactly ``module``'s tensors, with its shapes (reads no weights);
    return the fused parameters and their per-expert sources."""
    state = module.state_dict(keep_vars=True)
    persistent = set(state)
    transient = [n for n, _ in module.named_buffers() if n not in persistent]
    if transient:
        raise ValueError(
            f"gptq: module {prefix.rstrip('.')} has non-persistent buffers {transient} that the checkpoint cannot "
            "provide; this architecture is not supported by the layer-by-layer driver"
        )
    fused = {n: _fused_sources(prefix + n, tuple(t.shape)) for n, t in state.items() if prefix + n not in reader}
    fused = {n: src for n, src in fused.items() if src and all(x in reader for group in src for x in group)}
    missing = [prefix + n for n in state if prefix + n not in reader and n not in fused]
    if missing:
        raise ValueError(
            f"gptq: checkpoint {reader.dir} lacks {len(missing)} tensor(s) of module {prefix.rstrip('.')}, e.g. "
            f"{missing[:3]} (its tensor names do not follow the transformers module names; not supported)"
        )
    covered = {x for src in fused.values() for group in src for x in group}
    extra = [
        n
        for n in reader.names()
        if n.startswith(prefix) and n[len(prefix) :] not in persistent and n not in covered
        and not n.endswith(_IGNORED_CHECKPOINT_SUFFIXES)
    ]  # fmt: skip
    if extra:
        raise ValueError(
            f"gptq: checkpoint {reader.dir} has tensor(s) under {prefix!r} that the transformers module does not "
            f"have, e.g. {sorted(extra)[:3]} (a different module layout; not supported)"
        )
    for n, t in state.items():
        if n in fused:  # each per-expert tensor is one part of its expert's slice: gate or up [I, H], down [H, I]
            part = (t.shape[1] // len(fused[n][0]), *t.shape[2:])
            bad = next((x for group in fused[n] for x in group if reader.infos[x].shape != part), None)
            name, have, want = bad, reader.infos[bad].shape if bad else None, part
        else:
            name, have, want = prefix + n, reader.infos[prefix + n].shape, tuple(t.shape)
        if name is not None and have != want:
            raise ValueError(
                f"gptq: tensor {name} has shape {list(have)} in {reader.infos[name].file.name}, the model built from "
                f"config.json expects {list(want)}"
            )
    return fused


def _materialize(
    module: nn.Module, prefix: str, reader: SafetensorsDir, device: torch.device, dtype: torch.dtype
) -> None:
    """Give a meta module real storage on ``device`` filled from the checkpoint (floats in ``dtype``)."""
    fused = _layout(module, prefix, reader)
    module.to(dtype=dtype)  # meta: only changes the dtype of floating parameters/buffers
    module.to_empty(device=device)
    with torch.no_grad():
        for n, t in module.state_dict(keep_vars=True).items():
            if n in fused:  # [E, 2I, H] / [E, H, I] from the per-expert tensors
                t.copy_(torch.stack([torch.cat([reader.read(x) for x in group]) for group in fused[n]]))
            else:
                t.copy_(reader.read(prefix + n))


def _release(module: nn.Module) -> None:
    module.to_empty(device="meta")


# ----------------------------------------------------------------------------------------------------
# Running decoder layers


class _LayerRunner:
    """Calls decoder layers the way the model's forward does: rotary (cos, sin), position ids, mask."""

    def __init__(self, sk: _Skeleton, device: torch.device):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        self._sk = sk
        self._device = device
        self._mask_fns = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        # inv_freq is a non-persistent buffer computed from the config in __init__: build a real module.
        self.rotary = type(sk.base.rotary_emb)(config=sk.model.config).to(device)
        self._cache: dict[tuple, Any] = {}
        for i in range(sk.num_layers):
            kind = self.attention_kind(i)
            if kind not in self._mask_fns:
                raise ValueError(
                    f"gptq: layer {i} has attention type {kind!r}; only full and sliding-window attention are supported"
                )

    def attention_kind(self, i: int) -> str:
        cfg = self._sk.config
        types = getattr(cfg, "layer_types", None)
        if types:
            return types[i]
        # Models without layer_types (Llama, Mistral) use one mask for all layers, sliding iff sliding_window.
        return "sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"

    def _inputs(self, h: torch.Tensor, kind: str) -> tuple:
        key = (tuple(h.shape), h.dtype, kind)
        if key not in self._cache:
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)  # [1, L]
            cos_sin = self.rotary(h, pos)  # each [1, L, head_dim], in h's dtype
            fn = self._mask_fns[kind]
            # transformers renamed the mask builders' cache argument (5.17: past_key_values; 5.24: cache)
            no_cache = {"cache" if "cache" in inspect.signature(fn).parameters else "past_key_values": None}
            mask = fn(config=self._sk.model.config, inputs_embeds=h, attention_mask=None, position_ids=pos, **no_cache)
            self._cache[key] = (pos, cos_sin, mask)
        return self._cache[key]

    @torch.no_grad()
    def __call__(self, layer: nn.Module, i: int, h: torch.Tensor) -> torch.Tensor:
        pos, cos_sin, mask = self._inputs(h, self.attention_kind(i))
        # no cache argument: its name changed (past_key_values -> cache in 5.x); None is the default in both
        out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def run_all(self, layer: nn.Module, i: int, hs: list[torch.Tensor], *, keep: bool) -> None:
        """Run every batch through ``layer``; ``keep`` replaces ``hs[b]`` by its output (one batch extra)."""
        for b in range(len(hs)):
            out = self(layer, i, hs[b])
            if keep:
                hs[b] = out
            del out


@torch.no_grad()
def _embed(sk: _Skeleton, reader: SafetensorsDir, batches: Sequence[torch.Tensor], device, dtype) -> list[torch.Tensor]:
    emb = sk.base.embed_tokens
    _materialize(emb, f"{sk.prefix}embed_tokens.", reader, device, dtype)
    try:
        return [emb(ids.to(device)) for ids in batches]  # each [B, L, H]
    finally:
        _release(emb)


def _check_batches(batches: Sequence[torch.Tensor], vocab: int) -> None:
    if not batches:
        raise ValueError("gptq: no calibration batches given")
    for j, ids in enumerate(batches):
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.ndim != 2 or ids.numel() == 0:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(
                f"gptq: calibration batch {j} must be a non-empty int64 tensor [B, L] of token ids, got {got}"
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"gptq: calibration batch {j} has token ids in [{lo}, {hi}], outside the vocabulary [0, {vocab})"
            )


def _resolve(device: str | torch.device, compute_dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device)
    dtype = torch.float32 if compute_dtype is None else compute_dtype
    if dtype not in _FLOAT_WEIGHT_DTYPES:
        raise ValueError(f"gptq: compute_dtype must be one of {_FLOAT_WEIGHT_DTYPES}, got {dtype}")
    return device, dtype


def layerwise_hidden_states(
    model_dir: str | Path,
    reader: SafetensorsDir,
    batches: Sequence[torch.LongTensor],
    *,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Unquantized layer-by-layer forward, as the GPTQ driver runs it: yields the embeddings, then the
    output of every decoder layer (each a list of ``[B, L, H]``, one per batch; final norm not applied).

    For checking the driver against transformers' ``output_hidden_states``; same memory bounds.
    """
    device, dtype = _resolve(device, compute_dtype)
    sk = _build_skeleton(model_dir)
    _check_batches(batches, sk.config.vocab_size)
    runner = _LayerRunner(sk, device)
    hs = _embed(sk, reader, batches, device, dtype)
    yield [h.clone() for h in hs]
    for i, layer in enumerate(sk.base.layers):
        _materialize(layer, f"{sk.prefix}layers.{i}.", reader, device, dtype)
        try:
            runner.run_all(layer, i, hs, keep=True)
        finally:
            _release(layer)
        yield [h.clone() for h in hs]


# ----------------------------------------------------------------------------------------------------
# Hessian collection


class _HessianHooks:
    """Forward pre-hooks on a layer's target Linears; Linears fed the very same tensor share one H.

    Sharing is decided per call (same tensor object, unmodified since: ``_version``) and must be the same
    for every batch, which holds for any model whose forward does not branch on the data.
    """

    def __init__(self, entries: list[tuple[nn.Linear, str, str]], device: torch.device):
        self._device = device
        self.acc: dict[str, HessianAccumulator] = {}  # owner module name -> accumulator
        self.owner: dict[str, str] = {}  # module name -> owner module name
        self._last: tuple[torch.Tensor, int, str] | None = None
        self._handles = [
            mod.register_forward_pre_hook(self._hook_for(name), with_kwargs=True) for mod, name, _ in entries
        ]

    def _hook_for(self, name: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["input"]
            last = self._last
            owner = last[2] if last is not None and last[0] is x and last[1] == x._version else name
            if self.owner.setdefault(name, owner) != owner:
                raise RuntimeError(f"gptq: {name} shared its input with another Linear in one batch but not in another")
            if owner == name:
                self.acc.setdefault(name, HessianAccumulator(device=self._device)).add(x)
                self._last = (x, x._version, name)

        return hook

    def end_batch(self) -> None:
        self._last = None  # do not keep the last activation alive across batches

    def hessian(self, name: str) -> torch.Tensor:
        owner = self.owner.get(name)
        if owner is None:
            raise ValueError(f"gptq: {name} was never called during the calibration forward; cannot build its Hessian")
        return self.acc[owner].hessian

    def release(self, name: str) -> None:
        """Drop ``name``'s claim on its accumulator; the accumulator is freed with its last user."""
        owner = self.owner.pop(name, None)
        if owner is not None and owner not in self.owner.values():
            self.acc.pop(owner, None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None


class _ExpertHessians:
    """A forward pre-hook on a fused experts module: per expert, H of its gate/up input and of its down input."""

    def __init__(self, ex: _FusedExperts, device: torch.device):
        n = len(ex.down)
        self.gate_up = [HessianAccumulator(device=device) for _ in range(n)]
        self.down = [HessianAccumulator(device=device) for _ in range(n)]
        self._handle = ex.module.register_forward_pre_hook(self._hook, with_kwargs=True)

    @torch.no_grad()
    def _hook(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = inspect.signature(mod.forward).bind(*args, **kwargs).arguments
        x, top_k = bound["hidden_states"], bound["top_k_index"]  # [T, H], [T, k]
        top_k = top_k.reshape(x.shape[0], -1)
        apply_gate = getattr(mod, "_apply_gate", None)
        for e in torch.unique(top_k).tolist():
            if not 0 <= e < len(self.down):  # implementations may mark dropped slots with E
                continue
            xe = x[(top_k == e).any(dim=-1)]  # [n_e, H]: the tokens routed to expert e
            self.gate_up[e].add(xe)
            gu = F.linear(xe, mod.gate_up_proj[e])  # [n_e, 2I]
            if apply_gate is not None:
                act = apply_gate(gu)
            else:
                gate, up = gu.chunk(2, dim=-1)
                act = mod.act_fn(gate) * up
            self.down[e].add(act)  # [n_e, I]

    def remove(self) -> None:
        self._handle.remove()


def _hessian_or_identity(acc: HessianAccumulator, k: int, device: torch.device) -> torch.Tensor:
    """An expert no token reached: H = I makes GPTQ round-to-nearest (a zero H would zero its weights)."""
    if acc.num_samples == 0:
        return torch.eye(k, device=device)
    return acc.hessian


# ----------------------------------------------------------------------------------------------------
# The driver


def gptq_quantize_layers(
    model_dir: str | Path,
    reader: SafetensorsDir,
    targets: set[str],
    batches: list[torch.LongTensor],
    *,
    num_bits: int = 4,
    group_size: int = 128,
    qmax: int = 7,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    device: str | torch.device = "cpu",
    scale_dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    compute_dtype: torch.dtype | None = None,
    dequant_dtype: torch.dtype | None = None,
    block_size: int = 128,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """GPTQ every target Linear inside the decoder layers, layer by layer; yield ``(weight name, q, scale)``.

    ``q`` is int8 ``[N, K]`` and ``scale`` is ``scale_dtype`` ``[N, K/group_size]``, both on the CPU, in the
    ``formats.int4`` conventions (``num_bits``/``qmax``). Each target is yielded once, layer by layer, as soon
    as it is quantized, so the caller can write it and drop it. Targets that are neither the weight of an
    ``nn.Linear`` in a decoder layer nor a routed expert's are not yielded (``gptq_layer_targets`` tells
    which are).

    ``compute_dtype`` (default fp32) is the dtype of the calibration forward; ``dequant_dtype`` (default:
    each weight's checkpoint dtype) the dtype the engine dequantizes to, used both for GPTQ's error
    feedback and for the weights the next layers' calibration inputs are computed with.

    Raises ``ValueError`` at call time (before the first ``next``) for a target missing from the checkpoint,
    an architecture that cannot be driven, a checkpoint whose tensor names or shapes do not match the
    modules built from config.json (e.g. Mixtral's ``block_sparse_moe.experts.N.w1``), bad calibration
    batches or arguments, or a target whose K is not divisible by ``group_size``.
    """
    int_range(num_bits, qmax)  # validates the code convention

    def quantize(w: torch.Tensor, h: torch.Tensor, ddtype: torch.dtype):
        q, s = gptq_quantize(w, h, num_bits=num_bits, group_size=group_size, qmax=qmax, dampening_frac=dampening_frac,
                             act_order=act_order, block_size=block_size, scale_dtype=scale_dtype, dequant_dtype=ddtype)  # fmt: skip
        return (q, s), dequantize_int(q, s, group_size, dtype=ddtype)

    return _start(model_dir, reader, targets, batches, group_size, block_size, dampening_frac, device, compute_dtype,
                  dequant_dtype, quantize, progress)  # fmt: skip


def gptq_quantize_layers_nvfp4(
    model_dir: str | Path,
    reader: SafetensorsDir,
    targets: set[str],
    batches: list[torch.LongTensor],
    *,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    compute_dtype: torch.dtype | None = None,
    dequant_dtype: torch.dtype | None = None,
    block_size: int = 128,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``gptq_quantize_layers`` on the NVFP4 grid (``checkpoint.gptq.gptq_quantize_nvfp4``): yields
    ``(weight name, codes uint8 [N, K], scale e4m3 [N, K/16], global_scale fp32 [1])``, on the CPU."""

    def quantize(w: torch.Tensor, h: torch.Tensor, ddtype: torch.dtype):
        codes, s, gs = gptq_quantize_nvfp4(w, h, dampening_frac=dampening_frac, act_order=act_order,
                                           block_size=block_size, dequant_dtype=ddtype)  # fmt: skip
        return (codes, s, gs), dequantize_nvfp4(codes, s, gs, ddtype)

    return _start(model_dir, reader, targets, batches, NVFP4_GROUP, block_size, dampening_frac, device, compute_dtype,
                  dequant_dtype, quantize, progress)  # fmt: skip


# (weight, H, engine dtype) -> (the format's tensors, the dequantized weight the next layers are fed with)
LayerQuantizer = Callable[[torch.Tensor, torch.Tensor, torch.dtype], tuple[tuple[torch.Tensor, ...], torch.Tensor]]


def _start(model_dir, reader: SafetensorsDir, targets: set[str], batches, group_size: int, block_size: int,
           dampening_frac: float, device, compute_dtype, dequant_dtype, quantize: LayerQuantizer,
           progress: bool) -> Iterator[tuple]:  # fmt: skip
    """Validate everything, then return the (lazy) layer-by-layer generator."""
    if group_size <= 0 or block_size <= 0:
        raise ValueError(f"gptq: group_size and block_size must be positive, got {group_size} and {block_size}")
    if not (math.isfinite(dampening_frac) and dampening_frac >= 0):
        raise ValueError(f"gptq: dampening_frac must be a finite number >= 0, got {dampening_frac}")
    device, cdtype = _resolve(device, compute_dtype)
    targets = set(targets)
    missing = sorted(t for t in targets if t not in reader)
    if missing:
        raise ValueError(f"gptq: {len(missing)} target(s) not in checkpoint {reader.dir}, e.g. {missing[:5]}")
    sk = _build_skeleton(model_dir)
    _check_batches(batches, sk.config.vocab_size)
    _plan(sk, targets)
    targeted = [w for entries in sk.plan.values() for _, _, w in entries]
    targeted += [w for fused in sk.experts.values() for ex in fused for w in ex.weight_names]
    if not targeted:
        return iter(())
    _layout(sk.base.embed_tokens, f"{sk.prefix}embed_tokens.", reader)  # names and shapes of every tensor the
    for i in range(max(sk.layers_with_targets) + 1):  # driver will load, targets included
        _layout(sk.base.layers[i], f"{sk.prefix}layers.{i}.", reader)
    for wname in targeted:
        info = reader.infos[wname]
        if info.shape[1] % group_size:
            raise ValueError(
                f"gptq: {wname} has K={info.shape[1]} (shape {list(info.shape)}), not divisible by group_size={group_size}"
            )
        if dequant_dtype is None and info.dtype not in _FLOAT_WEIGHT_DTYPES:
            raise ValueError(
                f"gptq: {wname} is stored as {info.dtype}; expected one of {_FLOAT_WEIGHT_DTYPES} (an already "
                "quantized checkpoint cannot be GPTQ-quantized again)"
            )
    runner = _LayerRunner(sk, device)  # validates the layers' attention types
    # Everything above runs at call time, so bad arguments fail before the caller starts writing.
    return _drive(sk, runner, reader, batches, device, cdtype, quantize, dequant_dtype, progress)


def _drive(
    sk: _Skeleton,
    runner: _LayerRunner,
    reader: SafetensorsDir,
    batches: Sequence[torch.Tensor],
    device: torch.device,
    cdtype: torch.dtype,
    quantize: LayerQuantizer,
    dequant_dtype: torch.dtype | None,
    progress: bool,
) -> Iterator[tuple]:
    last = max(sk.layers_with_targets)  # later layers have no targets: they are never loaded
    hs = _embed(sk, reader, batches, device, cdtype)
    bar = _progress(last + 1, progress)
    try:
        for i in range(last + 1):
            layer = sk.base.layers[i]
            _materialize(layer, f"{sk.prefix}layers.{i}.", reader, device, cdtype)
            try:
                entries, experts = sk.plan.get(i, []), sk.experts.get(i, [])
                if entries or experts:
                    yield from _quantize_layer(
                        runner, layer, i, entries, experts, hs, reader, device, cdtype, quantize, dequant_dtype
                    )
                if i < last:  # inputs of layer i+1, computed with layer i's quantized weights
                    runner.run_all(layer, i, hs, keep=True)
            finally:
                _release(layer)
            bar.update(1)
    finally:
        bar.close()
        hs.clear()


def _quantize_layer(
    runner: _LayerRunner,
    layer: nn.Module,
    i: int,
    entries: list[tuple[nn.Linear, str, str]],
    experts: list[_FusedExperts],
    hs: list[torch.Tensor],
    reader: SafetensorsDir,
    device: torch.device,
    cdtype: torch.dtype,
    quantize: LayerQuantizer,
    dequant_dtype: torch.dtype | None,
) -> Iterator[tuple]:
    hooks = _HessianHooks(entries, device)
    expert_hooks = [_ExpertHessians(ex, device) for ex in experts]
    try:
        for b in range(len(hs)):
            runner(layer, i, hs[b])
            hooks.end_batch()
    finally:
        hooks.remove()
        for eh in expert_hooks:
            eh.remove()

    def quantized(dst: torch.Tensor, wname: str, h: torch.Tensor) -> tuple:
        """GPTQ ``wname`` (held in the layer as ``dst``), write its dequantized value into ``dst``."""
        ckpt_dtype = reader.infos[wname].dtype
        # The layer's copy is exact when fp32 holds the checkpoint dtype (or the dtypes agree).
        exact = cdtype == ckpt_dtype or (cdtype == torch.float32 and ckpt_dtype in _FLOAT_WEIGHT_DTYPES)
        out, deq = quantize(dst if exact else reader.read(wname).to(device), h, dequant_dtype or ckpt_dtype)
        with torch.no_grad():
            dst.copy_(deq)
        return (wname, *(t.cpu() for t in out))

    try:
        for mod, name, wname in entries:
            yield quantized(mod.weight, wname, hooks.hessian(name))
            hooks.release(name)
        for ex, eh in zip(experts, expert_hooks):
            gate_up, down = ex.module.gate_up_proj, ex.module.down_proj  # [E, 2I, H], [E, H, I]
            half = gate_up.shape[1] // 2
            for e, (names, acc) in enumerate(zip(ex.gate_up, eh.gate_up)):
                h = _hessian_or_identity(acc, gate_up.shape[2], device)
                for j, wname in enumerate(names):  # gate rows [0, I), up rows [I, 2I)
                    yield quantized(gate_up.data[e, j * half : (j + 1) * half], wname, h)
                eh.gate_up[e] = None  # free each H once its expert is done
            for e, ((wname,), acc) in enumerate(zip(ex.down, eh.down)):
                yield quantized(down.data[e], wname, _hessian_or_identity(acc, down.shape[2], device))
                eh.down[e] = None
    finally:
        hooks.acc.clear()
        expert_hooks.clear()


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="GPTQ", unit="layer", disable=not enabled)
