"""What a search trial costs besides its training, and what stopping at the target saves.

Three measurements on the current machine (CPU, one torch thread unless --threads), printed as one table:

1. **A warm worker's trial** (what a joblib worker pays per trial after its first job, torch and Hydra imported
   once): the search's own trials (`hydra_plugins.lbtrain_search._plan.expand` of `sweep=critical_batch` plus
   the given overrides), each run the way `lbtrain.cli._job` runs a sweep job, phase by phase: compose the config
   (Hydra composes each job's config), `session.prepare` (checks, folder, lock), `Trainer.setup` (data load, model,
   optimizer, TensorBoard writer; the data load timed on its own), `fit` (split into evaluation, checkpoints and
   the rest: training), and release. The first trial is reported apart (first-use costs of the process).
   The same trials again with `target.log_all=true` (every target point evaluated in full, as before the
   bound of `lbtrain.target`): evaluation shares side by side, and whether every trial stopped at the same update.
2. **Stop at target vs the full budget**: the same trials with `target.error=null` (no target: the whole budget,
   validation at epoch ends as a run without a target does), so updates and seconds compare directly.
3. **The real joblib launcher** (`--joblib N` workers, default 1; 0 skips it): the search through the CLI in a
   subprocess; each job's span from its lbtrain.log against the training time it recorded (results.json
   `wall_time_s`), and the time before the first job (CLI start, whole-search check, worker start-up).

    python scripts/bench_search.py [--batches 16,128,512] [--trials 4] [--joblib 1] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="16,128,512")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget-epochs", type=float, default=8, help="each trial's budget (the search's budget.amount)")
    ap.add_argument("--min-steps", type=int, default=100, help="the budget's least updates (budget.min_steps)")
    ap.add_argument("--joblib", type=int, default=1, help="workers of the end-to-end joblib search (0: skip; one "
                    "by default, so that a small machine's contention does not hide the per-job cost)")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("overrides", nargs="*", help="study overrides (default: the preset's digits study)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    batches = [int(b) for b in args.batches.split(",")]
    study = ["sweep=critical_batch", f"threads={args.threads}", "progress=false", *args.overrides]

    out: dict[str, Any] = {"batches": batches, "trials": args.trials, "study": study}
    t = time.perf_counter()
    import lbtrain.cli  # noqa: F401 - what a worker imports once: torch, Hydra, lbtrain
    import lbtrain.trainer  # noqa: F401

    out["import_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        budget = {"unit": "epochs", "amount": args.budget_epochs, "min_steps": args.min_steps}
        out["budget"] = budget
        warm = warm_worker(Path(tmp) / "target", batches, args.trials, study, budget)
        dense = warm_worker(Path(tmp) / "log_all", batches, args.trials, study, budget, extra=["target.log_all=true"])
        full = warm_worker(Path(tmp) / "full", batches, args.trials, study, budget, extra=["target.error=null"])
        out["target"], out["log_all"], out["full"] = warm, dense, full
        if args.joblib:
            out["joblib"] = joblib_search(Path(tmp) / "joblib", batches, args.trials, study, args.joblib)
    report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- a warm worker
@contextmanager
def timed(into: dict[str, float], key: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        into[key] += time.perf_counter() - t


def warm_worker(root: Path, batches: list[int], trials: int, study: list[str], budget: dict[str, Any],
                extra: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """Run the search's trials (each with `extra` overrides appended) one after another in this process, timing
    each phase of each job."""
    from hydra import compose, initialize_config_dir

    import lbtrain.trainer as trainer_mod
    from hydra_plugins.lbtrain_search import _plan
    from lbtrain.cli import CONFIG_DIR, setup_hydra
    from lbtrain.session import prepare
    from lbtrain.trainer import Trainer

    setup_hydra()
    search = {"batches": batches, "trials": trials, "confirm_seeds": 1, "budget": budget}
    root.mkdir(parents=True)
    phases: dict[str, float] = defaultdict(float)
    # the evaluation, checkpoint and data-load calls, timed where the trainer makes them (the loop is untouched)
    originals = (Trainer.evaluate, Trainer.save, trainer_mod.load_dataset, Trainer.check_target)
    depth = [0]  # a bounded target check that ends in a full evaluation is timed once

    def outermost(original):
        def wrapped(self, *a, **k):
            depth[0] += 1
            try:
                if depth[0] > 1:
                    return original(self, *a, **k)
                with timed(phases, "evaluate"):
                    return original(self, *a, **k)
            finally:
                depth[0] -= 1
        return wrapped

    def save(self, *a, **k):
        with timed(phases, "checkpoint"):
            return originals[1](self, *a, **k)

    def load(*a, **k):
        with timed(phases, "data"):
            return originals[2](*a, **k)

    rows = []
    Trainer.evaluate, Trainer.save, trainer_mod.load_dataset = outermost(originals[0]), save, load
    Trainer.check_target = outermost(originals[3])
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            space = compose(config_name="config", overrides=study, return_hydra_config=True).hydra.sweeper
            from omegaconf import OmegaConf

            search["space"] = OmegaConf.to_container(space.space, resolve=True)
            expanded = _plan.expand(search, study, lambda ov: compose(config_name="config", overrides=ov))
            for i, trial in enumerate(expanded.trials):
                phases.clear()
                start = time.perf_counter()
                with timed(phases, "compose"):
                    cfg = compose(config_name="config", overrides=[*trial.overrides, *extra])
                with timed(phases, "prepare"):
                    prepared = prepare(cfg, root / f"trial{i}", lock=True)
                with timed(phases, "setup"):
                    t = Trainer(prepared)
                    t.setup()
                with timed(phases, "fit"):
                    res = t.fit()
                with timed(phases, "release"):
                    prepared.release()
                    del t
                total = time.perf_counter() - start
                p = dict(phases)
                train = p["fit"] - p.get("evaluate", 0.0) - p.get("checkpoint", 0.0)
                fixed = total - p["fit"] + p.get("checkpoint", 0.0)  # everything but training and evaluation
                rows.append({"batch": trial.batch, "updates": res["updates"], "total": total, "train": train,
                             "evaluate": p.get("evaluate", 0.0), "fixed": fixed, "data": p.get("data", 0.0),
                             "checkpoint": p.get("checkpoint", 0.0), "compose": p["compose"],
                             "prepare": p["prepare"], "setup": p["setup"] - p.get("data", 0.0),
                             "release": p["release"], "reached": bool((res.get("target") or {}).get("reached"))})
    finally:
        Trainer.evaluate, Trainer.save, trainer_mod.load_dataset, Trainer.check_target = originals
    return {"first": rows[0], "rest": rows[1:]}


# ------------------------------------------------------------------------------------------- the real launcher
def joblib_search(root: Path, batches: list[int], trials: int, study: list[str], workers: int) -> dict[str, Any]:
    """The search through the CLI on the joblib launcher. Each job's span is read from its lbtrain.log (first and
    last line: from its folder's lock to its results), so the cost between jobs (Hydra's dispatch to the worker,
    composing the job's config, `prepare`) is what the span of all jobs holds beyond their recorded training."""
    from datetime import datetime

    root.mkdir(parents=True)
    cmd = [sys.executable, "-m", "lbtrain", "-m", *study, "hydra/launcher=local", f"hydra.launcher.n_jobs={workers}",
           f"hydra.sweeper.batches=[{','.join(map(str, batches))}]", f"hydra.sweeper.trials={trials}"]
    t0 = datetime.now()
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = (datetime.now() - t0).total_seconds()
    if p.returncode not in (0, 1):
        raise SystemExit(f"the joblib search failed ({p.returncode}): {p.stderr[-2000:]}")

    def stamp(line: str) -> datetime:
        return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")

    spans, trained = [], 0.0
    for log in root.rglob("lbtrain.log"):
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("[20")]
        spans.append((stamp(lines[0]), stamp(lines[-1])))
        trained += json.loads((log.parent / "results.json").read_text()).get("wall_time_s") or 0.0
    spans.sort()
    busy = (spans[-1][1] - spans[0][0]).total_seconds() * workers
    last = (spans[-1][1] - t0).total_seconds()
    return {"wall": wall, "jobs": len(spans), "workers": workers, "trained": trained,
            "before_first": (spans[0][0] - t0).total_seconds(), "after_last": wall - last,
            "per_job_besides_training": (busy - trained) / len(spans)}


# ------------------------------------------------------------------------------------------------- the table
def report(out: dict[str, Any]) -> None:
    rest, first = out["target"]["rest"], out["target"]["first"]
    full = out["full"]["rest"]

    def s(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    n = len(rest)
    print(f"search: batches {out['batches']} x {out['trials']} trials, {' '.join(out['study'])}")
    print(f"importing torch, Hydra and lbtrain (once per worker): {out['import_s']:.2f} s")
    print(f"\n1. a warm worker's trial (median of {n} trials after the first; seconds)")
    for key in ("compose", "prepare", "data", "setup", "release", "checkpoint", "fixed", "evaluate", "train",
                "total"):
        print(f"   {key:<11} {med(rest, key):7.3f}   (first trial {first[key]:.3f})")
    print(f"   fixed cost / training            {s(rest, 'fixed') / s(rest, 'train'):6.2f}  (sums over the trials)")
    evaluation = s(rest, "evaluate") / (s(rest, "train") + s(rest, "evaluate"))
    print(f"   evaluation / (training + eval)   {evaluation:6.2f}")
    print(f"   data load / fixed cost           {s(rest, 'data') / s(rest, 'fixed'):6.2f}")
    print(f"   trials that reached the target   {sum(r['reached'] for r in rest)}/{n}")
    for batch in out["batches"]:
        mine = [r for r in rest if r["batch"] == batch]
        theirs = [r for r in out["log_all"]["rest"] if r["batch"] == batch]
        if mine and theirs:
            print(f"     batch {batch:>5}: {s(mine, 'evaluate') / (s(mine, 'train') + s(mine, 'evaluate')):5.2f}"
                  f"  (target.log_all=true {s(theirs, 'evaluate') / (s(theirs, 'train') + s(theirs, 'evaluate')):.2f})")
    dense = out["log_all"]["rest"]
    share_dense = s(dense, "evaluate") / (s(dense, "train") + s(dense, "evaluate"))
    same = all(a["updates"] == b["updates"] for a, b in zip(rest, dense))
    print(f"   with target.log_all=true         {share_dense:6.2f}  (every target point evaluated in full; "
          f"evaluation time ratio {s(rest, 'evaluate') / s(dense, 'evaluate'):.3f}; same updates in every trial: "
          f"{same})")
    print("\n2. stop at the target vs the full budget (same trials, after the first)")
    print(f"   updates  {s(rest, 'updates'):8.0f} vs {s(full, 'updates'):8.0f}   ratio "
          f"{s(rest, 'updates') / s(full, 'updates'):.3f}")
    print(f"   seconds  {s(rest, 'total'):8.2f} vs {s(full, 'total'):8.2f}   ratio "
          f"{s(rest, 'total') / s(full, 'total'):.3f}  (training + evaluation: "
          f"{(s(rest, 'train') + s(rest, 'evaluate')) / (s(full, 'train') + s(full, 'evaluate')):.3f})")
    if "joblib" in out:
        j = out["joblib"]
        per_job = j["trained"] / j["jobs"]
        print(f"\n3. the search through the CLI on the joblib launcher ({j['workers']} worker(s), {j['jobs']} jobs)")
        print(f"   wall {j['wall']:.1f} s: {j['before_first']:.1f} s before the first job (CLI start, whole-search "
              f"check, worker start and imports), {j['after_last']:.1f} s after the last")
        print(f"   per job, first job's start to last job's end: {j['per_job_besides_training']:.2f} s besides "
              f"{per_job:.2f} s of recorded fit() (training, evaluation, checkpoints; fixed / fit "
              f"{j['per_job_besides_training'] / per_job:.2f})")


if __name__ == "__main__":
    main()
