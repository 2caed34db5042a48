"""``quantrl convert fp8|int4|nvfp4|kv-scales|bf16``: thin parsers over ``quantrl.checkpoint`` converters.

Flag names follow slime's ``convert_hf_to_fp8.py`` and its INT4 GPTQ script.
"""

from __future__ import annotations

import argparse
import sys

from quantrl.checkpoint.safetensors_io import CheckpointError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-workers", type=int, default=1, help="tensors converted in parallel (memory ~ workers x largest tensor)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GB per output safetensors shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _gptq_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="calibration text: parquet (text column), .txt, .jsonl, or 'synthetic'")
    p.add_argument("--num-calibration-samples", type=int, default=256)
    p.add_argument("--max-sequence-length", type=int, default=2048)
    p.add_argument("--dampening-frac", type=float, default=0.01)
    p.add_argument("--act-order", action="store_true", help="GPTQ columns by decreasing Hessian diagonal")
    p.add_argument("--seed", type=int, default=0)


def _gptq_opts(args: argparse.Namespace) -> dict:
    return {"method": args.method, "data_dir": args.data_dir, "num_calibration_samples": args.num_calibration_samples,
            "max_sequence_length": args.max_sequence_length, "dampening_frac": args.dampening_frac,
            "act_order": args.act_order, "seed": args.seed}  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser("convert", help="convert HF checkpoints: BF16 -> FP8 / INT4 / INT8 / NVFP4, and back to BF16")
    csub = conv.add_subparsers(dest="target", metavar="TARGET", required=True)

    p = csub.add_parser("fp8", help="BF16 -> FP8 e4m3 (block 128x128, channel or tensor scales, or MXFP8)")
    p.add_argument("--model-dir", required=True, help="input HF directory (BF16/FP16/FP32 safetensors)")
    p.add_argument("--save-dir", required=True, help="output directory (created atomically)")
    p.add_argument("--strategy", choices=["block", "channel", "tensor"], default="block")
    p.add_argument("--block-size", type=int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"))
    p.add_argument("--scale-fmt", choices=["ue8m0"], default=None, help="round block scales up to powers of two")
    p.add_argument("--format", dest="fmt", choices=["auto", "fp8", "compressed-tensors", "mxfp8"], default="auto",
                   help="config dialect: auto = fp8 for block, compressed-tensors for channel/tensor; mxfp8 = "
                        "MXFP8 (1x32 blocks, E8M0 scales, compressed-tensors mxfp8-quantized; sets the other flags)")
    _common(p)
    p.set_defaults(func=_fp8)

    p = csub.add_parser("int4", help="BF16 -> INT4 (W4A16) or INT8 (W8A16) compressed-tensors pack-quantized")
    p.add_argument("--input-dir", required=True, help="input HF directory")
    p.add_argument("--output-dir", required=True, help="output directory (created atomically)")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=128)
    p.add_argument("--qmax", type=int, choices=[7, 8], default=7, help="7: absmax/7, q in [-7,7]; 8: absmax/7.5, q in [-8,7]")
    p.add_argument("--quant-type", choices=["W4A16", "W8A16"], default="W4A16")
    _gptq_flags(p)
    _common(p)
    p.set_defaults(func=_int4)

    p = csub.add_parser("nvfp4", help="BF16 -> NVFP4 weight-only (NVFP4A16) compressed-tensors nvfp4-pack-quantized")
    p.add_argument("--input-dir", required=True, help="input HF directory")
    p.add_argument("--output-dir", required=True, help="output directory (created atomically)")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn", help="gptq: calibrated on the NVFP4 grid")
    _gptq_flags(p)
    _common(p)
    p.set_defaults(func=_nvfp4)

    p = csub.add_parser("kv-scales", help="add calibrated FP8 KV-cache scales (k_scale / v_scale) to a checkpoint")
    p.add_argument("--input-dir", required=True, help="input HF directory (any format quantrl loads)")
    p.add_argument("--output-dir", required=True, help="output directory (created atomically)")
    p.add_argument("--data-dir", default="synthetic", help="calibration text: parquet (text column), .txt, .jsonl, "
                   "or 'synthetic'")  # fmt: skip
    p.add_argument("--num-calibration-samples", type=int, default=64)
    p.add_argument("--max-sequence-length", type=int, default=512)
    p.add_argument("--headroom", type=float, default=1.0, help="scale = amax * headroom / 448 (> 1: room for RL "
                   "to grow K/V before they saturate)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GB per output safetensors shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_kv_scales)

    p = csub.add_parser("bf16", help="FP8 / INT4 / INT8 / NVFP4 -> BF16 (dequantize through quantrl.formats)")
    p.add_argument("--input-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    _common(p)
    p.set_defaults(func=_bf16)


def _shard_bytes(args: argparse.Namespace) -> int:
    return int(args.max_shard_size * 1e9)


def _run(fn, *a, **kw) -> int:
    try:
        report = fn(*a, **kw)
    except (CheckpointError, OSError, ImportError, ValueError) as e:  # a full disk, no pyarrow: words, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def _fp8(args: argparse.Namespace) -> int:
    from quantrl.checkpoint.convert_fp8 import Fp8ConvertOptions, convert_to_fp8

    opts = Fp8ConvertOptions(
        strategy=args.strategy, block_size=tuple(args.block_size), scale_fmt=args.scale_fmt, fmt=args.fmt,
        max_workers=args.max_workers, device=args.device, overwrite=args.overwrite, max_shard_bytes=_shard_bytes(args),
    )
    return _run(convert_to_fp8, args.model_dir, args.save_dir, opts, progress=not args.no_progress)


def _int4(args: argparse.Namespace) -> int:
    from quantrl.checkpoint.convert_int import IntConvertOptions, convert_to_int

    opts = IntConvertOptions(
        **_gptq_opts(args), quant_type=args.quant_type, group_size=args.group_size, qmax=args.qmax,
        max_workers=args.max_workers, device=args.device, overwrite=args.overwrite, max_shard_bytes=_shard_bytes(args),
    )
    return _run(convert_to_int, args.input_dir, args.output_dir, opts, progress=not args.no_progress)


def _nvfp4(args: argparse.Namespace) -> int:
    from quantrl.checkpoint.convert_nvfp4 import Nvfp4ConvertOptions, convert_to_nvfp4

    opts = Nvfp4ConvertOptions(**_gptq_opts(args), max_workers=args.max_workers, device=args.device,
                               overwrite=args.overwrite, max_shard_bytes=_shard_bytes(args))  # fmt: skip
    return _run(convert_to_nvfp4, args.input_dir, args.output_dir, opts, progress=not args.no_progress)


def _bf16(args: argparse.Namespace) -> int:
    from quantrl.checkpoint.convert_bf16 import Bf16ConvertOptions, convert_to_bf16

    opts = Bf16ConvertOptions(
        dtype=args.dtype, max_workers=args.max_workers, device=args.device, overwrite=args.overwrite,
        max_shard_bytes=_shard_bytes(args),
    )
    return _run(convert_to_bf16, args.input_dir, args.output_dir, opts, progress=not args.no_progress)


def _kv_scales(args: argparse.Namespace) -> int:
    from quantrl.rollout.kv_scales import KVScaleOptions, add_kv_scales

    try:
        opts = KVScaleOptions(data_dir=args.data_dir, num_calibration_samples=args.num_calibration_samples,
                              max_sequence_length=args.max_sequence_length, headroom=args.headroom, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _run(add_kv_scales, args.input_dir, args.output_dir, opts, device=args.device, overwrite=args.overwrite,
                max_shard_bytes=_shard_bytes(args), progress=not args.no_progress)  # fmt: skip
