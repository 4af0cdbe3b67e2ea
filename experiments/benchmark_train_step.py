"""The training step's speed, phase by phase: step time, XLA FLOPs and achieved GFLOP/s, as JSON.

    python -m experiments.benchmark_train_step                              # synthetic_cpu, both phases
    python -m experiments.benchmark_train_step --repeats 20 --set model.encoder.patch_size=8
    python -m experiments.benchmark_train_step --profile workdir/step_trace  # + a jax.profiler trace

Times the step that `experiments.train` compiles for each phase of a config: "single_prompt" (the
loop's first iteration only, what `single_prompt_steps` train) and "full_loop" (all interactive
iterations), one device, on a fixed batch shaped as the input pipeline yields it (rectangles as
masks: a step's cost depends on shapes, not on the pixels). Steps feed their state on, as in
training; the first (compiling) call is not timed. FLOPs are XLA's cost analysis of the compiled
step (the rematerialised forward passes included); the host's CPU model and fp32 matmul rate,
measured in the same run, are recorded beside them. Like `experiments.train`, it re-executes itself
with glibc's huge-page malloc tunable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import List, Optional

import jax

from experiments.device_benchmark import train_batch
from experiments.train import restart_with_huge_pages
from experiments.train_configs import get_config
from sam_jax.host import cpu_model, matmul_rate
from sam_jax.training.loop import build_model, compile_step, initial_params
from sam_jax.training.train_step import create_train_state, make_train_step

PHASES = ("single_prompt", "full_loop")


def bench_phase(config, phase: str, repeats: int, profile_dir: Optional[str]) -> dict:
    interactive = config.interactive_at(1 if phase == "single_prompt" else config.total_steps)
    model = build_model(config)
    state = create_train_state(initial_params(config, model), config.optimizer, config.model, config.seed)
    step = jax.jit(make_train_step(model, config.optimizer, interactive), donate_argnums=(0,))
    batch = jax.device_put(train_batch(config, config.data.global_batch_size))
    start = time.perf_counter()
    compiled, flops = compile_step(step, state, batch)
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    if profile_dir:
        with jax.profiler.trace(str(Path(profile_dir) / phase)):
            for _ in range(3):
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
    median = statistics.median(times)
    return {
        "iterations": interactive.num_iterations,
        "images": config.data.global_batch_size,
        "masks_per_image": config.data.preprocess.max_masks,
        "compile_s": round(compile_s, 2),
        "median_s": median,
        "min_s": min(times),
        "times_s": times,
        "xla_gflops_per_step": flops / 1e9,
        "gflops_per_s": flops / median / 1e9,
        "loss": float(metrics["total_loss"]),
    }


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="synthetic_cpu", help="a name from experiments/train_configs.py")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per phase")
    parser.add_argument("--profile", help="write a jax.profiler trace of 3 more steps per phase here")
    parser.add_argument("--output", help="default workdir/benchmarks/train_step_<config>.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    config = get_config(args.config, tuple(args.overrides))
    result = {
        "config": args.config, "overrides": args.overrides, "model": config.model.name,
        "cpu_model": cpu_model(), "devices": str(jax.devices()[0].device_kind),
        "matmul_fp32_gflops_per_s": round(matmul_rate(2048, 5) / 1e9, 1),
    }
    for phase in args.phases:
        result[phase] = bench_phase(config, phase, args.repeats, args.profile)
        entry = result[phase]
        print(f"{phase}: {entry['median_s'] * 1e3:.1f} ms/step (min {entry['min_s'] * 1e3:.1f}), "
              f"{entry['xla_gflops_per_step']:.2f} GFLOP, {entry['gflops_per_s']:.1f} GFLOP/s, "
              f"compile {entry['compile_s']} s", flush=True)
    result["matmul_fp32_gflops_per_s_after"] = round(matmul_rate(2048, 5) / 1e9, 1)
    output = Path(args.output or f"workdir/benchmarks/train_step_{args.config}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"matmul {result['matmul_fp32_gflops_per_s']} GFLOP/s on {result['cpu_model']}; wrote {output}")
    return result


if __name__ == "__main__":
    restart_with_huge_pages()
    main()
