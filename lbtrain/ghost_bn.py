"""Ghost Batch Normalization (Hoffer et al. 2017, "Train longer, generalize better").

In training, a batch of ``B`` samples is split into ``G = B // g`` ghost batches of ``g = ghost_batch``
samples, each normalized with its own mean and variance. Ghost batch ``k`` is the strided subset
``x[k::G]`` (samples ``k, k+G, k+2G, ...``), not the contiguous chunk ``x[k*g:(k+1)*g]``. Batches are
random draws, so either is an equally random partition; the strided one makes the whole layer a single
``F.batch_norm`` call on a free view of a contiguous input: ``(B, C, *S)`` is ``(g, G, C, *S)`` in memory,
i.e. ``(g, G*C, *S)``, in which every (ghost, channel) pair is one "channel" of an ordinary batch norm
(weight and bias repeated ``G`` times). No copies, forward or backward. channels_last input needs one copy
each way (its memory order puts H and W between the ghost and the channel index).

Whatever splits a batch further must split it the same strided way so that ghost batches survive the
split: ``lbtrain.data`` gives rank ``r`` of ``W`` the samples ``r::W`` of each global batch and the trainer's
micro-batch ``m`` of ``M`` is ``m::M``; a ghost batch of such a part is then a ghost batch of the whole.

Running statistics get one momentum update per step toward the mean over ghost batches of their
means and unbiased variances, so ``ghost_batch == batch`` is exactly ``nn.BatchNorm``; buffers keep
``nn.BatchNorm``'s shapes, so state dicts interchange. Eval mode is exactly ``nn.BatchNorm`` eval.
Under gradient accumulation ``defer_running_stats`` / ``apply_deferred_stats`` collect the statistics of
all micro-batches and make that one update per step, so accumulation changes nothing.
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
    "apply_deferred_stats",
    "convert_to_ghost_bn",
    "defer_running_stats",
    "set_ghost_batch",
]


def _check_ghost_batch(ghost_batch: int | None) -> int | None:
    if ghost_batch is None:
        return None
    if isinstance(ghost_batch, bool) or not isinstance(ghost_batch, int) or ghost_batch < 1:
        raise ValueError(f"ghost_batch must be a positive int or None, got {ghost_batch!r}")
    return ghost_batch


class GhostBatchNorm(_BatchNorm):
    """Batch norm that, in training, normalizes each ghost batch ``x[k::B//ghost_batch]`` separately.

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
        # While deferring (see `defer_running_stats`): sum over ghost batches of [mean, unbiased var], and
        # their number. Plain attributes, not buffers: not in state dicts, not averaged across ranks.
        self._stat_sum: Tensor | None = None
        self._stat_count: Tensor | None = None

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
        if n_ghosts <= 1 and self._stat_sum is None:  # one ghost batch: plain batch norm, bit-exact
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

        channels_last = (  # (G = 1 happens only while deferring statistics: no layout change needed)
            n_ghosts > 1 and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        )
        if channels_last:
            # NHWC memory holds (g, G, H, W, C); batch norm needs (g, H, W, G*C): one copy.
            h, w = spatial
            xt = x.permute(0, 2, 3, 1).reshape(g, n_ghosts, h, w, c).permute(0, 2, 3, 1, 4)
            xt = xt.reshape(g, h, w, n_ghosts * c).permute(0, 3, 1, 2)
        else:
            xt = x.reshape(g, n_ghosts * c, *spatial)  # a view when x is contiguous (or when G = 1)

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
            out = y.permute(0, 2, 3, 1).reshape(g, h, w, n_ghosts, c).permute(0, 3, 1, 2, 4)
            out = out.reshape(batch, h, w, c).permute(0, 3, 1, 2)
        else:
            out = y.reshape(batch, c, *spatial)

        if self.track_running_stats:
            if stats is not None and self._stat_sum is not None and self._stat_count is not None:
                self._stat_sum.add_(stats.detach().view(2, n_ghosts, c).sum(1))
                self._stat_count.add_(n_ghosts)
            else:
                self._update_running_stats(stats.view(2, n_ghosts, c).mean(1) if stats is not None else None)
        return out

    @torch.no_grad()
    def _update_running_stats(self, ghost_stats: Tensor | None, enabled: Tensor | None = None) -> None:
        """Momentum update toward ``ghost_stats = [mean of ghost means, mean of ghost unbiased vars]``.

        Mirrors ``nn.BatchNorm``: ``num_batches_tracked`` counts steps and ``momentum=None`` is a
        cumulative average (here with a tensor weight, so there is no host-device sync). ``enabled``, a
        bool tensor, masks the whole update without reading it on the host.
        """
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1 if enabled is None else enabled.to(self.num_batches_tracked.dtype))
            if self.momentum is None and ghost_stats is not None:
                factor = self.num_batches_tracked.to(ghost_stats.dtype).reciprocal()
        if ghost_stats is not None and self.running_mean is not None and self.running_var is not None:
            if enabled is not None:
                # (where() would make a Python float a float32 tensor, and a product could be 0 * inf)
                if isinstance(factor, Tensor):
                    factor = torch.where(enabled, factor, 0.0)
                else:
                    factor = enabled.to(ghost_stats.dtype) * factor
            self.running_mean.lerp_(ghost_stats[0], factor)
            self.running_var.lerp_(ghost_stats[1], factor)

    def defer_running_stats(self, defer: bool = True) -> None:
        """While deferring, training forwards only collect their ghost statistics (no running-stat update)
        until `apply_deferred_stats`, which makes the one update of a step from all of them."""
        if not defer:
            self._stat_sum = self._stat_count = None
        elif self._stat_sum is None and self.running_mean is not None:
            self._stat_sum = torch.zeros(2, self.num_features, dtype=self.running_mean.dtype,
                                         device=self.running_mean.device)
            self._stat_count = torch.zeros((), dtype=self.running_mean.dtype, device=self.running_mean.device)

    def apply_deferred_stats(self) -> None:
        """One momentum update toward the mean over all ghost batches collected since the last call."""
        if self._stat_sum is None or self._stat_count is None or not self.track_running_stats:
            return
        with torch.no_grad():
            # count 0 (no training forward since the last call) gives NaN: skip it without a host sync
            self._update_running_stats(self._stat_sum / self._stat_count.clamp(min=1),
                                       enabled=self._stat_count > 0)
            self._stat_sum.zero_()
            self._stat_count.zero_()


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


def defer_running_stats(module: nn.Module, defer: bool = True) -> list[GhostBatchNorm]:
    """Switch deferred running statistics on (or off) for every ``GhostBatchNorm`` in ``module``.

    For gradient accumulation: while on, each training forward only collects its ghost statistics, and
    `apply_deferred_stats` after the last micro-batch makes the step's one momentum update from all of
    them, exactly as the whole batch in one forward would. Returns the layers (to pass to
    `apply_deferred_stats`). Call it after moving the model to its device: the collectors are plain
    tensors made on the device of each layer's running statistics.
    """
    layers = [m for m in module.modules() if isinstance(m, GhostBatchNorm)]
    for m in layers:
        m.defer_running_stats(defer)
    return layers


def apply_deferred_stats(layers: list[GhostBatchNorm]) -> None:
    """The step's running-statistics update of each layer from what it collected (see `defer_running_stats`)."""
    for m in layers:
        m.apply_deferred_stats()


def set_ghost_batch(module: nn.Module, ghost_batch: int | None) -> int:
    """Set ``ghost_batch`` on every ``GhostBatchNorm`` in ``module``; returns how many were set."""
    ghost_batch = _check_ghost_batch(ghost_batch)
    count = 0
    for m in module.modules():
        if isinstance(m, GhostBatchNorm):
            m.ghost_batch = ghost_batch
            count += 1
    return count


def snapshot_deferred(module: nn.Module) -> list[tuple[GhostBatchNorm, Tensor, Tensor]]:
    """Copies of the statistics that deferring layers of `module` have collected so far (see
    `defer_running_stats`), for `restore_deferred`: a measurement that runs extra training-mode forwards in the
    middle of an accumulated step must not add its batches to the step's running-statistics update."""
    return [(m, m._stat_sum.clone(), m._stat_count.clone()) for m in module.modules()
            if isinstance(m, GhostBatchNorm) and m._stat_sum is not None and m._stat_count is not None]


def restore_deferred(snapshot: list[tuple[GhostBatchNorm, Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for m, stat_sum, count in snapshot:
            if m._stat_sum is not None and m._stat_count is not None:
                m._stat_sum.copy_(stat_sum)
                m._stat_count.copy_(count)
