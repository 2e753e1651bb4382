"""Signals, in one place: preemption of a training run, a sweep that is being stopped, and the one `Interrupted`.

- While a run trains, `Preemption` turns SIGTERM / SIGINT / SIGUSR2 into "finish this update, checkpoint, stop"
  (a second signal exits at once). SIGUSR2 is what SLURM/submitit send before a time limit; the launcher's own
  handler for it runs after the checkpoint (`chain`).
- In a sweep worker process (joblib, submitit), `guard_worker()` records SIGINT/SIGTERM that arrive outside
  training instead of dying (joblib would tear the pool down, killing jobs that are checkpointing); a run that
  starts afterwards stops at once.
- In the `lbtrain -m` process, `SweepStop` makes the first SIGINT/SIGTERM stop the sweep: it writes the signal
  into a stop file that every job reads before it starts (`sweep_stopping()`), so no new job starts.

`Interrupted` is a plain Exception so that a sweep launcher records it as the job's result instead of tearing its
pool down; every layer above the loop lets it through (it is caught before any `except Exception`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("lbtrain")
STOP_ENV, PARENT_ENV = "LBTRAIN_SWEEP_STOP", "LBTRAIN_SWEEP_PARENT"
DUPLICATE_WINDOW_S = 1.0  # a second signal this soon after the first is the same one delivered twice
TEST_SIGNAL_ENV = "LBTRAIN_TEST_SIGNAL"  # e.g. SIGKILL@37: send that signal to this process after update 37
_pending: list[int] = []  # signals a sweep worker received before its run began (module-private)


class Interrupted(Exception):
    """A run (or a sweep job that had not started) stopped by a signal; the run checkpointed first."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.signum,))  # picklable: sweep launchers return exceptions by pickling


def interrupt_signal(e: BaseException) -> int | None:
    """The signal of the `Interrupted` in `e`'s chain of causes, if any."""
    chain, seen = [], e
    while seen is not None and seen not in chain:
        chain.append(seen)
        if isinstance(seen, Interrupted):
            return seen.signum
        seen = seen.__cause__ or seen.__context__
    return None


# ------------------------------------------------------------------------------------- in a sweep worker
def in_worker() -> bool:
    """Whether this job runs in a sweep worker process (joblib, submitit), not in the `lbtrain -m` process."""
    parent = os.environ.get(PARENT_ENV)
    return parent is not None and parent != str(os.getpid())


def guard_worker() -> None:
    """Record (instead of obeying) SIGINT/SIGTERM in a sweep worker outside training; see the module docstring."""

    def record(signum: int, frame: Any) -> None:
        if not _pending:
            _pending.append(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(s, record)
        except ValueError:  # not the main thread
            pass


def sweep_stopping() -> int | None:
    """The signal that stops this sweep, if any: the parent's stop file, else one this worker recorded."""
    path = os.environ.get(STOP_ENV)
    if path:
        try:
            return int(Path(path).read_text() or signal.SIGINT)
        except (OSError, ValueError):
            pass
    return _pending[0] if _pending and in_worker() else None


class SweepStop:
    """In the `lbtrain -m` process: the first SIGINT/SIGTERM stops the sweep (running jobs checkpoint and stop, no
    new job starts); a second one exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.path = Path(tempfile.gettempdir()) / f"lbtrain-sweep-{os.getpid()}.stop"
        os.environ[STOP_ENV], os.environ[PARENT_ENV] = str(self.path), str(os.getpid())
        self.path.unlink(missing_ok=True)
        self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        self.path.write_text(str(signum))
        sys.stderr.write(f"lbtrain: {signal.Signals(signum).name}: stopping the sweep (running jobs checkpoint and "
                         "stop, no new job starts; send again to exit at once)\n")
        # A signal sent to this process alone (not its process group) must still reach the jobs running in worker
        # processes (joblib): forward it, so they checkpoint and stop instead of running to completion.
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    def close(self) -> None:
        for s, old in self.previous.items():
            signal.signal(s, old)
        self.path.unlink(missing_ok=True)


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc; empty elsewhere): sweep workers and what they started."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in children.read_text().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


# --------------------------------------------------------------------------------------- while training
class Preemption:
    """SIGTERM / SIGINT / SIGUSR2 while training: finish the update, checkpoint, stop; see the module docstring.
    A signal a sweep worker recorded before training began stops the run at once. `TEST_SIGNAL_ENV` injects a
    signal after a given update (fault-injection tests)."""

    SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR2", None)) if s is not None)

    def __init__(self) -> None:
        self.received: list[int] = _pending[:1]
        self.first = time.monotonic()  # when the first signal arrived
        self.previous: dict[int, Any] = {}
        spec = os.environ.get(TEST_SIGNAL_ENV)
        name, _, step = (spec or "").partition("@")
        self.fault = (int(getattr(signal, name)), int(step)) if spec else None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received:
            if time.monotonic() - self.first < DUPLICATE_WINDOW_S:
                return  # the same Ctrl-C twice: to the process group and forwarded by the sweep's parent
            os._exit(128 + signum)
        self.received.append(signum)
        self.first = time.monotonic()
        log.warning("received %s: stopping after this update (send again to exit at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> Preemption:
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (some launchers): no preemption handling
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)

    def after_update(self, step: int) -> None:
        if self.fault and self.fault[1] == step:
            os.kill(os.getpid(), self.fault[0])

    @property
    def signum(self) -> int:
        return self.received[0] if self.received else signal.SIGTERM

    def chain(self, signum: int) -> None:
        previous = self.previous.get(signum)
        if signum == getattr(signal, "SIGUSR2", None) and callable(previous):
            previous(signum, None)  # e.g. submitit's requeue, now that the checkpoint is safe


__all__ = ["Interrupted", "interrupt_signal", "in_worker", "guard_worker", "sweep_stopping", "SweepStop",
           "Preemption", "descendants"]
