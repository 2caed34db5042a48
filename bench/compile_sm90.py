"""Compile every quantrl Triton kernel for sm_90 (H100/H200) on a machine without a GPU, and read the SASS.

GPU minutes are scarce here, and a kernel that only ever ran in Triton's interpreter has never met the real
compiler: a Python-level error (a non-constexpr global, a shape the layout pass rejects), a PTX typo in
inline assembly, a register spill or a hot loop full of shared-memory shuffles all surface only at the first
launch on the device. Triton's wheel bundles ``ptxas``, ``cuobjdump`` and ``nvdisasm``, so the whole
pipeline (Python -> TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> cubin) runs on any Linux machine once
``triton.runtime.driver`` answers "cuda, sm_90". This script installs such a stand-in driver (compile: yes,
launch: no-op), calls the real launchers (``w4a16_gemm``, the quantizers, the block GEMM) with CPU tensors
for every specialization the GPU paths use, and reports per compiled kernel: registers, spilled bytes,
shared memory, and the instruction mix of the hot loop (the longest backward branch in the SASS) with its
ALU issue-cycle estimate per warp (``alu~``: max(2 x INT-pipe ops, FMA-pipe ops)), and the tensor-core
instruction used (HGMMA = wgmma, HMMA = mma.sync, QGMMA = fp8 wgmma).

Caveat: this is the local Triton (``triton.__version__`` is in the JSON), not necessarily the device's
(3.6 there); the SASS is indicative, the compile errors are real.

    python bench/compile_sm90.py                 # table + bench/results/compile_sm90.json; exit 1 on failure
    python bench/compile_sm90.py --no-write      # (tests/test_kernels_compile.py)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_sm90: unset TRITON_INTERPRET (the interpreter builds no GPU code)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

ARCH = 90
TENSOR_CORE_OPS = ("HGMMA", "QGMMA", "HMMA", "IMMA")
# Hopper's per-partition pipes: 16 INT32 lanes (logic, shifts, byte permutes, compares, address adds) against
# 32 on the FMA pipe (fp32/packed-half math, and IMAD, which ptxas uses for moves and left shifts to balance
# them). A warp's INT op therefore takes 2 issue cycles, so an ALU-bound loop costs ~max(2 INT, FMA) cycles.
INT_PIPE = {"LOP3", "SHF", "PRMT", "IADD3", "LEA", "ISETP", "SEL", "SGXT", "BMSK", "VIADD", "IMNMX", "VIMNMX", "IABS"}
FMA_PIPE = {"FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "IMAD", "FSEL", "FSETP", "F2FP", "MOV", "CS2R"}


class _NoLaunch:
    """Stands in for the CUDA launcher: the kernel is compiled, nothing runs."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        return None


class _Utils:
    @staticmethod
    def load_binary(name, kernel, shared, device):
        return None, None, 0, 0, 1024  # module, function, n_regs, n_spills, max threads (read from the cubin)

    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class Sm90OfflineDriver:
    """The part of Triton's driver interface that compiling (not launching) a kernel touches."""

    launcher_cls = _NoLaunch
    utils = _Utils()

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


# ---------------------------------------------------------------------------------------------------------
# the launches: every constexpr specialization the GPU code paths use
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    run: object  # () -> None: calls one real launcher with CPU tensors
    kernels: list = field(default_factory=list)  # filled in: compiled kernels this case produced


def _cases() -> list[Case]:
    from quantrl.kernels import block_gemm, decode_attention, fp8_quant, int4_quant, moe_fp8, moe_w4a16
    from quantrl.kernels.w4a16 import DEFAULT_UNPACK, GEMV_CONFIG, MMA_CONFIGS, W4A16Config, nvfp4_gemm, w4a16_gemm

    n, k = 1024, 1024  # multiples of 16: the pointer/int divisibility specializations real shapes get
    bf = torch.bfloat16
    cases: list[Case] = []

    def w4(m, cfg, g=128, dt=bf, bias=False):
        x = torch.empty(m, k, dtype=dt)
        qt = torch.empty(k // 8, n, dtype=torch.int32)
        st = torch.empty(k // g, n, dtype=torch.bfloat16)
        b = torch.empty(n, dtype=dt) if bias else None
        return lambda: w4a16_gemm(x, qt, st, g, b, cfg, native=True)

    for unpack in ("magic", "bf16x2"):
        for g in (128, 32):
            for split in (1, 8):
                cfg = replace(GEMV_CONFIG, split_k=split, unpack=unpack)
                cases.append(Case(f"w4a16 gemv {unpack} G={g} split={split}", w4(1, cfg, g, bias=split == 1)))
    cases.append(Case("w4a16 gemv fp16", w4(1, W4A16Config("gemv", 64, 128, split_k=1), 64, torch.float16)))
    for limit, cfg in MMA_CONFIGS:
        m = min(limit, 4096)
        for g in (128, 32):
            for unpack in ("magic", "bf16x2"):
                c = replace(cfg, split_k=1, unpack=unpack)
                cases.append(Case(f"w4a16 mma {unpack} bm={cfg.bm} bn={cfg.bn} bk={cfg.bk} G={g}", w4(m, c, g)))
    split_cfg = replace(MMA_CONFIGS[0][1], split_k=4, unpack=DEFAULT_UNPACK)
    cases.append(Case("w4a16 mma split-K + reduce", w4(16, split_cfg, 128, bias=True)))

    def fp4(m, cfg, dt=bf, bias=False):
        x = torch.empty(m, k, dtype=dt)
        qt = torch.empty(k // 8, n, dtype=torch.int32)
        st = torch.empty(-(-k // 64), n, dtype=torch.int32)
        table = torch.empty(2, 256, 4, dtype=torch.int32)
        b = torch.empty(n, dtype=dt) if bias else None
        return lambda: nvfp4_gemm(x, qt, st, table, b, cfg, native=True)

    for split in (1, 8):
        cases.append(Case(f"nvfp4 gemv split={split}", fp4(1, replace(GEMV_CONFIG, split_k=split), bias=split == 1)))
    cases.append(Case("nvfp4 gemv fp16", fp4(1, replace(GEMV_CONFIG, split_k=1), torch.float16)))
    for limit, cfg in MMA_CONFIGS:
        c = replace(cfg, split_k=1)
        cases.append(Case(f"nvfp4 mma bm={cfg.bm} bn={cfg.bn} bk={cfg.bk}", fp4(min(limit, 4096), c)))

    x = torch.empty(256, k, dtype=bf)
    w = torch.empty(n, k, dtype=bf)
    for native in (True, False):
        for fmt in (None, "ue8m0"):
            tag = f"{'native' if native else 'emulated'}{' ue8m0' if fmt else ''}"
            cases.append(Case(f"fp8 act quant 1x128 {tag}",
                              lambda fmt=fmt, nat=native: fp8_quant.quantize_fp8_activation_triton(
                                  x, 128, fmt, check=False, native=nat)))  # fmt: skip
            cases.append(Case(f"fp8 act quant 2d {tag}",
                              lambda fmt=fmt, nat=native: fp8_quant.quantize_fp8_activation_2d_triton(
                                  x, 128, fmt, check=False, native=nat)))  # fmt: skip
            cases.append(Case(f"fp8 block quant 128x128 {tag}",
                              lambda fmt=fmt, nat=native: fp8_quant.quantize_fp8_block_triton(
                                  w, (128, 128), fmt, check=False, native=nat)))  # fmt: skip
        for g, qmax in ((128, 7), (32, 8)):
            tag = f"G={g} qmax={qmax} {'native' if native else 'emulated'}"
            cases.append(Case(f"int4 quant+pack {tag}", lambda g=g, q=qmax, nat=native:
                              int4_quant.quantize_pack_int4_triton(w, g, q, check=False, native=nat)))  # fmt: skip
            cases.append(Case(f"int4 fake quant {tag}", lambda g=g, q=qmax, nat=native:
                              int4_quant.fake_quantize_int4_triton(w, g, q, check=False, native=nat)))  # fmt: skip

    kb = -(-k // 128)
    for m in (1, 64, 256, 4096):
        for b_scale in ("block", "row"):
            xq = torch.empty(m, k, dtype=torch.float8_e4m3fn)
            xs = torch.empty(m, kb, dtype=torch.float32)
            wq = torch.empty(n, k, dtype=torch.float8_e4m3fn)
            ws = torch.empty(n if b_scale == "row" else n // 128, kb, dtype=torch.float32)
            bias = torch.empty(n, dtype=bf) if m == 64 else None
            cases.append(Case(f"fp8 block gemm M={m} b_scale={b_scale}{' +bias' if bias is not None else ''}",
                              lambda xq=xq, xs=xs, wq=wq, ws=ws, bias=bias, b=b_scale: block_gemm.fp8_block_gemm_triton(
                                  xq, xs, wq, ws, bias, native=True, b_scale=b)))  # fmt: skip

    # decode attention: Qwen3-0.6B's heads (16 q / 8 kv, D 128) at batch 1 (split + merge) and 64 (one
    # split), BF16 and FP8 caches; a 4-per-group sliding layer at D 64; fp16; MHA at D 256; latent attention
    def attn(b, hq, hkv, d, cache, qdt=bf, window=None, length=4096, rope=0):
        q = torch.empty(b, hq, d + rope, dtype=qdt)
        k, v = (torch.empty(b, hkv, length, d, dtype=cache or qdt) for _ in range(2))
        r = torch.empty(b, hkv, length, rope, dtype=cache or qdt) if rope else None
        lens = torch.empty(b, dtype=torch.long)
        sc = torch.empty((), dtype=torch.float32)
        return lambda: decode_attention.decode_attention_triton(q, k, k if rope else v, lens, d**-0.5, sc, sc, window,
                                                                k_rope=r, rope_scale=sc, native=True)  # fmt: skip

    for b in (1, 64):
        for cache in (None, torch.float8_e4m3fn):
            cases.append(Case(f"decode attn B={b} G=2 D=128 {'fp8' if cache else 'bf16'}", attn(b, 16, 8, 128, cache)))
    cases.append(Case("decode attn G=4 D=64 window", attn(2, 16, 4, 64, None, window=1024)))
    cases.append(Case("decode attn fp16 G=2 D=128", attn(8, 16, 8, 128, None, torch.float16)))
    cases.append(Case("decode attn MHA D=256 fp8", attn(4, 8, 8, 256, torch.float8_e4m3fn)))
    for cache in (None, torch.float8_e4m3fn):  # DeepSeek / Kimi latent decode: 16 heads a block, r 512 + rot 64
        cases.append(Case(f"decode attn latent H=16 r=512 {'fp8' if cache else 'bf16'}",
                          attn(8, 16, 1, 512, cache, rope=64)))  # fmt: skip

    # grouped MoE W4A16 (Qwen3-30B-A3B's experts: H 2048, I 768): decode (BM 16) to prefill (BM 64) blocks
    def moe(bm, g, unpack, k_dim=2048, n_dim=768, e=128):
        x = torch.empty(64, k_dim, dtype=bf)
        qt = torch.empty(e, k_dim // 8, n_dim, dtype=torch.int32)
        st = torch.empty(e, k_dim // g, n_dim, dtype=bf)
        ids = torch.empty(4096, dtype=torch.int32)
        blocks = torch.empty(4096 // bm, dtype=torch.int32)
        return lambda: moe_w4a16.moe_w4a16_gemm(x, qt, st, g, ids, blocks, 512, 8, bm, native=True, unpack=unpack)

    for bm in (16, 32, 64):
        for unpack in ("bf16x2", "magic"):
            cases.append(Case(f"moe w4a16 bm={bm} G=128 {unpack}", moe(bm, 128, unpack)))
    cases.append(Case("moe w4a16 bm=16 G=32 bf16x2", moe(16, 32, "bf16x2")))
    for bm in (16, 64):  # NVFP4 experts: the same kernel with the table decode
        xb = torch.empty(64, 2048, dtype=bf)
        q4, s4 = torch.empty(128, 256, 768, dtype=torch.int32), torch.empty(128, 32, 768, dtype=torch.int32)
        tab = torch.empty(128, 2, 256, 4, dtype=torch.int32)
        ids, blocks = torch.empty(4096, dtype=torch.int32), torch.empty(4096 // bm, dtype=torch.int32)
        cases.append(Case(f"moe nvfp4 bm={bm}", lambda xb=xb, q4=q4, s4=s4, tab=tab, ids=ids, blocks=blocks, bm=bm:
                          moe_w4a16.moe_w4a16_gemm(xb, q4, s4, 16, ids, blocks, 512, 8, bm, native=True,
                                                   table=tab)))  # fmt: skip
    for bm in (16, 32, 64):  # the same layer with FP8 (128x128-block) experts
        xq, xs = torch.empty(64, 2048, dtype=torch.float8_e4m3fn), torch.empty(64, 16, dtype=torch.float32)
        w8, ws8 = torch.empty(128, 768, 2048, dtype=torch.float8_e4m3fn), torch.empty(128, 6, 16, dtype=torch.float32)
        ids, blocks = torch.empty(4096, dtype=torch.int32), torch.empty(4096 // bm, dtype=torch.int32)
        cases.append(Case(f"moe fp8 bm={bm}", lambda xq=xq, xs=xs, w8=w8, ws8=ws8, ids=ids, blocks=blocks, bm=bm:
                          moe_fp8.moe_fp8_gemm(xq, xs, w8, ws8, ids, blocks, 512, 8, bm, native=True)))  # fmt: skip
    return cases


def _jit_functions() -> list:
    from quantrl.kernels import block_gemm, decode_attention, fp8_quant, int4_quant, moe_fp8, moe_w4a16, w4a16

    out = []
    for mod in (w4a16, fp8_quant, int4_quant, block_gemm, decode_attention, moe_w4a16, moe_fp8):
        out += [v for v in vars(mod).values()
                if isinstance(v, triton.runtime.jit.JITFunction) and v.__name__.endswith("_kernel")]  # fmt: skip
    return out


def _compiled(fns) -> dict:
    """id(CompiledKernel) -> CompiledKernel, over every jit function's cache for our fake device 0."""
    got = {}
    for fn in fns:
        cache = getattr(fn, "device_caches", {}).get(0)
        if cache:
            for ck in cache[0].values():
                got[id(ck)] = ck
    return got


# ---------------------------------------------------------------------------------------------------------
# reading the cubin
# ---------------------------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"compile_sm90: Triton's bundled {name} is missing ({path})")
    return str(path)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
_BRANCH = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`?\(?\.?L?_?x?_?)?(0x[0-9a-f]+)")


def analyze_cubin(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res, sass = (subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True,
                                    check=True).stdout for flag in ("-res-usage", "-sass"))  # fmt: skip
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    instrs = [(int(a, 16), op, mods) for a, op, mods in _SASS_LINE.findall(sass)]
    loops = [(int(t, 16), int(a, 16)) for a, t in _BRANCH.findall(sass) if int(t, 16) < int(a, 16)]
    lo, hi = max(loops, key=lambda r: r[1] - r[0]) if loops else (0, -1)
    body = [(op, mods) for a, op, mods in instrs if lo <= a <= hi]
    mix = Counter(op for op, _ in body)
    int_ops = sum(v for op, v in mix.items() if op in INT_PIPE)
    fma_ops = sum(v for op, v in mix.items() if op in FMA_PIPE)
    return {
        "regs": int(usage.get("REG", 0)), "spill_bytes": int(usage.get("LOCAL", 0)) + int(usage.get("STACK", 0)),
        "shared_static": int(usage.get("SHARED", 0)), "sass_instructions": len(instrs),
        "loop_instructions": len(body), "loop_mix": dict(mix.most_common(12)),
        "loop_int_pipe": int_ops, "loop_fma_pipe": fma_ops, "loop_alu_cycles_per_warp": max(2 * int_ops, fma_ops),
        "loop_barriers": mix.get("BAR", 0), "loop_shared_ld_st": mix.get("LDS", 0) + mix.get("STS", 0),
        "tensor_core": sorted({op for _, op, _ in instrs if op in TENSOR_CORE_OPS}),
    }  # fmt: skip


def compile_all(cases: list[Case]) -> tuple[list[dict], list[str]]:
    driver.set_active(Sm90OfflineDriver())
    fns = _jit_functions()
    rows, failures = [], []
    seen: set[int] = set()
    for case in cases:
        try:
            case.run()
        except Exception as e:  # noqa: BLE001 - any compile error: name the case, keep going
            tb = traceback.format_exception_only(type(e), e)
            failures.append(f"{case.name}: {''.join(tb).strip()[-1500:]}")
            continue
        for key, ck in _compiled(fns).items():
            if key in seen:
                continue
            seen.add(key)
            info = analyze_cubin(ck.asm["cubin"])
            consts = {k: v for k, v in getattr(ck.src, "constants", {}).items()}
            rows.append({"case": case.name, "kernel": ck.name, "num_warps": ck.metadata.num_warps,
                         "num_stages": ck.metadata.num_stages, "shared": ck.metadata.shared,
                         "constexprs": {str(k): repr(v) for k, v in consts.items()}, **info})  # fmt: skip
            if info["spill_bytes"]:
                failures.append(f"{case.name}: {ck.name} spills {info['spill_bytes']} bytes")
    return rows, failures


def print_table(rows: list[dict]) -> None:
    print(f"{'case':46} {'kernel':28} {'regs':>4} {'spill':>5} {'smem':>6} {'loop':>5} {'alu~':>5} {'bar':>3} "
          f"{'lds/sts':>7}  tc")  # fmt: skip
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in list(r["loop_mix"].items())[:6])
        print(f"{r['case'][:46]:46} {r['kernel'][:28]:28} {r['regs']:4d} {r['spill_bytes']:5d} {r['shared']:6d} "
              f"{r['loop_instructions']:5d} {r['loop_alu_cycles_per_warp']:5d} {r['loop_barriers']:3d} "
              f"{r['loop_shared_ld_st']:7d}  "
              f"{'/'.join(r['tensor_core']) or '-'}   [{top}]")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/compile_sm90.json")
    p.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = p.parse_args(argv)
    cases = [c for c in _cases() if args.only in c.name]
    rows, failures = compile_all(cases)
    print_table(rows)
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    print(f"\n{len(cases)} launches, {len(rows)} kernels compiled for sm_{ARCH} with Triton {triton.__version__}; "
          f"{len(failures)} failures")  # fmt: skip
    if not args.no_write and not args.only:
        from _common import write_results

        path = write_results("compile_sm90", {"arch": f"sm_{ARCH}", "failures": failures, "kernels": rows})
        print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
