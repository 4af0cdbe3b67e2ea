"""experiments/benchmark_inference.py on vit_tiny: the decoder part against the official
code in one run, the chunk sweep beside the library's own choice, and its argument checks."""

from __future__ import annotations

import json

import pytest

from experiments import benchmark_inference
from sam_jax.configs import CONFIGS
from sam_jax.modeling import inference


def test_decoder_part_and_chunk_sweep(tmp_path):
    output = tmp_path / "inference.json"
    benchmark_inference.main(["--model-type", "vit_tiny", "--parts", "decoder", "--repeats", "1",
                              "--decoder-chunks", "1,4", "--output", str(output)])
    result = json.loads(output.read_text())
    assert result["cpu"] and result["matmul_gflops_per_s"] > 0 and result["matmul_gflops_per_s_after"] > 0
    for name in ("decoder_1_prompt", "decoder_64_prompts"):
        entry = result[name]
        assert entry["speedup_vs_torch"] == pytest.approx(entry["torch"]["median_s"] / entry["jax"]["median_s"])
    sweep = result["decoder_64_prompts_by_chunk"]
    assert set(sweep["median_s"]) == {"1", "4"} and all(t > 0 for t in sweep["median_s"].values())
    assert sweep["default_chunk"] == inference.decoder_chunk(CONFIGS["vit_tiny"], 64)


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
