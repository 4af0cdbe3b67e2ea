"""Shared fixtures: seeded official models and their converted params."""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # test modules import helpers from conftest

# The suite's time on 2 CPU cores is mostly XLA compiling (train steps, encoders, exports), and
# LLVM's optimisation level 0 compiles in about 70% of the time (the matmuls and convolutions
# are library calls, so runs slow little). Set before JAX starts its backend, so this process,
# the xdist workers and every subprocess a test starts (they inherit the environment) use it.
# XLA's graph passes and fusions are the same at either level; only LLVM's code generation differs.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402
import numpy as np
import pytest
import torch

from checkpoints_convert import reference_model
from checkpoints_convert.official import official_to_flax, to_flax_array, torch_key
from sam_jax.tree_paths import flatten, unflatten
from sam_jax.configs import SamConfig, get_config
from sam_jax.modeling import Sam

# The files that take longest on 2 CPU cores (a CI run's --durations, summed per file), longest
# first. pytest-xdist hands whole files (--dist loadfile) to whichever worker is free, in collection
# order (--no-loadscope-reorder); starting with these leaves the short files to even out the
# two workers' ends, where alphabetical order left the longest (parity, training) for last.
LONGEST_FILES = (
    "test_parity_end_to_end.py",
    "test_train_run.py",
    "test_train_step.py",
    "test_export_onnx.py",
    "test_converter.py",
    "test_automatic_mask_generator.py",
    "test_interactive_training.py",
    "test_text_prompt_training.py",
    "test_train_parallelism.py",
    "test_device_benchmark.py",
    "test_benchmark_train_step.py",
    "test_attention_impls.py",
    "test_point_protocol_parity.py",
    "test_batch_predictor.py",
    "test_predictor.py",
    "test_text_prompts_inference.py",
    "test_eval_command.py",
    "test_data_engine_loop.py",
    "test_auto_label.py",
    "test_beam_prepare.py",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Longest files first (LONGEST_FILES), every file's tests kept together and in their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected.detach().numpy() if torch.is_tensor(expected) else expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if not np.any(expected):  # empty or all zero: exact agreement is the only pass
        return 0.0 if np.array_equal(actual, expected) else float("inf")
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def check_output(label: str, got, want, tol: float = 1e-4) -> None:
    """An exported model's output against the reference: IoU-like scores within `tol` absolute,
    anything else within `tol` relative L2 error (reported)."""
    if label.endswith("iou_predictions"):
        np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=label)
        return
    error = relative_error(got, want)
    report(label, error)
    assert error < tol, label


def report(name: str, error: float) -> None:
    """Prints a measured parity error; `pytest -s` or -rA shows them."""
    print(f"[parity] {name}: relative L2 error {error:.2e}")


def make_official(config: "str | SamConfig", seed: int = 0):
    """(config, official torch model with every tensor random, converted Flax params)."""
    config = get_config(config) if isinstance(config, str) else config
    torch.manual_seed(seed)
    model = reference_model.build_official_for(config)
    reference_model.randomize_zero_initialised(model, seed + 1)
    params = official_to_flax(reference_model.state_dict_numpy(model), config)
    return config, model, params


@pytest.fixture(scope="session")
def tiny():
    return make_official("vit_tiny")


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory, worker_id) -> str:
    """A data dir with sam_synthetic/small (48 + 16 images) prepared once per test run,
    shared by the pytest-xdist workers (the first one prepares it under a file lock)."""
    import tensorflow_datasets as tfds
    from filelock import FileLock

    from sam_jax.data import builders  # noqa: F401  registers the builders

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # xdist: every worker's base temp lies in one run directory
        root = root.parent
    path = root / "tfds_sam_synthetic_small"
    with FileLock(str(path) + ".lock"):
        if not (path / "prepared").exists():
            tfds.builder("sam_synthetic/small", data_dir=str(path)).download_and_prepare()
            (path / "prepared").touch()
    return str(path)


def with_depth(config: SamConfig, depth: int) -> SamConfig:
    """`config` at full width with fewer blocks: windowed blocks, the last one global."""
    encoder = dataclasses.replace(config.encoder, depth=depth, global_attn_indexes=(depth - 1,))
    return dataclasses.replace(config, name=f"{config.name}_depth{depth}", encoder=encoder)


def apply_submodule(config: SamConfig, params, fn, *args, **kwargs):
    """Runs `fn(sam_module, *args)` inside `Sam(config)` bound to `params`."""
    return Sam(config).apply({"params": params}, *args, method=fn, **kwargs)


def to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x)))


def convert_module_params(flax_module, torch_module: torch.nn.Module, *init_args) -> dict:
    """Params for `flax_module` from an official submodule, by the converter's rule; strict."""
    shapes = flatten(jax.eval_shape(flax_module.init, jax.random.PRNGKey(0), *init_args)["params"])
    state_dict = torch_module.state_dict()
    keys = {path: torch_key(path) for path in shapes}
    assert sorted(keys.values()) == sorted(state_dict), "submodule keys do not correspond"
    return unflatten({p: to_flax_array(p, state_dict[k].detach().numpy()) for p, k in keys.items()})


# Faithful stand-ins for the few torchvision functions that official modules importing it call
# (torchvision has no CPU build here); see stand_ins/README.md.
STAND_INS = os.path.join(os.path.dirname(__file__), "stand_ins")


def official_module(name: str):
    """An official segment_anything module that imports torchvision, e.g. "predictor"."""
    return reference_model.official_module(name, STAND_INS)
