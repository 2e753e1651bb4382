"""`lbtrain` command line: Hydra composes the config, we validate it, then Trainer runs it.

Every user mistake (bad override, unknown option, meaningless value, missing data, foreign checkpoint)
ends as one line on stderr, `lbtrain: error: <key>=<value>: <what is allowed>`, with exit code 2.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lbtrain import distributed, regime
from lbtrain.config import ConfigError, DatasetNotFoundError, register_configs, validate

log = logging.getLogger("lbtrain")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
USER_ERRORS = (ConfigError, DatasetNotFoundError)
_user_error: list[BaseException] = []


def setup_hydra() -> None:
    """Register the schema and the resolvers the YAML files use (idempotent)."""
    register_configs()
    if not OmegaConf.has_resolver("lbtrain_effective"):
        OmegaConf.register_new_resolver(
            "lbtrain_effective", lambda key, *, _root_: regime.effective(_root_, key))
    if not OmegaConf.has_resolver("lbtrain_run_name"):
        OmegaConf.register_new_resolver("lbtrain_run_name", lambda overrides: overrides or "default")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> dict[str, Any] | None:
    from lbtrain.trainer import run  # heavy imports only once the config is known to be valid

    distributed.export_slurm_env()
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg, distributed.env_world().world)
        results = run(cfg, run_dir)
    except USER_ERRORS as e:
        if multirun:  # record and let the other jobs of the sweep go on
            log.error("job %s failed: %s", run_dir, e)
            _record_failure(cfg, run_dir, e)
            raise
        _user_error.append(e)  # reported by main() as one line (Hydra would add its own lines)
        return None
    except Exception as e:
        log.error("job %s failed: %s: %s (details in %s)", run_dir, type(e).__name__, e, run_dir / "results.json")
        _record_failure(cfg, run_dir, e)
        raise
    if distributed.env_world().main:
        err = results.get("final_val_error")
        log.info("%s: %s after %d updates, val error %s, results in %s", cfg.name, results["status"],
                 results["updates"], f"{err:.4f}" if err is not None else "n/a", run_dir)
    return results


def _record_failure(cfg: DictConfig, run_dir: Path, e: BaseException) -> None:
    """A job that failed before training wrote nothing: leave a results.json so sweep summaries list it."""
    path = run_dir / "results.json"
    if path.exists() or not distributed.env_world().main:
        return
    from lbtrain.checkpoint import atomic_write_json

    sel = lambda key: OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)  # noqa: E731
    atomic_write_json(path, {
        "status": "failed", "error": one_line(e), "experiment": sel("name"), "batch": sel("batch"),
        "base_batch": sel("base.batch"), "regime": sel("regime.name"), "seed": sel("seed"),
        "ghost_batch": sel("ghost_batch"), "final_val_error": None, "best_val_error": None, "updates": 0,
    })


def one_line(e: BaseException) -> str:
    """A user-facing single line for a Hydra/OmegaConf/lbtrain error."""
    chain, seen = [], e
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        if isinstance(err, USER_ERRORS):
            return str(err)
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
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return first


def main() -> None:
    """Console entry point (`lbtrain`, `python -m lbtrain`)."""
    if not Path(CONFIG_DIR).is_dir():
        sys.stderr.write(f"lbtrain: error: config folder {CONFIG_DIR} not found: install lbtrain from its "
                         "repository with `pip install -e .` (the configs live beside the package)\n")
        sys.exit(2)
    setup_hydra()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # exceptions reach us instead of Hydra's multi-line report
    argv = sys.argv[1:]
    shown = [b for a, b in zip(argv, argv[1:]) if a in ("--cfg", "-c")]
    if shown and shown[0] in ("job", "all") and "--resolve" not in argv:
        sys.argv.append("--resolve")  # show the effective values, not interpolation strings
    if not distributed.env_world().main:
        # only rank 0 writes: no .hydra/ copy and no log file from the other ranks
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    try:
        _hydra_main()
        if _user_error:
            raise _user_error[0]
    except USER_ERRORS + (HydraException, OmegaConfBaseException) as e:
        if multirun:
            sys.stderr.write(f"lbtrain: error: some jobs of the multirun failed; first failure: {one_line(e)}\n")
            sys.exit(1)
        sys.stderr.write(f"lbtrain: error: {one_line(e)}\n")
        sys.exit(2)
    except OSError as e:
        if e.filename is None:
            raise
        sys.stderr.write(f"lbtrain: error: cannot write {e.filename}: {e.strerror} "
                         "(choose a writable folder, e.g. hydra.run.dir=PATH)\n")
        sys.exit(2)
    except Exception as e:
        if multirun:  # each job already logged its failure and wrote its results.json
            sys.stderr.write(f"lbtrain: error: some jobs of the multirun failed; first failure: {one_line(e)}\n")
            sys.exit(1)
        raise
    except BaseException as e:
        from lbtrain.trainer import Interrupted

        if isinstance(e, Interrupted):
            sys.exit(128 + e.signum)
        raise


if __name__ == "__main__":
    main()
