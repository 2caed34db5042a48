"""Number formats: the single source of truth for FP8, INT4/INT8 and NVFP4 numerics (pure torch, any device)."""

from quantrl.formats.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_fp8,
    dequantize_fp8_activation,
    fake_quantize_fp8,
    fake_quantize_fp8_activation,
    quantize_fp8,
    quantize_fp8_activation,
)
from quantrl.formats.int4 import (
    dequantize_int,
    dequantize_int4,
    fake_quantize_int,
    fake_quantize_int4,
    pack_int,
    pack_int4,
    quantize_int,
    quantize_int4,
    unpack_int,
    unpack_int4,
)
from quantrl.formats.nvfp4 import (
    dequantize_nvfp4,
    fake_quantize_nvfp4,
    pack_nvfp4,
    quantize_nvfp4,
    unpack_nvfp4,
)

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "dequantize_fp8",
    "dequantize_fp8_activation",
    "dequantize_int",
    "dequantize_int4",
    "dequantize_nvfp4",
    "fake_quantize_fp8",
    "fake_quantize_fp8_activation",
    "fake_quantize_int",
    "fake_quantize_int4",
    "fake_quantize_nvfp4",
    "pack_int",
    "pack_int4",
    "pack_nvfp4",
    "quantize_fp8",
    "quantize_fp8_activation",
    "quantize_int",
    "quantize_int4",
    "quantize_nvfp4",
    "unpack_int",
    "unpack_int4",
    "unpack_nvfp4",
]
