"""The search sweeper (`lbtrain -m hydra/sweeper=search ...`, or the preset `sweep=critical_batch`).

For every batch size of `hydra.sweeper.batches`, `hydra.sweeper.trials` runs at quasi-random points of the search
space (`hydra/sweeper/space=sgd|adam`), each an ordinary lbtrain job (its own identity, folder and checkpoint) that
stops at its target within the budget (`hydra.sweeper.budget`); then, for each batch size, the best trial (the
fewest updates to the target) again with `hydra.sweeper.confirm_seeds` seeds. What is run is `_plan.expand`, the
same expansion the CLI checks as a whole before anything runs (`lbtrain.cli._sweep_jobs`).

Everything goes through the configured launcher (`self.launcher.launch`, as Hydra's BasicSweeper does), so the
search runs on every launcher: in this process, in joblib workers (`hydra/launcher=local`), or on SLURM. All the
trials of all batch sizes go out in one launch (chunks of `max_batch_size` if set), so a parallel launcher keeps
its workers busy; the confirmations follow in a second launch. A trial's outcome is its job's return value (the
results dict; a finished run's recorded results on a re-run, which trains nothing), else the results.json in its
run folder. A failed trial is recorded (results.json status failed) and the search goes on; once everything has
run, the first failure is raised, so `lbtrain -m` exits 1 as for any sweep with a failed job. Ctrl-C stops the
search as it stops any lbtrain sweep. The search's summary (every trial, the best per batch size, the
confirmations) is written to `<sweep dir>/<experiment>/search-<digest>.json` and logged, one line per batch size.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hydra_plugins.lbtrain_search import _plan as plan

log = logging.getLogger("lbtrain.search")


class SearchSweeper(Sweeper):
    """Quasi-random search per batch size with confirmation runs (see the module docstring)."""

    def __init__(self, batches: Sequence[int], trials: int, seed: int = 0, confirm_seeds: int = 5,
                 budget: Any = None, space: Any = None, max_batch_size: int | None = None) -> None:
        super().__init__()
        self.search = {"batches": _plain(batches), "trials": trials, "seed": seed, "confirm_seeds": confirm_seeds,
                       "budget": _plain(budget) or {}, "space": _plain(space) or {}}
        self.max_batch_size = max_batch_size
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    # ----------------------------------------------------------------------------------------------- the search
    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None and self.launcher is not None
        from lbtrain.cli import Rejected

        loader = self.hydra_context.config_loader
        try:
            study = plan.expand(self.search, arguments, lambda ov: loader.load_sweep_config(self.config, ov))
        except (ValueError, HydraException, OmegaConfBaseException) as e:  # one line, exit 2, nothing run
            raise Rejected(e) from e
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        batches = self.search["batches"]
        log.info("search: %d batch sizes x %d trials, then the best of each with %d seeds", len(batches),
                 self.search["trials"], study.confirm_seeds)

        returns: list[Sequence[JobReturn]] = []
        failures: list[BaseException] = []
        trials = self._launch(study.trials, returns, failures)
        winners: dict[int, plan.Outcome | None] = {}
        extra: list[plan.Trial] = []
        for b in batches:  # the best trial of each batch size, again with the other seeds
            win = winners[b] = plan.best([o for o in trials if o.trial.batch == b])
            if win is not None:
                extra += plan.confirmations(win.trial, study.seed, study.confirm_seeds)
        confirmed = self._launch(extra, returns, failures) if extra else []
        self._report(study, trials, winners, confirmed)
        if failures:
            raise failures[0]  # recorded and the search went on; the command still says some job failed
        return returns

    def _launch(self, trials: list[plan.Trial], returns: list[Sequence[JobReturn]],
                failures: list[BaseException]) -> list[plan.Outcome]:
        """Run `trials` through the launcher (in chunks of max_batch_size); their outcomes, in order."""
        from lbtrain import signals
        from lbtrain.signals import Interrupted

        size = self.max_batch_size if self.max_batch_size and self.max_batch_size > 0 else max(len(trials), 1)
        outcomes: list[plan.Outcome] = []
        for start in range(0, len(trials), size):
            chunk = trials[start:start + size]
            batch = [list(t.overrides) for t in chunk]
            self.validate_batch_is_legal(batch)
            rets = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(batch)
            returns.append(rets)
            for trial, ret in zip(chunk, rets):
                error = None
                if ret.status != JobStatus.COMPLETED:
                    exc = ret._return_value
                    if isinstance(exc, Interrupted) or signals.sweep_stopping() is not None:
                        raise exc if isinstance(exc, BaseException) else Interrupted(signals.sweep_stopping())
                    if isinstance(exc, BaseException):
                        failures.append(exc)
                    error = _one_line(exc)
                outcomes.append(_outcome(trial, ret, error))
        return outcomes

    # ---------------------------------------------------------------------------------------------- the summary
    def _report(self, study: plan.Study, trials: list[plan.Outcome], winners: dict[int, plan.Outcome | None],
                confirmed: list[plan.Outcome]) -> None:
        """One line per batch size in the log; everything in `<sweep dir>/<experiment>/search-<digest>.json`."""
        assert self.config is not None
        rows = []
        for b, win in winners.items():
            mine = [o for o in trials if o.trial.batch == b]
            seeds = [o for o in confirmed if o.trial.batch == b]
            if win is None:
                statuses = Counter(o.status for o in mine if o.status != "completed")
                why = f" ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))})" if statuses else ""
                line = (f"search: batch {b}: none of {len(mine)} trials reached the target within "
                        f"{mine[0].trial.steps if mine else '?'} updates{why}; nothing confirmed "
                        "(widen the space or raise hydra.sweeper.budget)")
            else:
                values = ", ".join(f"{k}={v}" for k, v in win.trial.values.items())
                again = ", ".join(f"{o.update}" if o.reached else o.status if o.status != "completed" else "not reached"
                                  for o in seeds)
                line = (f"search: batch {b}: {sum(o.reached for o in mine)}/{len(mine)} trials reached the target; "
                        f"best at update {win.update} ({values}) {win.run_dir}"
                        + (f"; confirmed with seeds {study.seed + 1}..{study.seed + study.confirm_seeds}: {again}"
                           if seeds else ""))
            log.info("%s", line)
            rows.append({"batch": b, "best": win.summary() if win else None,
                         "trials": [o.summary() for o in mine], "confirmations": [o.summary() for o in seeds]})
        name = _experiment(trials)
        out = Path(str(self.config.hydra.sweep.dir)) / name / f"search-{study.digest}.json"
        summary = {"search": self.search, "study": study.study, "trial_seed": study.seed, "batches": rows}
        try:
            from lbtrain.checkpoint import atomic_write_json

            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out, summary)
            log.info("search summary: %s", out)
        except OSError as e:  # the runs hold the results; a summary that cannot be written is not a failed search
            log.warning("cannot write the search summary %s: %s", out, e)


def _outcome(trial: plan.Trial, ret: JobReturn, error: str | None) -> plan.Outcome:
    """A trial's outcome: its job's results dict, else its run folder's results.json (a failed job's record)."""
    run_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir", default=None) if ret.hydra_cfg else None
    results = ret._return_value if ret.status == JobStatus.COMPLETED else None
    if not isinstance(results, dict) and run_dir is not None:
        try:
            text = (Path(run_dir) / "results.json").read_text()
            results = json.loads(text)
        except (OSError, ValueError):
            results = None
    return plan.outcome(trial, results if isinstance(results, dict) else None,
                        str(run_dir) if run_dir is not None else None, error)


def _experiment(outcomes: list[plan.Outcome]) -> str:
    for o in outcomes:
        if o.run_dir:
            return Path(o.run_dir).parent.name
    return "search"


def _one_line(e: Any) -> str:
    try:
        from lbtrain.cli import one_line

        return one_line(e) if isinstance(e, BaseException) else str(e)
    except Exception:  # noqa: BLE001 - a summary line must not fail the search
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


__all__ = ["SearchSweeper"]
