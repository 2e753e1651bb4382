"""How reports name and order regimes: the `label:` and `rank:` keys of the presets in configs/regime/.

Hoffer et al.'s Table 1 calls its regimes LB, +LR, +GBN and +RA and puts them in that order; each preset says so
itself (`label: +RA`, `rank: 3`), so a new preset gets its place in a report by its own file, not by an edit here.
A preset without a label is shown by its name. A regime without a preset (an ad-hoc `regime.name=...`) or without
a rank comes after every ranked one, in name order.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lbtrain.paths import config_dir

UNRANKED = sys.maxsize  # after every preset that declares a rank


@functools.cache
def presets(folder: str | None = None) -> dict[str, dict[str, Any]]:
    """{regime name: {"label": str | None, "rank": int | None}} for every preset in `folder` (default: the shipped
    configs' regime/ folder). A file that does not parse is left out: it costs its regime its place, not the
    report."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(folder or Path(config_dir(), "regime")).glob("*.yaml")):
        try:
            cfg = OmegaConf.load(path)
        except Exception:  # noqa: BLE001 - a broken preset must not stop a report of finished runs
            continue
        # the file as written: a preset that inherits (`defaults:`) declares its own label and rank
        name = str(cfg.get("name") or path.stem)
        rank = cfg.get("rank")
        out[name] = {"label": cfg.get("label"), "rank": rank if isinstance(rank, int) else None}
    return out


def label(regime: str) -> str:
    """The regime's short name in tables and legends ("+RA"), else its name."""
    return str(presets().get(regime, {}).get("label") or regime)


def has_label(regime: str) -> bool:
    """Whether the regime's preset declares a label: Hoffer et al.'s four Table-1 regimes do, which at r = 1 are
    the small-batch recipe itself."""
    return bool(presets().get(regime, {}).get("label"))


def rank(regime: str) -> tuple[int, str]:
    """Sort key: the preset's rank, then the name (unranked regimes last, by name)."""
    r = presets().get(regime, {}).get("rank")
    return (r if r is not None else UNRANKED, regime)
