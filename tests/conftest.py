"""Shared fixtures: compose configs the way the CLI does, and run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lbtrain.cli import CONFIG_DIR, setup_hydra

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

setup_hydra()


def make_cfg(*overrides: str) -> DictConfig:
    """Compose the real config tree with CLI-style overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300,
            module: str = "lbtrain") -> subprocess.CompletedProcess:
    """Run `python -m lbtrain ARGS` in `cwd` (outputs/ lands there)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("LBTRAIN_TEST_SIGNAL", None) if env is None or "LBTRAIN_TEST_SIGNAL" not in env else None
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def cfg_factory():
    return make_cfg
