"""The edge-of-stability figure: each run's sharpness trajectory against updates, beside SGD's stability thresholds.

Cohen et al. (2021): under full-batch gradient descent at learning rate lr, lambda_max (the top Hessian eigenvalue
of the training loss) rises until it reaches 2/lr and then hovers there ("edge of stability"); with heavy-ball
momentum m the threshold is 2(1+m)/lr. Under SGD, Andreyev & Beneventano (2024) find that the batch sharpness
(mini-batch curvature along the mini-batch gradient) is what settles at 2/lr, lambda_max staying below.

Reads the run's TensorBoard scalars as the `sharpness` instrument writes them (lbtrain/instruments/sharpness.py:
sharpness/lambda_max, sharpness/batch_sharpness, sharpness/two_over_lr, sharpness/two_over_lr_momentum), or, for
a run without them, what `lbtrain-measure` measured on its checkpoints. `edge_of_stability.png`: one panel per run
that has a trajectory (at least two measurements), its training loss on a second axis (a run that crosses the
threshold shows a loss spike there), 12 panels a file (`edge_of_stability_2.png`, ... for more).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lbtrain.analysis.figures import INSIDE, color, differences, label_keys, save_png, style_axes
from lbtrain.analysis.runs import Run, run_key

LAMBDA, BATCH = "sharpness/lambda_max", "sharpness/batch_sharpness"
TWO_OVER_LR, TWO_OVER_LR_M = "sharpness/two_over_lr", "sharpness/two_over_lr_momentum"
LOSS = "train/loss"
PANELS = 12  # per file: beyond that a figure is too tall to read
CLIP = 3.0  # the y axis stops at CLIP x the highest threshold: a catapult's spike would flatten the rest


def series(run: Run, tag: str) -> list[tuple[int, float]]:
    """The run's finite points of `tag`: logged during the run, else measured after the fact (lbtrain-measure)."""
    points = run.scalars(tag) or run.measured(tag)
    return [(int(s), float(v)) for s, v in points if math.isfinite(v)]


def has_trajectory(run: Run) -> bool:
    """Whether the run measured lambda_max at two updates or more (a trajectory, not an end point)."""
    return len({s for s, _ in series(run, LAMBDA)}) >= 2


def _panel(ax, run: Run, title: str) -> None:
    lam, bs = series(run, LAMBDA), series(run, BATCH)
    two, two_m = series(run, TWO_OVER_LR), series(run, TWO_OVER_LR_M)
    ax.plot([s for s, _ in lam], [v for _, v in lam], marker=".", color=color(0), label=r"$\lambda_{max}$")
    if bs:
        ax.plot([s for s, _ in bs], [v for _, v in bs], marker=".", color=color(1), alpha=0.8,
                label="batch sharpness")
    if two:
        ax.plot([s for s, _ in two], [v for _, v in two], drawstyle="steps-post", color="black", linestyle="--",
                label=r"$2/\eta$")
    if two_m and any(abs(v - w) > 1e-9 * abs(w) for (_, v), (_, w) in zip(two_m, two)):
        ax.plot([s for s, _ in two_m], [v for _, v in two_m], drawstyle="steps-post", color="grey", linestyle=":",
                label=r"$2(1+m)/\eta$")
    top = max((v for _, v in two + two_m), default=None)
    values = [v for _, v in lam + bs]
    if top is not None and values and max(values) > CLIP * top:
        ax.set_ylim(min(0.0, min(values)), CLIP * top)
    style_axes(ax, "updates", "sharpness", title, legend=INSIDE)
    loss = [(s, v) for s, v in run.scalars(LOSS) if v > 0]
    if loss:  # on a second axis: the loss spikes of a run that crossed the threshold (catapults)
        twin = ax.twinx()
        twin.plot([s for s, _ in loss], [v for _, v in loss], color="grey", alpha=0.5, linewidth=0.8)
        twin.set_yscale("log")
        twin.set_ylabel("train loss (grey)", color="grey")


def eos_figures(runs: Sequence[Run], title_prefix: str = "") -> list[Figure]:
    """One figure per PANELS runs with a trajectory (in report order), one panel each, labelled by what tells
    the runs apart; [] when no run has one."""
    chosen = sorted((r for r in runs if r.duplicate_of is None and has_trajectory(r)), key=run_key)
    if not chosen:
        return []
    keys = label_keys([r.identity for r in chosen])
    figures = []
    for first in range(0, len(chosen), PANELS):
        page = chosen[first:first + PANELS]
        cols = 1 if len(page) == 1 else 2
        rows = math.ceil(len(page) / cols)
        fig = Figure(figsize=(9.5 if cols == 1 else 14.0, 3.8 * rows + 0.4))
        FigureCanvasAgg(fig)  # Agg, without pyplot's global state (as figures.new_figure)
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, run in zip(axes, page):
            label = f"{title_prefix}{run.experiment} B={run.batch} {run.regime}{differences(run.identity, keys)}"
            _panel(ax, run, label)
        for ax in axes[len(page):]:
            ax.set_visible(False)
        fig.suptitle(r"Edge of stability: $\lambda_{max}$ against $2/\eta$ (Cohen et al. 2021); batch sharpness "
                     "(Andreyev & Beneventano 2024)", fontsize="medium")
        fig.tight_layout()
        figures.append(fig)
    return figures


def write_eos(runs: Sequence[Run], out_dir: str | Path, prefix: str = "") -> list[Path]:
    """`edge_of_stability.png` (and `_2`, `_3`, ... past PANELS runs) in `out_dir` for the runs with a sharpness
    trajectory; `prefix` goes before the file names (one experiment of several). Nothing when none has one."""
    out = []
    for i, fig in enumerate(eos_figures(runs)):
        name = f"{prefix}edge_of_stability{'' if i == 0 else f'_{i + 1}'}.png"
        out.append(save_png(fig, Path(out_dir) / name))
    return out
