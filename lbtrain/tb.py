"""TensorBoard logging: one run per job (scalars and HParams in the same event files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

# The final metrics shown next to each run's hyper-parameters in TensorBoard's HParams view.
HPARAM_METRICS = ("val/error", "val/best_error", "val/loss", "weights/distance", "train/loss")


class TBLogger:
    """A SummaryWriter that only writes on the main process; `purge_step` drops points of a killed run."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, purge_step: int | None = None):
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step) if enabled else None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

    def hparams(self, params: dict[str, Any], end: bool = False) -> None:
        """HParams in this run (not a sub-run, as SummaryWriter.add_hparams would make): the experiment and
        session start at the beginning, the session end (`end=True`) when the run finishes. The metrics
        shown are the last values of the HPARAM_METRICS scalars."""
        if self.writer is None:
            return
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
        exp, ssi, sei = hparams(clean, {m: 0.0 for m in HPARAM_METRICS})
        fw = self.writer._get_file_writer()
        for summary in (sei,) if end else (exp, ssi):
            fw.add_summary(summary)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
