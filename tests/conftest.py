"""Shared fixtures: a single-process gloo world for in-process tests, random MfM inputs."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_mfm.parallel.initialize import initialize_parallel  # noqa: E402


def load_script(path: Path):
    """A script (tools/*.py) as a module, to call its functions in this process without paying
    a fresh interpreter's start-up."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_process_world():
    """World size 1, TP=PP=CP=1 (with the CPU compatibility layer)."""
    initialize_parallel(seed=1234)
    yield


@pytest.fixture(autouse=True)
def deterministic_seed():
    torch.manual_seed(0)
