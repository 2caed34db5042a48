"""GPTQ (Frantar et al., 2022) for group-wise symmetric INT weights, on the numbers of ``formats.int4``.

Algorithm. For a Linear layer ``y = x Wᵀ`` with calibration inputs ``X`` the layer-wise objective is
``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` with ``H = 2/n Σ xᵀx`` (``HessianAccumulator``). GPTQ quantizes the columns
of ``W`` one at a time and, after each, spreads the column's rounding error over the not yet quantized
columns through the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``):

    err_j     = (w_j - ŵ_j) / U[j, j]
    w_{j+1:} -= err_j ⊗ U[j, j+1:]

Rows of ``W`` never interact (``H`` is shared, the error is per row), so all rows go through one column
loop together. The updates are applied lazily: inside a block of ``block_size`` columns only the block
is updated, and the block's accumulated errors reach the columns to its right with one matmul at the
block's end. Dead inputs (``diag(H) == 0``: the column never saw a non-zero activation) get
``H[j, j] = 1`` and ``w_j = 0``; ``dampening_frac · mean(diag H)`` is added to the diagonal so the
Cholesky factorization exists for rank-deficient ``H``.

Matching ``formats``. The engine dequantizes ``q * s`` with the stored (bf16) scale, so every scale here
comes from ``formats.int4._group_scale`` (absmax / div in fp32, clamped, rounded to ``scale_dtype``) and
every code from ``formats.int4._codes`` against that stored scale; the error GPTQ propagates is the error
of ``dequantize_int(q, s, group_size, dequant_dtype)``, i.e. of the weights the engine will actually use.
With ``H = c·I`` nothing is propagated (``U`` is diagonal) and the result is ``quantize_int`` bit for bit.

Group scales. Without act-order a group's scale is taken from the group's *current* weights (all
errors of earlier columns already applied) when the loop reaches the group's first column; for the part
of a group that lies right of the current lazy block, the block's pending updates are applied to a copy
first, so the scale never depends on ``block_size``. (The reference implementation reads the stale
outer matrix whenever a group starts inside a block, e.g. group 32 with block 128.) With
``act_order=True`` the columns are processed by decreasing ``diag(H)`` but the groups stay the
*original* contiguous column ranges, because compressed-tensors' ``pack-quantized`` output we write
carries no ``g_idx`` permutation; since a group's columns are then visited out of order, all scales are
computed from the original weights before the loop (the reference's ``static_groups=True``).

NVFP4 (``gptq_quantize_nvfp4``). The same loop on the NVFP4 grid (``formats.nvfp4``): the tensor's global
scale is fixed first, from the original weights (as llm-compressor does; GPTQ's updates may then push a
group past it, where the e4m3 scale clamps at 448 and the codes at ±6), group scales are e4m3 from the
current weights as above, codes are e2m1 of ``w / (fp32(s) / gs)`` rounded to nearest even, and the error
fed back is that of ``dequantize_nvfp4``. With ``H = c·I`` the result is ``quantize_nvfp4`` bit for bit.

All arithmetic is fp32 on the device of ``w`` (the Cholesky chain in fp64), whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantrl.formats import nvfp4
from quantrl.formats._checks import check_float_tensor
from quantrl.formats.int4 import SCALE_DTYPE, _codes, _group_scale, int_range


class HessianAccumulator:
    """Running ``H = 2/n Σ xᵀx`` over every activation row ``x`` (the last dim of what ``add`` gets).

    Each row counts as one sample (a token, for a language model), so batches of any shape and size can
    be mixed: the update ``H ← n/(n+m)·H + 2/(n+m)·XᵀX`` keeps ``H`` the exact average at every step
    (the GPTQ reference scales by the number of sequences instead; GPTQ is invariant to the scale of H).
    """

    def __init__(
        self,
        in_features: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"HessianAccumulator: dtype must be float32 or float64, got {dtype}")
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else None
        self._h: torch.Tensor | None = None
        self._n = 0
        if in_features is not None:
            self._init(in_features, self._device or torch.device("cpu"))

    def _init(self, k: int, device: torch.device) -> None:
        if k <= 0:
            raise ValueError(f"HessianAccumulator: in_features must be positive, got {k}")
        self._h = torch.zeros(k, k, dtype=self._dtype, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate activations ``[..., K]`` (any float dtype)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"HessianAccumulator.add: expected a floating-point tensor [..., K], got {got}")
        if self._h is None:
            self._init(x.shape[-1], self._device or x.device)
        assert self._h is not None
        k = self._h.shape[0]
        if x.shape[-1] != k:
            raise ValueError(f"HessianAccumulator.add: expected last dim {k}, got shape {tuple(x.shape)}")
        x2 = x.detach().reshape(-1, k).to(device=self._h.device, dtype=self._dtype)  # [M, K]
        m = x2.shape[0]
        if m == 0:
            return
        total = self._n + m
        # One fused op: H = n/(n+m) H + 2/(n+m) XᵀX.
        self._h.addmm_(x2.T, x2, beta=self._n / total, alpha=2.0 / total)
        self._n = total

    @property
    def hessian(self) -> torch.Tensor:
        """``[K, K]`` in the accumulation dtype (the live buffer, not a copy)."""
        if self._h is None or self._n == 0:
            raise ValueError(
                "HessianAccumulator: no activations were added; run calibration data through the layer first"
            )
        return self._h

    @property
    def num_samples(self) -> int:
        return self._n


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Damped ``H`` [K, K] fp64 -> upper ``U`` with ``H⁻¹ = Uᵀ U`` (fp64); ValueError if not PD."""
    hint = "H is not positive definite after dampening; increase --dampening-frac (dampening_frac)"
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(f"gptq_quantize: Cholesky factorization of H failed at column {int(info) - 1}: {hint}")
    hinv = torch.cholesky_inverse(lower)
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(u).all()):
        raise ValueError(f"gptq_quantize: Cholesky factorization of H⁻¹ failed (H is ill-conditioned): {hint}")
    return u


@dataclass(frozen=True)
class _IntGrid:
    """formats.int4's grid: stored scales from a group, codes and dequantized values of one column."""

    num_bits: int
    qmax: int
    scale_dtype: torch.dtype
    dequant_dtype: torch.dtype
    code_dtype = torch.int8

    def scales(self, g: torch.Tensor) -> torch.Tensor:
        """[R, K/G, G] fp32 -> stored scale [R, K/G]: formats' rule."""
        div = int_range(self.num_bits, self.qmax)[2]
        return _group_scale(g, div, self.scale_dtype, self.num_bits, g, "gptq_quantize: error-updated weight")

    def column(self, col: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """col fp32 [N], stored scales [N] -> (codes [N], what dequantize_int yields for them, as fp32)."""
        qlo, qhi, _ = int_range(self.num_bits, self.qmax)
        q = _codes(col.view(-1, 1, 1), s.view(-1, 1), qlo, qhi).view(-1)
        return q, (q * s.float()).to(self.dequant_dtype).float()


@dataclass(frozen=True)
class _Nvfp4Grid:
    """formats.nvfp4's grid under a fixed global scale ``gs`` (fp32 [1])."""

    gs: torch.Tensor
    dequant_dtype: torch.dtype
    table: torch.Tensor  # formats.nvfp4.E2M1_VALUES on the weight's device (not copied once per column)
    code_dtype = torch.uint8

    def scales(self, g: torch.Tensor) -> torch.Tensor:
        return nvfp4._group_scales(g, self.gs, g, "gptq_quantize_nvfp4: error-updated weight")

    def column(self, col: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_eff = s.float().div_(self.gs)  # formats' one division per group
        codes = nvfp4._e2m1_codes(torch.div(col, s_eff))
        deq = self.table[codes.long()] * s_eff
        return codes, deq.to(self.dequant_dtype).float()


def _check_finite(x: torch.Tensor, what: str) -> None:
    # One explicit pass: a NaN in H would otherwise surface as a misleading Cholesky failure.
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        nan = int(torch.isnan(x).sum())
        raise ValueError(
            f"{what}: input contains non-finite values ({nan} NaN, {int((~finite).sum()) - nan} Inf "
            f"of {x.numel()} elements)"
        )


def _check_inputs(
    w: torch.Tensor, h: torch.Tensor, group_size: int, block_size: int, dampening_frac: float
) -> None:
    check_float_tensor(w, what="gptq_quantize: weight", ndim=2)
    _check_finite(w, "gptq_quantize: weight")
    n, k = w.shape
    if group_size <= 0:
        raise ValueError(f"gptq_quantize: group_size must be positive, got {group_size}")
    if k % group_size:
        raise ValueError(
            f"gptq_quantize: K={k} (weight shape {tuple(w.shape)}) is not divisible by group_size={group_size}"
        )
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != (k, k):
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"gptq_quantize: Hessian must be [K, K] = ({k}, {k}) for weight {tuple(w.shape)}, got {got}")
    check_float_tensor(h, what="gptq_quantize: Hessian", ndim=2)
    _check_finite(h, "gptq_quantize: Hessian")
    if block_size <= 0:
        raise ValueError(f"gptq_quantize: block_size must be positive, got {block_size}")
    if not (math.isfinite(dampening_frac) and dampening_frac >= 0):
        raise ValueError(f"gptq_quantize: dampening_frac must be a finite number >= 0, got {dampening_frac}")


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    *,
    num_bits: int = 4,
    group_size: int = 128,
    qmax: int = 7,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    scale_dtype: torch.dtype = SCALE_DTYPE,
    dequant_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantize ``w [N, K]`` given ``H [K, K]`` -> ``(q int8 [N, K], scale [N, K/group_size])``.

    The result uses ``formats.int4`` conventions (``int_range(num_bits, qmax)``, stored scale in
    ``scale_dtype``), so ``dequantize_int(q, scale, group_size, dequant_dtype)`` are exactly the weights
    whose error GPTQ compensated; ``dequant_dtype`` should be the engine's dtype. ``w`` and ``H`` are not
    modified.
    """
    _check_inputs(w, H, group_size, block_size, dampening_frac)
    int_range(num_bits, qmax)  # validates the convention
    grid = _IntGrid(num_bits, qmax, scale_dtype, dequant_dtype)
    return _gptq(w, H, grid, group_size, dampening_frac, act_order, block_size)


def gptq_quantize_nvfp4(
    w: torch.Tensor,
    H: torch.Tensor,
    *,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    dequant_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on the NVFP4 grid: ``w [N, K]``, ``H [K, K]`` -> ``(codes uint8 [N, K], scale e4m3 [N, K/16],
    global_scale fp32 [1])``, the ``formats.quantize_nvfp4`` outputs; ``dequantize_nvfp4(codes, scale, gs,
    dequant_dtype)`` are the weights whose error was compensated. The global scale is that of ``w``."""
    _check_inputs(w, H, nvfp4.GROUP, block_size, dampening_frac)
    gs = nvfp4.global_scale_nvfp4(w)
    grid = _Nvfp4Grid(gs, dequant_dtype, nvfp4.E2M1_VALUES.to(w.device))
    codes, scale = _gptq(w, H, grid, nvfp4.GROUP, dampening_frac, act_order, block_size)
    return codes, scale, gs


def _gptq(w: torch.Tensor, H: torch.Tensor, grid, group_size: int, dampening_frac: float, act_order: bool,
          block_size: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The column loop on ``grid`` (``_IntGrid`` / ``_Nvfp4Grid``) -> (codes [N, K], stored scales [N, K/G])."""
    n, k = w.shape
    dev = w.device

    # Work on Wᵀ [K, N]: the column loop then touches contiguous rows (several times faster than
    # strided columns), and rows of W stay independent as in the textbook formulation.
    Wt = w.detach().to(torch.float32).T.contiguous()  # [K, N], updated in place by error propagation
    h = H.detach().to(device=dev, dtype=torch.float64).clone()

    diag = torch.diagonal(h)  # a view: writes go to h
    dead = diag == 0
    diag[dead] = 1.0
    Wt[dead] = 0.0

    num_groups = k // group_size
    if act_order:
        # Static groups over the original column ranges (no g_idx in our output format).
        grouped = Wt.T.reshape(n, num_groups, group_size)  # [N, K/G, G] (a copy: Wt.T is strided)
        scale_t = grid.scales(grouped).T.contiguous()  # [K/G, N]
        perm = torch.argsort(diag, descending=True, stable=True)
        Wt = Wt[perm]
        h = h[perm][:, perm]
        diag = torch.diagonal(h)
        group_of = (perm // group_size).tolist()  # processed position -> original group
    else:
        scale_t = None  # [K/G, N], allocated at the first group (its dtype is the grid's)
        perm = None
        group_of = [j // group_size for j in range(k)]

    diag += dampening_frac * diag.mean()
    U = _inverse_cholesky_upper(h).to(torch.float32)  # [K, K] upper
    del h, diag

    Qt = torch.empty(k, n, dtype=grid.code_dtype, device=dev)  # [K, N]
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = Wt[i1:i2].clone()  # [B, N]: the block, kept current within the block
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not act_order and j % group_size == 0:
                s_new = _current_group_scale(Wt, W1, Err1, U, i1, i2, i, group_size, grid)
                if scale_t is None:
                    scale_t = torch.empty(num_groups, n, dtype=s_new.dtype, device=dev)
                scale_t[j // group_size] = s_new
            col = W1[i]  # [N]
            q, deq = grid.column(col, scale_t[group_of[j]])  # stored scale of each row's group
            Qt[j] = q.to(grid.code_dtype)
            err = (col - deq) / U1[i, i]
            W1[i:] -= U1[i, i:].unsqueeze(1) * err.unsqueeze(0)
            Err1[i] = err
        Wt[i2:] -= U[i1:i2, i2:].T @ Err1  # lazy update of everything below the block: [K-i2, B] @ [B, N]

    if perm is not None:
        Qt = Qt[torch.argsort(perm)]
    return Qt.T.contiguous(), scale_t.T.contiguous()


def _current_group_scale(
    Wt: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor, i1: int, i2: int, i: int,
    group_size: int, grid,
) -> torch.Tensor:  # fmt: skip
    """Scale [N] of the group starting at column ``i1 + i`` from its fully error-updated weights."""
    j = i1 + i
    end = j + group_size
    cur = W1[i : min(end, i2) - i1]  # in-block part [g, N]: already current
    if end > i2:
        # Beyond the block Wt still lacks this block's first i errors; apply them to a copy.
        rest = Wt[i2:end] - U[i1:j, i2:end].T @ Err1[:i]  # [end-i2, N]
        cur = torch.cat((cur, rest), dim=0)
    return grid.scales(cur.T.unsqueeze(1)).view(-1)  # [N, 1, G] -> [N]
