"""GRPO: advantages and the clipped policy loss on hand-computed numbers; exact micro-batching in the Trainer."""

import math

import pytest
import torch
from transformers import Qwen3Config

from quantrl.model import build_model, random_init_
from quantrl.rl.grpo import GRPOConfig, group_advantages, informative_groups, make_loss_fn, policy_loss, reduce_metrics
from quantrl.rl.mismatch import ISConfig, importance_weights
from quantrl.train.trainer import TrainConfig, Trainer

# ---------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1])
    a = group_advantages(r, 4)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    want = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0, -0.5, -0.5, -0.5, 1.5]  # group 3: std 0.5
    torch.testing.assert_close(a, torch.tensor(want), atol=1e-5, rtol=1e-5)
    # exactly slime's formula: (r - mean) / (torch.std(r) + 1e-6), per group
    g = r.view(3, 4)
    ref = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).view(-1)
    torch.testing.assert_close(a, ref, atol=0, rtol=0)
    torch.testing.assert_close(group_advantages(r, 4, normalize_std=False), (g - g.mean(1, keepdim=True)).view(-1))
    biased = group_advantages(r, 4, unbiased=False)  # population std of [1, 0, 0, 1] is 0.5
    torch.testing.assert_close(biased[:4], torch.tensor([1.0, -1, -1, 1]), atol=1e-5, rtol=0)


def test_rloo_and_dr_grpo_advantages_hand_computed():
    from quantrl.rl.grpo import ADVANTAGE_ESTIMATORS

    r = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1])
    rloo = group_advantages(r, 4, **ADVANTAGE_ESTIMATORS["rloo"])
    # sample 0: 1 - mean(0, 0, 1) = 2/3; sample 1: 0 - mean(1, 0, 1) = -2/3; group 2: 1 - 0 = 1, 0 - 1/3
    torch.testing.assert_close(rloo, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, -1 / 3, -1 / 3, -1 / 3, 1.0]))
    dr = group_advantages(r, 4, **ADVANTAGE_ESTIMATORS["dr-grpo"])
    torch.testing.assert_close(dr, torch.tensor([0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75]))
    assert torch.equal(group_advantages(torch.ones(4), 4, **ADVANTAGE_ESTIMATORS["rloo"]), torch.zeros(4))


def test_equal_reward_groups_and_single_samples_get_exactly_zero():
    r = torch.tensor([0.3, 0.3, 0.3, 0.7, 0.1, 0.2])  # 0.3 * 3 / 3 != 0.3 in fp32: rounding must not leak
    a = group_advantages(r, 3)
    assert torch.equal(a[:3], torch.zeros(3)) and a[3:].abs().min() > 0.1
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0, 2.0]), 1), torch.zeros(3))


def test_informative_groups_are_those_with_nonzero_advantages():
    r = torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 1, 0, 0.3, 0.3, 0.3 + 2**-20])
    assert informative_groups(r, 3).tolist() == [False, False, True, True]  # any spread counts, however small
    adv = group_advantages(r, 3).view(4, 3)
    assert (adv != 0).any(1).tolist() == informative_groups(r, 3).tolist()


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="groups of n=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)


# ---------------------------------------------------------------------------------------------------------
# policy loss on a 2 x 3 batch: ratios [[1.5, 0.5, 1.0], [1.1, 0.7, masked]], advantages [+1, -1]
# ---------------------------------------------------------------------------------------------------------


def case(gen):
    old = -torch.rand(2, 3, generator=gen) - 0.5  # arbitrary old logprobs; only the ratios matter
    ratio = torch.tensor([[1.5, 0.5, 1.0], [1.1, 0.7, 3.0]])
    logp = (old + ratio.log()).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, torch.tensor([1.0, -1.0]), mask


def test_clipped_loss_hand_computed(gen):
    logp, old, adv, mask = case(gen)
    # row 0 (A=+1): 1.5 clipped to 1.2 -> -1.2; 0.5 -> -0.5 (max(-0.5, -0.8)); 1.0 -> -1
    # row 1 (A=-1): 1.1 -> 1.1; 0.7 clipped up to 0.8 -> 0.8
    loss, m = policy_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 1.1 + 0.8) / 5, abs=1e-6)
    assert m["pg_clipfrac"] == pytest.approx(2 / 5)
    assert m["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.0 + 1.1 + 0.7) / 5, abs=1e-6)
    assert m["approx_kl"] == pytest.approx(-sum(math.log(x) for x in (1.5, 0.5, 1.0, 1.1, 0.7)) / 5, abs=1e-6)
    assert "kl_ref" not in m
    loss.backward()
    # d/dlogp of -A * ratio is -A * ratio; clipped tokens and padding get no gradient
    want = torch.tensor([[0.0, -0.5, -1.0], [1.1, 0.0, 0.0]]) / 5
    torch.testing.assert_close(logp.grad, want, atol=1e-6, rtol=1e-5)

    seq, _ = policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-mean")
    assert seq.item() == pytest.approx(((-1.2 - 0.5 - 1.0) / 3 + (1.1 + 0.8) / 2) / 2, abs=1e-6)
    high, m = policy_loss(logp, old, adv, mask, clip_eps_high=0.6)  # DAPO clip-higher: 1.5 < 1.6 stays
    assert high.item() == pytest.approx((-1.5 - 0.5 - 1.0 + 1.1 + 0.8) / 5, abs=1e-6)
    assert m["pg_clipfrac"] == pytest.approx(1 / 5)


def test_entropy_bonus_hand_computed(gen):
    logp, old, adv, mask = case(gen)
    base, _ = policy_loss(logp, old, adv, mask)
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]], requires_grad=True)  # 99: a padding token
    loss, m = policy_loss(logp, old, adv, mask, entropy=ent, entropy_coef=0.1)
    assert m["entropy"] == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert loss.item() == pytest.approx(base.item() - 0.1 * 15 / 5, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(ent.grad, -0.1 * mask.float() / 5)  # the bonus pushes entropy up, padding aside
    _, m0 = policy_loss(logp, old, adv, mask, entropy=ent.detach())  # measured, not in the loss
    assert m0["entropy"] == m["entropy"]
    with pytest.raises(ValueError, match="needs the entropy"):
        policy_loss(logp, old, adv, mask, entropy_coef=0.1)


def test_entropy_outside_autograd_equals_the_differentiable_one(gen):
    from quantrl.train.logprobs import token_logprobs

    model = tiny_model()
    ids = torch.randint(0, 64, (3, 9), generator=gen)
    am = torch.ones_like(ids)
    am[0, :3] = 0
    _, with_grad = token_logprobs(model, ids, am, temperature=0.7, with_entropy=True)
    _, metric = token_logprobs(model, ids, am, temperature=0.7, with_entropy=True, entropy_grad=False)
    assert with_grad.requires_grad and not metric.requires_grad
    torch.testing.assert_close(metric, with_grad.detach(), rtol=1e-6, atol=1e-6)
    assert (metric[0, :3] == 0).all() and (metric[:, 3:] > 0).all()


def test_tis_and_mis_weights_multiply_the_surrogate(gen):
    logp, old, adv, mask = case(gen)
    # old / rollout ratios [[3, 1, 0.5], [1, 1, 1]]
    rollout = old - torch.log(torch.tensor([[3.0, 1.0, 0.5], [1.0, 1.0, 1.0]]))
    w, info = importance_weights(old, rollout, mask, ISConfig("tis", cap=2.0))
    loss, _ = policy_loss(logp, old, adv, mask, is_weight=w)
    assert loss.item() == pytest.approx((2 * -1.2 + 1 * -0.5 + 0.5 * -1.0 + 1.1 + 0.8) / 5, abs=1e-5)
    assert info["is_clipped_frac"] == pytest.approx(1 / 5)
    w, info = importance_weights(old, rollout, mask, ISConfig("mis", cap=2.0))
    loss, _ = policy_loss(logp, old, adv, mask, is_weight=w)
    # MIS drops ratio 3 (> 2) and keeps 0.5 (= 1/2, inside [1/C, C]); dropped tokens stay in the denominator
    assert loss.item() == pytest.approx((0 - 0.5 + 0.5 * -1.0 + 1.1 + 0.8) / 5, abs=1e-5)
    assert info["is_clipped_frac"] == pytest.approx(1 / 5)
    off, _ = policy_loss(logp, old, adv, mask, is_weight=importance_weights(old, rollout, mask, ISConfig(None))[0])
    assert off.item() == pytest.approx(-0.8 / 5, abs=1e-6)


def test_gspo_sequence_ratio_hand_computed(gen):
    logp, old, adv, mask = case(gen)
    s0, s1 = 0.75 ** (1 / 3), 0.77**0.5  # geometric means of [1.5, 0.5, 1.0] and [1.1, 0.7]
    loss, m = policy_loss(logp, old, adv, mask, ratio_level="sequence")
    assert loss.item() == pytest.approx((-3 * s0 + 2 * s1) / 5, abs=1e-6)
    assert m["ratio_mean"] == pytest.approx((3 * s0 + 2 * s1) / 5, abs=1e-6) and m["pg_clipfrac"] == 0
    loss.backward()  # every token of a sequence: -A * s_i / tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0, -s0, -s0], [s1, s1, 0.0]]) / 5, atol=1e-6, rtol=1e-5)
    # clip range 0.05: row 1 (A=-1, s=0.877 < 0.95) takes the clipped branch, whole, and loses its gradient
    logp.grad = None
    loss, m = policy_loss(logp, old, adv, mask, ratio_level="sequence", clip_eps=0.05)
    assert loss.item() == pytest.approx((-3 * s0 + 2 * 0.95) / 5, abs=1e-6) and m["pg_clipfrac"] == pytest.approx(2 / 5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0, -s0, -s0], [0.0, 0.0, 0.0]]) / 5, atol=1e-6, rtol=1e-5)


def test_gspo_token_form_has_slimes_gradient(gen):
    """slime's GSPO puts exp(mean_t (logp_t - old_t)) on every token, its gradient through the mean; under
    token-mean aggregation that is the gradient of our token form."""
    logp = (-torch.rand(4, 9, generator=gen) - 0.5).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(4, 9, generator=gen)
    adv = torch.randn(4, generator=gen)
    mask = (torch.rand(4, 9, generator=gen) > 0.3).float()
    loss, _ = policy_loss(logp, old, adv, mask, ratio_level="sequence", clip_eps=3e-2)
    (ours,) = torch.autograd.grad(loss, logp)
    seq = ((logp - old) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    ratio = seq.exp().expand_as(logp)
    a = adv[:, None]
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - 3e-2, 1 + 3e-2))
    (slime,) = torch.autograd.grad((pg * mask).sum() / mask.sum(), logp)
    torch.testing.assert_close(ours, slime, atol=1e-7, rtol=1e-5)
    assert ours.abs().sum() > 0


def test_k3_kl_to_reference(gen):
    logp, old, _, mask = case(gen)
    ref = old + 0.3 * torch.randn(2, 3, generator=gen)
    loss, m = policy_loss(logp, old, torch.zeros(2), mask, ref_logp=ref, kl_coef=0.1)
    d = ref - logp.detach()
    k3 = d.exp() - d - 1
    n = mask.sum()
    assert loss.item() == pytest.approx(float(0.1 * (k3 * mask).sum() / n), rel=1e-5)
    assert m["kl_ref"] == pytest.approx(float((k3 * mask).sum() / n), rel=1e-5) and m["kl_ref"] > 0
    loss.backward()
    torch.testing.assert_close(logp.grad, 0.1 * (1 - d.exp()) * mask / n, atol=1e-6, rtol=1e-5)
    _, m = policy_loss(logp, old, torch.zeros(2), mask, ref_logp=old + 30.0)  # k3 ~ e^30, clamped at 10
    assert m["kl_ref"] == pytest.approx(10.0)


def test_token_sum_mode_and_metric_reduction(gen):
    logp, old, adv, mask = case(gen)
    mean, m_full = policy_loss(logp, old, adv, mask)
    total, _ = policy_loss(logp, old, adv, mask, token_sum=True)
    assert total.item() == pytest.approx(mean.item() * 5, abs=1e-6)
    sums: dict[str, float] = {}
    for rows in (slice(0, 1), slice(1, 2)):  # what Trainer.train_step does with micro-batches of one row
        _, part = policy_loss(logp[rows], old[rows], adv[rows], mask[rows], token_sum=True)
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v
    reduced = reduce_metrics(sums)
    assert reduced["loss_tokens"] == 5
    for k, v in m_full.items():
        assert reduced[k] == pytest.approx(v, abs=1e-6), k


def test_empty_rows_are_left_out_of_the_sequence_mean(gen):
    logp, old, adv, mask = case(gen)
    mask = mask.clone()
    mask[1] = 0
    seq, _ = policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-mean")
    assert seq.item() == pytest.approx((-1.2 - 0.5 - 1.0) / 3, abs=1e-6)


def test_policy_loss_errors(gen):
    logp, old, adv, mask = case(gen)
    with pytest.raises(ValueError, match="is_weight"):
        policy_loss(logp, old, adv, mask, is_weight=torch.ones(2, 2))
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(logp, old, adv, mask, ratio_level="geometric")
    with pytest.raises(ValueError, match="token-mean"):
        policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-mean", token_sum=True)
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(logp, old, adv, mask, aggregation="sum")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:1], mask)
    with pytest.raises(ValueError, match="clip_eps"):
        GRPOConfig(clip_eps=1.5)


# ---------------------------------------------------------------------------------------------------------
# with the Trainer: token-level aggregation is exact across micro-batches
# ---------------------------------------------------------------------------------------------------------


def tiny_model():
    cfg = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
                      tie_word_embeddings=False)  # fmt: skip
    return random_init_(build_model(cfg.to_dict(), dtype=torch.float32), seed=0, std=0.05).train()


def rl_batch(gen, b=6, t=12):
    ids = torch.randint(0, 64, (b, t), generator=gen)
    am = torch.ones_like(ids)
    am[0, :3] = 0  # a left-padded row
    lm = torch.zeros_like(ids)
    lm[:, 5:] = 1  # response tokens; prompts of 5
    lm[2, 9:] = 0  # a shorter response: uneven token counts
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    return {"input_ids": ids, "attention_mask": am, "loss_mask": lm, "advantages": group_advantages(rewards, 3),
            "rollout_logp": -torch.rand(b, t - 1, generator=gen) - 4.5}  # fmt: skip


def test_loss_fn_in_trainer_is_independent_of_micro_batch_size(gen):
    batch = rl_batch(gen)
    cfg = GRPOConfig(clip_eps_high=0.28)
    # any detached weights (here TIS of arbitrary logprobs) must enter the same way however the batch is cut
    trainer_logp = -torch.rand(batch["rollout_logp"].shape, generator=gen) - 4.5
    batch["is_weight"], info = importance_weights(trainer_logp, batch["rollout_logp"], batch["loss_mask"][:, 1:],
                                                  ISConfig("tis", cap=1.5))  # fmt: skip
    out = []
    for mb in (6, 4, 1):
        tr = Trainer(tiny_model(), TrainConfig(lr=1e-3, micro_batch_size=mb, grad_clip=0.0))
        res = tr.train_step(batch, make_loss_fn(cfg))
        out.append((res, reduce_metrics(res), next(tr.model.parameters()).detach().clone()))
    (r0, m0, p0) = out[0]
    assert m0["ratio_mean"] == pytest.approx(1.0) and m0["pg_clipfrac"] == 0  # old_logp absent: on-policy
    assert m0["loss_tokens"] == float(batch["loss_mask"].sum())
    for r, m, p in out[1:]:
        assert r["loss"] == pytest.approx(r0["loss"], abs=1e-6)
        assert r["grad_norm"] == pytest.approx(r0["grad_norm"], rel=1e-4)
        torch.testing.assert_close(p, p0, atol=1e-6, rtol=1e-5)
    assert r0["grad_norm"] > 0 and 0 < info["is_clipped_frac"] < 1  # TIS truncates some tokens, not all
    unweighted = Trainer(tiny_model(), TrainConfig(lr=1e-3, micro_batch_size=6, grad_clip=0.0))
    plain = unweighted.train_step({k: v for k, v in batch.items() if k != "is_weight"}, make_loss_fn(cfg))
    assert plain["grad_norm"] != pytest.approx(r0["grad_norm"], rel=1e-3)  # the weights do reach the loss


def test_loss_fn_rejects_a_loss_mask_on_the_first_token(gen):
    batch = rl_batch(gen)
    batch["loss_mask"][:, 0] = 1
    with pytest.raises(ValueError, match="first token"):
        make_loss_fn()(tiny_model(), batch)
