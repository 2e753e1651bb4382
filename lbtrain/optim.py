"""Optimizers for the `optimizer=sgd|adamw|lars|lamb` config group, and the weight-decay / trust-ratio exclusions.

SGD and AdamW are torch's own (`torch.optim.SGD`, `torch.optim.AdamW`). LARS and LAMB are the short
implementations below, not `timm.optim.Lars` / `timm.optim.Lamb`:

* timm is not a runtime dependency: it pulls in huggingface_hub, safetensors and more for two small classes;
* its conventions differ from the ones we want separately configurable: timm's `Lamb` clips the global gradient
  norm to 1.0 by default (the trainer already clips with `base.grad_clip`), and timm's `Lars`/`Lamb` tie the
  layer-wise trust ratio to `weight_decay != 0` (`always_adapt`), coupling "no weight decay" with "no layer-wise
  adaptation"; here the two come from one explicit per-group flag.

Both are tested against their papers' update equations written out in `tests/test_optim.py`, and cross-checked
against timm's where the conventions coincide, when timm is importable.

Adding an optimizer is one `OPTIMIZERS` entry (plus its YAML file in the `optimizer` config group).

Parameter groups (`param_groups`): with `exclude_bn_bias=True` the affine parameters of normalisation layers
(every `_BatchNorm`, hence `GhostBatchNorm`, and instance/layer/group/RMS norm) and every parameter whose name ends
in "bias" go into a second group with `weight_decay=0.0` and `trust=False` (no layer-wise adaptation); the rest
keep `weight_decay` and `trust=True`. With `exclude_bn_bias=False` there is one group, `trust=True`, which makes
`sgd` exactly `torch.optim.SGD(params, lr, momentum, weight_decay, nesterov)`.

Update rules (`lr` is the group's `lr`, read on every step, so the trainer's schedule simply sets `group["lr"]`):

LARS (You, Gitman, Ginsburg 2017, Alg. 1, in the form of NVIDIA apex / timm, global lr outside the momentum),
for a parameter `w` with gradient `g`, group weight decay `wd`::

    local_lr = trust_coefficient * ||w|| / (||g|| + wd * ||w|| + eps)   if trust and ||w|| > 0 and ||g|| > 0
             = 1                                                        otherwise
    d = local_lr * (g + wd * w)
    v = d                      on the first step (like torch.optim.SGD's buffer)
    v = momentum * v + d       afterwards
    update = d + momentum * v  if nesterov else v
    w = w - lr * update

  With a constant lr this is the paper's `v = m v + lr * local_lr * (g + wd w); w = w - v`; with a schedule the lr
  applies to the current step only, as in torch's SGD. `eps` sits in the trust-ratio denominator only.

LAMB (You et al. 2019, Alg. 2, no gradient clipping), `t` the parameter's step count starting at 1::

    m = b1 * m + (1 - b1) * g ;  v = b2 * v + (1 - b2) * g**2       (m, v start at 0)
    m_hat = m / (1 - b1**t)   ;  v_hat = v / (1 - b2**t)          (bias_correction=false: m_hat = m, v_hat = v)
    r = m_hat / (sqrt(v_hat) + eps) + wd * w                        (eps outside the square root)
    ratio = phi(||w||) / ||r||   if trust and ||w|| > 0 and ||r|| > 0,  else 1
    w = w - lr * ratio * r

The paper's versions differ: bias correction is in Alg. 2 of v5 (ICLR 2020) and absent from earlier versions
(`optimizer.bias_correction`, default true). phi is the paper's scaling function of the weight norm: the identity
by default, `optimizer.phi_bounds=[lo, hi]` gives phi(z) = min(max(z, lo), hi). A layer whose weights or update
are all zero (a zero-initialised bias or BN shift at the first step, say) gets ratio 1, for LARS as for LAMB:
the ratio is undefined there, and 1 is the plain optimizer's step.

`step()` runs no host-device synchronisation: norms, ratios and the "> 0" conditions stay on the device
(`torch.where`), the per-parameter LAMB step count is a plain Python int. Work is done with `torch._foreach_*`
ops on each group's parameters of one device and dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from lbtrain.config import ConfigError

__all__ = [
    "LAMB",
    "LARS",
    "OPTIMIZERS",
    "OPTIMIZER_NAMES",
    "OptimizerSpec",
    "build_optimizer",
    "param_groups",
    "uses_sgd_noise_scale",
    "validate_optimizer_options",
]

# Normalisation layers whose affine parameters count as "BN" for the exclusions. `_NormBase` covers every
# `_BatchNorm` (BatchNorm1d/2d/3d, SyncBatchNorm, GhostBatchNorm) and the instance norms.
_NORM_LAYERS: tuple[type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_bias: bool) -> list[dict[str, Any]]:
    """The trainable parameters of `model`, in `model.parameters()` order, as optimizer parameter groups.

    `exclude_bn_bias=False`: `[{"params": all, "weight_decay": weight_decay, "trust": True}]`.
    `exclude_bn_bias=True`: `[{"params": others, "weight_decay": weight_decay, "trust": True},
    {"params": norm layers' parameters and "*bias", "weight_decay": 0.0, "trust": False}]` (both groups always
    present, possibly empty, so that the group layout of a checkpoint does not depend on the model).
    """
    weight_decay = float(weight_decay)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not exclude_bn_bias:
        return [{"params": [p for _, p in trainable], "weight_decay": weight_decay, "trust": True}]
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORM_LAYERS) for p in m.parameters(recurse=False)}
    excluded = [id(p) in norm_params or name.endswith("bias") for name, p in trainable]
    return [
        {"params": [p for (_, p), ex in zip(trainable, excluded) if not ex], "weight_decay": weight_decay,
         "trust": True},
        {"params": [p for (_, p), ex in zip(trainable, excluded) if ex], "weight_decay": 0.0, "trust": False},
    ]


def _by_device_and_dtype(params: list[Tensor]) -> list[list[int]]:
    """Indices of `params` bucketed by (device, dtype): foreach ops and `torch.stack` need one of each."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    return list(buckets.values())


def _with_grads(group: dict[str, Any], name: str) -> list[Tensor]:
    params = [p for p in group["params"] if p.grad is not None]
    if any(p.grad.is_sparse for p in params):
        raise RuntimeError(f"{name} does not support sparse gradients")
    return params


def _check_hparams(lr: float, weight_decay: float, eps: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"invalid learning rate: {lr}")
    if not weight_decay >= 0.0:
        raise ValueError(f"invalid weight_decay: {weight_decay}")
    if not eps > 0.0:
        raise ValueError(f"invalid eps: {eps}")


class _Layerwise(torch.optim.Optimizer):
    """The shared `step`: each group's parameters that have a gradient, by device and dtype, to `_update`."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = _with_grads(group, type(self).__name__)
            for idx in _by_device_and_dtype(params):
                self._update([params[i] for i in idx], group)
        return loss

    def _update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        raise NotImplementedError


class LARS(_Layerwise):
    """LARS: momentum SGD with a layer-wise learning rate (update rule in the module docstring).

    Group keys: `lr`, `momentum`, `weight_decay`, `nesterov`, `trust_coefficient`, `eps`, `trust` (apply the
    layer-wise ratio; False gives plain momentum SGD for that group). State per parameter: `momentum_buffer`
    (only when momentum != 0, created on the parameter's first step).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, trust_coefficient: float = 0.001, eps: float = 1e-8, trust: bool = True):
        _check_hparams(lr, weight_decay, eps)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum: {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if not trust_coefficient > 0.0:
            raise ValueError(f"invalid trust_coefficient: {trust_coefficient}")
        defaults = dict(lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay),
                        nesterov=bool(nesterov), trust_coefficient=float(trust_coefficient), eps=float(eps),
                        trust=bool(trust))
        super().__init__(params, defaults)

    def _update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        d = torch._foreach_add(grads, params, alpha=wd)  # g + wd * w, new tensors: p.grad is left untouched
        if group["trust"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
            torch._foreach_mul_(d, list(ratio.unbind(0)))
        update = d
        if momentum != 0:
            bufs, new = [], []
            for p, d_p in zip(params, d):
                state = self.state[p]
                if "momentum_buffer" in state:
                    bufs.append(state["momentum_buffer"])
                    new.append(d_p)
                else:  # first step: v = local_lr * d, as torch.optim.SGD starts its buffer at the gradient
                    state["momentum_buffer"] = d_p.clone()
            if bufs:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, new)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            update = torch._foreach_add(d, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, update, alpha=-lr)


class LAMB(_Layerwise):
    """LAMB: Adam direction plus L2 weight decay, scaled by a layer-wise trust ratio (rule in the module docstring).

    Group keys: `lr`, `betas`, `eps`, `weight_decay`, `trust`. State per parameter: `step` (int), `exp_avg`,
    `exp_avg_sq`. No gradient clipping inside: the trainer clips with `base.grad_clip`.
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, trust: bool = True, bias_correction: bool = True,
                 phi_bounds: tuple[float, float] | None = None):
        _check_hparams(lr, weight_decay, eps)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if phi_bounds is not None and not 0.0 <= phi_bounds[0] <= phi_bounds[1]:
            raise ValueError(f"invalid phi_bounds: {phi_bounds}")
        defaults = dict(lr=float(lr), betas=(float(b1), float(b2)), eps=float(eps), weight_decay=float(weight_decay),
                        trust=bool(trust), bias_correction=bool(bias_correction),
                        phi_bounds=tuple(float(x) for x in phi_bounds) if phi_bounds is not None else None)
        super().__init__(params, defaults)

    def _update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1  # a Python int: bias corrections are computed on the host with no device read
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        if group.get("bias_correction", True):
            m_hat = torch._foreach_div(m, [1 - b1 ** s["step"] for s in states])
            denom = torch._foreach_sqrt(torch._foreach_div(v, [1 - b2 ** s["step"] for s in states]))
        else:
            m_hat, denom = m, torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps)
        r = torch._foreach_div(m_hat, denom)
        if wd != 0:
            torch._foreach_add_(r, params, alpha=wd)
        if group["trust"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            r_norm = torch.stack(torch._foreach_norm(r))
            bounds = group.get("phi_bounds")
            phi = w_norm.clamp(bounds[0], bounds[1]) if bounds is not None else w_norm
            ratio = torch.where((w_norm > 0) & (r_norm > 0), phi / r_norm, 1.0)
            torch._foreach_mul_(r, list(ratio.unbind(0)))
        torch._foreach_add_(params, r, alpha=-lr)


@dataclass(frozen=True)
class _Options:
    lr: float
    momentum: float
    nesterov: bool
    betas: tuple[float, float]
    eps: float
    trust_coefficient: float
    fused: bool | None
    bias_correction: bool = True
    phi_bounds: tuple[float, float] | None = None


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry.

    build: (param groups from `param_groups`, options) -> optimizer.
    uses_momentum: reads `base.momentum` / `base.nesterov` (otherwise nesterov=True is a config error).
    sgd_noise_scale: Smith et al.'s SGD noise scale g = eps N / (B (1 - m)) describes its updates.
    reads: the `optimizer.*` options it uses; setting another one away from its default is a config error (it would
    change the run's identity without changing what is trained).
    """

    build: Callable[[list[dict[str, Any]], _Options], torch.optim.Optimizer]
    uses_momentum: bool
    sgd_noise_scale: bool
    summary: str
    reads: tuple[str, ...] = ()


def _fused(o: _Options) -> dict[str, bool]:
    return {} if o.fused is None else {"fused": o.fused}  # None: torch's default (foreach where it can)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(
        build=lambda groups, o: torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                                **_fused(o)),
        uses_momentum=True, sgd_noise_scale=True, summary="torch.optim.SGD (momentum, optional Nesterov)", reads=()),
    "adamw": OptimizerSpec(
        build=lambda groups, o: torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **_fused(o)),
        uses_momentum=False, sgd_noise_scale=False, summary="torch.optim.AdamW (decoupled weight decay)",
        reads=("betas", "eps")),
    "lars": OptimizerSpec(  # `fused` is for torch's optimizers; ours always use foreach ops
        build=lambda groups, o: LARS(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                     trust_coefficient=o.trust_coefficient, eps=o.eps),
        uses_momentum=True, sgd_noise_scale=False, summary="LARS, You et al. 2017", reads=("eps", "trust_coefficient")),
    "lamb": OptimizerSpec(
        build=lambda groups, o: LAMB(groups, lr=o.lr, betas=o.betas, eps=o.eps, bias_correction=o.bias_correction,
                                     phi_bounds=o.phi_bounds),
        uses_momentum=False, sgd_noise_scale=False, summary="LAMB, You et al. 2019",
        reads=("betas", "eps", "bias_correction", "phi_bounds")),
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)


def _spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ConfigError("optimizer.name", name, f"unknown optimizer; choose one of {', '.join(OPTIMIZER_NAMES)}")
    return OPTIMIZERS[name]


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def validate_optimizer_options(name: str, *, momentum: float, weight_decay: float, betas: Sequence[float],
                               eps: float, trust_coefficient: float, nesterov: bool,
                               defaults: dict[str, Any] | None = None, bias_correction: bool = True,
                               phi_bounds: Sequence[float] | None = None) -> None:
    """Raise `ConfigError` (its message starts with the config key) for the first meaningless option. `defaults`
    (the schema's `optimizer.*` defaults): an option the optimizer does not read must keep its default."""
    spec = _spec(name)
    given = {"betas": [float(x) for x in betas] if isinstance(betas, Sequence) and not isinstance(betas, str)
             else betas, "eps": eps, "trust_coefficient": trust_coefficient, "bias_correction": bias_correction,
             "phi_bounds": [float(x) for x in phi_bounds] if phi_bounds is not None else None}
    for key, value in given.items():
        if defaults is not None and key not in spec.reads and value != defaults[key]:
            raise ConfigError(f"optimizer.{key}", value, f"not used by {name} (it reads "
                              f"{', '.join(spec.reads) or 'none of these options'}); leave it out")
    if phi_bounds is not None:
        pb = given["phi_bounds"]
        if not (len(pb) == 2 and all(_is_real(x) for x in pb) and 0 <= pb[0] <= pb[1]):
            raise ConfigError("optimizer.phi_bounds", list(phi_bounds), "must be [lo, hi] with 0 <= lo <= hi")
    if not (_is_real(momentum) and 0 <= momentum < 1):
        raise ConfigError("base.momentum", momentum, "must be in [0, 1)")
    if not (_is_real(weight_decay) and weight_decay >= 0):
        raise ConfigError("base.weight_decay", weight_decay, "must be a finite number >= 0")
    b = list(betas) if isinstance(betas, Sequence) and not isinstance(betas, str) else betas
    if not (isinstance(b, list) and len(b) == 2 and all(_is_real(x) and 0 <= x < 1 for x in b)):
        raise ConfigError("optimizer.betas", betas, "must be two numbers [beta1, beta2], each in [0, 1)")
    if not (_is_real(eps) and eps > 0):
        raise ConfigError("optimizer.eps", eps, "must be a finite number > 0")
    if not (_is_real(trust_coefficient) and trust_coefficient > 0):
        raise ConfigError("optimizer.trust_coefficient", trust_coefficient, "must be a finite number > 0")
    if nesterov and not spec.uses_momentum:
        raise ConfigError("base.nesterov", nesterov, f"not used by {name}")
    if nesterov and momentum == 0:
        raise ConfigError("base.nesterov", nesterov, "needs base.momentum > 0")


def build_optimizer(model: nn.Module, name: str, *, lr: float, momentum: float, weight_decay: float,
                    nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    trust_coefficient: float = 0.001, exclude_bn_bias: bool = False,
                    fused: bool | None = None, bias_correction: bool = True,
                    phi_bounds: Sequence[float] | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` over `param_groups(model, weight_decay, exclude_bn_bias)`; options are validated first.

    `momentum`/`nesterov` are read by sgd and lars, `betas` by adamw and lamb, `eps` by adamw, lamb and lars (trust
    ratio denominator), `trust_coefficient` by lars, `bias_correction` and `phi_bounds` by lamb; `fused` is passed
    to torch's sgd/adamw when not None.
    """
    validate_optimizer_options(name, momentum=momentum, weight_decay=weight_decay, betas=betas, eps=eps,
                               trust_coefficient=trust_coefficient, nesterov=nesterov, bias_correction=bias_correction,
                               phi_bounds=phi_bounds)
    b1, b2 = betas
    options = _Options(lr=float(lr), momentum=float(momentum), nesterov=bool(nesterov), betas=(float(b1), float(b2)),
                       eps=float(eps), trust_coefficient=float(trust_coefficient), fused=fused,
                       bias_correction=bool(bias_correction),
                       phi_bounds=(float(phi_bounds[0]), float(phi_bounds[1])) if phi_bounds is not None else None)
    return _spec(name).build(param_groups(model, weight_decay, exclude_bn_bias), options)


def uses_sgd_noise_scale(name: str, momentum: float) -> bool:
    """Whether Smith et al.'s noise scale g = eps N / (B (1 - m)) applies: an SGD formula, so only for "sgd"."""
    return _spec(name).sgd_noise_scale and 0 <= momentum < 1
