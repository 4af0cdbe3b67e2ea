"""experiments/benchmark_inference.py on vit_tiny: the decoder part against the official
code in one run, the chunk sweep beside the library's own choice, and its argument checks."""

from __future__ import annotations

import json

import pytest

from experiments import benchmark_inference
from sam_jax.modeling import inference


def test_decoder_part_and_chunk_sweep(tmp_path, monkeypatch):
    # vit_tiny's 64 prompts fit one CPU chunk; chunks of 2, as vit_b's on the CPU, check that the
    # FLOP count still covers every prompt.
    monkeypatch.setattr(inference, "decoder_chunk", lambda config, num_prompts: min(num_prompts, 2))
    output = tmp_path / "inference.json"
    benchmark_inference.main(["--model-type", "vit_tiny", "--parts", "decoder", "--repeats", "1",
                              "--decoder-chunks", "1,4", "--output", str(output)])
    result = json.loads(output.read_text())
    assert result["cpu"] and result["matmul_gflops_per_s"] > 0 and result["matmul_gflops_per_s_after"] > 0
    for name in ("decoder_1_prompt", "decoder_64_prompts"):
        entry = result[name]
        assert entry["speedup_vs_torch"] == pytest.approx(entry["torch"]["median_s"] / entry["jax"]["median_s"])
        assert entry["flop_floor_s"] == pytest.approx(entry["jax_gflops"] / result["matmul_gflops_per_s"])
        assert entry["jax_over_flop_floor"] == pytest.approx(entry["jax"]["median_s"] / entry["flop_floor_s"])
        assert entry["torch_over_flop_floor"] == pytest.approx(entry["torch"]["median_s"] / entry["flop_floor_s"])
        assert entry["jax_gflops"] == pytest.approx(sum(entry["jax_gflops_by_part"].values()))
        fewer_flops = entry["torch_matmul_conv_gflops"] / entry["jax_gflops"]
        faster_rate = entry["jax_gflops_per_s"] / entry["torch_gflops_per_s"]
        assert entry["speedup_vs_torch"] == pytest.approx(fewer_flops * faster_rate)
    # Every prompt is counted: XLA counts a loop's body once, so decoding in CPU chunks would give
    # about one chunk's FLOPs (plus the upsampling) for the 64 boxes.
    one, many = (result[name]["jax_gflops_by_part"] for name in ("decoder_1_prompt", "decoder_64_prompts"))
    assert many["decoder"] > 32 * one["decoder"] and many["upsampling"] > 32 * one["upsampling"]
    assert result["decoder_64_prompts"]["torch_matmul_conv_gflops"] > 32 * result["decoder_1_prompt"][
        "torch_matmul_conv_gflops"]
    sweep = result["decoder_64_prompts_by_chunk"]
    assert set(sweep["median_s"]) == {"1", "4"} and all(t > 0 for t in sweep["median_s"].values())
    assert sweep["default_chunk"] == 2


@pytest.mark.parametrize("args, problem", [
    (["--decoder-chunks", "2,x"], "comma-separated integers"),
    (["--decoder-chunks", "0"], "positive sizes"),
    (["--parts", "encoder", "--decoder-chunks", "2"], "needs the decoder part"),
    (["--parts", "decoder,wings"], "subset of"),
])
def test_bad_arguments_are_named(args, problem, capsys):
    with pytest.raises(SystemExit):
        benchmark_inference.main(["--model-type", "vit_tiny", *args])
    assert problem in capsys.readouterr().err


def test_flop_counts_match_a_matmul():
    import jax.numpy as jnp
    import torch

    m, k, n = 48, 80, 24
    assert benchmark_inference.xla_flops(lambda a, b: a @ b, jnp.ones((m, k)), jnp.ones((k, n))) == 2 * m * k * n
    linear = torch.nn.Linear(k, n, bias=False)
    x = torch.ones(m, k)
    with torch.no_grad():
        assert benchmark_inference.torch_gflops(lambda: linear(x)) == pytest.approx(2 * m * k * n / 1e9)
