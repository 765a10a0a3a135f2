"""Shared fixtures of the core tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "diffbias_tests_planted", Path(__file__).with_name("planted.py")
)
_planted = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_planted)


@pytest.fixture(scope="session")
def planted():
    """The planted-problem generators of ``tests/core/planted.py`` (a module)."""
    return _planted


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (faster for small training loops on a shared machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
