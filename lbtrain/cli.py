"""`lbtrain` command line: Hydra composes the config, the pre-flight check accepts it, then Trainer runs it.

Every user mistake (bad override, unknown option, meaningless value, missing data, a run folder held by another
process or another run, a foreign checkpoint) ends as one line on stderr, `lbtrain: error: ...`, exit code 2, and
writes nothing: a single run is checked (`Preflight.on_run_start`) before Hydra makes its folder, and lbtrain, not
Hydra, writes `.hydra/` and `lbtrain.log` once the run holds its folder's lock.

Run folders are `outputs/<experiment>/<name>`, `<name>` a function of the run's identity (`lbtrain.identity`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import tempfile
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

from lbtrain import distributed, regime
from lbtrain.checkpoint import CheckpointError, atomic_write_json, remove_stale_temporaries
from lbtrain.config import ConfigError, DatasetNotFoundError, register_configs, resolved, schema_defaults, validate
from lbtrain.identity import identity, identity_hash, run_name
from lbtrain.results import ResultsError, read_results
from lbtrain.rundir import RunFolderError, RunLock, check_folder

log = logging.getLogger("lbtrain")


def _config_dir() -> str:
    """The shipped configs: inside the package (wheel, sdist, `pip install .`), else the repository's top-level
    configs/ beside the package (a source checkout or `pip install -e .`)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    return str(here / "configs")


CONFIG_DIR = _config_dir()
USER_ERRORS = (ConfigError, DatasetNotFoundError, RunFolderError, CheckpointError, ResultsError)
GROUPS = ("dataset", "model", "regime", "optimizer")  # config groups whose choice is part of a run's name
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
_user_error: list[BaseException] = []


class JobInterrupted(Exception):
    """A sweep job in a worker process (joblib, submitit) that was interrupted or skipped because the sweep is
    stopping. A plain Exception, so Hydra records it as the job's result instead of tearing the pool down."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.signum,))


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
    """Hydra callback: check a single run completely before Hydra makes its folder (a rejected command then
    writes nothing at all). Sweeps are checked per job, inside the job (its failure is recorded there)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            task = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
            validate(task, distributed.env_world().world)  # without torch: most mistakes are reported in ~1 s
            self._check(config)
        except USER_ERRORS + (OSError, OmegaConfBaseException) as e:
            raise Rejected(e) from e

    @staticmethod
    def _check(config: DictConfig) -> None:
        from lbtrain.preflight import preflight

        HydraConfig.instance().set_config(config)  # so ${hydra:...} in hydra.run.dir resolves
        task = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
        world = distributed.env_world()
        checked = preflight(task, world.world, local_rank=world.local_rank)
        run_dir = _run_dir_of(config)
        if run_dir.is_file():
            raise OSError(20, "Not a directory", str(run_dir))
        if run_dir.is_dir() or task.get("resume"):  # (under DDP rank 0 alone takes the lock)
            check_folder(run_dir, checked.identity, schema_defaults(), task.get("resume"),
                         check_lock=world.main and run_dir.is_dir(), verify=True)


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
    from lbtrain.preflight import preflight
    from lbtrain.trainer import Interrupted, run, set_threads

    world = distributed.env_world()
    if _in_worker():
        _guard_worker_signals()
    stopping = _sweep_stopping()
    if stopping is None and _in_worker():
        from lbtrain.trainer import PENDING_SIGNALS

        stopping = PENDING_SIGNALS[0] if PENDING_SIGNALS else None
    if stopping is not None:  # Ctrl-C'd sweep: jobs that had not started yet do not start
        _remove_if_empty(run_dir)
        raise (JobInterrupted(stopping) if _in_worker() else Interrupted(stopping))
    distributed.export_slurm_env()
    set_threads(cfg.threads if cfg.threads is not None else _launcher_threads())
    lock = RunLock(run_dir)
    handler: logging.Handler | None = None
    try:
        if world.main:
            lock.acquire()  # one writer per folder, for the life of the run
        try:
            checked = preflight(cfg, world.world, local_rank=world.local_rank)
            # (a single run's checkpoint was verified before its folder was touched; a sweep job's is here)
            folder = check_folder(run_dir, checked.identity, schema_defaults(), cfg.resume, check_lock=False,
                                  verify=multirun)
        except (ConfigError, DatasetNotFoundError) as e:
            if multirun and world.main:
                _record_failure(cfg, run_dir, e)
            raise
        if world.main:
            for tmp in remove_stale_temporaries(run_dir):
                log.info("removed %s, left by a process killed while writing it", tmp.name)
            if not folder.final:  # a completed run's record stays as it was
                _save_hydra_files(cfg, run_dir)
            handler = logging.FileHandler(run_dir / "lbtrain.log")
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logging.getLogger().addHandler(handler)
        try:
            results = run(cfg, run_dir)
        except Interrupted as e:
            if _in_worker():
                raise JobInterrupted(e.signum) from None
            raise
        except Exception as e:
            if not isinstance(e, USER_ERRORS):
                log.error("job %s failed: %s: %s (details in %s)", run_dir, type(e).__name__, e,
                          run_dir / "results.json")
            raise
        if world.main:
            err = results.get("final_val_error")
            log.info("%s: %s after %d updates, val error %s", cfg.name, results["status"], results["updates"],
                     f"{err:.4f}" if err is not None else "n/a")
            log.info("results: %s  TensorBoard: %s  checkpoint: %s", run_dir / "results.json", run_dir,
                     run_dir / "checkpoint.pt")
        return results
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        lock.release()


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
    from lbtrain.results import Results

    path = run_dir / "results.json"
    try:
        if read_results(path) is not None:
            return
    except ResultsError:
        return
    sel = lambda key: OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)  # noqa: E731
    try:
        ident = identity(resolved(cfg))
        digest = identity_hash(ident, schema_defaults())
    except Exception:  # noqa: BLE001 - a config that does not even resolve
        ident, digest = {}, None
    res = Results(status="failed", error=one_line(e), identity=ident, identity_hash=digest, experiment=sel("name"),
                  dataset=sel("dataset.name"), model=sel("model.name"), regime=sel("regime.name"),
                  batch=sel("batch"), base_batch=sel("base.batch"), ghost_batch=sel("ghost_batch"), seed=sel("seed"))
    atomic_write_json(path, res.to_dict())


# --------------------------------------------------------------------------------------- sweep stopping
_STOP_ENV, _PARENT_ENV = "LBTRAIN_SWEEP_STOP", "LBTRAIN_SWEEP_PARENT"


def _in_worker() -> bool:
    """Whether this job runs in a sweep worker process (joblib, submitit), not in the `lbtrain -m` process."""
    parent = os.environ.get(_PARENT_ENV)
    return parent is not None and parent != str(os.getpid())


def _guard_worker_signals() -> None:
    """In a sweep worker, SIGINT/SIGTERM outside training must not kill the process (joblib would then tear down
    the pool, killing jobs that are checkpointing): record the signal; training (if it starts) stops at once."""
    from lbtrain.trainer import PENDING_SIGNALS

    def record(signum: int, frame: Any) -> None:
        if not PENDING_SIGNALS:
            PENDING_SIGNALS.append(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(s, record)
        except ValueError:  # not the main thread
            pass


def _launcher_threads() -> int | None:
    """Jobs that a launcher runs side by side (joblib's n_jobs) share the cores: each gets cores // n_jobs torch
    threads unless `threads=` says otherwise (n_jobs threads each would oversubscribe the machine n_jobs times)."""
    if not _in_worker():
        return None
    n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs", default=None)
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (cores if n_jobs < 0 else n_jobs))


def _sweep_stopping() -> int | None:
    """The signal that is stopping this sweep, if any (the parent writes it into the stop file)."""
    path = os.environ.get(_STOP_ENV)
    if not path:
        return None
    try:
        return int(Path(path).read_text() or signal.SIGINT)
    except (OSError, ValueError):
        return None


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


class _SweepStop:
    """In the `lbtrain -m` process: the first SIGINT/SIGTERM stops the sweep (running jobs checkpoint and stop, no
    new job starts); a second one exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.path = Path(tempfile.gettempdir()) / f"lbtrain-sweep-{os.getpid()}.stop"
        os.environ[_STOP_ENV], os.environ[_PARENT_ENV] = str(self.path), str(os.getpid())
        self.path.unlink(missing_ok=True)
        self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        self.path.write_text(str(signum))
        sys.stderr.write(f"lbtrain: {signal.Signals(signum).name}: stopping the sweep (running jobs checkpoint and "
                         "stop, no new job starts; send again to exit at once)\n")

    def close(self) -> None:
        for s, old in self.previous.items():
            signal.signal(s, old)
        self.path.unlink(missing_ok=True)


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


def _interrupt_signal(e: BaseException) -> int | None:
    trainer = sys.modules.get("lbtrain.trainer")  # (never imported: nothing trained, nothing was interrupted)
    kinds = (JobInterrupted, trainer.Interrupted) if trainer else (JobInterrupted,)
    chain, seen = [], e
    while seen is not None and seen not in chain:
        chain.append(seen)
        if isinstance(seen, kinds):
            return seen.signum
        seen = seen.__cause__ or seen.__context__
    return None


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
    multirun = any(a in ("-m", "--multirun") for a in argv)
    sweep_stop = _SweepStop() if multirun else None
    code = 0
    try:
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


def _report(e: BaseException, multirun: bool) -> int:
    """Print the one line for `e` and return the exit code (re-raise what is not ours to report)."""
    if isinstance(e, Rejected):
        e = e.error
    signum = _interrupt_signal(e)
    if signum is not None:
        return 128 + signum
    if isinstance(e, (SystemExit, KeyboardInterrupt)):
        raise e
    if multirun:  # each job logged its failure and wrote its results.json
        sys.stderr.write(f"lbtrain: error: some jobs of the multirun failed; first failure: {one_line(e)}\n")
        return 1
    if isinstance(e, USER_ERRORS + (HydraException, OmegaConfBaseException)) or (
            isinstance(e, OSError) and e.filename is not None):
        sys.stderr.write(f"lbtrain: error: {one_line(e)}\n")
        return 2
    raise e


if __name__ == "__main__":
    main()


__all__ = ["main", "setup_hydra", "one_line", "run_folder_name", "Preflight"]
