"""Trainer core: every mode trains, micro-batching is exact, padding-correct logprobs, fp32 masters,
BF16 HF checkpoints that transformers and our loader read back."""

import pytest
import torch
from _tiny_models import lm_loss
from transformers import AutoModelForCausalLM, Qwen3Config

from quantrl.model import build_model, load_model, random_init_
from quantrl.train.logprobs import token_logprobs
from quantrl.train.optimizer import MasterAdamW
from quantrl.train.trainer import TrainConfig, Trainer

VOCAB = 200


def hf_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=64, max_position_embeddings=128, tie_word_embeddings=False)
    return Qwen3Config(**{**base, **kw})


def tiny(dtype=torch.bfloat16, seed=0, **kw):
    return random_init_(build_model(hf_config(**kw).to_dict(), dtype=dtype), seed=seed, std=0.05).train()


def batch(n=8, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: token t+1 = (token t * 3 + 1) mod VOCAB
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = [start]
    for _ in range(t - 1):
        ids.append((ids[-1] * 3 + 1) % VOCAB)
    ids = torch.cat(ids, 1)
    am = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": am, "loss_mask": am.clone()}


@pytest.mark.parametrize("mode", ["bf16", "fp8", "int4-qat"])
def test_tiny_model_trains_in_every_mode(mode):
    torch.manual_seed(0)
    tr = Trainer(tiny(), TrainConfig(mode=mode, lr=3e-3, micro_batch_size=4, qat_group_size=64))
    b = batch()
    losses = [tr.train_step(b, lm_loss)["loss"] for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0], losses
    if mode != "bf16":
        assert len(tr.swapped) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers


def test_micro_batching_does_not_change_the_step():
    b = batch(n=6, t=16)
    b["loss_mask"][:, :5] = 0  # uneven token counts per sequence
    b["loss_mask"][0, :12] = 0
    out = []
    for mb in (6, 2, 4):
        tr = Trainer(tiny(dtype=torch.float32), TrainConfig(lr=1e-3, micro_batch_size=mb, grad_clip=0))
        m = tr.train_step(b, lm_loss)
        out.append((m["loss"], m["grad_norm"], tr.model.model.layers[0].mlp.up_proj.weight.detach().clone()))
    for loss, gn, w in out[1:]:
        assert loss == pytest.approx(out[0][0], rel=1e-5) and gn == pytest.approx(out[0][1], rel=1e-4)
        torch.testing.assert_close(w, out[0][2], rtol=1e-5, atol=1e-6)


def _master_grad_at_the_step(tr, w, b):
    """The optimizer's fp32 gradient of parameter ``w`` when ``tr.train_step(b)`` reaches the clipping."""
    seen = {}
    clip = tr.optimizer.grad_norm_and_clip

    def capture(max_norm, **kw):
        seen["grad"] = tr.optimizer.master_grads()[[q is w for q in tr.optimizer.params].index(True)].clone()
        return clip(max_norm, **kw)

    tr.optimizer.grad_norm_and_clip = capture
    tr.train_step(b, lm_loss)
    assert w.dtype == torch.bfloat16 and seen["grad"].dtype == torch.float32
    return seen["grad"].double()


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_micro_batch_gradients_of_bf16_parameters_are_summed_in_fp32(mode):
    """The master's gradient is the fp32 sum of the micro-batches' gradients, each computed alone: bf16
    ones from autograd, and in FP8 training the wgrad GEMM's fp32 output, never rounded to bf16 (the
    parameter's FP32_GRAD_SINK). Not a bf16 running sum, off by ~2^-9 of the partial sums per addition."""
    from quantrl.train.optimizer import FP32_GRAD_SINK

    b = batch(n=16, t=12)
    tr = Trainer(tiny(), TrainConfig(mode=mode, lr=1e-3, micro_batch_size=1, grad_clip=0))
    w = tr.model.model.layers[0].mlp.up_proj.weight
    parts = []
    for i in range(16):  # each micro-batch's gradient on its own
        micro = {k: v[i : i + 1] for k, v in b.items()}
        sunk = []
        if mode == "fp8":
            setattr(w, FP32_GRAD_SINK, sunk.append)
        (lm_loss(tr.model, micro)[0] / float(b["loss_mask"].sum())).backward()
        if mode == "fp8":
            delattr(w, FP32_GRAD_SINK)
            assert w.grad is None and sunk[0].dtype == torch.float32
        parts.append(sunk[0].double() if sunk else w.grad.double())
        tr.model.zero_grad()
    want = torch.stack(parts).sum(0)
    got = _master_grad_at_the_step(tr, w, b)
    assert not hasattr(w, FP32_GRAD_SINK)  # set only while the optimizer accumulates
    scale = want.abs().max()
    assert (got - want).abs().max() < 1e-6 * scale
    bf16_sum = torch.zeros_like(w)
    for g in parts:
        bf16_sum += g.to(torch.bfloat16)
    assert (bf16_sum.double() - want).abs().max() > 1e-3 * scale  # what accumulating in p.grad would give
    rounded = torch.stack([g.to(torch.bfloat16).double() for g in parts]).sum(0)
    if mode == "fp8":  # and what rounding each micro-batch's dW to bf16 first would give
        assert (rounded - want).abs().max() > 1e-5 * scale


def test_a_failed_step_leaves_no_gradient_behind():
    """A NaN gradient norm, or an error in a later micro-batch (an OOM): the next step is the clean one."""
    b = batch(n=4, t=16)
    clean = Trainer(tiny(dtype=torch.float32), TrainConfig(lr=1e-3, micro_batch_size=2)).train_step(b, lm_loss)
    tr = Trainer(tiny(dtype=torch.float32), TrainConfig(lr=1e-3, micro_batch_size=2))
    with pytest.raises(FloatingPointError):
        tr.train_step(b, lambda m, micro: (lm_loss(m, micro)[0] * float("inf"), {}))
    calls = []

    def second_micro_batch_fails(model, micro):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated OOM")
        return lm_loss(model, micro)

    with pytest.raises(RuntimeError, match="simulated OOM"):
        tr.train_step(b, second_micro_batch_fails)
    assert tr.train_step(b, lm_loss) == clean


def test_logprobs_are_padding_and_length_correct():
    model = tiny(dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, VOCAB, (1, 9), generator=g), torch.randint(0, VOCAB, (1, 5), generator=g)
    ref_a, ent_a = token_logprobs(model, a, with_entropy=True)
    ref_b, _ = token_logprobs(model, b)
    pad = torch.zeros(1, 4, dtype=torch.long)
    for left in (True, False):
        ids = torch.cat([a, torch.cat([pad, b], 1) if left else torch.cat([b, pad], 1)])
        am = torch.ones_like(ids)
        am[1, :4] = 0 if left else 1
        if not left:
            am[1, 5:] = 0
        lp, ent = token_logprobs(model, ids, am, with_entropy=True)
        torch.testing.assert_close(lp[0], ref_a[0], rtol=1e-5, atol=1e-5)
        got_b = lp[1, 4:] if left else lp[1, :4]
        torch.testing.assert_close(got_b, ref_b[0], rtol=1e-5, atol=1e-5)
        assert bool((lp[1, :4] == 0).all()) if left else bool((lp[1, 4:] == 0).all())
        torch.testing.assert_close(ent[0], ent_a[0], rtol=1e-5, atol=1e-5)
    # temperature divides the logits before the softmax
    lp_t, _ = token_logprobs(model, a, temperature=0.7)
    logits = model(a)[:, :-1].float() / 0.7
    torch.testing.assert_close(lp_t[0], logits.log_softmax(-1)[0].gather(-1, a[0, 1:, None])[:, 0])


def test_fp32_masters_keep_updates_bf16_would_lose():
    p = torch.nn.Parameter(torch.full((4, 4), 1.0, dtype=torch.bfloat16))
    opt = MasterAdamW([("w", p)], lr=1e-4, betas=(0.0, 0.0), eps=1e-12)
    for _ in range(50):
        p.grad = torch.ones_like(p)
        opt.step()
        opt.zero_grad()
    # each step moves the master by 1e-4 (< bf16's half-ulp at 1.0 = 2^-8): only the master remembers
    assert opt.masters[0][0, 0].item() == pytest.approx(1.0 - 50e-4, rel=1e-4)
    assert p[0, 0].item() == pytest.approx(1.0 - 50e-4, abs=2**-8)
    assert p.dtype == torch.bfloat16 and opt.masters[0].dtype == torch.float32


def test_weights_loaded_after_the_optimizer_was_built_are_not_overwritten():
    """model.load_state_dict after the optimizer exists: the next step starts from the loaded weights,
    not from the masters' stale copy."""
    p = torch.nn.Parameter(torch.full((4,), 1.0, dtype=torch.bfloat16))
    opt = MasterAdamW([("w", p)], lr=1e-3, betas=(0.0, 0.0), eps=1e-12)
    with torch.no_grad():
        p.copy_(torch.full((4,), 3.0))
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.masters[0][0].item() == pytest.approx(3.0 - 1e-3, rel=1e-6)
    assert p[0].item() == pytest.approx(3.0, abs=2**-6)
    p.grad = torch.ones_like(p)  # an untouched parameter keeps its fp32 master
    opt.step()
    assert opt.masters[0][0].item() == pytest.approx(3.0 - 2e-3, rel=1e-6)


@pytest.mark.parametrize("mode, gather, dtype", [("bf16", False, torch.float32), ("fp8", True, torch.bfloat16),
                                                 ("int4-qat", False, torch.bfloat16)])  # fmt: skip
def test_optimizer_cpu_offload_takes_the_same_steps(mode, gather, dtype):
    """--optimizer-cpu-offload: masters and Adam moments in CPU memory; on a CPU-only machine the steps are
    the resident optimizer's, bit for bit, FP8 param-gather included (the FP8 weight cache is derived from
    the parameters, whichever device steps them), and either resumes the other's state."""
    b = batch(n=4, t=16)
    runs = []
    for offload in (False, True):
        cfg = TrainConfig(mode=mode, lr=3e-3, micro_batch_size=2, qat_group_size=64, fp8_param_gather=gather,
                          optimizer_cpu_offload=offload)  # fmt: skip
        tr = Trainer(tiny(dtype=dtype), cfg)
        losses = [tr.train_step(b, lm_loss)["loss"] for _ in range(3)]
        runs.append((losses, tr))
    (l0, resident), (l1, offloaded) = runs
    assert l0 == l1 and l0[-1] < l0[0]
    offloaded_params = dict(offloaded.model.named_parameters())
    assert all(torch.equal(w, offloaded_params[n]) for n, w in resident.model.named_parameters())
    opt = offloaded.optimizer
    # its own fp32 copies even of fp32 parameters (the resident optimizer steps those in place)
    assert opt.offload and all(m is not p and m.data_ptr() != p.data_ptr() for m, p in zip(opt.masters, opt.params))
    if dtype == torch.float32:
        assert all(m is p for m, p in zip(resident.optimizer.masters, resident.optimizer.params))
    opt.load_state_dict(resident.optimizer.state_dict())  # a resident run resumes offloaded
    moments = [[v for s in tr.optimizer.opt.state.values() for v in s.values()] for tr in (offloaded, resident)]
    assert all(torch.equal(x, y) for x, y in zip(*moments))
    assert resident.train_step(b, lm_loss) == offloaded.train_step(b, lm_loss)


@pytest.mark.gpu
def test_optimizer_cpu_offload_on_cuda_frees_the_masters_and_moments():
    b = {k: v.cuda() for k, v in batch(n=4, t=16).items()}
    out = {}
    for offload in (False, True):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        tr = Trainer(tiny().cuda(), TrainConfig(mode="fp8", lr=3e-3, micro_batch_size=2, fp8_param_gather=True,
                                                optimizer_cpu_offload=offload))  # fmt: skip
        for _ in range(2):
            tr.train_step(b, lm_loss)
        tr.optimizer.zero_grad()
        n = sum(p.numel() for p in tr.optimizer.params)
        out[offload] = (torch.cuda.memory_allocated() - base, [m.detach().cpu() for m in tr.optimizer.masters], n)
        assert all(m.is_pinned() for m in tr.optimizer.masters) == offload
        del tr
    (mem0, m0, n), (mem1, m1, _) = out[False], out[True]
    assert mem0 - mem1 >= 12 * n  # fp32 master + two fp32 moments per parameter moved off the GPU
    for a, c in zip(m0, m1):  # CPU and CUDA AdamW: the same formula, rounding may differ by an ulp
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


def test_checkpoint_is_bf16_hf_and_loads_everywhere(tmp_path):
    src = tmp_path / "src"
    hf = AutoModelForCausalLM.from_config(hf_config(), dtype=torch.float32)
    hf.save_pretrained(src)
    model = load_model(src, dtype=torch.bfloat16)
    tr = Trainer(model.train(), TrainConfig(mode="int4-qat", lr=1e-3, qat_group_size=64))
    tr.train_step(batch(n=4, t=12), lm_loss)
    out = tr.save_checkpoint(tmp_path / "ckpt", src)
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    back = load_model(out, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert torch.equal(dict(back.named_parameters())[name], p.detach()), name
    hf_back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(hf_back.state_dict()["model.layers.1.mlp.down_proj.weight"], model.model.layers[1].mlp.down_proj.weight.detach())


def test_config_errors():
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="int8")
    with pytest.raises(ValueError, match="blockwise"):
        TrainConfig(mode="fp8", fp8_recipe="delayed")
    tr = Trainer(tiny(dtype=torch.float32))
    with pytest.raises(KeyError, match="loss_mask"):
        tr.train_step({"input_ids": torch.zeros(1, 3, dtype=torch.long)}, lm_loss)


def test_distributed_optimizer_owners_are_contiguous_and_balanced():
    from quantrl.train.data_parallel import owners

    sizes = [1000, 10, 10, 500, 500, 10, 1000, 10]
    for world in (1, 2, 3, 4):
        own = owners(sizes, world)
        assert own == sorted(own) and own[0] == 0 and own[-1] == world - 1  # runs in order, first and last used
        loads = [sum(n for n, o in zip(sizes, own) if o == r) for r in range(world)]
        assert max(loads) <= sum(sizes) / world + max(sizes) / 2, (world, loads)
    assert owners([5, 5], 4) == [1, 3]  # more replicas than parameters: some own nothing
    p = torch.nn.Parameter(torch.ones(3))
    idle = MasterAdamW([("a", torch.nn.Parameter(torch.ones(3))), ("b", p)], lr=1e-3, shard=(0, 4))
    assert idle.masters == [None, None] and idle.opt is None
    p.grad = torch.ones(3)
    idle.step()  # nothing to step; the weights come from their owners
    assert torch.equal(p, torch.ones(3)) and idle.state_dict()["params"] == {}


@pytest.mark.parametrize("moe", [False, True])
def test_packed_sequences_give_the_padded_batchs_logprobs_and_gradients(moe):
    """Packing ragged right-padded sequences (first-fit decreasing into fewer rows, attention kept inside each
    sequence, positions restarting): logprobs, entropies and gradients equal the padded batch's (fp32), MoE
    routing replay included; left padding is refused."""
    from quantrl.train.packing import pack

    torch.manual_seed(0)
    if moe:
        from _tiny_models import qwen3_moe_config

        model = random_init_(build_model(qwen3_moe_config(vocab_size=VOCAB).to_dict(), dtype=torch.float32), std=0.1)
    else:
        model = tiny(torch.float32)
    b = batch(n=5, t=20)
    lengths = [20, 7, 12, 5, 9]
    am = torch.stack([(torch.arange(20) < n).long() for n in lengths])
    ids = b["input_ids"] * am
    assert pack(ids, am).input_ids.shape[0] == 3  # 20 | 12 + 7 | 9 + 5
    routing = None
    if moe:  # replay each token's own choices: the packed forward must route the same tokens the same way
        from quantrl.model.moe import Routing

        rec = Routing(record=True)
        with torch.no_grad():
            model(ids, am, routing=rec)
        routing = rec.stacked(*ids.shape)
    out = {}
    for packed in (False, True):
        model.zero_grad()
        lp, ent = token_logprobs(model, ids, am, temperature=0.9, with_entropy=True, routing=routing, pack=packed)
        (lp.sum() + 0.1 * ent.sum()).backward()
        out[packed] = (lp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    (lp0, e0, g0), (lp1, e1, g1) = out[False], out[True]
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    assert (lp1[3, 4:] == 0).all() and (lp1[3, :4] != 0).all()  # a 5-token sequence scores its 4 targets
    assert len(g0) == len(g1) and all(torch.allclose(a, c, rtol=1e-4, atol=1e-6) for a, c in zip(g0, g1))
    with pytest.raises(ValueError, match="right-padded"):
        pack(ids, am.flip(1))
