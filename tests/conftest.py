"""Shared fixtures: a single-process gloo world for in-process tests, random MfM inputs."""

from __future__ import annotations

import socket

import pytest
import torch

from megatron_mfm.parallel.initialize import initialize_parallel


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
