"""Shared fixtures: seeded official models and their converted params."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path.insert(0, os.path.dirname(__file__))  # official_sam, parity helpers

import numpy as np
import pytest
import torch

import official_sam
from checkpoints_convert.official import official_to_flax
from sam_jax.configs import get_config


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected.detach().numpy() if torch.is_tensor(expected) else expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def report(name: str, error: float) -> None:
    """Prints a measured parity error; `pytest -s` or -rA shows them."""
    print(f"[parity] {name}: relative L2 error {error:.2e}")


def make_official(name: str, seed: int = 0):
    """(config, official torch model with every tensor random, converted Flax params)."""
    config = get_config(name)
    torch.manual_seed(seed)
    model = official_sam.build_official_for(config)
    official_sam.randomize_zero_initialised(model, seed + 1)
    params = official_to_flax(official_sam.state_dict_numpy(model), config)
    return config, model, params


@pytest.fixture(scope="session")
def tiny():
    return make_official("vit_tiny")
