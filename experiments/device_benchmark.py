"""One accelerator benchmark, sized for a few minutes on one H100/H200: writes one JSON.

    bash experiments/device_benchmark.sh                       (on the GPU machine; installs carried wheels)
    python -m experiments.device_benchmark --tiny              (the same sections on the CPU, tiny model)

Sections, in this order, timed against `--budget-s` (the encoder's measurements
leave `--reserve-s` of it to the later sections, the train step starts only with
`--train-min-s` left; what would start past it is recorded as skipped, and the
JSON is rewritten after each section):
  matmul      the bf16 (n, n) @ (n, n) rate JAX reaches on the device;
  encoder     sam_jax image-encoder throughput in bf16 at each batch size, for
              each attention path (`sam_jax.modeling.attention`: "xla",
              "dot_product", "flash", "auto" and what "auto" resolved to), and the
              official PyTorch model in bf16 on the same device and weights;
  amg         `SamAutomaticMaskGenerator.generate` on one 768x1024 image, default
              settings, sam_jax (bf16, "auto") and the official code (fp32: it
              turns its tensors into numpy, which has no bf16);
  train       the vit_b train step at 1024 (bf16, scanned and rematerialised
              blocks, the full 11-iteration loop, 64 masks per image), per-device
              batch 8; model-FLOP utilisation = XLA's cost-analysis FLOPs per step
              / step time / the measured bf16 matmul rate.
Weights are random official-layout ones (no downloads), converted with
`checkpoints_convert`. Timings are medians over `--repeats` after a warm-up
(compile times reported apart).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmark_inference import ORIGINAL_SIZE, encoder_flops, first_run, official_module
from experiments.benchmark_inference import timed as median_times
from experiments.sample_image import synthetic_image
from experiments.train_configs import get_config as get_train_config
from sam_jax.configs import CONFIGS, get_config
from sam_jax.host import cpu_model, matmul_rate
from sam_jax.modeling import Sam
from sam_jax.modeling.attention import resolve_attention_impl

IMPLS = ("xla", "dot_product", "flash", "auto")


class Budget:
    """Seconds left of the run; sections that would start past the end are skipped."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def timed(fn, repeats: int) -> dict:
    """Warm-up (compile) time, then `benchmark_inference.timed`'s median and spread of `repeats` calls."""
    return {"first_s": round(first_run(fn), 4), **median_times(fn, repeats)}


def official_model(config, device: str):
    """The official model with random weights, and the same weights as sam_jax params (fp32)."""
    import torch

    from checkpoints_convert import reference_model
    from checkpoints_convert.official import official_to_flax

    torch.manual_seed(0)
    reference = reference_model.build_official_for(config).eval()
    params = official_to_flax(reference_model.state_dict_numpy(reference), config)
    return reference.to(device=device, dtype=torch.bfloat16), params


def resolved_paths(config, impl: str) -> dict:
    """What `impl` runs for the windowed and the global blocks on this backend (bf16)."""
    e = config.encoder
    head_dim = e.embed_dim // e.num_heads
    resolve = lambda windowed, grid: resolve_attention_impl(impl, windowed=windowed, dtype=jnp.bfloat16,
                                                            head_dim=head_dim, grid=grid)
    return {"windowed": resolve(True, (e.window_size,) * 2), "global": resolve(False, (e.grid_size,) * 2)}


def bench_encoder(result, name, config, params, reference, args, budget, device):
    import torch

    s = config.image_size
    entries = result.setdefault("encoder", {}).setdefault(name, {})
    for batch in args.batch_sizes:
        images = np.random.default_rng(batch).normal(size=(batch, s, s, 3)).astype(np.float32)
        row = entries.setdefault(f"batch_{batch}", {"gflops": encoder_flops(config, batch) / 1e9})
        for impl in args.impls:
            if budget.left() - args.reserve_s < args.section_min_s:  # keep time for the generator and training
                row[impl] = {"skipped": "budget"}
                continue
            model = Sam(config, dtype=jnp.bfloat16, attention_impl=impl)
            encode = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x, method=Sam.encode_image))
            x = jnp.asarray(images, jnp.bfloat16)
            try:
                entry = timed(lambda: encode(params, x).block_until_ready(), args.repeats)
            except Exception as error:  # an out-of-memory at batch 32 is a result, not the end of the run
                row[impl] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
                continue
            entry.update(images_per_s=batch / entry["median_s"], paths=resolved_paths(config, impl),
                         flop_utilisation=row["gflops"] * 1e9 / entry["median_s"] / result["matmul_bf16_flops_per_s"])
            row[impl] = entry
            print(f"{name} b{batch} {impl}: {entry['images_per_s']:.1f} img/s", flush=True)
        if reference is not None and budget.left() - args.reserve_s >= args.section_min_s:
            torch_x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device=device, dtype=torch.bfloat16)

            def official():
                with torch.no_grad():
                    reference.image_encoder(torch_x)
                if device == "cuda":
                    torch.cuda.synchronize()

            try:
                entry = timed(official, args.repeats)
                entry["images_per_s"] = batch / entry["median_s"]
                row["official_torch"] = entry
                print(f"{name} b{batch} official torch: {entry['images_per_s']:.1f} img/s", flush=True)
            except Exception as error:
                row["official_torch"] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        best = max((v["images_per_s"] for k, v in row.items() if k in IMPLS and "images_per_s" in v), default=None)
        if best and "images_per_s" in row.get("official_torch", {}):
            row["best_sam_jax_over_official"] = best / row["official_torch"]["images_per_s"]


def bench_amg(result, config, params, reference, args):
    import torch

    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator

    image = synthetic_image(*ORIGINAL_SIZE, seed=0)
    ours = SamAutomaticMaskGenerator(Sam(config, dtype=jnp.bfloat16), params, points_per_side=args.amg_points)

    entry = {"points_per_side": args.amg_points, "sam_jax": timed(lambda: ours.generate(image), args.repeats)}
    if reference is not None:
        # In fp32: the official generator turns its tensors into numpy, which has no bf16.
        official = official_amg_class()(copy.deepcopy(reference).float(), points_per_side=args.amg_points)

        def run_official():
            with torch.no_grad():
                return official.generate(image)

        entry["official_torch"] = timed(run_official, args.repeats)
        entry["official_torch"]["dtype"] = "float32"
        entry["sam_jax_speedup"] = entry["official_torch"]["median_s"] / entry["sam_jax"]["median_s"]
    result["amg"] = entry
    print(f"amg: sam_jax {entry['sam_jax']['median_s']:.3f} s", flush=True)


def official_amg_class():
    """The official generator, on the real torchvision where there is one (the GPU image), else the stand-ins."""
    try:
        import torchvision  # noqa: F401

        from checkpoints_convert import reference_model  # noqa: F401  (registers the bare package)
    except ImportError:
        return official_module("automatic_mask_generator").SamAutomaticMaskGenerator
    return importlib.import_module("segment_anything.automatic_mask_generator").SamAutomaticMaskGenerator


def bench_train(result, args):
    from experiments.benchmark_train_step import prepare_step

    overrides = [f"data.global_batch_size={args.train_batch}", f"attention_impl={args.train_attention}",
                 "dtype=bfloat16"]
    config = get_train_config(args.train_config, tuple(overrides + args.train_set))
    one_step, flops, compile_s, _ = prepare_step(config, config.interactive, args.train_batch)
    entry = timed(one_step, args.repeats)
    entry.update(
        config=args.train_config, model=config.model.name, per_device_batch=args.train_batch,
        masks_per_image=config.data.preprocess.max_masks, image_size=config.model.image_size,
        iterations=config.interactive.num_iterations,
        dtype=config.dtype, remat_policy=config.remat_policy, attention=args.train_attention,
        compile_s=round(compile_s, 1), xla_flops_per_step=flops,
        model_flop_utilisation=flops / entry["median_s"] / result["matmul_bf16_flops_per_s"],
        images_per_s=args.train_batch / entry["median_s"],
    )
    result["train"] = entry
    print(f"train: {entry['median_s']:.3f} s/step, MFU {entry['model_flop_utilisation']:.2%}", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="the CPU check: vit_tiny, batch 1 and 2, synthetic_smoke training (one prompt iteration), small matmul")
    parser.add_argument("--model-types", nargs="+", default=["vit_b", "vit_h"], choices=sorted(CONFIGS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", nargs="+", default=["encoder", "amg", "train"],
                        choices=["encoder", "amg", "train"])
    parser.add_argument("--no-official", action="store_true", help="skip the official PyTorch timings")
    parser.add_argument("--amg-points", type=int, default=32, help="points_per_side of the generator")
    parser.add_argument("--train-config", default="vit_b", help="a config of experiments/train_configs.py")
    parser.add_argument("--train-batch", type=int, default=8, help="images per step (one device)")
    parser.add_argument("--train-attention", default="auto", choices=IMPLS)
    parser.add_argument("--train-set", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections after this")
    parser.add_argument("--section-min-s", type=float, default=20.0, help="a measurement needs this much budget left")
    parser.add_argument("--reserve-s", type=float, default=150.0,
                        help="budget the encoder measurements leave for the generator and the train step")
    parser.add_argument("--train-min-s", type=float, default=100.0,
                        help="the train step (compile included) starts only with this much budget left")
    parser.add_argument("--output", type=Path, default=Path("workdir/benchmarks/device_benchmark.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.model_types, args.batch_sizes, args.repeats, args.amg_points = ["vit_tiny"], [1, 2], 2, 4
        args.train_config, args.train_batch, args.matmul_size = "synthetic_smoke", 2, 512
        args.train_set = ["interactive.num_correction_points=0", "interactive.num_mask_only=0"] + args.train_set
    budget = Budget(args.budget_s)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    result = {
        "date": time.strftime("%Y-%m-%d"), "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "device_count": jax.device_count(), "host_cpu": cpu_model(),
        "jax": jax.__version__, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "matmul_bf16_flops_per_s": matmul_rate(args.matmul_size, 10, jnp.bfloat16),
        "skipped": [], "errors": {},
    }
    print(f"{result['device']}: bf16 matmul {result['matmul_bf16_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def section(name, fn, min_s=args.section_min_s):
        if budget.left() < min_s:
            result["skipped"].append(name)
        else:
            try:
                fn()
            except Exception:  # keep the other sections' figures
                result["errors"][name] = traceback.format_exc(limit=4)[-2000:]
                print(f"{name} failed:\n{result['errors'][name]}", flush=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    if not args.no_official:
        import torch

        result["torch"] = torch.__version__
    models = {}
    for name in args.model_types:
        config = get_config(name)
        reference, params = official_model(config, device) if not args.no_official else (None, None)
        if params is None:
            params = Sam(config).init(jax.random.PRNGKey(0), jnp.zeros((1, config.image_size, config.image_size, 3)),
                                      method=Sam.encode_image)["params"]
        models[name] = (config, jax.device_put(params), reference)
        if "encoder" in args.sections:
            section(f"encoder_{name}", lambda: bench_encoder(result, name, *models[name], args, budget, device))
    if "amg" in args.sections:
        config, params, reference = models[args.model_types[0]]
        section("amg", lambda: bench_amg(result, config, params, reference, args))
    if "train" in args.sections:
        section("train", lambda: bench_train(result, args), args.train_min_s)
    result["seconds"] = round(args.budget_s - budget.left(), 1)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
