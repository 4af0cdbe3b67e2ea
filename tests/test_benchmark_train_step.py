"""experiments/benchmark_train_step.py on the smoke config's micro model: both phases measured, the JSON consistent."""

from __future__ import annotations

import json
import math

from experiments import benchmark_train_step
from experiments.train_configs import get_config
from test_train_run import MICRO


def test_both_phases_are_timed_with_their_flops(tmp_path):
    output = tmp_path / "step.json"
    overrides = [arg for override in MICRO for arg in ("--set", override)]  # compiles in half the time
    benchmark_train_step.main(["--config", "synthetic_smoke", "--repeats", "2", "--output", str(output), *overrides])
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
