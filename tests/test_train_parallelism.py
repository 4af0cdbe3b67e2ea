"""`parallelism=pmap` against the default FSDP-sharded jit: the same run end to end on 8 fake CPU
devices (`experiments.train`, `synthetic_smoke`: single-prompt steps, then the full loop)."""

import json
import os

import numpy as np
import pytest

from test_train_run import params_of, run_train

DEVICES = 8
STEPS = 4  # 3 single-prompt steps, then 1 of the full loop: both loops run under both strategies
RTOL = 1e-4  # devices add losses and gradients in other orders: fp32 rounding only


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data_dir):
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    out = {}
    for parallelism in ("fsdp", "pmap"):
        workdir = tmp_path_factory.mktemp(parallelism) / "smoke"
        code, _, err = run_train(workdir, synthetic_data_dir, cache, f"parallelism={parallelism}",
                                 f"data.global_batch_size={DEVICES}", f"optimizer.total_steps={STEPS}",
                                 "optimizer.grad_clip_norm=0.5", env=env)
        assert code == 0, err
        assert f"training on {DEVICES} devices ({parallelism})" in err
        out[parallelism] = workdir
    return out


def train_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/total_loss" in row]


def test_pmap_logs_the_losses_gradients_and_miou_of_the_sharded_run(runs):
    fsdp, pmap = train_rows(runs["fsdp"]), train_rows(runs["pmap"])
    assert [r["step"] for r in pmap] == [r["step"] for r in fsdp] == [2, 3, 4]
    for a, b in zip(pmap, fsdp):
        for key in ("train/total_loss", "train/focal", "train/dice", "train/iou_loss", "train/grad_norm",
                    "train/learning_rate"):
            assert a[key] == pytest.approx(b[key], rel=RTOL), (a["step"], key)
        for key in (k for k in b if k.startswith("train/miou_iter_")):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    # The clipped norm is what both optimizers saw: 0.5 against a larger raw norm.
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
