"""Ghost Batch Normalization (Hoffer et al. 2017, "Train longer, generalize better").

In training, each ghost batch -- a contiguous chunk of ``ghost_batch`` samples of the batch,
``x[0:g], x[g:2g], ...`` -- is normalized with its own mean and variance. All ghost batches of a
layer are normalized by a single fused ``F.batch_norm`` call: the ``G = B // g`` ghost batches are
moved into the channel dimension, ``(B, C, *S) -> (g, G*C, *S)``, so every (ghost, channel) pair
becomes one "channel" of an ordinary batch norm (weight and bias repeated ``G`` times).

Running statistics get one momentum update per step toward the mean over ghost batches of their
means and unbiased variances, so ``ghost_batch == batch`` is exactly ``nn.BatchNorm``; buffers keep
``nn.BatchNorm``'s shapes, so state dicts interchange. Eval mode is exactly ``nn.BatchNorm`` eval.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "convert_to_ghost_bn",
    "set_ghost_batch",
]


def _check_ghost_batch(ghost_batch: int | None) -> int | None:
    if ghost_batch is None:
        return None
    if isinstance(ghost_batch, bool) or not isinstance(ghost_batch, int) or ghost_batch < 1:
        raise ValueError(f"ghost_batch must be a positive int or None, got {ghost_batch!r}")
    return ghost_batch


class GhostBatchNorm(_BatchNorm):
    """Batch norm that, in training, normalizes each chunk of ``ghost_batch`` samples separately.

    ``ghost_batch=None`` (or a ghost batch equal to the whole batch) is exactly ``nn.BatchNorm``.
    In training, a batch size not divisible by ``ghost_batch`` raises ``ValueError``; eval mode
    accepts any batch size.
    """

    def __init__(
        self,
        num_features: int,
        ghost_batch: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        # `bias` is only forwarded when False, so torch versions without that argument still work.
        extra = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        self.ghost_batch = _check_ghost_batch(ghost_batch)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch={self.ghost_batch}"

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.ghost_batch is None:
            return super().forward(input)
        self._check_input_dim(input)
        batch, g = input.shape[0], self.ghost_batch
        if batch % g != 0:
            raise ValueError(
                f"{type(self).__name__}: batch size {batch} is not divisible by ghost_batch={g}; "
                "use a batch size that is a multiple of ghost_batch"
            )
        n_ghosts = batch // g
        if n_ghosts <= 1:  # one ghost batch: plain batch norm, bit-exact
            return super().forward(input)
        return self._ghost_forward(input, n_ghosts, g)

    def _ghost_forward(self, x: Tensor, n_ghosts: int, g: int) -> Tensor:
        batch, c = x.shape[0], x.shape[1]
        spatial = tuple(x.shape[2:])
        running_mean, running_var = self.running_mean, self.running_var
        track = self.track_running_stats and running_mean is not None and running_var is not None
        stats = None
        if track:
            # momentum=1.0 makes F.batch_norm overwrite these with each ghost batch's mean and
            # unbiased variance (zeros, not empty: the kernel computes 0 * old + 1 * new).
            stats = torch.zeros(2, n_ghosts * c, dtype=running_mean.dtype, device=running_mean.device)
        weight = self.weight.repeat(n_ghosts) if self.weight is not None else None
        bias = self.bias.repeat(n_ghosts) if self.bias is not None else None

        channels_last = (
            x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        )
        if channels_last:
            # Keep NHWC memory order: (G, g, H, W, C) -> (g, H, W, G, C), a channels_last (g, G*C, H, W).
            h, w = spatial
            xt = x.permute(0, 2, 3, 1).reshape(n_ghosts, g, h, w, c).permute(1, 2, 3, 0, 4)
            xt = xt.reshape(g, h, w, n_ghosts * c).permute(0, 3, 1, 2)
        else:
            xt = x.reshape(n_ghosts, g, c, *spatial).transpose(0, 1).reshape(g, n_ghosts * c, *spatial)

        y = F.batch_norm(
            xt,
            stats[0] if stats is not None else None,
            stats[1] if stats is not None else None,
            weight,
            bias,
            True,
            1.0,
            self.eps,
        )

        if channels_last:
            out = y.permute(0, 2, 3, 1).reshape(g, h, w, n_ghosts, c).permute(3, 0, 1, 2, 4)
            out = out.reshape(batch, h, w, c).permute(0, 3, 1, 2)
        else:
            out = y.reshape(g, n_ghosts, c, *spatial).transpose(0, 1).reshape(batch, c, *spatial)

        if self.track_running_stats:
            self._update_running_stats(stats.view(2, n_ghosts, c).mean(1) if stats is not None else None)
        return out

    @torch.no_grad()
    def _update_running_stats(self, ghost_stats: Tensor | None) -> None:
        """Momentum update toward ``ghost_stats = [mean of ghost means, mean of ghost unbiased vars]``.

        Mirrors ``nn.BatchNorm``: ``num_batches_tracked`` counts steps and ``momentum=None`` is a
        cumulative average (here with a tensor weight, so there is no host-device sync).
        """
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None and ghost_stats is not None:
                factor = self.num_batches_tracked.to(ghost_stats.dtype).reciprocal()
        if ghost_stats is not None and self.running_mean is not None and self.running_var is not None:
            self.running_mean.lerp_(ghost_stats[0], factor)
            self.running_var.lerp_(ghost_stats[1], factor)


class GhostBatchNorm1d(GhostBatchNorm):
    """Ghost version of ``nn.BatchNorm1d``: input ``(B, C)`` or ``(B, C, L)``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class GhostBatchNorm2d(GhostBatchNorm):
    """Ghost version of ``nn.BatchNorm2d``: input ``(B, C, H, W)``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


_GHOST_OF: dict[type[nn.Module], type[GhostBatchNorm]] = {
    nn.BatchNorm1d: GhostBatchNorm1d,
    nn.BatchNorm2d: GhostBatchNorm2d,
}


def _to_ghost(bn: _BatchNorm, ghost_batch: int) -> GhostBatchNorm:
    cls = _GHOST_OF[type(bn)]
    extra = {} if bn.bias is not None or not bn.affine else {"bias": False}
    # Built on the meta device, then given bn's own parameter and buffer tensors (no copies).
    new = cls(
        bn.num_features,
        ghost_batch,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device="meta",
        **extra,
    )
    new._parameters.clear()
    new._parameters.update(bn._parameters)
    new._buffers.clear()
    new._buffers.update(bn._buffers)
    new._non_persistent_buffers_set.clear()
    new._non_persistent_buffers_set.update(bn._non_persistent_buffers_set)
    new.train(bn.training)
    return new


def convert_to_ghost_bn(module: nn.Module, ghost_batch: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d`` (exact type) in ``module`` by its ghost version.

    The new layers share the old ones' parameter and buffer tensors and hyper-parameters (hooks on
    the old layers are not carried over). Children are replaced in place; the (possibly new) root
    is returned, so ``convert_to_ghost_bn(nn.BatchNorm2d(8), 32)`` returns a ``GhostBatchNorm2d``.
    """
    ghost_batch = _check_ghost_batch(ghost_batch)
    if ghost_batch is None:
        raise ValueError("convert_to_ghost_bn needs an int ghost_batch")
    if type(module) in _GHOST_OF:
        return _to_ghost(module, ghost_batch)  # type: ignore[arg-type]
    for name, child in module.named_children():
        new_child = convert_to_ghost_bn(child, ghost_batch)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def set_ghost_batch(module: nn.Module, ghost_batch: int | None) -> int:
    """Set ``ghost_batch`` on every ``GhostBatchNorm`` in ``module``; returns how many were set."""
    ghost_batch = _check_ghost_batch(ghost_batch)
    count = 0
    for m in module.modules():
        if isinstance(m, GhostBatchNorm):
            m.ghost_batch = ghost_batch
            count += 1
    return count
