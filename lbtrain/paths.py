"""Where lbtrain's shipped files are, without importing anything heavy.

The CLI composes its configs from this folder; the analysis reads the regime presets' report labels and ranks
from it. Both ask here, so that neither has to import the other (the analysis never imports the run layer).
"""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """The shipped configs: inside the package (wheel, sdist, `pip install .`), else the repository's top-level
    configs/ beside the package (a source checkout or `pip install -e .`)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    return str(here / "configs")
