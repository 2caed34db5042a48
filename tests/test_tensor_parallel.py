"""A tensor-parallel engine (two gloo processes on CPU) against the same model on one process.

For BF16, FP8 (128x128 blocks) and INT4 checkpoints of a dense Qwen3, a Qwen3-MoE and a DeepSeek-V3
(latent attention), each rank loads its shard: its dequantized weights are exactly the matching rows
or columns of the whole model's; its logits equal the whole model's up to fp32 summation order; its
engine samples what the single engine samples, with the whole model's logprobs; and a weight update of
whole tensors (the trainer's sync in the engine's format) leaves each rank its piece, atomically.
"""


import pytest
import torch
from _gloo import spawn_gloo
from _tiny_models import bf16_fp8_int4, deepseek_v3_config, qwen3_config, qwen3_moe_config, random_prompts

# every split holds whole FP8 tiles: 4 query heads and 2 kv heads of 128, SwiGLU 512, experts 256
ARCHS = {
    "qwen3": lambda: qwen3_config(hidden_size=256, intermediate_size=512, head_dim=128),
    "qwen3_moe": lambda: qwen3_moe_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                          head_dim=128),
    # 2 heads a rank: q_b_proj 2 x (128 + 64) = 384 rows, kv_b_proj 2 x (128 + 128) = 512
    "deepseek_v3": lambda: deepseek_v3_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
                                              kv_lora_rank=128, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                              v_head_dim=128),
    # expert parallelism: experts 128 wide, which 2 ranks could not split into FP8 tiles, held whole, 4 a rank
    "qwen3_moe_ep": lambda: qwen3_moe_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                             num_experts=8, head_dim=128),
    "deepseek_v3_ep": lambda: deepseek_v3_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                                 num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
                                                 kv_lora_rank=128, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                                 v_head_dim=128),
}
# logit (relative) and |logprob| differences, TP vs one process: fp32 summation order (measured < 1e-6). FP8
# W8A8 quantizes activations per call: where the order moves an activation across an e4m3 rounding boundary
# the step is 1/16 of that element, and in a MoE it can flip a near-tied expert (measured up to 2.2e-2
# relative logits, DeepSeek-V3; 8e-3 logprobs). The sampled tokens are the same.
LOGPROB_TOL = {"bf16": 1e-5, "int4": 1e-5, "fp8": 5e-2}


def _shards(rank: int, world: int, ckpts: dict) -> None:
    for (arch, kind), path in ckpts.items():
        _check(rank, world, arch, kind, path)


def _check(rank, world, arch, kind, path):
    from quantrl.model import dequantized_weights, engine_state, load_model
    from quantrl.model.tensor_parallel import COLUMN, TPContext
    from quantrl.rollout import Engine, SamplingParams

    what = f"{arch}/{kind}"
    ep = arch.endswith("_ep")
    tp = TPContext(rank, world, expert_parallel=ep)
    whole, shard = load_model(path, dtype=torch.float32), load_model(path, dtype=torch.float32, tp=tp)
    mods = dict(shard.named_modules())
    full_w, mine = dequantized_weights(whole), dequantized_weights(shard)
    split = 0
    for name, w in mine.items():
        lin = mods[name.removesuffix(".weight")]
        if not hasattr(lin, "tp_dim"):
            assert torch.equal(w, full_w[name]), (what, name)  # replicated: whole
            continue
        n = w.shape[lin.tp_dim]
        assert torch.equal(w, full_w[name].narrow(lin.tp_dim, rank * n, n)), (what, name)
        split += lin.tp_dim == COLUMN
    assert split > 0, what
    # the vocabulary too: embedding rows and lm_head rows (the logits are all-gathered)
    assert torch.equal(shard.model.embed_tokens.weight, whole.model.embed_tokens.weight.chunk(world, 0)[rank]), what
    assert mods["lm_head"].tp_dim == COLUMN, what
    moe = sorted(n.split(".experts.")[0] for n in full_w if ".experts." in n)
    if moe:  # expert parallelism: this rank's experts, whole; otherwise every expert, split
        held = {n.split(".experts.")[1].split(".")[0] for n in mine if n.startswith(moe[0] + ".experts.")}
        total = len({n.split(".experts.")[1].split(".")[0] for n in full_w if n.startswith(moe[0] + ".experts.")})
        assert len(held) == (total // world if ep else total), what
    if ep and kind != "bf16":  # a sync target from one rank covers every rank's experts
        from quantrl.sync import SyncTarget

        target = SyncTarget.for_engine(shard)
        assert all(n.removesuffix(".weight") in target.modules for n in full_w if ".experts." in n), what

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 11), generator=g)
    with torch.no_grad():
        want, got = whole(ids), shard(ids)
    assert float((got - want).abs().max() / want.abs().max()) < LOGPROB_TOL[kind], what

    prompts = random_prompts([5, 9, 3], seed=4)
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=6, seed=3)
    one = Engine(whole, kv_cache_tokens=512).generate(prompts, params)
    engine = Engine(shard, kv_cache_tokens=512)
    assert engine.cache.num_kv_heads == 1  # 2 kv heads over 2 ranks; latent attention: one latent, replicated
    many = engine.generate(prompts, params)
    assert [r.tokens for r in many] == [r.tokens for r in one], what
    # each rank drawing with its own seed still follows rank 0: the shards never split
    split_seeds = engine.generate(prompts, SamplingParams(n=2, temperature=0.8, max_new_tokens=6, seed=3 + 100 * rank))
    assert [r.tokens for r in split_seeds] == [r.tokens for r in one], what
    for a, b in zip(many, one):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < LOGPROB_TOL[kind], what
    # an FP8 KV cache splits by heads like the BF16 one (its per-layer scales are replicated)
    one8 = Engine(whole, kv_cache_tokens=512, kv_cache_dtype="fp8_e4m3").generate(prompts, params)
    many8 = Engine(shard, kv_cache_tokens=512, kv_cache_dtype="fp8_e4m3").generate(prompts, params)
    assert [r.tokens for r in many8] == [r.tokens for r in one8], what
    # the shards' K/V differ from one process's by summation order, and a sub-ulp difference can cross an
    # e4m3 rounding boundary (2^-4 relative): measured up to 5e-4 on a few tokens, fp32 rounding elsewhere
    gap8 = max(abs(x - y) for a, b in zip(many8, one8) for x, y in zip(a.logprobs, b.logprobs))
    assert gap8 < max(LOGPROB_TOL[kind], 5e-3), (what, gap8)

    # an update of whole engine-format tensors (here: the other rank-independent copy, perturbed)
    update = {n: t.clone() for n, t in engine_state(whole).items()}
    for n, t in update.items():
        if t.is_floating_point() and t.dtype.itemsize > 1 and not n.endswith(("weight_scale", "weight_scale_inv")):
            t.mul_(1 + 2**-5)
    with pytest.raises(ValueError, match="nothing was loaded"):  # one bad tensor: no rank loads anything
        bad = dict(update)
        first = next(n for n in bad if n.endswith(("o_proj.weight", "o_proj.weight_packed")))
        bad[first] = bad[first][:, :-8]
        engine.update_weights(bad.items(), version=1)
    before = dequantized_weights(shard)
    assert all(torch.equal(before[n], mine[n]) for n in mine), what
    engine.update_weights(update.items(), version=1, check_equal=True)
    whole_engine = Engine(whole, kv_cache_tokens=64)
    whole_engine.update_weights(update.items(), version=1)
    full_w, mine = dequantized_weights(whole), dequantized_weights(shard)
    for name, w in mine.items():
        lin = mods[name.removesuffix(".weight")]
        ref = full_w[name] if not hasattr(lin, "tp_dim") else full_w[name].narrow(lin.tp_dim, rank * w.shape[lin.tp_dim],
                                                                                w.shape[lin.tp_dim])  # fmt: skip
        assert torch.equal(w, ref), (what, "after update", name)


def test_tensor_parallel_engine_equals_one_process(tmp_path):
    ckpts = {(arch, kind): path for arch, make in ARCHS.items()
             for kind, path in bf16_fp8_int4(make(), tmp_path / arch, 32).items()}  # fmt: skip
    spawn_gloo(_shards, 2, tmp_path, ckpts)


def test_splits_that_would_cut_a_block_are_refused(tmp_path):
    from quantrl.model import QuantScheme, build_model
    from quantrl.model.state import tensor_index
    from quantrl.model.tensor_parallel import TPContext, local_tensor

    cfg = qwen3_config(hidden_size=256, intermediate_size=512, head_dim=64).to_dict()  # kv: 2 heads x 64 = 128 rows
    model = build_model(cfg, QuantScheme.fp8_block(), dtype=torch.float32, tp=TPContext(0, 2))
    unit, attr = tensor_index(model)["model.layers.0.self_attn.k_proj.weight_scale_inv"]
    with pytest.raises(ValueError, match="blocks are 128 wide"):
        local_tensor(unit, attr, torch.ones(1, 2), "model.layers.0.self_attn.k_proj.weight_scale_inv")
    with pytest.raises(ValueError, match="num_attention_heads=4 does not split into 3"):
        build_model(cfg, dtype=torch.float32, tp=TPContext(0, 3))
