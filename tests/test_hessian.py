"""Tests for lbtrain.instruments.hessian: Lanczos top eigenvalue, Hutchinson trace, Hessian-vector products."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lbtrain.instruments.hessian import hutchinson_trace, hvp, hvp_batches, top_eigenvalue

pytestmark = pytest.mark.usefixtures("one_thread")

D = 30
F64 = torch.float64




def quadratic(eigs: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, object]:
    """loss = 0.5 w^T A w with A = Q diag(eigs) Q^T, Q a random orthogonal matrix: Hessian A, spectrum eigs."""
    g = torch.Generator().manual_seed(seed)
    d = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ q.T
    a = 0.5 * (a + a.T)
    w = torch.randn(d, generator=g, dtype=F64).requires_grad_()
    return a, w, lambda: 0.5 * w @ a @ w


def separated_spectrum() -> list[float]:
    """0.1..1 plus a well separated top eigenvalue 5."""
    return [0.1 + 0.9 * i / (D - 2) for i in range(D - 1)] + [5.0]


def hutchinson_sd(h: torch.Tensor) -> float:
    """Exact single-sample standard deviation of z^T H z for Rademacher z: sqrt(2 (|H|_F^2 - sum_i H_ii^2))."""
    return math.sqrt(2.0 * float((h**2).sum() - (h.diagonal() ** 2).sum()))


# --- a small float64 MLP with its dense Hessian ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp():
    """tanh MLP 6-24-3 (243 parameters), float64, cross-entropy on batches of 64; dense Hessian of batch 0."""
    torch.manual_seed(0)  # parameter init only; the tests below check the global RNG state around the calls
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 3)).to(F64)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 6, generator=g, dtype=F64) for _ in range(2)]
    ys = [torch.randint(0, 3, (64,), generator=g) for _ in range(2)]
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss_of(k):
        return lambda: F.cross_entropy(model(xs[k]), ys[k])

    def flat_loss(flat):
        ps = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return F.cross_entropy(functional_call(model, ps, (xs[0],)), ys[0])

    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    dense = torch.autograd.functional.hessian(flat_loss, flat0, vectorize=True)
    dense = 0.5 * (dense + dense.T)
    return {"model": model, "params": params, "loss_of": loss_of, "dense": dense, "sizes": sizes,
            "shapes": shapes}


def split_like(flat: torch.Tensor, sizes, shapes) -> list[torch.Tensor]:
    return [t.view(s) for t, s in zip(torch.split(flat, sizes), shapes)]


# --- tests -----------------------------------------------------------------------------------------------------


def test_hvp_matches_dense_hessian_and_leaves_grad_alone(mlp):
    g = torch.Generator().manual_seed(2)
    v_flat = torch.randn(mlp["dense"].shape[0], generator=g, dtype=F64)
    v = split_like(v_flat, mlp["sizes"], mlp["shapes"])
    with torch.no_grad():  # hvp must enable grad itself
        hv = hvp(mlp["loss_of"](0), mlp["params"], v)
    got = torch.cat([h.reshape(-1) for h in hv])
    torch.testing.assert_close(got, mlp["dense"] @ v_flat, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in mlp["params"])


def test_hvp_unused_and_linear_params_get_zero_blocks():
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    lin = torch.tensor([3.0], dtype=F64, requires_grad=True)  # enters linearly: its gradient has no graph
    unused = torch.zeros(4, dtype=F64, requires_grad=True)
    hv = hvp(lambda: (w**3).sum() + 2 * lin.sum(), [w, lin, unused],
             [torch.ones(2, dtype=F64), torch.ones(1, dtype=F64), torch.ones(4, dtype=F64)])
    torch.testing.assert_close(hv[0], 6 * w.detach())  # H = diag(6 w)
    assert torch.equal(hv[1], torch.zeros(1, dtype=F64)) and torch.equal(hv[2], torch.zeros(4, dtype=F64))


def test_hvp_batches_equals_hvp_of_mean_loss(mlp):
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g, dtype=F64) for p in mlp["params"]]
    l0, l1 = mlp["loss_of"](0), mlp["loss_of"](1)
    got = hvp_batches([l0, l1], mlp["params"], v)
    want = hvp(lambda: 0.5 * (l0() + l1()), mlp["params"], v)
    single = hvp(l0, mlp["params"], v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert max(float((a - c).abs().max()) for a, c in zip(got, single)) > 1e-3  # the second batch does count


def test_top_eigenvalue_quadratic_known_spectrum():
    eigs = separated_spectrum()
    _, w, loss = quadratic(eigs)
    r = top_eigenvalue([loss], [w])
    assert set(r) == {"lambda_max", "iters", "hvps", "converged"}
    assert r["converged"] and r["hvps"] == r["iters"] <= 20
    assert abs(r["lambda_max"] - 5.0) / 5.0 < 1e-4
    # two closures: hvps counts per-batch HVPs
    r2 = top_eigenvalue([loss, loss], [w])
    assert r2["hvps"] == 2 * r2["iters"] and abs(r2["lambda_max"] - 5.0) < 5e-4


@pytest.mark.parametrize("eigs, want", [
    ([-10.0] + [-1.0 + 3.0 * i / (D - 3) for i in range(D - 2)] + [3.0], 3.0),  # indefinite, |min| > max
    ([-5.0 + 4.0 * i / (D - 1) for i in range(D)], -1.0),  # negative definite: the least negative
])
def test_top_eigenvalue_is_largest_algebraic(eigs, want):
    """lbtrain's lambda_max is the largest *algebraic* eigenvalue (power iteration would give -10 / -5)."""
    _, w, loss = quadratic(eigs, seed=4)
    r = top_eigenvalue(loss, [w], iters=30)
    assert r["converged"]
    assert abs(r["lambda_max"] - want) / abs(want) < 1e-4


def test_top_eigenvalue_not_converged_reports_so():
    _, w, loss = quadratic([float(i + 1) for i in range(D)])  # no gap to speak of: 3 steps are not enough
    r = top_eigenvalue(loss, [w], iters=3)
    assert not r["converged"] and r["iters"] == 3 and r["hvps"] == 3
    assert r["lambda_max"] < D  # a Ritz value: a lower bound in exact arithmetic


def test_hutchinson_trace_quadratic():
    a, w, loss = quadratic(separated_spectrum())
    exact = float(a.trace())
    r = hutchinson_trace([loss], [w], samples=10, generator=torch.Generator().manual_seed(5))
    assert set(r) == {"trace", "stderr", "samples", "hvps"}
    assert r["samples"] == r["hvps"] == 10
    assert abs(r["trace"] - exact) <= 3 * r["stderr"]
    many = hutchinson_trace([loss], [w], samples=1000, generator=torch.Generator().manual_seed(6))
    assert abs(many["trace"] - exact) / exact < 0.03
    assert many["stderr"] == pytest.approx(hutchinson_sd(a) / math.sqrt(1000), rel=0.15)


def test_mlp_top_eigenvalue_and_trace_against_dense(mlp):
    exact_eigs = torch.linalg.eigvalsh(mlp["dense"])
    loss = mlp["loss_of"](0)
    r = top_eigenvalue([loss], mlp["params"])
    assert r["converged"]
    assert abs(r["lambda_max"] - float(exact_eigs[-1])) / float(exact_eigs[-1]) < 0.01
    exact_trace = float(mlp["dense"].trace())
    t = hutchinson_trace([loss], mlp["params"], samples=50, generator=torch.Generator().manual_seed(7))
    assert abs(t["trace"] - exact_trace) <= 3 * t["stderr"]


def test_mlp_hutchinson_stderr_is_a_standard_error(mlp):
    """Over 40 independent runs of 50 samples: stderr ~ the exact sd/sqrt(50), and +-2 stderr covers ~95%."""
    loss = mlp["loss_of"](0)
    exact_trace = float(mlp["dense"].trace())
    true_se = hutchinson_sd(mlp["dense"]) / math.sqrt(50)
    runs = [hutchinson_trace(loss, mlp["params"], samples=50, generator=torch.Generator().manual_seed(100 + i))
            for i in range(40)]
    ratios = sorted(r["stderr"] / true_se for r in runs)
    assert 0.85 < ratios[len(ratios) // 2] < 1.15  # median returned stderr vs the exact standard error
    covered = sum(abs(r["trace"] - exact_trace) <= 2 * r["stderr"] for r in runs)
    assert covered >= 33  # P(Binomial(40, 0.95) < 33) ~ 0.3%; a stderr 2x too small covers only ~68%


def test_global_rng_untouched_and_generator_reproducible():
    _, w, loss = quadratic(separated_spectrum())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    e1 = top_eigenvalue(loss, [w])
    t1 = hutchinson_trace(loss, [w], samples=5)
    e2 = top_eigenvalue(loss, [w], generator=torch.Generator().manual_seed(9))
    t2 = hutchinson_trace(loss, [w], samples=5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch.get_rng_state(), before)
    # generator=None means a fixed dedicated seed: reproducible, and a different seed gives different draws
    assert top_eigenvalue(loss, [w]) == e1 and hutchinson_trace(loss, [w], samples=5) == t1
    assert hutchinson_trace(loss, [w], samples=5, generator=torch.Generator().manual_seed(9)) == t2
    assert t1["trace"] != t2["trace"] and e2["converged"]


# --- top-k eigenvalues (full reorthogonalisation) and the curvature along the gradient ---------------------------


def test_top_eigenvalues_known_spectrum_no_ghosts():
    """Three separated top eigenvalues of a known spectrum, each to 1e-4; without full reorthogonalisation a
    converged top value would come back as a duplicate ("ghost") and push out the third."""
    from lbtrain.instruments.hessian import top_eigenvalues

    eigs = [0.1 + 0.9 * i / (D - 5) for i in range(D - 4)] + [3.0, 4.0, 5.0, 6.0]
    _, w, loss = quadratic(eigs, seed=8)
    r = top_eigenvalues(loss, [w], k=3, iters=D)
    assert set(r) == {"eigenvalues", "lambda_max", "residuals", "iters", "hvps", "converged"}
    assert r["converged"] and len(r["eigenvalues"]) == 3 and r["lambda_max"] == r["eigenvalues"][0]
    for got, want in zip(r["eigenvalues"], [6.0, 5.0, 4.0]):
        assert abs(got - want) / want < 1e-4
    # k = 1 agrees with the memory-lean top_eigenvalue (same start vector)
    one = top_eigenvalues(loss, [w], k=1, iters=D)
    assert one["lambda_max"] == pytest.approx(top_eigenvalue(loss, [w], iters=D)["lambda_max"], rel=1e-6)
    with pytest.raises(ValueError, match="k <= iters"):
        top_eigenvalues(loss, [w], k=5, iters=4)


def test_top_eigenvalues_mlp_against_dense(mlp):
    from lbtrain.instruments.hessian import top_eigenvalues

    exact = torch.linalg.eigvalsh(mlp["dense"]).flip(0)[:4].tolist()
    r = top_eigenvalues([mlp["loss_of"](0)], mlp["params"], k=4, iters=80)
    assert r["converged"]
    for got, want in zip(r["eigenvalues"], exact):
        assert abs(got - want) / abs(want) < 0.01


def test_gradient_curvature_against_dense(mlp):
    """g^T H g / |g|^2 of batch 0's loss, g its gradient: Andreyev & Beneventano's mini-batch sharpness."""
    from lbtrain.instruments.hessian import gradient, gradient_curvature

    loss = mlp["loss_of"](0)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss(), mlp["params"])])
    got = torch.cat([t.reshape(-1) for t in gradient([loss], mlp["params"])])
    torch.testing.assert_close(got, g, rtol=1e-12, atol=1e-14)
    r = gradient_curvature([loss], mlp["params"])
    assert r["curvature"] == pytest.approx(float(g @ mlp["dense"] @ g / (g @ g)), rel=1e-9)
    assert r["grad_norm_sq"] == pytest.approx(float(g @ g), rel=1e-12) and r["hvps"] == 1
    # two closures: the mean loss's gradient and Hessian
    two = gradient_curvature([mlp["loss_of"](0), mlp["loss_of"](1)], mlp["params"])
    assert two["hvps"] == 2 and math.isfinite(two["curvature"]) and two["curvature"] != r["curvature"]
    assert all(p.grad is None for p in mlp["params"])
