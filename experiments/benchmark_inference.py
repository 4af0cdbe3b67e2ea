"""Inference speed: sam_jax vs the official PyTorch code, same machine, same run.

    python -m experiments.benchmark_inference --model-type vit_b --repeats 3

Measures, on the same random official-layout weights, fp32, with the same
thread count for both:
  encoder     image-encoder latency at batch 1 and throughput at batch 4;
  decoder     `predict` with 1 point and `predict_torch`/`predict_batch` with
              64 boxes on a set 768x1024 image: prompt transform, decoder,
              upsampling to the original size, threshold, numpy masks;
  amg         `SamAutomaticMaskGenerator.generate` on one 768x1024 image with
              the default 32x32 grid (encoder included), with the default
              thresholds and with thresholds at 0 (every mask survives to NMS
              and RLE: random weights rarely pass the defaults).
Each decoder row also has its FLOP floor: XLA's count of what sam_jax computes (the decoder
on the predictor's padded prompts, all in one chunk, and the upsampling to the original size)
over the matmul rate, and beside it the matmul and conv FLOPs PyTorch's FLOP counter sees in the
official call (it computes more: its cross-attentions project every image token), so a ratio
splits into fewer FLOPs and a faster rate, host by host.
With `--decoder-chunks 1,2,4,8,16,64` the decoder part also times the 64
boxes' decoder alone (low-res masks, no upsampling) at each number of
prompts per CPU chunk (`inference.decode_in_chunks`), beside the size the
library picks on this host (`inference.decoder_chunk`): how a host's caches
move the best chunk.
Every timing is a median over `--repeats` runs after a warm-up run (which
includes JAX compilation, reported separately). The FLOP floor is the
encoder's FLOPs over the fp32 matmul rate measured in this run. Writes JSON
(default workdir/benchmarks/inference_<model>.json).

Runs from a source checkout: the official predictor and generator import
torchvision, and the tests' stand-ins for it (`tests/stand_ins`) take its place.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.sample_image import synthetic_image
from sam_jax.configs import CONFIGS, SamConfig
from sam_jax.host import cpu_model, matmul_rate, xla_flops
from sam_jax.modeling import Sam

PARTS = ("encoder", "decoder", "amg")
ORIGINAL_SIZE = (768, 1024)  # (H, W) of the decoder and AMG image
STAND_INS = Path(__file__).resolve().parents[1] / "tests" / "stand_ins"


def official_module(name: str):
    """An official segment_anything module that imports torchvision, on the tests' stand-ins."""
    from checkpoints_convert import reference_model

    return reference_model.official_module(name, STAND_INS)


def encoder_flops(config: SamConfig, batch: int) -> float:
    """2 x multiply-adds of the image encoder as the original computes it: dense layers,
    attention, rel-pos terms, convs (qkv and proj over the zero-padded windows)."""
    e = config.encoder
    c, g, w = e.embed_dim, e.grid_size, e.window_size
    tokens = g * g
    padded_tokens = (-(-g // w) * w) ** 2  # windowed blocks attend over the padded grid
    flops = 2 * tokens * 3 * e.patch_size**2 * c  # patch embedding
    for i in range(e.depth):
        span, side = (tokens, g) if i in e.global_attn_indexes else (w * w, w)
        queries = tokens if i in e.global_attn_indexes else padded_tokens
        flops += 2 * queries * 4 * c * c  # qkv and proj
        flops += 2 * tokens * 2 * c * int(c * e.mlp_ratio)  # MLP
        flops += 2 * 2 * queries * span * c  # q @ k and attn @ v
        flops += 2 * 2 * queries * side * c  # decomposed rel-pos (h and w)
    flops += 2 * tokens * (c * e.out_chans + 9 * e.out_chans**2)  # neck
    return float(batch * flops)


def timed(fn, repeats: int) -> dict:
    """Median and spread of `repeats` wall-clock runs of fn (after the caller's warm-up)."""
    return timed_alternately([fn], repeats)[0]


def timed_alternately(fns, repeats: int) -> list:
    """`timed` of each of fns, their runs alternating (one of each per round): a host whose speed
    drifts over minutes then moves all of them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [{"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "times_s": t} for t in times]


def first_run(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(result: dict, name: str, ours, official, repeats: int) -> tuple:
    """Warms up and times both callables; records medians and the speed-up. Returns both
    callables' last outputs."""
    outputs = []
    remember = lambda fn: lambda: outputs.append(fn())
    entry = {"jax_first_run_s": first_run(remember(ours)),
             "torch_first_run_s": first_run(remember(official))}
    entry["jax"] = timed(remember(ours), repeats)
    entry["torch"] = timed(remember(official), repeats)
    entry["speedup_vs_torch"] = entry["torch"]["median_s"] / entry["jax"]["median_s"]
    result[name] = entry
    print(f"{name}: sam_jax {entry['jax']['median_s']:.3f} s, torch {entry['torch']['median_s']:.3f} s, "
          f"{entry['speedup_vs_torch']:.2f}x", flush=True)
    return outputs[-1 - repeats], outputs[-1]


def bench_encoder(result, config, model, params, reference, repeats):
    import torch

    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Sam.encode_image))
    s = config.image_size
    for batch in (1, 4):
        images = np.random.default_rng(batch).normal(size=(batch, s, s, 3)).astype(np.float32)
        x = jnp.asarray(images)
        torch_x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        name = f"encoder_b{batch}"
        with torch.no_grad():
            compare(result, name, lambda: encode(params, x).block_until_ready(),
                    lambda: reference.image_encoder(torch_x), repeats)
        entry = result[name]
        entry["gflops"] = encoder_flops(config, batch) / 1e9
        entry["flop_floor_s"] = entry["gflops"] / result["matmul_gflops_per_s"]
        entry["jax_over_flop_floor"] = entry["jax"]["median_s"] / entry["flop_floor_s"]
        entry["torch_over_flop_floor"] = entry["torch"]["median_s"] / entry["flop_floor_s"]
        entry["jax_images_per_s"] = batch / entry["jax"]["median_s"]
        entry["torch_images_per_s"] = batch / entry["torch"]["median_s"]


def bench_decoder(result, model, params, reference, repeats, chunks=()):
    import torch

    from sam_jax.predictor import SamPredictor

    image = synthetic_image(*ORIGINAL_SIZE, seed=0)
    ours = SamPredictor(model, params)
    ours.set_image(image)
    official = official_module("predictor").SamPredictor(reference)
    with torch.no_grad():
        official.set_image(image)
    h, w = ORIGINAL_SIZE
    point, label = np.array([[w * 0.4, h * 0.6]]), np.array([1])
    rng = np.random.default_rng(0)
    corners = np.sort(rng.uniform(0, 1, (64, 2, 2)), axis=1) * [w, h]
    boxes = corners.reshape(64, 4)  # XYXY

    def official_64():
        torch_boxes = official.transform.apply_boxes_torch(torch.from_numpy(boxes).float(), (h, w))
        masks, iou, low_res = official.predict_torch(None, None, torch_boxes, multimask_output=True)
        return masks.numpy(), iou.numpy(), low_res.numpy()

    with torch.no_grad():
        compare(result, "decoder_1_prompt",
                lambda: ours.predict(point, label, multimask_output=True),
                lambda: official.predict(point, label, multimask_output=True), repeats)
        compare(result, "decoder_64_prompts",
                lambda: ours.predict_batch(boxes=boxes, multimask_output=True), official_64, repeats)
        add_flop_floor(result["decoder_1_prompt"], result["matmul_gflops_per_s"],
                       decoder_gflops(model, params, ours, point[None], label[None], None),
                       torch_gflops(lambda: official.predict(point, label, multimask_output=True)))
        add_flop_floor(result["decoder_64_prompts"], result["matmul_gflops_per_s"],
                       decoder_gflops(model, params, ours, None, None, boxes), torch_gflops(official_64))
    result["decoder_64_prompts"]["masks_shape"] = [64, 3, h, w]
    if chunks:
        sweep_decoder_chunks(result, model, params, ours, boxes, chunks, repeats)


def decoder_gflops(model, params, predictor, coords, labels, boxes) -> dict:
    """XLA's GFLOPs of one multimask `predict_batch` call on these prompts: the decoder on the
    padded prompts in one chunk and the thresholded upsampling to the original size. The CPU's
    chunks run the same decoder in a loop, out of which XLA hoists the work on the image alone
    (the first layer's image projections); counted on the chunks, that work would count once per
    chunk (`host.xla_flops`)."""
    from sam_jax.modeling import inference
    from sam_jax.prompts import bucket, prompt_counts, to_input_frame

    b, n = prompt_counts(coords, labels, boxes, None)
    padded = to_input_frame(predictor.transform, predictor.original_size, coords, labels, boxes, None,
                            bucket(b), bucket(n))
    decode = lambda p, e, x: inference.decode_in_chunks(model, p, e, *x, chunk=bucket(b),
                                                        image_pe=predictor.image_pe)
    low_res = jax.eval_shape(decode, params, predictor.features, padded)[0]
    upsample = lambda x: inference.upsample_masks(x, tuple(predictor.input_size), tuple(predictor.original_size),
                                                  model.config.image_size, model.config.mask_threshold)
    return {"decoder": xla_flops(decode, params, predictor.features, padded) / 1e9,
            "upsampling": xla_flops(upsample, low_res) / 1e9}


def torch_gflops(fn) -> float:
    """GFLOPs of the matmuls and convolutions in one call of `fn`, by PyTorch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def add_flop_floor(entry: dict, matmul_gflops_per_s: float, jax_parts: dict, torch_gflops: float) -> None:
    """sam_jax's FLOPs (by part and in all), their floor at the run's matmul rate and each side's
    time over it."""
    jax_gflops = sum(jax_parts.values())
    entry["jax_gflops_by_part"] = jax_parts
    entry["jax_gflops"] = jax_gflops
    entry["torch_matmul_conv_gflops"] = torch_gflops
    entry["flop_floor_s"] = jax_gflops / matmul_gflops_per_s
    entry["jax_over_flop_floor"] = entry["jax"]["median_s"] / entry["flop_floor_s"]
    entry["torch_over_flop_floor"] = entry["torch"]["median_s"] / entry["flop_floor_s"]
    # speed-up = (torch_gflops / jax_gflops) x (jax_gflops_per_s / torch_gflops_per_s): fewer FLOPs, faster rate
    entry["jax_gflops_per_s"] = jax_gflops / entry["jax"]["median_s"]
    entry["torch_gflops_per_s"] = torch_gflops / entry["torch"]["median_s"]
    print(f"  {jax_gflops:.2f} GFLOP in sam_jax, {torch_gflops:.2f} in the official matmuls and convs; "
          f"{entry['jax_gflops_per_s']:.1f} against {entry['torch_gflops_per_s']:.1f} GFLOP/s; sam_jax at "
          f"{entry['jax_over_flop_floor']:.2f}x its FLOP floor", flush=True)


def sweep_decoder_chunks(result, model, params, predictor, boxes, chunks, repeats):
    """Times the decoder alone on the 64 boxes at each chunk size (low-res logits out)."""
    from sam_jax.modeling import inference
    from sam_jax.prompts import to_input_frame

    padded = to_input_frame(predictor.transform, predictor.original_size, None, None, boxes, None, len(boxes), 1)
    sweep = {"default_chunk": inference.decoder_chunk(model.config, len(boxes)), "median_s": {}}
    for chunk in chunks:
        decode = jax.jit(lambda p, e, b, pe, c=chunk: inference.decode_in_chunks(model, p, e, boxes=b, chunk=c,
                                                                                image_pe=pe))
        run = lambda: jax.block_until_ready(decode(params, predictor.features, padded[2], predictor.image_pe))
        run()
        sweep["median_s"][str(chunk)] = timed(run, repeats)["median_s"]
        print(f"decoder alone, 64 boxes, chunk {chunk}: {sweep['median_s'][str(chunk)]:.3f} s", flush=True)
    result["decoder_64_prompts_by_chunk"] = sweep


def bench_amg(result, model, params, reference, repeats):
    import torch

    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator

    official_amg = official_module("automatic_mask_generator").SamAutomaticMaskGenerator
    image = synthetic_image(*ORIGINAL_SIZE, seed=0)
    settings = {
        "amg_default_thresholds": {},
        "amg_zero_thresholds": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0),
    }
    for name, kwargs in settings.items():
        ours = SamAutomaticMaskGenerator(model, params, **kwargs)
        official = official_amg(reference, **kwargs)
        with torch.no_grad():
            records = compare(result, name, lambda: ours.generate(image),
                              lambda: official.generate(image), repeats)
        result[name]["records"] = {"jax": len(records[0]), "torch": len(records[1])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=sorted(CONFIGS))
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoder-chunks", default="",
                        help="comma-separated prompts per CPU chunk to time the 64-box decoder at (e.g. 1,2,4,8)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts must be a subset of {PARTS}; got {args.parts!r}")
    try:
        chunks = [int(c) for c in args.decoder_chunks.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--decoder-chunks must be comma-separated integers; got {args.decoder_chunks!r}")
    if any(c < 1 for c in chunks) or (chunks and "decoder" not in parts):
        parser.error(f"--decoder-chunks takes positive sizes and needs the decoder part; got {args.decoder_chunks!r}"
                     f" with --parts {args.parts}")

    import torch

    from checkpoints_convert import reference_model
    from checkpoints_convert.official import official_to_flax

    config = CONFIGS[args.model_type]
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    reference = reference_model.build_official_for(config).eval().requires_grad_(False)
    params = official_to_flax(reference_model.state_dict_numpy(reference), config)
    model = Sam(config)
    result = {
        "model_type": args.model_type, "repeats": args.repeats, "dtype": "float32",
        "threads": threads, "cpu": cpu_model(),
        "jax": jax.__version__, "backend": jax.default_backend(), "torch": torch.__version__,
        "matmul_gflops_per_s": matmul_rate() / 1e9,
    }
    output = args.output or Path("workdir/benchmarks") / f"inference_{args.model_type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    benches = {"encoder": lambda: bench_encoder(result, config, model, params, reference, args.repeats),
               "decoder": lambda: bench_decoder(result, model, params, reference, args.repeats, chunks),
               "amg": lambda: bench_amg(result, model, params, reference, args.repeats)}
    for part in parts:
        benches[part]()
        output.write_text(json.dumps(result, indent=2) + "\n")  # a long run keeps what it measured
    return finish(result, output)


def finish(result: dict, output: Path) -> dict:
    """Measures the matmul rate again (it drifts on shared machines), writes and prints the JSON."""
    result["matmul_gflops_per_s_after"] = matmul_rate() / 1e9
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
