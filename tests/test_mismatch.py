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
    assert torch.equal(w, torch.ones(1, 4)) and info["is_clipped_frac"] == 0


def test_weights_are_detached_and_errors():
    lt = torch.zeros(2, 3, requires_grad=True)
    w, _ = importance_weights(lt, torch.zeros(2, 3), torch.ones(2, 3), ISConfig("tis"))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="mode"):
        ISConfig("clip")
    with pytest.raises(ValueError, match="cap"):
        ISConfig("tis", cap=0.5)
    with pytest.raises(ValueError, match="no tokens"):
        mismatch_metrics(torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        mismatch_metrics(torch.zeros(2), torch.zeros(2), torch.zeros(3))
