"""Program -> output tile order shared by the tiled GEMMs (W4A16 mma path, FP8 block GEMM).

Programs walk bands of ``GROUP_M`` row tiles column by column, so programs that run together share weight
(B) tiles in L2 instead of each streaming a different column of the weight.
"""

from __future__ import annotations

from quantrl.kernels._triton import tl, triton


@triton.jit
def swizzled_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` over a cdiv(M, BM) x cdiv(N, BN) tile grid."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n  # programs per band of GROUP_M row tiles
    first_m = (pid // width) * GROUP_M
    band = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % band, (pid % width) // band
