"""Fixtures only; the helpers the tests import are in tests/helpers.py."""

from __future__ import annotations

import helpers  # noqa: F401 - registers lbtrain's Hydra schema and resolvers before any test composes a config
import pytest


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny tensors gain
    nothing from intra-op threads, and on a small machine shared with other jobs 2-thread OpenMP regions stall."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
