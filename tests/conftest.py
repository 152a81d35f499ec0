"""Shared fixtures: Taichi backends (cpu always; vulkan/cuda where available)."""
import os

import numpy as np
import pytest

from diffus_taichi import backend

ARCH_PARAMS = ["cpu", "vulkan", "cuda"]


def _available(name):
    if os.environ.get("DIFFUS_TEST_ARCHS"):
        if name not in os.environ["DIFFUS_TEST_ARCHS"].split(","):
            return False
    return backend.arch_supported(name)


@pytest.fixture(params=ARCH_PARAMS)
def arch(request):
    """Each available backend in f32 (skips the missing ones)."""
    if not _available(request.param):
        pytest.skip(f"{request.param} backend unavailable")
    backend.ensure(request.param, "f32")
    yield request.param


@pytest.fixture
def cpu64():
    """CPU backend in f64 (for exact physics checks and gradient references)."""
    backend.ensure("cpu", "f64")
    yield "cpu"


@pytest.fixture
def cpu32():
    backend.ensure("cpu", "f32")
    yield "cpu"


@pytest.fixture(scope="session")
def phantom_volume():
    """The built-in 'phantom' head as a Volume, built once per session: it is made procedurally
    on every load_volume("phantom") (seconds each), and a Volume holds NumPy arrays only, so it
    outlives Taichi re-initialisations. Tests pass it to Simulator / PoseSearch in place of the
    name and must not modify it."""
    from diffus_taichi.volume import load_volume

    return load_volume("phantom")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
