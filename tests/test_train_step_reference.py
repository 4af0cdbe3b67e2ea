"""The training step computes what it computed before it was made faster: the loss one full-loop step
differentiates, its per-iteration metrics and its gradients against `tests/data/train_step_reference.npz`,
written at f8f8de3 by `tests/data/make_train_step_reference.py` (its docstring says how)."""

import importlib.util
import os

import numpy as np
import pytest

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
_spec = importlib.util.spec_from_file_location("make_train_step_reference",
                                               os.path.join(DATA, "make_train_step_reference.py"))
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


@pytest.fixture(scope="module")
def stored():
    with np.load(os.path.join(DATA, "train_step_reference.npz")) as f:
        return dict(f)


@pytest.fixture(scope="module")
def inputs():
    return reference.reference_inputs()


def _compare(got: dict, want: dict, prefix: str, rtol: float, atol_scale: float):
    names = sorted(k for k in want if k.startswith(prefix))
    assert sorted(got) == names, "the param tree changed"
    # Summation order may differ: entries that cancel to ~0 differ at fp32 noise of the largest ones.
    scale = max(float(np.abs(want[k]).max()) for k in names)
    for k in names:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol_scale * scale, err_msg=k)


def test_losses_metrics_and_gradients_equal_the_reference(stored, inputs):
    (loss, metrics), grads = reference.loss_and_grads(*inputs)
    np.testing.assert_allclose(loss, stored["loss"], rtol=1e-5)
    got = reference.flat("metrics", metrics)
    assert sorted(got) == sorted(k for k in stored if k.startswith("metrics"))
    for k in got:  # per iteration: loss, focal, dice, iou_loss, miou
        np.testing.assert_allclose(got[k], stored[k], rtol=1e-5, atol=1e-6, err_msg=k)
    _compare(reference.flat("grads", grads), stored, "grads", rtol=1e-4, atol_scale=1e-5)
