"""Tests for lbtrain.instruments.gns: gradient noise scale estimators (McCandlish et al. 2018, App. A.1)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lbtrain.instruments.gns import GradientNoiseScale, gns_estimates, sq_norm

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64




def t64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def test_sq_norm():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([0.5, -1.5], dtype=torch.bfloat16)
    out = sq_norm([a, None, b])
    assert out.dim() == 0 and out.dtype == torch.float32
    assert float(out) == pytest.approx(30.0 + 0.25 + 2.25)
    out64 = sq_norm([a, torch.ones(3, dtype=F64)])
    assert out64.dtype == F64 and float(out64) == pytest.approx(33.0)
    with pytest.raises(ValueError):
        sq_norm([None])


def test_gns_estimates_hand_made():
    g2, s = gns_estimates(t64(5.0), t64(3.0), 2, 8)
    assert float(g2) == pytest.approx((8 * 3.0 - 2 * 5.0) / (8 - 2))  # 14/6
    assert float(s) == pytest.approx((5.0 - 3.0) / (1 / 2 - 1 / 8))  # 16/3
    # consistency: noiseless gradients (small == big) have S = 0 and |G|^2 = the common value
    g2, s = gns_estimates(torch.tensor(7.0), torch.tensor(7.0), 16, 64)
    assert float(g2) == pytest.approx(7.0) and float(s) == 0.0
    with pytest.raises(ValueError):
        gns_estimates(t64(1.0), t64(1.0), 64, 16)


# --- against an exact computation on a finite data set ---------------------------------------------------------

N, B_SMALL, B_BIG, DRAWS = 512, 16, 64, 2000


@pytest.fixture(scope="module")
def per_example():
    """Per-example gradients (N x P, float64) of a tanh MLP 20-16-5 (421 params) on a fixed teacher data set."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5)).to(F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 20, generator=g, dtype=F64)
    y = (x @ torch.randn(20, 5, generator=g, dtype=F64) + 0.5 * torch.randn(N, 5, generator=g, dtype=F64)).argmax(1)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([per[k].reshape(N, -1) for k in params], 1)
    # cross-check the vmap gradients against autograd on the full-batch mean loss
    full = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    torch.testing.assert_close(flat.mean(0), torch.cat([t.reshape(-1) for t in full]))
    return flat, [p.numel() for p in params.values()]


def batch_means(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row r: mean of flat[idx[r]] (repeats counted), via a count matrix (no DRAWS x B x P temporary)."""
    counts = torch.zeros(idx.shape[0], flat.shape[0], dtype=F64)
    counts.scatter_add_(1, idx, torch.ones(idx.shape, dtype=F64))
    return counts @ flat / idx.shape[1]


def test_estimates_unbiased_against_exact_per_example_gradients(per_example):
    """Mean over 2000 random batches of (|G|^2_est, S_est) matches the exact |G|^2 and tr(Sigma) within 5%.

    Truth from all N per-example gradients g_i: G = mean_i g_i, tr(Sigma) = mean_i |g_i - G|^2, the *population*
    (1/N) covariance, because batches are drawn i.i.d. uniformly from the N examples *with replacement*: then
    E|G_B|^2 = |G|^2 + tr(Sigma_pop)/B exactly and both estimators are exactly unbiased (N-1 would differ by 0.2%,
    below this test's resolution anyway). The small batch is the first B_SMALL examples of the big batch, as when
    one micro-batch / one rank's share is measured against the whole batch.
    """
    flat, sizes = per_example
    mean = flat.mean(0)
    true_g2 = float(mean.square().sum())
    true_s = float((flat - mean).square().sum(1).mean())
    assert 20 < true_s / true_g2 < 200  # B_simple ~ 50: noise and signal both matter at these batch sizes

    g = torch.Generator().manual_seed(2)
    idx = torch.randint(N, (DRAWS, B_BIG), generator=g)
    big, small = batch_means(flat, idx), batch_means(flat, idx[:, :B_SMALL])
    ests = []
    for r in range(DRAWS):  # through the public API, per-parameter blocks and 0-d tensors, as the trainer does
        s_sq = sq_norm(torch.split(small[r], sizes))
        b_sq = sq_norm(torch.split(big[r], sizes))
        ests.append(torch.stack(gns_estimates(s_sq, b_sq, B_SMALL, B_BIG)))
    ests = torch.stack(ests)
    est_g2, est_s = ests.mean(0).tolist()
    se_g2, se_s = (ests.std(0) / math.sqrt(DRAWS)).tolist()
    assert se_g2 < 0.015 * true_g2 and se_s < 0.015 * true_s  # the 5% checks below have power (> 3 SE)
    assert est_g2 == pytest.approx(true_g2, rel=0.05)
    assert est_s == pytest.approx(true_s, rel=0.05)

    # Without replacement E|G_B|^2 = |G|^2 + tr(Sigma)/B (N-B)/(N-1): S_est then targets the N-1 covariance and
    # |G|^2_est is low by tr(Sigma)/(N-1), ~10% here; seen, so sampling conventions matter at this resolution.
    idx_wo = torch.argsort(torch.rand(DRAWS, N, generator=g), 1)[:, :B_BIG]
    big, small = batch_means(flat, idx_wo), batch_means(flat, idx_wo[:, :B_SMALL])
    g2_wo, _ = gns_estimates(small.square().sum(1), big.square().sum(1), B_SMALL, B_BIG)
    assert float(g2_wo.mean()) == pytest.approx(true_g2 - true_s / (N - 1), rel=0.05)
    assert float(g2_wo.mean()) < 0.95 * true_g2


def test_b_simple_synthetic_known_noise():
    """g_i = mu + sigma z_i in d dims: B_simple = d sigma^2 / |mu|^2 = 100, recovered within 5% by the EMA ratio.

    The batch means are drawn from their exact distribution (mean of B i.i.d. N(mu, sigma^2 I) is
    N(mu, sigma^2/B I)); the big batch contains the small one, as in training.
    """
    d, sigma, bs, bb, draws = 100, 1.0, 32, 256, 2000
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(d, generator=g, dtype=F64)
    mu /= mu.norm()  # |mu|^2 = 1
    small = mu + sigma / math.sqrt(bs) * torch.randn(draws, d, generator=g, dtype=F64)
    rest = mu + sigma / math.sqrt(bb - bs) * torch.randn(draws, d, generator=g, dtype=F64)
    big = (bs * small + (bb - bs) * rest) / bb
    gns = GradientNoiseScale(beta=0.998)
    for r in range(draws):
        gns.update(sq_norm([small[r]]), sq_norm([big[r]]), bs, bb)
    v = gns.values()
    assert v["b_simple"] == pytest.approx(d * sigma**2 / 1.0, rel=0.05)
    assert v["trace_cov"] == pytest.approx(d * sigma**2, rel=0.05)
    assert v["grad_norm_sq"] == pytest.approx(1.0, rel=0.05)


# --- GradientNoiseScale bookkeeping ----------------------------------------------------------------------------


def test_ema_arithmetic_hand_made():
    """beta = 0.5, b_small = 1, b_big = 2: |G|^2_est = 2 big - small, S_est = 2 (small - big).

    measurements (small, big) -> (|G|^2, S): (5, 3) -> (1, 4); (10, 4) -> (-2, 12); (4, 3) -> (2, 2).
    Bias-corrected EMAs: t=1: (1, 4); t=2: (0.25 - 1, 1 + 6) / 0.75 = (-1, 28/3); t=3: (0.625, 4.5) / 0.875.
    """
    gns = GradientNoiseScale(beta=0.5)
    assert gns.values() == {"b_simple": None, "trace_cov": None, "grad_norm_sq": None}
    gns.update(t64(5.0), t64(3.0), 1, 2)
    assert gns.values() == {"b_simple": 4.0, "trace_cov": 4.0, "grad_norm_sq": 1.0}
    gns.update(t64(10.0), t64(4.0), 1, 2)
    v = gns.values()
    assert v["grad_norm_sq"] == pytest.approx(-1.0) and v["trace_cov"] == pytest.approx(28 / 3)
    assert v["b_simple"] is None  # smoothed |G|^2 <= 0
    gns.update(t64(4.0), t64(3.0), 1, 2)
    v = gns.values()
    assert v["grad_norm_sq"] == pytest.approx(0.625 / 0.875) and v["trace_cov"] == pytest.approx(4.5 / 0.875)
    assert v["b_simple"] == pytest.approx(4.5 / 0.625)  # ratio of the averages (7.2), not an average of ratios


def test_first_values_are_the_first_measurement_exactly():
    small, big = torch.tensor(3.7), torch.tensor(1.3)
    g2, s = gns_estimates(small, big, 8, 96)
    gns = GradientNoiseScale()  # beta = 0.95, float32 state
    gns.update(small, big, 8, 96)
    v = gns.values()
    assert v["grad_norm_sq"] == float(g2) and v["trace_cov"] == float(s)  # bit-exact: w_1 = 1


def test_non_finite_measurement_is_skipped():
    gns = GradientNoiseScale(beta=0.9)
    gns.update(torch.tensor(float("nan")), torch.tensor(1.0), 1, 2)
    assert gns.values()["grad_norm_sq"] is None and gns.num_skipped == 1
    gns.update(torch.tensor(5.0), torch.tensor(3.0), 1, 2)
    before = gns.values()
    gns.update(torch.tensor(float("inf")), torch.tensor(3.0), 1, 2)
    assert gns.values() == before == {"b_simple": 4.0, "trace_cov": 4.0, "grad_norm_sq": 1.0}
    assert gns.num_skipped == 2


def _feed(gns: GradientNoiseScale, seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        big = torch.rand((), generator=g) + 1.0
        gns.update(big + torch.rand((), generator=g), big, 32, 256)


def test_state_dict_round_trip_bit_exact():
    a = GradientNoiseScale(beta=0.9)
    _feed(a, 0, 7)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as a checkpoint would
    buf.seek(0)
    b = GradientNoiseScale(beta=0.5)  # the saved beta wins
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.beta == 0.9 and b.values() == a.values()
    _feed(a, 1, 5)
    _feed(b, 1, 5)
    assert b.values() == a.values()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k != "beta")
    # an empty state round-trips to "no measurement yet"
    c = GradientNoiseScale()
    c.load_state_dict(GradientNoiseScale(beta=0.8).state_dict())
    assert c.beta == 0.8 and c.values()["b_simple"] is None


def test_update_does_not_sync_with_host(monkeypatch):
    """update() (and sq_norm / gns_estimates) must not read tensor values on the host."""
    gns = GradientNoiseScale()
    grads_small = [torch.randn(10, 3), torch.randn(3)]
    grads_big = [torch.randn(10, 3) * 0.5, torch.randn(3) * 0.5]

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside update()")

    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__", "__array__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for _ in range(3):  # first update (state creation) and later ones
        gns.update(sq_norm(grads_small), sq_norm(grads_big), 16, 64)
    monkeypatch.undo()
    assert gns.values()["trace_cov"] is not None
