"""experiments/benchmark_train_step.py on the smoke config's micro model: both phases measured, the JSON
consistent, the profiled op time attributed to the model's parts."""

from __future__ import annotations

import json
import math

from experiments import benchmark_train_step
from experiments.benchmark_inference import timed_alternately
from experiments.train_configs import get_config
from test_train_run import MICRO


def test_both_phases_are_timed_with_their_flops(tmp_path):
    output = tmp_path / "step.json"
    overrides = [arg for override in MICRO for arg in ("--set", override)]  # compiles in half the time
    benchmark_train_step.main(["--config", "synthetic_smoke", "--repeats", "2", "--output", str(output),
                               "--profile", str(tmp_path / "trace"), *overrides])
    result = json.loads(output.read_text())
    config = get_config("synthetic_smoke")
    assert result["cpu_model"] and result["matmul_fp32_gflops_per_s"] > 0
    single, full = result["single_prompt"], result["full_loop"]
    # The steps `experiments.train` runs in each phase: one iteration, then the whole loop.
    assert single["iterations"] == 1 and full["iterations"] == config.interactive.num_iterations == 4
    for entry in (single, full):
        assert len(entry["times_s"]) == 2 and entry["min_s"] <= entry["median_s"]
        assert entry["images"] == config.data.global_batch_size
        assert math.isclose(entry["gflops_per_s"], entry["xla_gflops_per_step"] / entry["median_s"])
        assert math.isfinite(entry["loss"]) and entry["loss"] > 0
    # Three more decoder iterations (each with its rematerialised forward) cost FLOPs.
    assert full["xla_gflops_per_step"] > single["xla_gflops_per_step"] > 0
    # The profile: every part of the step found in the trace, the decoder's backward pass (with its
    # rematerialised forward) among them, the later iterations' prompt sampling.
    for entry in (single, full):
        parts = entry["profile"]["parts"]
        for part in ("image encoder", "prompt encoder", "mask decoder: two-way transformer",
                     "mask decoder: upscaling, mask products, IoU head", "loss", "optimizer update"):
            assert parts[part]["forward_ms"] + parts[part]["backward_ms"] > 0 and parts[part]["ops"] > 0, part
        assert parts["image encoder"]["backward_ms"] > 0
        decoder = parts["mask decoder: two-way transformer"]
        assert decoder["backward_ms"] > 0 and decoder["forward_ms"] > 0
        assert math.isclose(sum(p["share"] for p in parts.values()), 1.0, abs_tol=0.01)
        assert math.isclose(entry["profile"]["op_ms_per_step"],
                            sum(p["forward_ms"] + p["backward_ms"] for p in parts.values()), rel_tol=0.01)
    sampling_ops = lambda entry: entry["profile"]["parts"].get("prompt sampling", {"ops": 0})["ops"]
    assert sampling_ops(full) > sampling_ops(single)
    assert (full["profile"]["parts"]["mask decoder: two-way transformer"]["ops"]
            > 2 * single["profile"]["parts"]["mask decoder: two-way transformer"]["ops"])


def test_against_times_a_variant_in_the_same_process(tmp_path):
    output = tmp_path / "step.json"
    overrides = [arg for override in MICRO for arg in ("--set", override)]
    benchmark_train_step.main(["--config", "synthetic_smoke", "--phases", "single_prompt", "--repeats", "3",
                               "--output", str(output), *overrides, "--against", "interactive.image_groups=2"])
    result = json.loads(output.read_text())
    assert result["against"] == ["interactive.image_groups=2"] and "full_loop" not in result
    entry = result["single_prompt"]
    variant = entry["against"]
    assert len(entry["times_s"]) == len(variant["times_s"]) == 3
    assert math.isclose(entry["speedup_vs_against"], variant["median_s"] / entry["median_s"])
    # The variant is its own program (the decoder called once per image) with the same losses.
    assert variant["xla_gflops_per_step"] != entry["xla_gflops_per_step"]
    assert math.isclose(variant["loss"], entry["loss"], rel_tol=1e-5)


def test_timed_alternately_alternates():
    calls = []
    entries = timed_alternately([lambda: calls.append("a"), lambda: calls.append("b")], 3)
    assert calls == ["a", "b"] * 3
    assert [len(entry["times_s"]) for entry in entries] == [3, 3]
