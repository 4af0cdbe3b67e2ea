"""experiments/device_benchmark.py, run as on a GPU but with `--tiny` on this CPU: every section measures."""

from __future__ import annotations

import json

from experiments import device_benchmark


def test_tiny_device_benchmark_measures_every_section(tmp_path):
    output = tmp_path / "bench.json"
    device_benchmark.main(["--tiny", "--output", str(output), "--budget-s", "3000"])
    result = json.loads(output.read_text())
    assert result["errors"] == {} and result["skipped"] == []
    assert result["backend"] == "cpu" and result["matmul_bf16_flops_per_s"] > 0
    for batch in ("batch_1", "batch_2"):
        row = result["encoder"]["vit_tiny"][batch]
        for impl in device_benchmark.IMPLS:
            assert row[impl]["images_per_s"] > 0, (batch, impl)
        # What each path ran: on the CPU "auto" is the XLA path for both kinds of block.
        assert row["auto"]["paths"] == {"windowed": "xla", "global": "xla"}
        assert row["flash"]["paths"] == {"windowed": "flash", "global": "flash"}
        assert row["official_torch"]["images_per_s"] > 0
        assert row["best_sam_jax_over_official"] > 0
    assert result["amg"]["sam_jax"]["median_s"] > 0 and result["amg"]["official_torch"]["median_s"] > 0
    train = result["train"]
    assert train["dtype"] == "bfloat16" and train["per_device_batch"] == 2
    assert train["xla_flops_per_step"] > 0 and 0 < train["model_flop_utilisation"]
