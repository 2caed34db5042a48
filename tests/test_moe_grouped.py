"""The grouped MoE kernels (``kernels.moe_w4a16``, ``kernels.moe_fp8``) and the MoE block running on them.

The kernels run on CUDA or in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 without a GPU),
outputs poisoned. Each routed pair's row must equal an fp32 GEMM of its token (FP8: its 1x128-quantized
values) with its expert's engine weight (formats' dequantization) to the one bf16 rounding of the output;
the block (INT4 and FP8 checkpoints) must give the expert
loop's sum (the same bf16 additions in ascending expert order) to that rounding, keep following weight
updates through the stacked buffers, and check itself once against the loop.
"""

import pytest
import torch

from quantrl import formats as fm
from quantrl import kernels

triton = pytest.importorskip("triton")
from quantrl.kernels.moe_routing import align_pairs, block_rows
from quantrl.kernels.moe_w4a16 import moe_w4a16_gemm

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = [
    pytest.mark.skipif(not (CUDA or kernels.interpreted()), reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),  # numpy inside the interpreter
]


def experts_w4(e, n, k, g, gen):
    """E random INT4 experts: stacked kernel layout (qweight_t [E, K/8, N], scale_t [E, K/G, N]) and each
    one's engine weight [N, K] (bf16, formats' dequantization)."""
    qts, sts, ws = [], [], []
    for _ in range(e):
        q, s = fm.quantize_int4(torch.randn(n, k, generator=gen) * 0.1, g, 7)
        s = s.bfloat16()
        qt, st = kernels.w4a16_repack(fm.pack_int4(q), s)
        qts.append(qt)
        sts.append(st)
        ws.append(fm.dequantize_int4(q, s, g, torch.bfloat16))
    return torch.stack(qts).to(DEV), torch.stack(sts).to(DEV), ws


def routed(t, e, top_k, gen, skip=()):
    """[T, k] distinct experts per token, never one of ``skip`` (experts that get no pair)."""
    allowed = torch.tensor([j for j in range(e) if j not in skip])
    return torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:top_k]] for _ in range(t)])


@pytest.mark.parametrize(("t", "e", "top_k", "bm"), [(1, 4, 2, 16), (5, 6, 2, 16), (37, 8, 3, 32), (3, 16, 8, 16)])
def test_align_pairs_places_every_pair_once_in_its_experts_blocks(t, e, top_k, bm, gen):
    ex = routed(t, e, top_k, gen, skip=(1,))
    ids, blocks = align_pairs(ex, e, bm)
    n = t * top_k
    assert ids.shape[0] % bm == 0 and blocks.shape[0] == ids.shape[0] // bm
    assert ids.shape[0] == -(-(n + e * (bm - 1)) // bm) * bm  # shapes alone: static under CUDA graphs
    real = ids[ids < n]
    assert sorted(real.tolist()) == list(range(n))  # every pair exactly once
    for b, expert in enumerate(blocks.tolist()):
        rows = ids[b * bm : (b + 1) * bm]
        rows = rows[rows < n]
        if expert < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (ex.reshape(-1)[rows.long()] == expert).all()
            assert rows.tolist() == sorted(rows.tolist())  # pair order within an expert
    assert 1 not in blocks.tolist()  # an expert without pairs has no block


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("unpack", ["bf16x2", "magic"])
@pytest.mark.parametrize(("t", "e", "top_k", "n", "k", "g"),
                         [(1, 4, 2, 96, 128, 32), (7, 6, 2, 64, 256, 128), (20, 5, 3, 80, 64, 32)])  # fmt: skip
def test_each_pair_is_its_token_through_its_expert(t, e, top_k, n, k, g, unpack, gen):
    qt, st, ws = experts_w4(e, n, k, g, gen)
    x = torch.randn(t, k, generator=gen).bfloat16()
    ex = routed(t, e, top_k, gen, skip=(e - 1,))
    bm = block_rows(t * top_k, e)
    ids, blocks = align_pairs(ex.to(DEV), e, bm)
    out = moe_w4a16_gemm(x.to(DEV), qt, st, g, ids, blocks, t * top_k, top_k, bm, unpack=unpack)
    want = torch.stack([x[p // top_k].double() @ ws[int(ex.reshape(-1)[p])].double().T for p in range(t * top_k)])
    err = (out.cpu().double() - want).abs() / want.abs().clamp_min(1e-3 * want.abs().max())
    assert torch.isfinite(out).all() and float(err.max()) <= 2**-7  # the output's one bf16 rounding (+ sums)
    # the down projection's form: rows are the pairs themselves
    h = torch.randn(t * top_k, k, generator=gen).bfloat16()
    out = moe_w4a16_gemm(h.to(DEV), qt, st, g, ids, blocks, t * top_k, 1, bm, unpack=unpack)
    want = torch.stack([h[p].double() @ ws[int(ex.reshape(-1)[p])].double().T for p in range(t * top_k)])
    assert float((out.cpu().double() - want).norm() / want.norm()) <= 4e-3


def test_the_grouped_sum_adds_in_the_expert_loops_order(gen):
    """bf16 addition is not associative: the grouped path must add each token's expert outputs in ascending
    expert order, as the loop's index_add_ does, to give its bits (large and tiny terms make orders differ)."""
    from quantrl.model.moe import sum_in_expert_order

    n, k, h, e = 64, 4, 32, 9
    ex = routed(n, e, k, gen)
    y = (torch.randn(n, k, h, generator=gen) * torch.exp2(torch.randint(-12, 12, (n, k, h), generator=gen))).bfloat16()
    loop = torch.zeros(n, h, dtype=torch.bfloat16)
    for j in range(e):  # SparseMoeBlock._grouped's order
        t, slot = (ex == j).nonzero(as_tuple=True)
        loop.index_add_(0, t, y[t, slot])
    assert torch.equal(sum_in_expert_order(y, ex), loop)
    assert not torch.equal(y.sum(1, dtype=torch.bfloat16), loop)  # another order: other bits


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize(("t", "e", "top_k", "n", "k"), [(1, 4, 2, 96, 128), (9, 5, 2, 80, 64)])
def test_nvfp4_pairs_decode_through_their_experts_tables(t, e, top_k, n, k, gen):
    """NVFP4 experts (each with its own global scale, hence its own decode table): every pair's row is its
    token times formats' NVFP4 weight of its expert, rounded once."""
    qts, sts, tabs, ws = [], [], [], []
    for _ in range(e):
        codes, sc, gs = fm.quantize_nvfp4(torch.randn(n, k, generator=gen) * float(torch.rand((), generator=gen) + 0.1))
        qt, st = kernels.nvfp4_repack(fm.pack_nvfp4(codes), sc)
        qts.append(qt)
        sts.append(st)
        tabs.append(kernels.nvfp4_decode_table(gs))
        ws.append(fm.dequantize_nvfp4(codes, sc, gs, torch.bfloat16))
    qt, st, tab = (torch.stack(ts).to(DEV) for ts in (qts, sts, tabs))
    x = torch.randn(t, k, generator=gen).bfloat16()
    ex = routed(t, e, top_k, gen)
    bm = block_rows(t * top_k, e)
    ids, blocks = align_pairs(ex.to(DEV), e, bm)
    out = moe_w4a16_gemm(x.to(DEV), qt, st, 16, ids, blocks, t * top_k, top_k, bm, table=tab)
    want = torch.stack([x[p // top_k].double() @ ws[int(ex.reshape(-1)[p])].double().T for p in range(t * top_k)])
    assert torch.isfinite(out).all()
    assert float((out.cpu().double() - want).norm() / want.norm()) <= 4e-3


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize(("t", "e", "top_k", "n", "k"), [(1, 4, 2, 96, 128), (7, 6, 2, 200, 320), (20, 5, 3, 64, 64)])
def test_fp8_pairs_are_their_quantized_tokens_through_their_experts(t, e, top_k, n, k, gen):
    """FP8 experts (128x128 blocks, ragged N and K included): each pair's row is its token's 1x128 codes
    times its expert's weight, fp32 accumulation rounded once; the down projection's pair rows too."""
    from quantrl.kernels.moe_fp8 import moe_fp8_gemm

    w, s, deq = [], [], []
    for _ in range(e):
        q, sc = fm.quantize_fp8(torch.randn(n, k, generator=gen).bfloat16(), "block", (128, 128))
        w.append(q)
        s.append(sc)
        deq.append(fm.dequantize_fp8(q, sc, (128, 128), torch.float64))
    w, s = torch.stack(w).to(DEV), torch.stack(s).to(DEV)
    ex = routed(t, e, top_k, gen, skip=(0,))
    bm = block_rows(t * top_k, e)
    ids, blocks = align_pairs(ex.to(DEV), e, bm)
    for rows, div in ((t, top_k), (t * top_k, 1)):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        xq, xs = fm.quantize_fp8_activation(x, 128)
        xd = fm.dequantize_fp8_activation(xq, xs, 128, dtype=torch.float64)
        out = moe_fp8_gemm(xq.to(DEV), xs.to(DEV), w, s, ids, blocks, t * top_k, div, bm)
        want = torch.stack([xd[p // div] @ deq[int(ex.reshape(-1)[p])].T for p in range(t * top_k)])
        assert torch.isfinite(out).all()
        assert float((out.cpu().double() - want).norm() / want.norm()) <= 4e-3


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint with INT4 (group 32), NVFP4 and FP8 (128x128 blocks) experts."""
    from _tiny_models import bf16_fp8_int4, qwen3_moe_config

    from quantrl.checkpoint.convert_nvfp4 import convert_to_nvfp4

    cfg = qwen3_moe_config(intermediate_size=128, moe_intermediate_size=64)  # halves hold whole INT4 groups
    base = tmp_path_factory.mktemp("moe_grouped")
    dirs = bf16_fp8_int4(cfg, base, 32)
    dirs["nvfp4"] = convert_to_nvfp4(dirs["bf16"], base / "nvfp4", progress=False).output_dir
    return dirs


@pytest.fixture(params=["int4", "nvfp4", "fp8"])
def moe_ckpt(request, moe_dirs):
    return moe_dirs[request.param]


def _kernels_on(monkeypatch):
    from quantrl.model.linear import Fp8Linear, _KernelLinear

    if not CUDA:  # the interpreter's W4A16 / FP8 kernels, for the expert loop too
        monkeypatch.setattr(_KernelLinear, "kernel_backend", "triton")
        monkeypatch.setattr(Fp8Linear, "kernel_backend", "triton")


def test_the_block_sums_the_expert_loop_through_the_grouped_kernel(moe_ckpt, monkeypatch, gen):
    """An INT4 or FP8 Qwen3-MoE: logits of a batch through the grouped kernel equal the expert loop's to
    bf16 rounding; the kernel was taken (checked once, then kept), and its stacked weights are the experts'."""
    from quantrl.model import load_model
    from quantrl.model.moe import SparseMoeBlock

    _kernels_on(monkeypatch)
    model = load_model(moe_ckpt, dtype=torch.bfloat16, device=DEV)
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=gen).to(DEV)
    with torch.no_grad():
        fused = model(ids).float()
        assert all(b._fused_ok is True for b in blocks)
        fused_again = model(ids).float()  # the kept kernel, without the check
        monkeypatch.setattr(SparseMoeBlock, "grouped_kernel", False)
        loop = model(ids).float()
    assert torch.equal(fused, fused_again)
    assert float((fused - loop).norm() / loop.norm()) < 1e-2
    from quantrl.model.moe import _grouped_tensors

    b = blocks[0]
    first = b._stack["down_proj"][1]
    assert all(_grouped_tensors(e.down_proj)[0].data_ptr() == first[j].data_ptr() for j, e in enumerate(b.experts))


def test_an_engine_update_reaches_the_stacked_experts(moe_ckpt, monkeypatch, gen):
    """Weight sync refills each expert's kernel buffers in place, which are views into the stack: after an
    update the grouped kernel computes with the new experts (as the loop over the same model does)."""
    from quantrl.model import engine_state, load_model
    from quantrl.model.moe import SparseMoeBlock
    from quantrl.rollout import Engine

    _kernels_on(monkeypatch)
    model = load_model(moe_ckpt, dtype=torch.bfloat16, device=DEV)
    engine = Engine(model, kv_cache_tokens=64)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen).to(DEV)
    with torch.no_grad():
        before = model(ids).float()
    update = {n: t.clone() for n, t in engine_state(model).items()}
    for name in [n for n in update if ".experts." in n and n.endswith(("weight_packed", "proj.weight"))]:
        update[name] = update[name].flip(0).contiguous()  # other experts, same shapes
    engine.update_weights(update.items(), version=1)
    block = next(m for m in model.modules() if isinstance(m, SparseMoeBlock))
    assert isinstance(block._stack, dict)  # still the stack: refilled in place
    with torch.no_grad():
        after = model(ids).float()
        monkeypatch.setattr(SparseMoeBlock, "grouped_kernel", False)
        loop = model(ids).float()
    assert float((after - before).norm() / before.norm()) > 0.05
    assert float((after - loop).norm() / loop.norm()) < 1e-2


def test_a_disagreeing_kernel_is_dropped_with_a_warning(moe_ckpt, monkeypatch, gen):
    from quantrl.kernels import moe_fp8, moe_w4a16
    from quantrl.model import load_model
    from quantrl.model.moe import SparseMoeBlock

    _kernels_on(monkeypatch)
    for mod, fn in ((moe_w4a16, "moe_w4a16_gemm"), (moe_fp8, "moe_fp8_gemm")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, real=real, **kw: real(*a, **kw) * 1.5)
    model = load_model(moe_ckpt, dtype=torch.bfloat16, device=DEV)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=gen).to(DEV)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="grouped MoE kernel disabled"):
            out = model(ids).float()
        monkeypatch.setattr(SparseMoeBlock, "grouped_kernel", False)
        loop = model(ids).float()
    assert torch.equal(out, loop)
    assert all(m._fused_ok is False for m in model.modules() if isinstance(m, SparseMoeBlock))


@pytest.mark.gpu
def test_routing_and_grouped_gemm_replay_in_a_cuda_graph(gen):
    """align_pairs has no host sync (no bincount), so a graph captures routing + GEMM once and each replay
    follows the experts written into its input; Qwen3-30B-A3B's shapes (128 experts, top 8, G 128)."""
    e, top_k, t, k, n, g = 128, 8, 16, 2048, 768, 128
    qt, st, ws = experts_w4(e, n, k, g, gen)
    x = torch.randn(t, k, generator=gen).bfloat16().to(DEV)
    ex = routed(t, e, top_k, gen).to(DEV)
    bm = block_rows(t * top_k, e)

    def step():
        ids, blocks = align_pairs(ex, e, bm)
        return moe_w4a16_gemm(x, qt, st, g, ids, blocks, t * top_k, top_k, bm)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(2):
        ex.copy_(routed(t, e, top_k, gen))
        graph.replay()
        want = torch.stack([x[p // top_k].double().cpu() @ ws[int(ex.reshape(-1)[p])].double().T
                            for p in range(t * top_k)])  # fmt: skip
        assert float((out.cpu().double() - want).norm() / want.norm()) <= 4e-3


@pytest.mark.gpu
def test_graphed_int4_moe_decode_takes_the_grouped_kernel(moe_ckpt):
    """An INT4 / FP8 MoE engine with CUDA graphs decodes through the grouped kernel (no dense dispatch over all
    experts) and samples what the eager engine samples, logprobs to bf16 rounding."""
    from _tiny_models import random_prompts

    from quantrl.model import load_model
    from quantrl.model.moe import SparseMoeBlock
    from quantrl.rollout import Engine, SamplingParams

    model = load_model(moe_ckpt, dtype=torch.bfloat16, device=DEV)
    prompts = random_prompts([5, 9, 3], seed=4)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=12, seed=0)
    graphed = Engine(model, kv_cache_tokens=256, use_cuda_graph=True).generate(prompts, params)
    assert all(b._fused_ok is True for b in model.modules() if isinstance(b, SparseMoeBlock))
    eager = Engine(model, kv_cache_tokens=256).generate(prompts, params)
    same = sum(a.tokens == b.tokens for a, b in zip(graphed, eager))
    assert same >= len(eager) - 1  # greedy: a bf16 near-tie may flip one sample
    gaps = [abs(x - y) for a, b in zip(graphed, eager) if a.tokens == b.tokens for x, y in zip(a.logprobs, b.logprobs)]
    assert max(gaps) < 5e-2


@pytest.mark.usefixtures("poisoned_empty")  # another rank's rows are never written: NaN unless masked
def test_expert_parallel_ranks_sum_their_own_experts(moe_dirs, monkeypatch, gen):
    """With expert parallelism each rank stacks only its experts; another rank's pairs are computed by no
    block and add exact zeros, so each rank's grouped sum equals its loop over its own experts (the block
    then all-reduces the ranks' sums). Both ranks' shards, built in one process, called before the reduce.
    INT4 only: the tiny model's attention cannot split into whole 128x128 FP8 tiles (the kernels' expert
    handling is the same for both formats)."""
    moe_ckpt = moe_dirs["int4"]
    from quantrl.model import load_model
    from quantrl.model.moe import SparseMoeBlock, route
    from quantrl.model.tensor_parallel import TPContext

    _kernels_on(monkeypatch)
    x = torch.randn(6, 64, generator=gen).bfloat16().to(DEV)
    sums = []
    for rank in range(2):
        shard = load_model(moe_ckpt, dtype=torch.bfloat16, device=DEV, tp=TPContext(rank, 2, expert_parallel=True))
        block = next(m for m in shard.modules() if isinstance(m, SparseMoeBlock))
        assert len(block._owned) == block.num_experts // 2
        with torch.no_grad():
            weights, experts, _ = route(block.gate(x), block.top_k, block.normalize, None)
            loop = block._grouped(x, weights, experts)
            block._stack = block._stack_experts()
            assert isinstance(block._stack, dict) and block._stack["up_proj"][1].shape[0] == len(block._owned)
            grouped = block._fused(x, weights, experts)
        assert torch.isfinite(grouped).all()
        assert float((grouped.float() - loop.float()).norm() / loop.float().norm()) < 1e-2
        sums.append(grouped.float())
    whole = next(m for m in load_model(moe_ckpt, dtype=torch.bfloat16, device=DEV).modules()
                 if isinstance(m, SparseMoeBlock))  # fmt: skip
    with torch.no_grad():
        weights, experts, _ = route(whole.gate(x), whole.top_k, whole.normalize, None)
        want = whole._grouped(x, weights, experts).float()
    assert float((sums[0] + sums[1] - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
def test_device_paths_of_the_three_formats(gen):
    """The GPU session's pick of the kernel tests above, on the device's native paths (bf16x2 PTX unpacking,
    the NVFP4 table PTX, fp8 tensor cores), at shapes with ragged N and K tiles."""
    test_each_pair_is_its_token_through_its_expert(7, 6, 2, 64, 256, 128, "bf16x2", gen)
    test_nvfp4_pairs_decode_through_their_experts_tables(9, 5, 2, 80, 64, gen)
    test_fp8_pairs_are_their_quantized_tokens_through_their_experts(7, 6, 2, 200, 320, gen)
