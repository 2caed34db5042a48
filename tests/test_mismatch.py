"""Mismatch metrics and TIS/MIS weights on hand-computed numbers."""

import math

import pytest
import torch

from quantrl.rl.mismatch import ISConfig, importance_weights, mismatch_metrics, quantiles


def test_metrics_on_hand_computed_values():
    lt = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])
    lr = torch.tensor([[-1.5, -2.0, -0.3], [-0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    m = mismatch_metrics(lt, lr, mask)
    r = torch.tensor([0.5, 0.0, -0.2, -0.8])
    assert m["mismatch_abs_mean"] == pytest.approx(float(r.abs().mean()))
    assert m["mismatch_abs_max"] == pytest.approx(0.8)
    assert m["mismatch_k3"] == pytest.approx(float((r.exp() - 1 - r).mean()))
    assert m["is_ratio_max"] == pytest.approx(math.exp(0.5)) and m["is_ratio_min"] == pytest.approx(math.exp(-0.8))
    assert m["tokens"] == 4


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_quantiles_are_torch_quantiles(n):
    x = torch.randn(n).exp()
    qs = (0.0, 0.01, 0.5, 0.99, 1.0)
    want = torch.quantile(x.double(), torch.tensor(qs, dtype=torch.float64)).tolist()
    assert quantiles(x, qs) == pytest.approx(want, rel=1e-6, abs=0)


def test_quantiles_beyond_torch_quantiles_limit():
    """More tokens in a step than torch.quantile takes (2^24: e.g. 128 prompts x 16 samples x 8k tokens)."""
    x = torch.arange(2**24 + 3, dtype=torch.float32).flip(0)  # exact in fp32: quantiles are known
    assert quantiles(x, (0.0, 0.5, 1.0)) == [0.0, (2**24 + 2) / 2, 2**24 + 2]


def test_identical_policies_have_zero_mismatch():
    lp = torch.randn(4, 9)
    m = mismatch_metrics(lp, lp.clone(), torch.ones(4, 9))
    assert m["mismatch_abs_mean"] == 0 and m["mismatch_k3"] == 0 and m["is_ratio_p50"] == 1


def test_k3_is_nonnegative_and_estimates_kl():
    torch.manual_seed(0)
    # sampler p = N(0,1), learner q = N(0.3,1): KL(p||q) = 0.045
    x = torch.randn(200_000)
    lp = -0.5 * x**2
    lq = -0.5 * (x - 0.3) ** 2
    m = mismatch_metrics(lq, lp, torch.ones_like(x))
    assert m["mismatch_k3"] == pytest.approx(0.045, rel=0.05)


def test_tis_truncates_and_mis_masks():
    lt = torch.log(torch.tensor([[3.0, 1.0, 0.25, 1.5]]))
    lr = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    w, info = importance_weights(lt, lr, mask, ISConfig("tis", cap=2.0))
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 0.25, 0.0]]))
    assert info["is_clipped_frac"] == pytest.approx(1 / 3)
    w, info = importance_weights(lt, lr, mask, ISConfig("mis", cap=2.0))
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert info["is_clipped_frac"] == pytest.approx(2 / 3)
    w, info = importance_weights(lt, lr, mask, ISConfig(None))
    assert torch.equal(w, mask.float()) and info["is_clipped_frac"] == 0
    w, info = importance_weights(lt, lr, mask, ISConfig("clip", cap=2.0, cap_low=0.5))
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 0.5, 0.0]]))
    assert info["is_clipped_frac"] == pytest.approx(2 / 3)


def test_weights_are_detached_and_errors():
    lt = torch.zeros(2, 3, requires_grad=True)
    w, _ = importance_weights(lt, torch.zeros(2, 3), torch.ones(2, 3), ISConfig("tis"))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="mode"):
        ISConfig("truncate")
    with pytest.raises(ValueError, match="level"):
        ISConfig("tis", level="row")
    with pytest.raises(ValueError, match="cap_low"):
        ISConfig("clip", cap_low=1.5)
    with pytest.raises(ValueError, match="rejection"):
        ISConfig(rs_level="token", rs_cap=0.9)
    with pytest.raises(ValueError, match="veto"):
        ISConfig(veto=2.0)
    with pytest.raises(ValueError, match="needs an IS mode"):
        ISConfig(rs_level="token", batch_normalize=True)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        importance_weights(torch.zeros(3), torch.zeros(3), torch.ones(3), ISConfig("tis"))
    with pytest.raises(ValueError, match="cap"):
        ISConfig("tis", cap=0.5)
    with pytest.raises(ValueError, match="no tokens"):
        mismatch_metrics(torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        mismatch_metrics(torch.zeros(2), torch.zeros(2), torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------
# sequence / geometric levels, rejection, the veto, batch normalization: rows with log ratios
#   row 0: [log 2, log 2, 0]      sequence ratio 4, geometric 4^(1/3)
#   row 1: [log 0.5, 0, (masked)] sequence ratio 0.5, geometric 0.5^(1/2)
# ---------------------------------------------------------------------------------------------------------


def rows():
    r = torch.tensor([[math.log(2), math.log(2), 0.0], [math.log(0.5), 0.0, 5.0]])
    rollout = -torch.rand(2, 3) - 1
    return rollout + r, rollout, torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_sequence_and_geometric_levels_hand_computed():
    lt, lr, mask = rows()
    w, _ = importance_weights(lt, lr, mask, ISConfig("tis", cap=10.0, level="sequence"))
    torch.testing.assert_close(w, torch.tensor([[4.0, 4.0, 4.0], [0.5, 0.5, 0.0]]))
    w, info = importance_weights(lt, lr, mask, ISConfig("tis", cap=3.0, level="sequence"))
    torch.testing.assert_close(w, torch.tensor([[3.0, 3.0, 3.0], [0.5, 0.5, 0.0]]))
    assert info["is_clipped_frac"] == pytest.approx(3 / 5)  # the truncated row's three tokens
    w, _ = importance_weights(lt, lr, mask, ISConfig("mis", cap=3.0, level="geometric"))
    g0, g1 = 4 ** (1 / 3), 0.5**0.5
    torch.testing.assert_close(w, torch.tensor([[g0, g0, g0], [g1, g1, 0.0]]))
    w, info = importance_weights(lt, lr, mask, ISConfig("mis", cap=1.5, level="geometric"))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [g1, g1, 0.0]]))  # 1.59 > 1.5: row 0 masked


def test_a_long_sequence_ratio_stays_finite():
    lt = torch.ones(1, 400)  # log ratio 400 = e^400: inf in fp32 without the clamp
    w, _ = importance_weights(lt, torch.zeros(1, 400), torch.ones(1, 400), ISConfig("tis", cap=2.0, level="sequence"))
    assert torch.equal(w, torch.full((1, 400), 2.0))
    w, _ = importance_weights(-lt, torch.zeros(1, 400), torch.ones(1, 400), ISConfig("mis", level="sequence"))
    assert torch.equal(w, torch.zeros(1, 400))


def test_rejection_sampling_and_veto():
    lt, lr, mask = rows()
    # token-level rejection outside [0.6, 1.5] drops both log-2 tokens and the log-0.5 token; weights stay TIS's
    w, info = importance_weights(lt, lr, mask, ISConfig("tis", cap=2.0, rs_level="token", rs_cap=1.5, rs_cap_low=0.6))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    assert info["rs_rejected_frac"] == pytest.approx(3 / 5) and info["is_weight_mean"] == pytest.approx(1.0)
    # sequence-level rejection, no IS weights: row 0 (ratio 4) outside [1/3, 3] goes whole, row 1 (0.5) stays
    w, info = importance_weights(lt, lr, mask, ISConfig(rs_level="sequence", rs_cap=3.0))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    assert info["rs_rejected_frac"] == pytest.approx(3 / 5)
    # the veto: one token at ratio 0.5 < 0.6 rejects row 1; a masked token never vetoes
    w, info = importance_weights(lt, lr, mask, ISConfig("tis", cap=5.0, veto=0.6))
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0, 1.0], [0.0, 0.0, 0.0]]))
    assert info["rs_rejected_frac"] == pytest.approx(2 / 5)
    lt2 = lt.clone()
    lt2[1, 2] = lr[1, 2] - 20  # a vanishing ratio, but off the mask
    w, _ = importance_weights(lt2, lr, mask, ISConfig("tis", cap=5.0, veto=1e-4))
    assert w[1, :2].tolist() == pytest.approx([0.5, 1.0])


def test_batch_normalization_means_one_over_what_is_kept():
    lt, lr, mask = rows()
    w, info = importance_weights(lt, lr, mask, ISConfig("tis", cap=5.0, batch_normalize=True))
    raw = torch.tensor([2.0, 2.0, 1.0, 0.5, 1.0])
    torch.testing.assert_close(w[mask.bool()], raw / raw.mean())
    assert info["is_weight_mean"] == pytest.approx(float(raw.mean()))
    # sequence level: one weight per sequence, the mean of (4, 0.5) -> 1
    w, _ = importance_weights(lt, lr, mask, ISConfig("tis", cap=10.0, level="sequence", batch_normalize=True))
    torch.testing.assert_close(w, torch.tensor([[4.0, 4.0, 4.0], [0.5, 0.5, 0.0]]) / 2.25)
    # a rejected row is left out of the mean
    w, _ = importance_weights(lt, lr, mask, ISConfig("tis", cap=10.0, level="sequence", batch_normalize=True,
                                                     rs_level="sequence", rs_cap=3.0))  # fmt: skip
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("level", ["token", "geometric"])
def test_replicas_with_a_summing_reduce_get_the_whole_batchs_weights(level):
    """Data parallel: each replica holds some rows; the sums over replicas make the normalization and the
    fractions those of the whole batch."""
    gen = torch.Generator().manual_seed(3)
    lr = -torch.rand(6, 7, generator=gen) - 1
    lt = lr + 0.6 * torch.randn(6, 7, generator=gen)
    mask = (torch.rand(6, 7, generator=gen) > 0.2).long()
    cfg = ISConfig("tis", cap=1.6 if level == "token" else 1.1, level=level, rs_level="token", rs_cap=2.5,
                   batch_normalize=True)
    whole, whole_info = importance_weights(lt, lr, mask, cfg)
    halves = [slice(0, 2), slice(2, 6)]
    sent = []
    for h in halves:  # what each replica would contribute
        importance_weights(lt[h], lr[h], mask[h], cfg, reduce=lambda xs: sent.append(xs) or xs)
    total = [a + b for a, b in zip(*sent)]
    for h in halves:
        w, info = importance_weights(lt[h], lr[h], mask[h], cfg, reduce=lambda xs: total)
        torch.testing.assert_close(w, whole[h], rtol=1e-6, atol=1e-7)
        assert info == pytest.approx(whole_info)
    assert whole_info["rs_rejected_frac"] > 0 and whole_info["is_clipped_frac"] > 0
