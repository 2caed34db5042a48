"""GPU kernels (Triton) for quantrl's number formats; each has the ``formats`` reference as its oracle.

    w4a16_linear / w4a16_repack / w4a16_unrepack   INT4 weight-only GEMM and its weight layout
    nvfp4_linear / nvfp4_repack / nvfp4_decode_table
                                                   NVFP4 weight-only GEMM (the same kernels, e2m1 decode)
    quantize_fp8_activation / fp8_block_gemm / fp8_block_linear
                                                   1x128 activation quantization, block-scaled FP8 GEMM
    quantize_fp8_activation_2d                     x and x^T in 1x128 groups at once (FP8 training)
    quantize_fp8_block                             BF16 -> FP8 128x128 blocks (weight sync)
    quantize_pack_int4 / fake_quantize_int4        INT4 quantize + pack (sync), fused fake quant (QAT)

Every function runs the Triton kernel for CUDA tensors when Triton is installed and the ``formats``
reference otherwise (``dispatch.py``); Triton is optional, this package imports without it.
"""

from quantrl.kernels.dispatch import (
    fake_quantize_int4,
    fp8_block_gemm,
    fp8_block_linear,
    interpreted,
    linear_fp32_acc,
    nvfp4_dequantize,
    nvfp4_linear,
    quantize_fp8_activation,
    quantize_fp8_activation_2d,
    quantize_fp8_block,
    quantize_pack_int4,
    triton_available,
    use_triton,
    w4a16_dequantize,
    w4a16_linear,
)
from quantrl.kernels.layout import nvfp4_decode_table, nvfp4_repack, nvfp4_unrepack, w4a16_repack, w4a16_unrepack

__all__ = [
    "fake_quantize_int4",
    "fp8_block_gemm",
    "fp8_block_linear",
    "interpreted",
    "linear_fp32_acc",
    "nvfp4_decode_table",
    "nvfp4_dequantize",
    "nvfp4_linear",
    "nvfp4_repack",
    "nvfp4_unrepack",
    "quantize_fp8_activation",
    "quantize_fp8_activation_2d",
    "quantize_fp8_block",
    "quantize_pack_int4",
    "triton_available",
    "use_triton",
    "w4a16_dequantize",
    "w4a16_linear",
    "w4a16_repack",
    "w4a16_unrepack",
]
