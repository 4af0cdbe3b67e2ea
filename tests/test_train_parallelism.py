"""`parallelism=pmap` against the default FSDP-sharded jit: the same `synthetic_smoke` run of
`sam_jax.training.loop.train_and_evaluate` end to end on 8 fake CPU devices."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import device_workers
from test_train_run import MICRO, params_of

DEVICES = 8
STEPS = 3  # single-prompt steps: the full loop under pmap is test_train_step.py's (one compile less here)
RTOL = 1e-4  # devices add losses and gradients in other orders: fp32 rounding only
WORKER = Path(__file__).parent / "train_parallelism_worker.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data_dir):
    out = tmp_path_factory.mktemp("parallelism")
    env = device_workers.cpu_devices_env(DEVICES)
    overrides = [f"data.global_batch_size={DEVICES}", f"optimizer.total_steps={STEPS}", f"single_prompt_steps={STEPS}",
                 "optimizer.grad_clip_norm=0.5", *MICRO]
    result = subprocess.run([sys.executable, str(WORKER), synthetic_data_dir, str(out), *overrides], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    for parallelism in ("fsdp", "pmap"):
        assert f"training on {DEVICES} devices ({parallelism})" in result.stderr
    return {p: out / p for p in ("fsdp", "pmap")}


def train_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/total_loss" in row]


def test_pmap_logs_the_losses_gradients_and_miou_of_the_sharded_run(runs):
    fsdp, pmap = train_rows(runs["fsdp"]), train_rows(runs["pmap"])
    assert [r["step"] for r in pmap] == [r["step"] for r in fsdp] == [2, 3]
    for a, b in zip(pmap, fsdp):
        for key in ("train/total_loss", "train/focal", "train/dice", "train/iou_loss", "train/grad_norm",
                    "train/learning_rate"):
            assert a[key] == pytest.approx(b[key], rel=RTOL), (a["step"], key)
        assert a["train/miou_iter_1"] == pytest.approx(b["train/miou_iter_1"], abs=1e-6)
    # The raw norm is above the clip: both optimizers saw the clipped gradient.
    assert all(r["train/grad_norm"] > 0.5 for r in fsdp)


def test_pmap_reaches_the_params_of_the_sharded_run(runs):
    fsdp, pmap = params_of(runs["fsdp"] / "model"), params_of(runs["pmap"] / "model")
    assert fsdp.keys() == pmap.keys()
    for key in fsdp:
        close = np.isclose(pmap[key], fsdp[key], rtol=1e-4, atol=1e-6)
        # Adam turns rounding-level gradients (attention key biases, whose true gradient is 0)
        # into full steps of either sign; everything else agrees to rounding.
        if not (key.endswith("k_proj/bias") or key.endswith("attn/qkv/bias")):
            assert close.mean() >= 0.999, (key, int((~close).sum()), close.size)
