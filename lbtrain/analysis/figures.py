"""The one figure set-up of every analysis figure: size and style, log axes, the legend outside the axes, labels
that never repeat for different curves, and an atomic PNG write.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global state leaks between figures (or into a
caller that uses pyplot itself).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lbtrain.analysis.runs import shown, variant_columns, variant_keys
from lbtrain.checkpoint import atomic_write_bytes

SIZE = (9.5, 4.8)  # inches: room for the legend right of the axes
DPI = 120
LINE_STYLES = ("-", "--", ":", "-.")  # past 10 colours the line style changes, so no two groups look alike
OUTSIDE, INSIDE = "outside", "inside"
# Identity keys a curve's label names by itself ("B=64 adapt"); the dataset is not among them: unlike a table, a
# figure has no dataset column.
LABEL_SHOWN = ("name", "seed", "batch", "regime.name")


def new_figure(size: tuple[float, float] = SIZE, ncols: int = 1) -> tuple[Figure, Any]:
    """A figure on the Agg canvas and its axes (one, or an array of `ncols` side by side)."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    return fig, (fig.add_subplot() if ncols == 1 else fig.subplots(1, ncols))


def color(i: int, n: int = 0, cmap: str = "tab10") -> Any:
    """The i-th group's colour: tab10's 10 colours in turn, or, with `n` and a continuous map (viridis), evenly
    spread over the map (for ordered groups such as batch sizes)."""
    if n:
        return colormaps[cmap](i / max(n - 1, 1))
    return colormaps[cmap](i % 10)


def line_style(i: int) -> str:
    """The i-th group's line style: changes each time the 10 colours come round again."""
    return LINE_STYLES[i // 10 % len(LINE_STYLES)]


def log_axes(ax: Any, x: bool = False, y: bool = False, xbase: float = 10) -> None:
    """Log scales where asked (large batches make few updates: a linear axis squeezes them against 0)."""
    if x:
        ax.set_xscale("log", base=xbase)
    if y:
        ax.set_yscale("log")


def style_axes(ax: Any, xlabel: str, ylabel: str, title: str = "", legend: str | None = OUTSIDE) -> None:
    """Axis labels, title, grid and the legend: `outside` the axes (it never hides a curve), `inside` (where the
    figure has several panels and no room beside them), or None."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if legend and ax.get_lines():
        if legend == OUTSIDE:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        else:
            ax.legend(fontsize="small")


def finish(fig: Figure, ax: Any, xlabel: str, ylabel: str, title: str = "", legend: str | None = OUTSIDE) -> Figure:
    """`style_axes`, then a layout that keeps the outside legend on the canvas."""
    style_axes(ax, xlabel, ylabel, title, legend)
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure rendered as PNG (render before writing anything: a figure that fails to draw leaves no file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path) -> Path:
    """The figure as a PNG at `path`, written atomically (a reader never sees half an image)."""
    atomic_write_bytes(path, png_bytes(fig))
    return Path(path)


def label_keys(identities: Sequence[Mapping[str, Any]]) -> list[str]:
    """The identity keys that a figure's labels must name (each curve's flat identity): every key in which its
    curves differ, as the tables' variant columns, beyond the batch and regime that every label names."""
    return variant_keys([dict(d) for d in identities], LABEL_SHOWN)


def differences(identity: Mapping[str, Any], keys: Sequence[str]) -> str:
    """" (k=v, ...)" for the label of a curve with this identity, "" without keys."""
    return f" ({', '.join(f'{k}={shown(dict(identity), k)}' for k in keys)})" if keys else ""


def distinct_labels(labels: Sequence[str | None], keys: Sequence[Mapping[str, Any]]) -> list[str | None]:
    """Legend labels in which no label stands for two different curves.

    `labels[i]` is the label of the curve whose flat identity (or any dict that tells curves apart) is `keys[i]`;
    None is a curve without a legend entry. Where one label would name curves with different keys, each of those
    labels is extended with the keys in which they differ ("B=64 adapt (epochs=2)", "B=64 adapt (epochs=4)"), as
    the tables' variant columns do; curves with equal keys may share a label (seeds of one configuration)."""
    out = list(labels)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        if label is not None:
            by_label.setdefault(label, []).append(i)
    for label, idx in by_label.items():
        dicts = [dict(keys[i]) for i in idx]
        if len({_dumps(d) for d in dicts}) < 2:
            continue
        columns = variant_columns(dicts)
        for i, d in zip(idx, dicts):
            out[i] = label + differences(d, columns)
    # two values that print alike (1 and 1.0): the curves still differ, so they get a number each
    seen: dict[str, set[str]] = {}
    for i, label in enumerate(out):
        if label is not None:
            seen.setdefault(label, set()).add(_dumps(dict(keys[i])))
    for label, variants in seen.items():
        if len(variants) > 1:
            order = sorted(variants)
            for i, lab in enumerate(out):
                if lab == label:
                    out[i] = f"{label} [{order.index(_dumps(dict(keys[i]))) + 1}]"
    return out


def _dumps(d: Mapping[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)
