"""Gradient noise scale from gradients at two batch sizes (McCandlish et al. 2018, Appendix A.1), with the
finite-data correction and a confidence interval.

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training" (2018, arXiv:1812.06162).
Let g_1..g_N be the per-example gradients of the N training examples (the i.i.d. units: single samples, or the
groups BatchNorm normalizes over), G = (1/N) sum_i g_i the true gradient and

    tr(Sigma) = 1/(N-1) sum_i |g_i - G|^2          (the N-1, "sample", covariance of the N per-example gradients)

A batch of B examples drawn *without replacement* (what an epoch's permutation does) has a mean gradient G_B with
E[G_B] = G and Cov(G_B) = Sigma (1/B - 1/N) (the finite-population correction (N-B)/(N-1) applied to the 1/N
covariance), so

    E|G_B|^2 = |G|^2 + tr(Sigma) (1/B - 1/N) = (|G|^2 - tr(Sigma)/N) + tr(Sigma)/B.

Measuring |G_B|^2 at two batch sizes B_small < B_big on the same parameters, the two-point estimators

    |G|^2_unc = (B_big |G_Bbig|^2 - B_small |G_Bsmall|^2) / (B_big - B_small)
    S_est     = (|G_Bsmall|^2 - |G_Bbig|^2) / (1/B_small - 1/B_big)

have E[S_est] = tr(Sigma) exactly but E[|G|^2_unc] = |G|^2 - tr(Sigma)/N (the 1/B term is fitted, the -1/N one is
not), so the unbiased pair is

    |G|^2_est = |G|^2_unc + S_est / N,        S_est as above.

(Drawn *with* replacement, E|G_B|^2 = |G|^2 + tr(Sigma_pop)/B with the 1/N covariance and |G|^2_unc is unbiased.)
The "simple" noise scale is B_simple = tr(Sigma) / |G|^2 (the critical batch size under the paper's assumptions);
the uncorrected ratio B_unc = S / |G|^2_unc = B_simple / (1 - B_simple/N), i.e. B_simple = B_unc / (1 + B_unc/N):
negligible when B_simple << N, a factor ~4 when B_simple is half the training set. N = None: no correction.
With data augmentation the per-example gradient is itself random; the correction then removes the part of the
noise that comes from choosing examples plus trace(augmentation noise)/N too much, so the truth lies between the
corrected and the uncorrected value (both are recorded).

Each single-step estimate is very noisy (|G|^2_est is often negative), so, as in the paper, |G|^2 and S are
averaged separately (an exponential moving average of each, per measurement) and B_simple is the ratio of the
two averages (not an average of ratios, which would be biased and unstable). Its interval is Fieller's for a
ratio of two means (Fieller 1954): with (S_bar, G_bar) the averages and V their estimated covariance matrix (the
EMA-weighted covariance of the per-measurement pairs divided by n_eff - 1, n_eff = (sum w)^2 / sum w^2 the
effective number of measurements), the set of R with

    (S_bar - R G_bar)^2 <= q^2 (V_ss - 2 R V_sg + R^2 V_gg),     q the Student-t 97.5% quantile, n_eff - 1 d.o.f.

It is the interval [lo, hi] around S_bar / G_bar when G_bar^2 > q^2 V_gg (|G|^2 significantly positive), else
unbounded (reported as hi = None): B_simple is then beyond what the measurements resolve. It treats the
measurements in the average as independent draws of one (|G|^2, S) pair (fresh batches each time); the drift of
the true values over the averaging window is not in it. The interval is on the corrected B_simple.

Typical sources of the two measurements: under DDP, the local gradient on each rank (B_small = per-rank batch, the
mean of |G_Bsmall|^2 over the ranks) and the all-reduced gradient (B_big = global batch); under gradient
accumulation, one micro-batch and the accumulated gradient. The mean of |G_Bsmall|^2 over several disjoint small
batches of the same size may be passed as `small_sq`: it has the same expectation and less variance.

Conventions compared with k-diffusion's ``k_diffusion/gns.py`` (crowsonkb/k-diffusion, class GradientNoiseScale):
same estimators, same separate EMAs of |G|^2 and S with a ratio of averages, same bias correction by 1 - beta^t.
Differences: k-diffusion works on Python floats (host values, beta=0.9998 per step, eps clamps) and has no
finite-N correction nor interval; here the state stays in device tensors so `update` never synchronises with the
host, the EMA is per *measurement* (the trainer measures at log steps only, hence the much smaller default
beta=0.95), non-finite measurements are skipped, and B_simple is reported as None, not clamped with an eps, when
the smoothed |G|^2 is not positive.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["GradientNoiseScale", "gns_estimates", "sq_norm", "fieller_interval", "t_quantile"]

CI_LEVEL = 0.95
CI_METHOD = "fieller"  # Fieller's interval for a ratio of means, EMA-weighted moments (see the module docstring)


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or wider when an input is wider (float64 stays float64; half/bfloat16 are upcast)."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def sq_norm(grads: Sequence[Tensor | None]) -> Tensor:
    """Squared L2 norm of a list of tensors, sum_i |g_i|^2, as a 0-d tensor on their device (no host sync).

    Accumulated in float32, or float64 if any input is float64 (half/bfloat16 gradients are upcast). ``None``
    entries (parameters without a gradient) are skipped; at least one tensor is required.
    """
    tensors = [g for g in grads if g is not None]
    if not tensors:
        raise ValueError("sq_norm needs at least one tensor")
    acc = _acc_dtype(*(t.dtype for t in tensors))
    device = tensors[0].device
    same = [t for t in tensors if t.dtype == acc]
    norms: list[Tensor] = list(torch._foreach_norm(same)) if same else []
    norms += [torch.linalg.vector_norm(t, dtype=acc) for t in tensors if t.dtype != acc]
    return torch.stack([n.to(device) for n in norms]).square().sum()


def _check_batch_sizes(b_small: float, b_big: float) -> None:
    if not (isinstance(b_small, numbers.Real) and isinstance(b_big, numbers.Real)):
        raise TypeError("b_small and b_big must be Python numbers (a tensor would force a host sync)")
    if not (math.isfinite(b_small) and math.isfinite(b_big) and 0 < b_small < b_big):
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")


def gns_estimates(small_sq: Tensor, big_sq: Tensor, b_small: float, b_big: float,
                  n: int | None = None) -> tuple[Tensor, Tensor]:
    """Single-measurement estimates (|G|^2_est, S_est) from squared gradient norms at two batch sizes.

        |G|^2_est = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)  [+ S_est / n]
        S_est     = (small_sq - big_sq) / (1/b_small - 1/b_big)

    ``small_sq`` = |G_Bsmall|^2 and ``big_sq`` = |G_Bbig|^2 (see :func:`sq_norm`), both at the same parameters;
    S = tr(Sigma). ``n``: the number of examples the batches are drawn from without replacement; then both are
    unbiased (see the module docstring); None: the uncorrected |G|^2 (unbiased for i.i.d. draws with replacement).
    Works elementwise, so batched tensors of measurements are accepted too. Computed in float32 or wider on the
    inputs' device; no host sync.
    """
    _check_batch_sizes(b_small, b_big)
    if n is not None and not (isinstance(n, numbers.Integral) and n >= 1):
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    small_sq = torch.as_tensor(small_sq)
    big_sq = torch.as_tensor(big_sq)
    acc = _acc_dtype(small_sq.dtype, big_sq.dtype)
    small_sq, big_sq = small_sq.to(acc), big_sq.to(acc)
    b_small, b_big = float(b_small), float(b_big)
    grad_norm_sq = (big_sq * b_big - small_sq * b_small) / (b_big - b_small)
    trace_cov = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    if n is not None:
        grad_norm_sq = grad_norm_sq + trace_cov / float(n)
    return grad_norm_sq, trace_cov


def t_quantile(p: float, dof: Tensor | float) -> Tensor | float:
    """Student-t quantile t_p(dof) by the Cornish-Fisher expansion in 1/dof (Abramowitz & Stegun 26.7.5), elementwise
    for a tensor `dof` (no host read). At p = 0.975: 5.87 vs the exact 6.02 at 1.5 d.o.f., 4.27 vs 4.303 at 2, 3.179
    vs 3.182 at 3, exact as dof -> inf. (No scipy: the estimator stays torch + the standard library.)"""
    z = _normal_quantile(p)
    g = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    inv = 1.0 / dof
    return z + inv * (g[0] + inv * (g[1] + inv * (g[2] + inv * g[3])))


def _normal_quantile(p: float) -> float:
    """Standard normal quantile by bisection on erf (to 1e-12; only called at read time)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def fieller_interval(s: Tensor, g: Tensor, v_ss: Tensor, v_gg: Tensor, v_sg: Tensor,
                     q: Tensor | float) -> tuple[Tensor, Tensor]:
    """Fieller's interval for the ratio R = E[s] / E[g] from the means (s, g) and their estimated (co)variances.

    The set {R : (s - R g)^2 <= q^2 (v_ss - 2 R v_sg + R^2 v_gg)}; with a = g^2 - q^2 v_gg, b = s g - q^2 v_sg,
    c = s^2 - q^2 v_ss its ends are (b -+ sqrt(b^2 - a c)) / a. It always holds s / g. Returns (lo, hi),
    elementwise: the interval when a > 0; when a <= 0 (g not significantly non-zero) the set is unbounded: hi = inf
    and lo = the larger root if s / g lies above it (a one-sided bound), else nan. nan where g <= 0.
    """
    q2 = torch.as_tensor(q, dtype=s.dtype, device=s.device) ** 2
    a, b, c = g * g - q2 * v_gg, s * g - q2 * v_sg, s * s - q2 * v_ss
    root = (b * b - a * c).clamp_min(0).sqrt()  # >= 0 in exact arithmetic whenever a > 0 (s/g is inside)
    r1, r2 = (b - root) / a, (b + root) / a  # a < 0: r1 >= r2
    ratio = s / g
    bounded = a > 0  # (False where q is nan)
    nan, inf = torch.full_like(s, math.nan), torch.full_like(s, math.inf)
    lo = torch.where(bounded, torch.minimum(r1, ratio), torch.where(ratio >= r1, r1, nan))
    hi = torch.where(bounded, torch.maximum(r2, ratio), inf)
    ok = (g > 0) & torch.isfinite(q2)
    return torch.where(ok, lo, nan), torch.where(ok, hi, nan)


class GradientNoiseScale:
    """Smoothed gradient noise scale B_simple = EMA[S_est] / EMA[|G|^2_est] (McCandlish et al. 2018, App. A.1),
    corrected for sampling without replacement from ``n`` examples, with Fieller's interval.

    Each :meth:`update` takes one measurement (squared gradient norms at two batch sizes, tensors on the device)
    and folds its estimates (:func:`gns_estimates`, uncorrected) into exponential moving averages with factor
    ``beta`` per measurement, bias-corrected as in Adam (Kingma & Ba 2015):

        m_t = beta m_{t-1} + (1 - beta) x_t,  m_0 = 0,   reported  m_t / (1 - beta^t)

    kept directly in the equivalent corrected form  mhat_t = mhat_{t-1} + w_t (x_t - mhat_{t-1}) with
    w_t = (1 - beta) / (1 - beta^t), so w_1 = 1 and the first reported values are exactly the first measurement's
    estimates; afterwards they are the beta-weighted average of all measurements so far. ``beta=0`` reports the
    last measurement only. The same weights give the weighted (co)variances of the pairs, updated in the centered
    form C_t = (1 - w_t) (C_{t-1} + w_t dx dy) (dx = x_t - mhat_{t-1}; West 1979), numerically stable in float32.
    The finite-n correction |G|^2 = |G|^2_unc + S/n is linear, so it is applied when read (to the means and the
    moments alike) and the uncorrected values stay available. B_simple is the ratio of the two averages.

    :meth:`update` never synchronises with the host: all arithmetic is on device tensors (0-d for the trainer;
    any shape elementwise). A measurement whose estimates are not finite (inf/nan gradients, e.g. an AMP overflow
    step) is skipped (the state is kept, via ``torch.where``) and counted in ``num_skipped``; without this one
    overflow would poison the averages forever. :meth:`values` does the single host read.
    """

    _KEYS = ("grad_norm_sq", "trace_cov", "var_g", "var_s", "cov_gs", "beta_pow", "accepted", "skipped")
    _MOMENTS = ("var_g", "var_s", "cov_gs")  # absent from checkpoints written before the interval existed

    def __init__(self, beta: float = 0.95, n: int | None = None) -> None:
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if n is not None and not (isinstance(n, numbers.Integral) and n >= 1):
            raise ValueError(f"n must be a positive integer or None, got {n!r}")
        self.beta = beta
        self.n = None if n is None else int(n)
        # bias-corrected EMAs of the uncorrected |G|^2_est and S_est, their weighted (co)variances,
        # beta^(accepted measurements), counts; None before any update
        self._state: dict[str, Tensor] | None = None

    def update(self, small_sq: Tensor, big_sq: Tensor, b_small: float, b_big: float) -> None:
        """Fold in one measurement: |G_Bsmall|^2 and |G_Bbig|^2 at batch sizes b_small < b_big. No host sync."""
        grad_norm_sq, trace_cov = gns_estimates(small_sq, big_sq, b_small, b_big)
        if self._state is None:
            zero = torch.zeros_like(grad_norm_sq)
            self._state = {k: zero.clone() for k in self._KEYS}
            self._state["beta_pow"].fill_(1.0)
        st = self._state
        if st["beta_pow"].device != grad_norm_sq.device:  # e.g. state loaded from a CPU checkpoint
            st = self._state = {k: v.to(grad_norm_sq.device) for k, v in st.items()}
        grad_norm_sq = grad_norm_sq.to(st["beta_pow"].dtype)
        trace_cov = trace_cov.to(st["beta_pow"].dtype)

        ok = torch.isfinite(grad_norm_sq) & torch.isfinite(trace_cov)
        beta = torch.full_like(st["beta_pow"], self.beta)  # a tensor, so that w_1 = (1-beta)/(1-beta) is exactly 1
        beta_pow = torch.where(ok, st["beta_pow"] * beta, st["beta_pow"])
        w = (1.0 - beta) / (1.0 - beta_pow)  # inf/nan on a skipped first measurement: discarded by the where below
        dg, ds = grad_norm_sq - st["grad_norm_sq"], trace_cov - st["trace_cov"]
        new = {"grad_norm_sq": st["grad_norm_sq"] + w * dg, "trace_cov": st["trace_cov"] + w * ds,
               "var_g": (1.0 - w) * (st["var_g"] + w * dg * dg), "var_s": (1.0 - w) * (st["var_s"] + w * ds * ds),
               "cov_gs": (1.0 - w) * (st["cov_gs"] + w * dg * ds)}
        for key, value in new.items():
            st[key] = torch.where(ok, value, st[key])
        st["beta_pow"] = beta_pow
        st["accepted"] = st["accepted"] + ok.to(beta_pow.dtype)
        st["skipped"] = st["skipped"] + (~ok).to(beta_pow.dtype)

    def summary(self) -> dict[str, Tensor] | None:
        """The reported quantities as device tensors (elementwise; no host read): "grad_norm_sq" (corrected),
        "grad_norm_sq_uncorrected", "trace_cov", "b_simple" (corrected), "b_simple_uncorrected", "b_simple_lo",
        "b_simple_hi" (Fieller's CI_LEVEL interval on the corrected B_simple, Student-t quantile with n_eff - 1
        degrees of freedom; nan where undefined, i.e. n_eff < 2.5 or no B_simple; hi = inf where unbounded), "n_eff"
        (effective number of measurements, (sum w)^2 / sum w^2), "measurements" (accepted). None before any
        update."""
        if self._state is None:
            return None
        st = self._state
        g_unc, s = st["grad_norm_sq"], st["trace_cov"]
        var_g, var_s, cov = st["var_g"], st["var_s"], st["cov_gs"]
        inv_n = 0.0 if self.n is None else 1.0 / self.n
        g = g_unc + s * inv_n  # the finite-n correction, linear in the estimates: to the moments too
        var_g, cov = var_g + 2 * inv_n * cov + inv_n**2 * var_s, cov + inv_n * var_s
        # 1/n_eff = sum w^2 / (sum w)^2 for w_i = beta^(t-i), i = 1..t: (1-beta)(1+beta^t) / ((1+beta)(1-beta^t))
        bp, beta = st["beta_pow"], self.beta
        n_eff = (1 + beta) * (1 - bp) / ((1 - beta) * (1 + bp))
        n_eff = torch.where(st["accepted"] > 0, n_eff, torch.zeros_like(n_eff))
        # weighted covariance C -> covariance of the weighted mean: C * n_eff/(n_eff-1) / n_eff = C / (n_eff - 1)
        dof = n_eff - 1
        scale = 1.0 / dof.clamp_min(1e-12)
        # from the third measurement on (n_eff(3) = 2.99 at beta = 0.95; the quantile is 2.5% low at 1.5 d.o.f.)
        q = torch.where(dof >= 1.5, t_quantile(0.5 + CI_LEVEL / 2, dof.clamp_min(1.0)), math.nan)
        lo, hi = fieller_interval(s, g, var_s * scale, var_g * scale, cov * scale, q)
        nan = torch.full_like(s, math.nan)
        return {"grad_norm_sq": g, "grad_norm_sq_uncorrected": g_unc, "trace_cov": s,
                "b_simple": torch.where(g > 0, s / g, nan), "b_simple_uncorrected": torch.where(g_unc > 0, s / g_unc,
                                                                                                nan),
                "b_simple_lo": lo, "b_simple_hi": hi, "n_eff": n_eff, "measurements": st["accepted"]}

    _VALUE_KEYS = ("b_simple", "b_simple_uncorrected", "b_simple_lo", "b_simple_hi", "trace_cov", "grad_norm_sq",
                   "grad_norm_sq_uncorrected", "n_eff", "measurements")

    def values(self) -> dict[str, float | None]:
        """:meth:`summary` as Python floats (the host read, here), for a 0-d state.

        All None before any (finite) measurement; "b_simple" (and "b_simple_uncorrected") None when the smoothed
        |G|^2 (uncorrected) is <= 0 (noise dominates: B_simple is then undefined, or beyond what the measurements
        resolve). "trace_cov" may be negative from noise too; it is reported as is. "b_simple_lo"/"b_simple_hi":
        None where undefined (before the third measurement: n_eff < 2.5; no B_simple) or unbounded.
        """
        none: dict[str, float | None] = dict.fromkeys(self._VALUE_KEYS)
        summary = self.summary()
        if summary is None:
            return none
        if summary["measurements"].dim() != 0:
            raise ValueError("values() reads a 0-d state; use summary() for batched measurements")
        got = dict(zip(self._VALUE_KEYS, torch.stack([summary[k].double() for k in self._VALUE_KEYS]).tolist()))
        if got["measurements"] == 0:
            return none
        return {k: v if math.isfinite(v) else None for k, v in got.items()}

    @property
    def num_skipped(self) -> int:
        """Measurements skipped as non-finite (reads the device)."""
        return 0 if self._state is None else int(self._state["skipped"].item())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for a bit-exact resume: beta, n and the state tensors (cloned; None before update)."""
        d: dict[str, Any] = {"beta": self.beta, "n": self.n}
        for k in self._KEYS:
            d[k] = None if self._state is None else self._state[k].detach().clone()
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output. The saved beta wins (the saved averages were built with it); n is
        the constructor's (it is applied when read). A state saved before the interval existed has no moments:
        they are set to nan, so the interval stays undefined for that run while the averages go on."""
        beta = float(d["beta"])
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        tensors = {k: d.get(k) for k in self._KEYS}
        if all(t is None for t in tensors.values()):
            self.beta, self._state = beta, None
            return
        base = tensors["grad_norm_sq"]
        for k in self._MOMENTS:
            if k not in d and base is not None:
                tensors[k] = torch.full_like(torch.as_tensor(base), math.nan)
        if any(t is None for t in tensors.values()):
            raise ValueError("incomplete GradientNoiseScale state: some tensors are None")
        self.beta = beta
        self._state = {k: torch.as_tensor(t).detach().clone() for k, t in tensors.items()}

    def __repr__(self) -> str:
        return f"GradientNoiseScale(beta={self.beta}, n={self.n})"
