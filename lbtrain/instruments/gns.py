"""Gradient noise scale from gradients at two batch sizes (McCandlish et al. 2018, Appendix A.1).

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training" (2018, arXiv:1812.06162).
Let G be the true (full-data) gradient and Sigma the per-example gradient covariance, so a batch gradient G_B of B
examples drawn i.i.d. satisfies E|G_B|^2 = |G|^2 + tr(Sigma) / B. Measuring |G_B|^2 at two batch sizes
B_small < B_big on the same parameters gives the unbiased estimators

    |G|^2_est = (B_big |G_Bbig|^2 - B_small |G_Bsmall|^2) / (B_big - B_small)
    S_est     = (|G_Bsmall|^2 - |G_Bbig|^2) / (1/B_small - 1/B_big)          (S = tr(Sigma))

and the "simple" noise scale B_simple = tr(Sigma) / |G|^2 (the critical batch size under the paper's assumptions).
Each single-step estimate is very noisy (|G|^2_est is often negative), so, as in the paper, numerator and
denominator are smoothed separately with an exponential moving average and B_simple is the ratio of the two
averages (not an average of ratios, which would be biased and unstable).

Typical sources of the two measurements: under DDP, the local gradient on one rank (B_small = per-rank batch) and
the all-reduced gradient (B_big = global batch); under gradient accumulation, one micro-batch and the accumulated
gradient. The mean of |G_Bsmall|^2 over several disjoint small batches of the same size may be passed as `small_sq`:
it has the same expectation and less variance. Sampling without replacement from a finite data set of N examples
makes E|G_B|^2 = |G|^2 + tr(Sigma)/B * (N - B)/(N - 1); S_est then estimates the N-1 (sample) covariance trace and
|G|^2_est is low by tr(Sigma)/(N - 1), negligible for real data sets.

Conventions compared with k-diffusion's ``k_diffusion/gns.py`` (crowsonkb/k-diffusion, class GradientNoiseScale):
same estimators, same separate EMAs of |G|^2 and S with a ratio of averages, same bias correction by 1 - beta^t.
Differences: k-diffusion works on Python floats (host values, beta=0.9998 per step, eps clamps); here the state stays
in 0-d device tensors so `update` never synchronises with the host, the EMA is per *measurement* (the trainer
measures at log steps only, hence the much smaller default beta=0.95), non-finite measurements are skipped, and
B_simple is reported as None, not clamped with an eps, when the smoothed |G|^2 is not positive.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["GradientNoiseScale", "gns_estimates", "sq_norm"]


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


def gns_estimates(small_sq: Tensor, big_sq: Tensor, b_small: float, b_big: float) -> tuple[Tensor, Tensor]:
    """Unbiased single-measurement estimates (|G|^2_est, S_est) from squared gradient norms at two batch sizes.

        |G|^2_est = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        S_est     = (small_sq - big_sq) / (1/b_small - 1/b_big)

    ``small_sq`` = |G_Bsmall|^2 and ``big_sq`` = |G_Bbig|^2 (see :func:`sq_norm`), both at the same parameters;
    S = tr(Sigma), the trace of the per-example gradient covariance. Works elementwise, so batched tensors of
    measurements are accepted too. Computed in float32 or wider on the inputs' device; no host sync.
    """
    _check_batch_sizes(b_small, b_big)
    small_sq = torch.as_tensor(small_sq)
    big_sq = torch.as_tensor(big_sq)
    acc = _acc_dtype(small_sq.dtype, big_sq.dtype)
    small_sq, big_sq = small_sq.to(acc), big_sq.to(acc)
    b_small, b_big = float(b_small), float(b_big)
    grad_norm_sq = (big_sq * b_big - small_sq * b_small) / (b_big - b_small)
    trace_cov = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_norm_sq, trace_cov


class GradientNoiseScale:
    """Smoothed gradient noise scale B_simple = EMA[S_est] / EMA[|G|^2_est] (McCandlish et al. 2018, App. A.1).

    Each :meth:`update` takes one measurement (squared gradient norms at two batch sizes, 0-d tensors on the
    device) and folds its estimates (:func:`gns_estimates`) into two exponential moving averages with factor
    ``beta`` per measurement. The averages are bias-corrected as in Adam (Kingma & Ba 2015):

        m_t = beta m_{t-1} + (1 - beta) x_t,  m_0 = 0,   reported  m_t / (1 - beta^t)

    kept directly in the equivalent corrected form  mhat_t = mhat_{t-1} + w_t (x_t - mhat_{t-1}) with
    w_t = (1 - beta) / (1 - beta^t), so w_1 = 1 and the first reported values are exactly the first measurement's
    estimates; afterwards they are the beta-weighted average of all measurements so far. ``beta=0`` reports the
    last measurement only. B_simple is the ratio of the two averages.

    :meth:`update` never synchronises with the host: all arithmetic is on 0-d tensors on the measurements' device.
    A measurement whose estimates are not finite (inf/nan gradients, e.g. an AMP overflow step) is skipped (the
    state is kept, via ``torch.where``) and counted in ``num_skipped``; without this one overflow would poison the
    averages forever. :meth:`values` does the single host read.
    """

    _KEYS = ("grad_norm_sq", "trace_cov", "beta_pow", "accepted", "skipped")

    def __init__(self, beta: float = 0.95) -> None:
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        # bias-corrected EMAs of |G|^2_est and S_est, beta^(accepted measurements), counts; None before any update
        self._state: dict[str, Tensor] | None = None

    def update(self, small_sq: Tensor, big_sq: Tensor, b_small: float, b_big: float) -> None:
        """Fold in one measurement: |G_Bsmall|^2 and |G_Bbig|^2 at batch sizes b_small < b_big. No host sync."""
        grad_norm_sq, trace_cov = gns_estimates(small_sq, big_sq, b_small, b_big)
        if self._state is None:
            zero = torch.zeros((), dtype=grad_norm_sq.dtype, device=grad_norm_sq.device)
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
        for key, x in (("grad_norm_sq", grad_norm_sq), ("trace_cov", trace_cov)):
            st[key] = torch.where(ok, st[key] + w * (x - st[key]), st[key])
        st["beta_pow"] = beta_pow
        st["accepted"] = st["accepted"] + ok.to(beta_pow.dtype)
        st["skipped"] = st["skipped"] + (~ok).to(beta_pow.dtype)

    def values(self) -> dict[str, float | None]:
        """Smoothed {"b_simple", "trace_cov", "grad_norm_sq"} as Python floats (one host read, here).

        All None before any (finite) measurement; "b_simple" is None when the smoothed |G|^2 is <= 0 (noise
        dominates: B_simple is then undefined, or beyond what the measurements can resolve). "trace_cov" may be
        negative from noise too; it is reported as is.
        """
        none: dict[str, float | None] = {"b_simple": None, "trace_cov": None, "grad_norm_sq": None}
        if self._state is None:
            return none
        st = self._state
        g2, s, accepted = torch.stack([st["grad_norm_sq"], st["trace_cov"], st["accepted"]]).tolist()
        if accepted == 0:
            return none
        return {"b_simple": s / g2 if g2 > 0 else None, "trace_cov": s, "grad_norm_sq": g2}

    @property
    def num_skipped(self) -> int:
        """Measurements skipped as non-finite (reads the device)."""
        return 0 if self._state is None else int(self._state["skipped"].item())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for a bit-exact resume: beta and the 0-d state tensors (cloned; None before update)."""
        d: dict[str, Any] = {"beta": self.beta}
        for k in self._KEYS:
            d[k] = None if self._state is None else self._state[k].detach().clone()
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output. The saved beta wins: the saved averages were built with it."""
        beta = float(d["beta"])
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        tensors = [d[k] for k in self._KEYS]
        if all(t is None for t in tensors):
            self.beta, self._state = beta, None
            return
        if any(t is None for t in tensors):
            raise ValueError("incomplete GradientNoiseScale state: some tensors are None")
        self.beta = beta
        self._state = {k: torch.as_tensor(t).detach().clone() for k, t in zip(self._KEYS, tensors)}

    def __repr__(self) -> str:
        return f"GradientNoiseScale(beta={self.beta})"
