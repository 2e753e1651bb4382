"""The loader contract: what the trainer, the instruments and `lbtrain.interp` call on a training or validation
loader, so that none of them needs to know which loader it has (`DeviceLoader` for in-memory datasets,
`ImageFolderLoader` for ImageNet; both in `lbtrain.data.loaders`, both checked against `Loader` in the tests).

Beyond the signatures, every loader keeps these promises:
  * an epoch's sample order and augmentation are a pure function of (seed, epoch), so a run resumed
    at `start_step` sees exactly the batches an uninterrupted run would have seen;
  * every training step has exactly `batch` samples (drop_last), as ghost batch norm requires;
  * `steps_per_epoch(batch)` is the number of such steps in one pass over the distinct training samples;
  * the batch size may change from one epoch to the next;
  * under data parallelism rank r of W gets the strided share r::W of each global batch (not a contiguous
    slice: ghost batches are strided subsets, see `lbtrain.ghost_bn`, and so stay whole on one rank);
  * `eval_batches` and `samples` never augment: they measure, the same samples every time.

No torch import at run time (annotations only), so the contract can be named where torch is not loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor


@runtime_checkable
class Loader(Protocol):
    """A dataset split served as normalized (x, y) batches on the training device."""

    def __len__(self) -> int:
        """Distinct samples in the split (N)."""
        ...

    def steps_per_epoch(self, batch: int) -> int:
        """Training steps of `batch` samples in one pass over the distinct samples (drop_last)."""
        ...

    def epoch(self, epoch: int, batch: int, start_step: int = 0, rank: int = 0,
              world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's strided share (rank::world) of each global training batch of `epoch`, from `start_step` on;
        `batch` is the global number of samples per step (trainer, interp's BN re-estimation)."""
        ...

    def eval_batches(self, batch: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """All samples in order, no augmentation, last partial batch included; with `world` > 1 this rank's
        contiguous share of each batch (trainer's validation, interp)."""
        ...

    def samples(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The samples at `indices` as one batch, without augmentation (a fixed measurement set: the sharpness
        probe)."""
        ...
