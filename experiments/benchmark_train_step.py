"""The training step's speed, phase by phase: step time, XLA FLOPs and achieved GFLOP/s, as JSON.

    python -m experiments.benchmark_train_step                              # synthetic_cpu, both phases
    python -m experiments.benchmark_train_step --repeats 20 --set model.encoder.patch_size=8
    python -m experiments.benchmark_train_step --profile workdir/step_trace  # + a trace, time by model part
    python -m experiments.benchmark_train_step --against interactive.image_groups=1  # against a variant

Times the step that `experiments.train` compiles for each phase of a config: "single_prompt" (the
loop's first iteration only, what `single_prompt_steps` train) and "full_loop" (all interactive
iterations), one device, on a fixed batch shaped as the input pipeline yields it (rectangles as
masks: a step's cost depends on shapes, not on the pixels). Steps feed their state on, as in
training; compiling and the first call are not timed. FLOPs are XLA's cost analysis of the step
(the rematerialised forward passes and every loop iteration included: `host.xla_flops`); the
host's CPU model and fp32 matmul rate, measured in the same run, are recorded beside them.
`--against` compiles a variant of the config too and alternates the two steps' timed calls, for
changes smaller than the drift of a host's speed over minutes. Like `experiments.train`, it
re-executes itself with glibc's huge-page malloc tunable.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import time
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional

import jax
import numpy as np

from experiments.benchmark_inference import timed_alternately
from experiments.train import restart_with_huge_pages
from experiments.train_configs import get_config
from sam_jax.host import cpu_model, matmul_rate
from sam_jax.training.loop import build_model, initial_params, step_flops
from sam_jax.training.train_step import create_train_state, make_train_step

PHASES = ("single_prompt", "full_loop")


def train_batch(config, batch_size: int, seed: int = 0) -> dict:
    """A batch as the input pipeline hands it to the step: rectangles as masks, their boxes."""
    p = config.data.preprocess
    t, low, m = p.image_size, p.low_res_size, p.max_masks
    rng = np.random.default_rng(seed)
    masks = np.zeros((batch_size, m, t, t), bool)
    boxes = np.zeros((batch_size, m, 4), np.float32)
    points = np.zeros((batch_size, m, 2), np.float32)
    for i in range(batch_size):
        for j in range(m):
            w, h = rng.integers(t // 16, t // 3, 2)
            x0, y0 = rng.integers(0, t - w), rng.integers(0, t - h)
            masks[i, j, y0:y0 + h, x0:x0 + w] = True
            boxes[i, j] = (x0, y0, x0 + w, y0 + h)
            points[i, j] = (x0 + w / 2, y0 + h / 2)
    batch = {
        "image": rng.integers(0, 256, (batch_size, t, t, 3), dtype=np.uint8),
        "image_size": np.full((batch_size, 2), t, np.int32),
        "masks_low_res": masks.reshape(batch_size, m, low, t // low, low, t // low).mean(axis=(3, 5)) >= 0.5,
        "boxes": boxes, "points": points, "point_valid": np.ones((batch_size, m), bool),
        "mask_valid": np.ones((batch_size, m), bool), "image_id": np.arange(batch_size, dtype=np.int32),
    }
    if p.input_res_masks:
        batch["masks"] = masks
    return batch


class PreparedStep(NamedTuple):
    run: Callable[[], dict]  # runs a step, feeding the state on as training does; returns its metrics when ready
    flops: float  # XLA's count per step, every loop iteration counted (`loop.step_flops`)
    compile_s: float
    hlo: str  # the compiled step's optimised HLO (names and op_name metadata of what a trace shows)


def prepare_step(config, interactive, batch_size: int) -> PreparedStep:
    """The jitted train step of `interactive` for `config`, compiled ahead of time on a fixed
    `train_batch`."""
    model = build_model(config)
    state = create_train_state(initial_params(config, model), config.optimizer, config.model, config.seed)
    step = jax.jit(make_train_step(model, config.optimizer, interactive), donate_argnums=(0,))
    batch = jax.device_put(train_batch(config, batch_size))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = step_flops(model, config.optimizer, interactive, state, batch)
    holder = {"state": state}

    def one_step() -> dict:
        holder["state"], metrics = compiled(holder["state"], batch)
        return jax.block_until_ready(metrics)

    return PreparedStep(one_step, flops, compile_s, compiled.as_text())


# Where a step's time goes: the first pattern that an op's `op_name` metadata matches names its part.
# The library marks the loss, the prompt sampling and the optimizer update with `jax.named_scope`.
STEP_PARTS = (
    ("image encoder", r"image_encoder"),
    ("prompt encoder", r"prompt_encoder"),
    ("mask decoder: two-way transformer", r"mask_decoder/.*transformer/"),
    ("mask decoder: upscaling, mask products, IoU head", r"mask_decoder"),
    ("loss", r"/loss/"),
    ("prompt sampling", r"/prompt_sampling/"),
    ("optimizer update", r"/optimizer/"),
)
PROFILED_STEPS = 3


def op_time_by_part(trace_dir: Path, hlo: str, steps: int) -> dict:
    """Per step, the op time of a `jax.profiler` trace (with a Perfetto JSON) of `steps` steps of the
    compiled step whose HLO is `hlo`, by model part (`STEP_PARTS`) and pass: "forward", or "backward"
    (the gradient, with the forward passes that rematerialisation recomputes for it). Times are summed
    over the runtime's threads, so they add up to more than the wall time when ops run side by side;
    "unattributed" is what carries no op_name (copies, loop control)."""
    traces = sorted(trace_dir.glob("**/*.trace.json.gz"), key=lambda path: path.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no Perfetto trace (*.trace.json.gz) under {trace_dir}")
    op_names = dict(re.findall(r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]+)"', hlo, re.M))
    instructions = set(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = ", hlo, re.M))
    totals: dict = {}
    with gzip.open(traces[-1]) as f:
        events = json.load(f)["traceEvents"]
    for event in events:
        if event.get("ph") != "X" or event.get("name") not in instructions:
            continue
        op_name = op_names.get(event["name"])
        if op_name is None:
            part, direction = "unattributed", "forward"
        else:
            part = next((name for name, pattern in STEP_PARTS if re.search(pattern, op_name)), "other")
            direction = "backward" if "transpose(" in op_name else "forward"
        entry = totals.setdefault(part, {"forward_ms": 0.0, "backward_ms": 0.0, "ops": 0})
        entry[f"{direction}_ms"] += event["dur"] / 1e3 / steps
        entry["ops"] += 1
    for entry in totals.values():
        entry.update(forward_ms=round(entry["forward_ms"], 2), backward_ms=round(entry["backward_ms"], 2),
                     ops=round(entry["ops"] / steps))
    total = sum(entry["forward_ms"] + entry["backward_ms"] for entry in totals.values())
    parts = dict(sorted(totals.items(), key=lambda item: -(item[1]["forward_ms"] + item[1]["backward_ms"])))
    for entry in parts.values():
        entry["share"] = round((entry["forward_ms"] + entry["backward_ms"]) / total, 3)
    return {"op_ms_per_step": round(total, 1), "ops_per_step": sum(e["ops"] for e in parts.values()),
            "parts": parts}


def bench_phase(config, phase: str, repeats: int, profile_dir: Optional[str], against=None) -> dict:
    """The phase's step timed; with `against` (a second config), that config's step too, compiled in
    the same process and timed in alternation with it (the entry's "against")."""
    configs = [config] if against is None else [config, against]
    interactives = [c.interactive_at(1 if phase == "single_prompt" else c.total_steps) for c in configs]
    prepared = [prepare_step(c, i, c.data.global_batch_size) for c, i in zip(configs, interactives)]
    firsts = [p.run() for p in prepared]  # the first call of a compiled step still allocates; not timed
    entries = []
    for c, interactive, step, first, timing in zip(configs, interactives, prepared, firsts,
                                                   timed_alternately([p.run for p in prepared], repeats)):
        entries.append({
            "iterations": interactive.num_iterations,
            "images": c.data.global_batch_size,
            "masks_per_image": c.data.preprocess.max_masks,
            "compile_s": round(step.compile_s, 2),
            **timing,
            "xla_gflops_per_step": step.flops / 1e9,
            "gflops_per_s": step.flops / timing["median_s"] / 1e9,
            "loss": float(first["total_loss"]),
        })
    entry = entries[0]
    if against is not None:
        entry["against"] = entries[1]
        entry["speedup_vs_against"] = entries[1]["median_s"] / entry["median_s"]
    if profile_dir:
        trace_dir = Path(profile_dir) / phase
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(PROFILED_STEPS):
                prepared[0].run()
        entry["profile"] = op_time_by_part(trace_dir, prepared[0].hlo, PROFILED_STEPS)
    return entry


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="synthetic_cpu", help="a name from experiments/train_configs.py")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per phase")
    parser.add_argument("--profile", help="write a jax.profiler trace of 3 more steps per phase here, and their op "
                                          "time by model part to the JSON")
    parser.add_argument("--against", action="append", default=[], metavar="PATH=VALUE",
                        help="also time the config with these overrides added (after --set's), compiled in the "
                             "same process, its steps alternating with the config's; the JSON gives its times "
                             "and the config's speed-up over it")
    parser.add_argument("--output", help="default workdir/benchmarks/train_step_<config>.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    config = get_config(args.config, tuple(args.overrides))
    against = get_config(args.config, (*args.overrides, *args.against)) if args.against else None
    result = {
        "config": args.config, "overrides": args.overrides, "against": args.against, "model": config.model.name,
        "cpu_model": cpu_model(), "devices": str(jax.devices()[0].device_kind),
        "matmul_fp32_gflops_per_s": round(matmul_rate(2048, 5) / 1e9, 1),
    }
    for phase in args.phases:
        result[phase] = bench_phase(config, phase, args.repeats, args.profile, against)
        entry = result[phase]
        for name, e in ((phase, entry), (f"{phase} with {' '.join(args.against)}", entry.get("against"))):
            if e is not None:
                print(f"{name}: {e['median_s'] * 1e3:.1f} ms/step (min {e['min_s'] * 1e3:.1f}), "
                      f"{e['xla_gflops_per_step']:.2f} GFLOP, {e['gflops_per_s']:.1f} GFLOP/s, "
                      f"compile {e['compile_s']} s", flush=True)
        if against is not None:
            print(f"  speed-up over it: {entry['speedup_vs_against']:.3f}x (medians, alternating calls)")
        for part, times in entry.get("profile", {}).get("parts", {}).items():
            print(f"  {part}: {times['forward_ms']:.1f} ms forward + {times['backward_ms']:.1f} ms backward "
                  f"({times['share']:.0%} of the op time, {times['ops']} ops)")
    result["matmul_fp32_gflops_per_s_after"] = round(matmul_rate(2048, 5) / 1e9, 1)
    output = Path(args.output or f"workdir/benchmarks/train_step_{args.config}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"matmul {result['matmul_fp32_gflops_per_s']} GFLOP/s on {result['cpu_model']}; wrote {output}")
    return result


if __name__ == "__main__":
    restart_with_huge_pages()
    main()
