"""`lbtrain` command line: Hydra composes the config, `lbtrain.session.prepare` accepts it, then Trainer runs it.

Every user mistake (bad override, unknown option, meaningless value, missing data, a run folder held by another
process or another run, a foreign checkpoint) ends as one line on stderr, `lbtrain: error: ...`, exit code 2, and
writes nothing: a single run is prepared (`Preflight.on_run_start`) before Hydra makes its folder, and lbtrain, not
Hydra, writes `.hydra/` and `lbtrain.log` once the run holds its folder's lock. The job takes that prepared run;
a sweep job, whose callback Hydra does not call in a worker, prepares itself: once per run either way.

Run folders are `outputs/<experiment>/<name>`, `<name>` a function of the run's identity (`lbtrain.identity`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lbtrain import distributed, regime, signals
from lbtrain.checkpoint import CheckpointError, atomic_write_json, remove_stale_temporaries
from lbtrain.config import (
    ConfigError,
    DatasetNotFoundError,
    check_override_values,
    register_configs,
    resolved,
    schema_defaults,
    validate,
)
from lbtrain.identity import identity, identity_hash, run_name
from lbtrain.paths import config_dir
from lbtrain.results import Results, ResultsError, read_results
from lbtrain.rundir import RunFolderError
from lbtrain.signals import Interrupted

log = logging.getLogger("lbtrain")


class SweepRefused(ValueError):
    """Jobs of a sweep that its pre-flight check refused (one line)."""


CONFIG_DIR = config_dir()
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetNotFoundError, RunFolderError, CheckpointError,
                                             ResultsError, SweepRefused)
GROUPS = ("dataset", "model", "regime", "optimizer")  # config groups whose choice is part of a run's name
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
_user_error: list[BaseException] = []
_prepared: dict[Path, Any] = {}  # run folder -> the run its pre-flight callback prepared (a single run)


# ------------------------------------------------------------------------------------------- run names
def _compose_identity(overrides: tuple[str, ...]) -> dict[str, Any] | None:
    """The identity of the primary config composed with `overrides` (inside the running Hydra app)."""
    from hydra import compose

    try:
        return identity(resolved(compose(config_name=_config_name(), overrides=list(overrides))))
    except Exception:  # noqa: BLE001 - naming must never fail a run; the caller falls back
        return None


_compose_cached = lru_cache(maxsize=256)(_compose_identity)
_CONFIG_NAME: list[str] = ["config"]


def _config_name() -> str:
    return _CONFIG_NAME[0]


def run_folder_name(root: DictConfig) -> str:
    """`<name>` of `outputs/<experiment>/<name>` for a composed config (with its `hydra` node): the identity's
    differences from the experiment as shipped (see lbtrain.identity.run_name)."""
    cfg = OmegaConf.masked_copy(root, [k for k in root.keys() if k != "hydra"])
    ident = identity(resolved(cfg))
    hyd = root.get("hydra") or {}
    choices = (hyd.get("runtime") or {}).get("choices") or {}
    _CONFIG_NAME[0] = str((hyd.get("job") or {}).get("config_name") or "config")
    searchpath = list(hyd.get("searchpath") or [])
    extra = (f"hydra.searchpath=[{','.join(searchpath)}]",) if searchpath else ()
    experiment = choices.get("experiment")
    experiments = _options("experiment")
    if ident.get("name") in experiments:
        experiment = ident["name"]  # a function of the identity, not of how the experiment was picked
    base = (f"experiment={experiment}",) if experiment else ()
    reference = _compose_cached(base + extra) if GlobalHydra.instance().is_initialized() else None
    if reference is None:
        return f"run~{identity_hash(ident)}"
    options = {g: _options(g) for g in GROUPS if isinstance(ident.get(g), dict)}

    def subtree(group: str, option: str) -> dict[str, Any] | None:
        composed = _compose_cached(base + (f"{group}={option}",) + extra)
        return composed.get(group) if composed else None

    return run_name(ident, reference, options, subtree)


def _options(group: str) -> list[str]:
    if not GlobalHydra.instance().is_initialized():
        return []
    try:
        return GlobalHydra.instance().config_loader().get_group_options(group)
    except Exception:  # noqa: BLE001
        return []


def setup_hydra() -> None:
    """Register the schema and the resolvers the YAML files use (idempotent)."""
    register_configs()
    if not OmegaConf.has_resolver("lbtrain_effective"):
        OmegaConf.register_new_resolver(
            "lbtrain_effective", lambda key, *, _root_: regime.effective(_root_, key))
    if not OmegaConf.has_resolver("lbtrain_run_name"):
        OmegaConf.register_new_resolver("lbtrain_run_name", lambda *, _root_: run_folder_name(_root_))


# ------------------------------------------------------------------------------------------- pre-flight
def _run_dir_of(config: DictConfig) -> Path:
    return Path(str(OmegaConf.select(config, "hydra.run.dir")))


class Rejected(BaseException):
    """A single run refused by the pre-flight check. A BaseException because Hydra turns an Exception raised by a
    callback into a warning and goes on (it would then make the run folder); main() reports `error`."""

    def __init__(self, error: BaseException):
        self.error = error
        super().__init__(str(error))


class Preflight(Callback):
    """Hydra callback: prepare a single run completely (`lbtrain.session.prepare`, which takes the folder's lock
    last) before Hydra makes its folder: a rejected command then writes nothing at all. Sweep jobs are prepared in
    the job (a failure is recorded there)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            task = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
            check_override_values(OmegaConf.select(config, "hydra.overrides.task"))
            validate(task, distributed.env_world().world)  # without torch: most mistakes are reported in ~1 s
            from lbtrain.session import prepare

            HydraConfig.instance().set_config(config)  # so ${hydra:...} in hydra.run.dir resolves
            run_dir = _run_dir_of(config)
            _prepared[run_dir.absolute()] = prepare(task, run_dir, lock=True, validated=True)
        except USER_ERRORS + (OSError, OmegaConfBaseException) as e:
            raise Rejected(e) from e
        except Exception as e:  # noqa: BLE001 - anything else before training is a refusal too, in one line
            raise Rejected(e) from e


    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep is checked as a whole before its first job starts: every job's config through the same checks
        (`lbtrain.session.precheck`; a job run in this process reuses them). The refused jobs are listed in one
        line and nothing runs, unless `skip_bad_jobs=true` (they are then recorded as failed; the others run)."""
        try:
            check_override_values(OmegaConf.select(config, "hydra.overrides.task"))
            if config.get("skip_bad_jobs"):
                return
            bad = _refused_jobs(config)
        except USER_ERRORS + (OmegaConfBaseException, HydraException) as e:
            raise Rejected(e) from e
        if bad:
            shown = "; ".join(f"[{','.join(job) or 'defaults'}] {why}" for job, why in bad[:5])
            more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise Rejected(SweepRefused(f"{len(bad)} job(s) of this sweep are refused before any ran: {shown}{more} "
                                        "(fix them, or run the others with skip_bad_jobs=true)"))




def _sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as the sweeper will expand them: Hydra's basic sweeper, or lbtrain's search
    (`hydra/sweeper=search`: every trial of every batch size; its confirmation runs differ from a trial only in
    `seed`); None for another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    task = list(OmegaConf.select(config, "hydra.overrides.task") or [])
    if target == "hydra_plugins.lbtrain_search.search_sweeper.SearchSweeper":
        from hydra import compose

        from hydra_plugins.lbtrain_search._plan import expand

        name = str(OmegaConf.select(config, "hydra.job.config_name", default="config") or "config")
        search = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
        study = expand(search, task, lambda overrides: compose(config_name=name, overrides=overrides))  # type: ignore[arg-type]
        return [t.overrides for t in study.trials]
    if not target.endswith("BasicSweeper"):
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    args = [f"{k}={v}" for k, v in params.items()] + task
    parsed = OverridesParser.create().parse_overrides(args)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _refused_jobs(config: DictConfig) -> list[tuple[list[str], str]]:
    from hydra import compose

    from lbtrain.session import precheck

    jobs = _sweep_jobs(config)
    if jobs is None:
        return []
    varying = {o for job in jobs for o in job} - set.intersection(*(set(job) for job in jobs)) if jobs else set()
    _CONFIG_NAME[0] = str(OmegaConf.select(config, "hydra.job.config_name", default="config") or "config")
    bad = []
    for job in jobs:
        try:
            task = compose(config_name=_config_name(), overrides=list(job))
            task = OmegaConf.masked_copy(task, [k for k in task.keys() if k != "hydra"])
            precheck(task)
        except USER_ERRORS + (OmegaConfBaseException, HydraException) as e:
            bad.append(([o for o in job if o in varying], one_line(e)))
    return bad


# ----------------------------------------------------------------------------------------- the job
@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> dict[str, Any] | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return _job(cfg, run_dir, multirun)
    except USER_ERRORS as e:
        if multirun:  # recorded (when the folder is this job's); the other jobs of the sweep go on
            log.error("job %s failed: %s", run_dir, one_line(e))
            raise
        _user_error.append(e)  # reported by main() as one line (Hydra would add its own lines)
        return None
    except Exception as e:
        if multirun:
            raise
        _user_error.append(e)  # main() reports it (one line for a write error; a traceback for a bug)
        return None


def _job(cfg: DictConfig, run_dir: Path, multirun: bool) -> dict[str, Any]:
    from lbtrain.session import prepare
    from lbtrain.trainer import run, set_threads

    world = distributed.env_world()
    if signals.in_worker():
        signals.guard_worker()
    stopping = signals.sweep_stopping()
    if stopping is not None:  # Ctrl-C'd sweep: jobs that had not started yet do not start
        _remove_if_empty(run_dir)
        raise Interrupted(stopping)
    distributed.export_slurm_env()
    set_threads(cfg.threads if cfg.threads is not None else _launcher_threads())
    prepared = _prepared.pop(run_dir.absolute(), None)
    handler: logging.Handler | None = None
    # A sweep job's console output is one line (and its warnings and errors); lbtrain.log keeps everything.
    quieted = [(h, h.level) for h in logging.getLogger().handlers
               if multirun and type(h) is logging.StreamHandler]
    for h, _ in quieted:
        h.setLevel(logging.WARNING)
    try:
        if prepared is None:  # a sweep job (or a run whose callback Hydra did not call)
            try:
                prepared = prepare(cfg, run_dir, lock=True)
            except (ConfigError, DatasetNotFoundError) as e:
                if multirun and world.main:
                    _record_failure(cfg, run_dir, e)
                raise
        if world.main:
            for tmp in remove_stale_temporaries(run_dir):
                log.info("removed %s, left by a process killed while writing it", tmp.name)
            if not prepared.folder.final:  # a completed run's record stays as it was
                _save_hydra_files(cfg, run_dir)
            handler = logging.FileHandler(run_dir / "lbtrain.log")
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logging.getLogger().addHandler(handler)
        try:
            results = run(prepared)
        except Interrupted:
            raise
        except Exception as e:
            if not isinstance(e, USER_ERRORS):
                log.error("job %s failed: %s: %s (details in %s)", run_dir, type(e).__name__, e,
                          run_dir / "results.json")
            raise
        if world.main:
            err = results.get("final_val_error")
            summary = (f"{cfg.name}: {results['status']} after {results['updates']} updates, val error "
                       + (f"{err:.4f}" if err is not None else "n/a"))
            if multirun:  # one line per sweep job on the console; the job's details are in its lbtrain.log
                log.info("%s", summary)
                sys.stdout.write(f"{run_dir}: {summary.split(': ', 1)[1]}\n")
                sys.stdout.flush()
            else:
                log.info("%s", summary)
                log.info("results: %s  TensorBoard: %s  checkpoint: %s", run_dir / "results.json", run_dir,
                         run_dir / "checkpoint.pt")
        return results
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        for h, level in quieted:
            h.setLevel(level)
        if prepared is not None:
            prepared.release()


def _save_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """What Hydra would write into `.hydra/` (config, hydra config, overrides), written once the run holds its
    folder, so a rejected command or a second process never overwrites a run's record."""
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    hyd = HydraConfig.get()
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hyd}), out / "hydra.yaml")
    OmegaConf.save(hyd.overrides.task, out / "overrides.yaml")


def _record_failure(cfg: DictConfig, run_dir: Path, e: BaseException) -> None:
    """A sweep job that failed before training: leave a results.json (status failed) so summaries list it, unless
    the folder already holds one (never overwrite a run's results)."""
    path = run_dir / "results.json"
    try:
        if read_results(path) is not None:
            return
    except ResultsError:
        return
    try:
        ident = identity(resolved(cfg))
        if "branch" in ident:  # a branch: its parent's hash, when the parent's record reads, as a prepared one has
            with contextlib.suppress(Exception):
                parent = read_results(Path(str(cfg.branch.parent)) / "results.json")
                ident["branch"]["parent_identity"] = identity_hash(parent.identity, schema_defaults())
        digest = identity_hash(ident, schema_defaults())
    except Exception:  # noqa: BLE001 - a config that does not even resolve
        ident, digest = {}, None
    atomic_write_json(path, Results.of_run("failed", ident, digest, error=one_line(e)).to_dict())


# --------------------------------------------------------------------------------------- sweeps
def _launcher_threads() -> int | None:
    """Jobs that a launcher runs side by side (joblib's n_jobs) share the cores: each gets cores // n_jobs torch
    threads unless `threads=` says otherwise (n_jobs threads each would oversubscribe the machine n_jobs times)."""
    if not signals.in_worker():
        return None
    n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs", default=None)
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (cores if n_jobs < 0 else n_jobs))


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- errors
def one_line(e: BaseException) -> str:
    """A user-facing single line for a Hydra/OmegaConf/lbtrain error."""
    chain, seen = [], e
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        if isinstance(err, USER_ERRORS):
            return " ".join(str(err).split())
    for err in chain:
        if isinstance(err, OverrideParseException):
            return (f"cannot parse override {err.override!r}: {str(err).splitlines()[0]} "
                    "(quote values holding '=', ',' or spaces: key='value')")
        if isinstance(err, MissingConfigException):
            m = re.search(r"Could not find '([^']+)/([^']+)'", str(err))
            if m and err.options:
                return f"{m.group(1)}={m.group(2)}: unknown option; allowed: {', '.join(sorted(err.options))}"
            return str(err).strip().splitlines()[0]
    for err in chain:
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            msg = str(err).split("\n")[0].strip()
            if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
                return f"{err.full_key}: unknown key (the valid keys are listed by `lbtrain --cfg job`)"
            return f"{err.full_key}: {msg}"
    for err in chain:
        if isinstance(err, OSError) and err.filename is not None:
            return (f"cannot write {err.filename}: {err.strerror} (choose a writable folder with space, e.g. "
                    "hydra.run.dir=PATH)")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return first


def main() -> None:
    """Console entry point (`lbtrain`, `python -m lbtrain`)."""
    if not Path(CONFIG_DIR, "config.yaml").is_file():
        sys.stderr.write(f"lbtrain: error: config folder {CONFIG_DIR} not found: this installation of lbtrain is "
                         "incomplete; reinstall it (pip install lbtrain, or pip install . in its repository)\n")
        sys.exit(2)
    setup_hydra()
    _user_error.clear()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # exceptions reach us instead of Hydra's multi-line report
    argv = sys.argv[1:]
    shown = [b for a, b in zip(argv, argv[1:]) if a in ("--cfg", "-c")]
    if shown and shown[0] in ("job", "all") and "--resolve" not in argv:
        sys.argv.append("--resolve")  # show the effective values, not interpolation strings
    if not distributed.env_world().main:
        sys.argv += ["hydra/job_logging=disabled"]  # only rank 0 writes a log
    bad = _unknown_optional_choice(argv)
    if bad:
        sys.stderr.write(f"lbtrain: error: {bad}\n")
        sys.exit(2)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    sweep_stop = signals.SweepStop() if multirun else None
    code = 0
    try:
        if shown and shown[0] == "job" and "--package" not in argv and "-p" not in argv:
            _show_job_config()
        else:
            _hydra_main()
        if _user_error:
            raise _user_error[0]
    except BaseException as e:  # noqa: BLE001 - every way out gets its exit code and one line
        stopped = sweep_stop.signum if sweep_stop else None
        # a stopped sweep exits 128 + signal whatever its jobs raised (a worker hit while starting up raises
        # KeyboardInterrupt through joblib)
        code = 128 + stopped if stopped is not None else _report(e, multirun)
    finally:
        stopped = sweep_stop.signum if sweep_stop else None
        if sweep_stop:
            sweep_stop.close()
    if stopped is not None:
        code = 128 + stopped
    if code:
        sys.exit(code)


def _ours(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS + (HydraException, OmegaConfBaseException)) or (
        isinstance(e, OSError) and e.filename is not None)


def _plain(e: BaseException) -> str:
    """One line for an unexpected exception before training (e.g. a value the checks did not foresee)."""
    text = " ".join(str(e).split())[:300]
    return f"the run was refused before it started: {type(e).__name__}{': ' + text if text else ''}"


def _show_job_config() -> None:
    """`lbtrain --cfg job`: Hydra's YAML of the composed config, without the dataset keys that only other datasets
    read (synthetic's shape and sizes, ImageNet's image_size and workers): what is shown is what the run uses."""
    import contextlib
    import io

    from lbtrain.data import REGISTRY

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            _hydra_main()
    finally:
        text = buf.getvalue()
        try:
            cfg = OmegaConf.create(text)
            ds = cfg.get("dataset") if isinstance(cfg, DictConfig) else None
            entry = REGISTRY.get(str(ds.get("name"))) if isinstance(ds, DictConfig) else None
        except Exception:  # noqa: BLE001 - not the YAML we expected: show it as Hydra wrote it
            entry = None
        if entry is not None:
            for key in {k for e in REGISTRY.values() for k in e.reads} - set(entry.reads):
                ds.pop(key, None)
            text = OmegaConf.to_yaml(cfg)
        sys.stdout.write(text)


OPTIONAL_GROUPS = ("sweep",)  # `optional` in config.yaml's defaults: Hydra would silently skip a misspelled option


def _unknown_optional_choice(argv: list[str]) -> str | None:
    """The one-line error for `sweep=NAME` naming no shipped sweep (Hydra ignores a missing optional option)."""
    for arg in argv:
        group, sep, value = arg.partition("=")
        if sep and group in OPTIONAL_GROUPS and value not in ("null", ""):
            options = sorted(p.stem for p in Path(CONFIG_DIR, group).glob("*.yaml"))
            for v in value.split(","):
                if v not in options:
                    return f"{group}={v}: unknown option; allowed: {', '.join(options)}"
    return None


def _report(e: BaseException, multirun: bool) -> int:
    """Print the one line for `e` and return the exit code (re-raise what is not ours to report)."""
    if isinstance(e, Rejected):  # refused before anything was written: one line, whatever went wrong
        sys.stderr.write(f"lbtrain: error: {one_line(e.error) if _ours(e.error) else _plain(e.error)}\n")
        return 2
    signum = signals.interrupt_signal(e)
    if signum is not None:
        return 128 + signum
    if isinstance(e, (SystemExit, KeyboardInterrupt)):
        raise e
    if multirun:  # each job logged its failure and wrote its results.json
        sys.stderr.write(f"lbtrain: error: some jobs of the multirun failed; first failure: {one_line(e)}\n")
        return 1
    if _ours(e):
        sys.stderr.write(f"lbtrain: error: {one_line(e)}\n")
        return 2
    raise e


if __name__ == "__main__":
    main()


__all__ = ["main", "setup_hydra", "one_line", "run_folder_name", "Preflight"]
