"""Image-encoder speed: sam_jax vs the official PyTorch model, same machine, same run.

    python -m experiments.benchmark_encoder --model-type vit_b --batch 1 --repeats 5

Both run the same random official-layout weights in fp32 on the CPU with the
same thread count; timings are medians after a warm-up (compile) run. The
FLOP floor is the encoder's FLOPs over the matmul rate measured in this run.
Writes JSON (default workdir/benchmarks/encoder_<model>_b<batch>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.configs import CONFIGS, SamConfig
from sam_jax.modeling import Sam


def encoder_flops(config: SamConfig, batch: int) -> float:
    """2 x multiply-adds of the image encoder: dense layers, attention, rel-pos terms, convs."""
    e = config.encoder
    c, g, w = e.embed_dim, e.grid_size, e.window_size
    tokens = g * g
    padded_tokens = (-(-g // w) * w) ** 2  # windowed blocks attend over the padded grid
    flops = 2 * tokens * 3 * e.patch_size**2 * c  # patch embedding
    for i in range(e.depth):
        span, side = (tokens, g) if i in e.global_attn_indexes else (w * w, w)
        queries = tokens if i in e.global_attn_indexes else padded_tokens
        flops += 2 * queries * 4 * c * c  # qkv and proj (on the padded windows, as the original)
        flops += 2 * tokens * 2 * c * int(c * e.mlp_ratio)  # MLP
        flops += 2 * 2 * queries * span * c  # q @ k and attn @ v
        flops += 2 * 2 * queries * side * c  # decomposed rel-pos (h and w)
    flops += 2 * tokens * (c * e.out_chans + 9 * e.out_chans**2)  # neck
    return float(batch * flops)


def matmul_rate(n: int = 4096, repeats: int = 5) -> float:
    """Measured fp32 JAX matmul rate, FLOP/s."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * n**3 / median_seconds(lambda: f(a).block_until_ready(), repeats)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-torch", action="store_true", help="time sam_jax only")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    config = CONFIGS[args.model_type]
    threads = os.cpu_count()
    s = config.image_size
    images = np.random.default_rng(0).normal(size=(args.batch, s, s, 3)).astype(np.float32)
    result = {
        "model_type": args.model_type, "batch": args.batch, "repeats": args.repeats,
        "dtype": "float32", "threads": threads, "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "encoder_gflops": encoder_flops(config, args.batch) / 1e9,
    }
    result["matmul_gflops_per_s"] = matmul_rate() / 1e9
    result["flop_floor_s"] = result["encoder_gflops"] / result["matmul_gflops_per_s"]

    if args.skip_torch:
        params = jax.jit(Sam(config).init, static_argnames="method")(
            jax.random.PRNGKey(0), jnp.asarray(images[:1]), method=Sam.encode_image)["params"]
    else:
        import torch

        from checkpoints_convert import reference_model
        from checkpoints_convert.official import official_to_flax

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        reference = reference_model.build_official_for(config)
        params = official_to_flax(reference_model.state_dict_numpy(reference), config)
        torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            run_torch = lambda: reference.image_encoder(torch_images)
            start = time.perf_counter()
            run_torch()
            result["torch_first_run_s"] = time.perf_counter() - start
            result["torch_s"] = median_seconds(run_torch, args.repeats)
        result["torch"] = torch.__version__

    model = Sam(config)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Sam.encode_image))
    x = jnp.asarray(images)
    start = time.perf_counter()
    encode(params, x).block_until_ready()
    result["jax_first_run_s"] = time.perf_counter() - start  # includes compilation
    result["jax_s"] = median_seconds(lambda: encode(params, x).block_until_ready(), args.repeats)
    result["jax_images_per_s"] = args.batch / result["jax_s"]
    result["jax_over_flop_floor"] = result["jax_s"] / result["flop_floor_s"]
    if "torch_s" in result:
        result["speedup_vs_torch"] = result["torch_s"] / result["jax_s"]

    output = args.output or Path("workdir/benchmarks") / f"encoder_{args.model_type}_b{args.batch}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
