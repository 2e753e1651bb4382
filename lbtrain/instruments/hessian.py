"""Sharpness: top Hessian eigenvalue (Lanczos) and Hessian trace (Hutchinson) from Hessian-vector products.

The Hessian H is that of a loss L(w) at the current parameters w, where L is the *mean* of the losses returned by
a list of closures (one per batch): H v = (1/K) sum_k d/dw <grad L_k(w), v>, a double backward through
``torch.autograd.grad(..., create_graph=True)`` (Pearlmutter 1994), one batch's graph at a time.

- top eigenvalue: Lanczos (Lanczos 1950; Golub & Van Loan, Matrix Computations, ch. 10) on H, reporting the
  largest *algebraic* eigenvalue lambda_max = max_i lambda_i (a negative-curvature direction of larger magnitude
  does not count). PyHessian's power iteration converges to the eigenvalue of largest *magnitude* instead, which
  differs when the most negative eigenvalue dominates (rare near minima, common early in training).
- top-k eigenvalues: Lanczos with full reorthogonalisation (``top_eigenvalues``), the k largest algebraic Ritz
  values, each converged to the same residual test; memory ``iters`` parameter-sized vectors.
- trace: Hutchinson's estimator (Hutchinson 1990; Avron & Toledo 2011) tr(H) = E[z^T H z] for Rademacher z, whose
  single-sample variance is 2 (|H|_F^2 - sum_i H_ii^2); the reported standard error is the sample standard
  deviation of the z^T H z over sqrt(samples). That is the right standard error of *one* draw of the probes: a
  caller that reuses the same probes at every measurement (one fixed seed) repeats that draw's error in the
  standard error itself (+-24% at 10 probes for Gaussian z^T H z, more when it is skewed) at every measurement;
  draw the probes afresh per measurement (a seed per measurement) and use a few tens of them.
- curvature along the gradient (``gradient_curvature``): g^T H g / |g|^2, g the gradient of the same loss; over a
  mini-batch's loss this is the "batch sharpness" of Andreyev & Beneventano (2024).

Compared with PyHessian (Yao, Gholami, Keutzer, Mahoney 2020, "PyHessian: Neural Networks Through the Lens of the
Hessian", ``pyhessian/hessian.py``): PyHessian's ``dataloader_hv_product`` averages per-batch HVPs weighted by batch
size and restarts power iteration / Hutchinson from the global RNG; here batches are weighted equally (make the
closures return loss * (n_k K / N) for size weighting), random vectors come from a dedicated ``torch.Generator``
(never the global RNG, so measuring leaves training's random streams alone), Hutchinson uses a fixed number of
samples (fixed cost, honest standard error) rather than a relative-change stop, and the eigenvalue uses Lanczos with
a residual-based stop rather than power iteration with a relative-change stop.

The caller owns data and model state: each closure must recompute the same loss every call (fixed batch, dropout
off) and must not change what it measures; in particular a model in train mode updates BatchNorm running statistics
on every forward, i.e. on every HVP, so use eval mode or save/restore the buffers. No function here touches
``param.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_SEED", "gradient", "gradient_curvature", "hutchinson_trace", "hvp", "hvp_batches",
           "top_eigenvalue", "top_eigenvalues"]

LossFns = Callable[[], Tensor] | Sequence[Callable[[], Tensor]]

DEFAULT_SEED = 0  # seed of the dedicated generator made when none is given (measurements are then reproducible)


def _acc_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    out = torch.float32
    for t in tensors:
        out = torch.promote_types(out, t.dtype)
    return out


def _dot(a: Sequence[Tensor], b: Sequence[Tensor], acc: torch.dtype) -> Tensor:
    """sum_i <a_i, b_i> as a 0-d tensor of dtype `acc` (no host sync)."""
    parts = [torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)) for x, y in zip(a, b)]
    return torch.stack(parts).sum()


def _axpy_(y: list[Tensor], alpha: Tensor, x: Sequence[Tensor]) -> None:
    """y_i += alpha * x_i in place, alpha a 0-d tensor (no host sync, no temporaries)."""
    for yi, xi in zip(y, x):
        yi.addcmul_(xi, alpha.to(yi.dtype))


def _scale_(y: list[Tensor], alpha: Tensor) -> None:
    for yi in y:
        yi.mul_(alpha.to(yi.dtype))


def _loss_list(loss_fns: LossFns) -> list[Callable[[], Tensor]]:
    fns = [loss_fns] if callable(loss_fns) else list(loss_fns)
    if not fns:
        raise ValueError("need at least one loss closure")
    return fns


def _generator(generator: torch.Generator | None, params: Sequence[Tensor]) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator(device=params[0].device).manual_seed(DEFAULT_SEED)


def hvp(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], vec: Sequence[Tensor]) -> list[Tensor]:
    """Hessian-vector product H v of the scalar ``loss_fn()`` with respect to ``params`` (Pearlmutter 1994).

    H v = d/dw <dL/dw, v>: one forward, one backward with ``create_graph=True`` and one double backward. ``loss_fn``
    recomputes the loss (data, BN mode etc. are the caller's), so the graph is freed on return; a loss that is an
    average over several batches may be returned as such. Parameters the loss does not depend on, or depends on
    only linearly, get zero blocks. Runs under ``torch.enable_grad()`` (callable from a ``no_grad`` context); the
    result is detached, in the parameters' dtypes, and ``param.grad`` is not touched.
    """
    params = list(params)
    vec = list(vec)
    if len(params) != len(vec):
        raise ValueError(f"{len(params)} params but {len(vec)} vector blocks")
    with torch.enable_grad():
        loss = loss_fn()
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        hv: Sequence[Tensor | None] = [None] * len(params)
        if live:
            hv = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[vec[i] for i in live],
                                     allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def hvp_batches(loss_fns: Sequence[Callable[[], Tensor]], params: Sequence[Tensor],
                vec: Sequence[Tensor]) -> list[Tensor]:
    """Mean of per-batch HVPs, (1/K) sum_k H_k v = H v for the mean loss (1/K) sum_k L_k.

    One batch's graph lives at a time; memory is the result plus one per-batch HVP. A single closure may be passed
    instead of a list.
    """
    fns = _loss_list(loss_fns)
    out = hvp(fns[0], params, vec)
    for fn in fns[1:]:
        torch._foreach_add_(out, hvp(fn, params, vec))
    if len(fns) > 1:
        torch._foreach_div_(out, float(len(fns)))
    return out


def top_eigenvalue(loss_fns: LossFns, params: Sequence[Tensor], iters: int = 20, tol: float = 1e-3,
                   generator: torch.Generator | None = None) -> dict:
    """Largest algebraic eigenvalue of the Hessian of the mean of ``loss_fns`` at ``params``, by Lanczos.

    Lanczos three-term recurrence from a Gaussian start v_1 (drawn from ``generator``; a dedicated generator seeded
    with ``DEFAULT_SEED`` when None, never the global RNG):

        w = H v_j - beta_{j-1} v_{j-1},  alpha_j = <w, v_j>,  w -= alpha_j v_j,  beta_j = |w|,  v_{j+1} = w / beta_j

    T_j = tridiag(beta, alpha, beta) holds the projection of H on the Krylov space; its largest eigenvalue theta
    (Ritz value) increases to lambda_max. Stop (``converged``) when the Ritz residual |H y - theta y| =
    beta_j |s_j| (s the eigenvector of T_j for theta, s_j its last entry) is <= tol * max|Ritz value|, the ARPACK
    criterion scaled by the spectral radius estimate so that lambda_max near 0 can converge; some eigenvalue then
    lies within the residual of theta (within residual^2 / gap once the gap is resolved). Also stops, converged,
    when beta_j vanishes (the Krylov space is invariant: theta is then exact). Otherwise ``iters`` steps are done
    and the last theta (a lower bound on lambda_max in exact arithmetic) is returned with ``converged=False``.

    Memory: only 3 parameter-sized vectors (v_{j-1}, v_j, w; plus one per-batch HVP with several closures) and no
    full reorthogonalisation, instead of the ``iters`` x params of Lanczos with full reorthogonalisation. This is
    justified for the *extreme* eigenvalue (Paige 1971, 1980): in floating point, orthogonality is lost only along
    Ritz vectors that have already converged, which produces duplicate ("ghost") copies of converged Ritz values
    but not a wrong largest one, and we stop as soon as the top one has converged. The new vector is also
    re-orthogonalised once against the two vectors held (local reorthogonalisation, the correction folded into
    alpha_j), which costs two dot products per step against one HVP.

    One host read per step (alpha_j, beta_j), for the convergence test. Returns {"lambda_max": float,
    "iters": Lanczos steps done, "hvps": per-batch HVPs done (= iters * number of closures), "converged": bool}.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    fns = _loss_list(loss_fns)
    params = list(params)
    acc = _acc_dtype(params)
    gen = _generator(generator, params)

    v = [torch.randn(p.shape, generator=gen, device=gen.device, dtype=p.dtype).to(p.device) for p in params]
    _scale_(v, _dot(v, v, acc).rsqrt())
    v_prev: list[Tensor] | None = None
    beta_prev: Tensor | None = None
    alphas: list[float] = []
    betas: list[float] = []
    theta = float("nan")
    converged = False
    steps = 0
    eps = torch.finfo(acc).eps
    for steps in range(1, iters + 1):
        w = hvp_batches(fns, params, v)
        if v_prev is not None:
            _axpy_(w, -beta_prev, v_prev)
        alpha = _dot(w, v, acc)
        _axpy_(w, -alpha, v)
        # local reorthogonalisation against the two vectors held ("twice is enough")
        c = _dot(w, v, acc)
        _axpy_(w, -c, v)
        alpha = alpha + c
        if v_prev is not None:
            _axpy_(w, -_dot(w, v_prev, acc), v_prev)
        beta = _dot(w, w, acc).sqrt()
        a, b = torch.stack([alpha, beta]).tolist()  # the one host read of this step
        alphas.append(a)
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        ritz, vecs = np.linalg.eigh(T)
        theta = float(ritz[-1])
        scale = max(abs(float(ritz[0])), abs(theta))
        residual = abs(b * float(vecs[-1, -1]))
        if not math.isfinite(theta) or not math.isfinite(b):
            break
        if b <= 100.0 * eps * max(scale, max(betas, default=0.0)) or residual <= tol * scale:
            converged = True
            break
        if steps == iters:
            break
        betas.append(b)
        _scale_(w, 1.0 / beta)
        v_prev, v, beta_prev = v, w, beta
    return {"lambda_max": theta, "iters": steps, "hvps": steps * len(fns), "converged": converged}


def top_eigenvalues(loss_fns: LossFns, params: Sequence[Tensor], k: int = 1, iters: int = 20, tol: float = 1e-3,
                    generator: torch.Generator | None = None) -> dict:
    """The ``k`` largest algebraic eigenvalues of the Hessian of the mean of ``loss_fns``, by Lanczos with full
    reorthogonalisation.

    The recurrence of ``top_eigenvalue`` from the same Gaussian start (same ``generator`` use), but every new
    vector is orthogonalised twice (classical Gram-Schmidt, "twice is enough") against all Lanczos vectors so far:
    without it, converged Ritz values come back as duplicate ("ghost") copies, harmless for the largest one but not
    for the second, third, ... Stops (``converged``) when each of the top ``k`` Ritz values has a residual
    beta_j |s_{j,i}| <= tol * max|Ritz value| (or when the Krylov space is invariant); otherwise after ``iters``
    steps with ``converged=False``. ``iters`` must be >= k.

    Memory: ``iters`` parameter-sized vectors (the Lanczos basis, in the accumulation dtype), e.g. 2 GB for
    ResNet-50 (25.6M parameters) at 20 steps, against 3 for ``top_eigenvalue``; two (steps x P) matrix-vector
    products per step on top of the HVP. One host read per step. Returns {"eigenvalues": the top k Ritz values
    (largest first; fewer when the space was exhausted first), "lambda_max", "residuals" (of those values),
    "iters", "hvps", "converged"}.
    """
    if k < 1 or iters < k:
        raise ValueError(f"need 1 <= k <= iters, got k={k}, iters={iters}")
    fns = _loss_list(loss_fns)
    params = list(params)
    acc = _acc_dtype(params)
    gen = _generator(generator, params)
    sizes = [p.numel() for p in params]
    device = params[0].device

    def blocks(flat: Tensor) -> list[Tensor]:
        return [b.view(p.shape).to(p.dtype) for b, p in zip(torch.split(flat, sizes), params)]

    # the same start vector as top_eigenvalue (drawn per parameter, in its dtype)
    start = [torch.randn(p.shape, generator=gen, device=gen.device, dtype=p.dtype).to(p.device) for p in params]
    basis = torch.zeros(iters, sum(sizes), dtype=acc, device=device)
    v = torch.cat([s.reshape(-1).to(acc) for s in start])
    basis[0] = v / torch.linalg.vector_norm(v)
    alphas: list[float] = []
    betas: list[float] = []
    top: list[float] = []
    res: list[float] = []
    converged = False
    steps = 0
    eps = torch.finfo(acc).eps
    for steps in range(1, iters + 1):
        j = steps - 1
        w = torch.cat([h.reshape(-1).to(acc) for h in hvp_batches(fns, params, blocks(basis[j]))])
        alpha = torch.dot(w, basis[j])
        w -= alpha * basis[j]
        if j > 0:
            w -= betas[-1] * basis[j - 1]
        for _ in range(2):  # full reorthogonalisation, twice
            w -= basis[:steps].T @ (basis[:steps] @ w)
        beta = torch.linalg.vector_norm(w)
        a, b = torch.stack([alpha, beta]).tolist()  # the one host read of this step
        alphas.append(a)
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        ritz, vecs = np.linalg.eigh(T)
        m = min(k, steps)
        top = [float(x) for x in ritz[::-1][:m]]
        res = [abs(b * float(vecs[-1, -1 - i])) for i in range(m)]
        scale = max(abs(float(ritz[0])), abs(float(ritz[-1])))
        if not all(math.isfinite(x) for x in top) or not math.isfinite(b):
            break
        if b <= 100.0 * eps * max(scale, max(betas, default=0.0)):
            converged = True  # the Krylov space is invariant: its Ritz values are eigenvalues
            break
        if m == k and max(res) <= tol * scale:
            converged = True
            break
        if steps == iters:
            break
        betas.append(b)
        basis[steps] = w / beta
    return {"eigenvalues": top, "lambda_max": top[0] if top else float("nan"), "residuals": res, "iters": steps,
            "hvps": steps * len(fns), "converged": converged}


def gradient(loss_fns: LossFns, params: Sequence[Tensor]) -> list[Tensor]:
    """Gradient of the mean of ``loss_fns`` at ``params`` (one backward per closure, one graph at a time), detached;
    ``param.grad`` is not touched. Parameters the loss does not depend on get zero blocks."""
    fns = _loss_list(loss_fns)
    params = list(params)
    out = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for fn in fns:
            grads = torch.autograd.grad(fn().reshape(()), params, allow_unused=True)
            torch._foreach_add_(out, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    if len(fns) > 1:
        torch._foreach_div_(out, float(len(fns)))
    return out


def gradient_curvature(loss_fns: LossFns, params: Sequence[Tensor]) -> dict:
    """Curvature of the mean of ``loss_fns`` along its own gradient: g^T H g / |g|^2 (g and H of the same loss).

    Over a mini-batch's loss (closures = its BatchNorm groups) this is the quantity Andreyev & Beneventano (2024,
    "Edge of Stochastic Stability") call the mini-batch sharpness; its mean over mini-batches, "batch sharpness",
    is what settles at 2/lr under SGD. Cost: one backward and one HVP per closure. Returns {"curvature" (nan when
    g = 0), "grad_norm_sq", "hvps"}.
    """
    fns = _loss_list(loss_fns)
    params = list(params)
    acc = _acc_dtype(params)
    g = gradient(fns, params)
    hg = hvp_batches(fns, params, g)
    num, den = torch.stack([_dot(g, hg, acc), _dot(g, g, acc)]).tolist()
    return {"curvature": num / den if den > 0 else float("nan"), "grad_norm_sq": den, "hvps": len(fns)}


def hutchinson_trace(loss_fns: LossFns, params: Sequence[Tensor], samples: int = 10,
                     generator: torch.Generator | None = None) -> dict:
    """Hutchinson estimate of tr(H) for the Hessian of the mean of ``loss_fns`` at ``params``.

        tr(H) ~= (1/n) sum_{i=1..n} z_i^T H z_i,   z_i with i.i.d. Rademacher (+-1) entries,

    unbiased, with Var(z^T H z) = 2 (|H|_F^2 - sum_i H_ii^2) (Hutchinson 1990; Avron & Toledo 2011). ``stderr`` is
    the sample standard deviation (n - 1 denominator) of the z_i^T H z_i divided by sqrt(n): a standard error of
    ``trace`` (nan when samples == 1). The z are drawn from ``generator`` (a dedicated generator seeded with
    ``DEFAULT_SEED`` when None; never the global RNG). Memory: z, H z and, with several closures, one per-batch
    HVP. One host read, at the end. Returns {"trace", "stderr", "samples", "hvps" (= samples * closures)}.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    fns = _loss_list(loss_fns)
    params = list(params)
    acc = _acc_dtype(params)
    gen = _generator(generator, params)
    quad = []
    for _ in range(samples):
        z = [torch.randint(0, 2, p.shape, generator=gen, device=gen.device, dtype=p.dtype).to(p.device).mul_(2).sub_(1)
             for p in params]
        quad.append(_dot(z, hvp_batches(fns, params, z), acc))
    vals = torch.stack(quad).cpu().to(torch.float64).numpy()
    stderr = float(vals.std(ddof=1) / math.sqrt(samples)) if samples > 1 else float("nan")
    return {"trace": float(vals.mean()), "stderr": stderr, "samples": samples, "hvps": samples * len(fns)}
