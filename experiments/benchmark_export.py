"""Exported models in onnxruntime vs sam_jax's jitted functions vs the official PyTorch code.

    python -m experiments.benchmark_export --model-type vit_b --repeats 3

On the same random official-layout weights, fp32, every runner with all cores:
  export      time to export each format, and the size of every artifact;
  decoder     the official ONNX interface on one 768x1024 image's embedding, with 1 point and
              16 points (plus the pad point): masks at the original size, IoU, low-res masks.
              onnxruntime on sam_jax's decoder.onnx, onnxruntime on the official SamOnnxModel
              exported by torch.onnx (`reference_model.export_official_onnx`, as the tests), sam_jax
              jitted (graphs.official_decoder + postprocess_masks: the same computation), and
              the official SamOnnxModel in PyTorch;
  encoder     one 768x1024 image resized to 1024 (normalise, pad, encode): onnxruntime on
              encoder.onnx, sam_jax's encode_images jitted, the official preprocess + image_encoder.
Timings are medians over `--repeats` runs after a warm-up run (reported separately). Ratios are
runner / onnxruntime-on-ours. Writes JSON (default workdir/benchmarks/export_<model>.json).
Runs from a source checkout (the official modules import torchvision; the tests' stand-ins serve).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmark_inference import STAND_INS, encoder_flops, finish, first_run, timed
from experiments.sample_image import synthetic_image
from sam_jax.configs import CONFIGS
from sam_jax.host import cpu_model, matmul_rate
from sam_jax.modeling import Sam, inference
from sam_jax.modeling.sam import postprocess_masks

ORIGINAL_SIZE = (768, 1024)


def onnx_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def race(result: dict, name: str, runners: dict, repeats: int) -> None:
    """Warms up and times each runner; ratios against the first."""
    entry = {}
    for runner, fn in runners.items():
        entry[runner] = {"first_run_s": first_run(fn), **timed(fn, repeats)}
    base = next(iter(runners))
    for runner in runners:
        entry[runner]["over_" + base] = entry[runner]["median_s"] / entry[base]["median_s"]
    result[name] = entry
    print(f"{name}: " + ", ".join(f"{r} {e['median_s'] * 1e3:.1f} ms" for r, e in entry.items()), flush=True)


def bench_decoder(result, config, model, params, reference, folder, repeats):
    import torch

    from sam_jax.export import graphs

    from checkpoints_convert import reference_model

    reference_model.export_official_onnx(reference, config, folder / "official_decoder.onnx", STAND_INS)
    ours, theirs = onnx_session(folder / "onnx" / "decoder.onnx"), onnx_session(folder / "official_decoder.onnx")
    official = reference_model.official_onnx_model(reference, STAND_INS)
    e, m, s = config.embedding_size, config.low_res_mask_size, config.image_size
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(1, config.prompt_embed_dim, e, e)).astype(np.float32)
    input_size = tuple(int(v * s / max(ORIGINAL_SIZE) + 0.5) for v in ORIGINAL_SIZE)

    @jax.jit
    def sam_jax_decoder(*inputs):
        low_res, iou = model.apply({"params": params}, *inputs, method=graphs.official_decoder)
        return postprocess_masks(low_res, input_size, ORIGINAL_SIZE, s), iou, low_res

    for points in (1, 16):
        coords = np.concatenate([rng.uniform(0, s * 0.7, (1, points, 2)), np.zeros((1, 1, 2))], 1).astype(np.float32)
        labels = np.concatenate([np.ones((1, points)), -np.ones((1, 1))], 1).astype(np.float32)
        feed = {"image_embeddings": embedding, "point_coords": coords, "point_labels": labels,
                "mask_input": np.zeros((1, 1, m, m), np.float32), "has_mask_input": np.zeros(1, np.float32),
                "orig_im_size": np.asarray(ORIGINAL_SIZE, np.float32)}
        jax_inputs = [jnp.asarray(feed[k]) for k in list(feed)[:-1]]
        torch_inputs = [torch.from_numpy(v) for v in feed.values()]

        def official_torch():
            with torch.no_grad():
                return official(*torch_inputs)

        race(result, f"decoder_{points}_points", {
            "onnxruntime_sam_jax_export": lambda: ours.run(None, feed),
            "onnxruntime_official_export": lambda: theirs.run(None, feed),
            "sam_jax_jit": lambda: jax.block_until_ready(sam_jax_decoder(*jax_inputs)),
            "official_pytorch": official_torch}, repeats)


def bench_encoder(result, config, model, params, reference, folder, repeats):
    import torch

    from sam_jax.utils.transforms import ResizeLongestSide, pad_to_square

    image = ResizeLongestSide(config.image_size).apply_image(synthetic_image(*ORIGINAL_SIZE, seed=0))
    session = onnx_session(folder / "onnx" / "encoder.onnx")
    batch, sizes = (jnp.asarray(x) for x in pad_to_square([image], config.image_size, 1))
    torch_image = torch.from_numpy(image.transpose(2, 0, 1).copy()).float()[None]

    def official_torch():
        with torch.no_grad():
            return reference.image_encoder(reference.preprocess(torch_image))

    race(result, "encoder", {
        "onnxruntime_sam_jax_export": lambda: session.run(None, {"input_image": image.astype(np.float32)}),
        "sam_jax_jit": lambda: inference.encode_images(model, params, batch, sizes).block_until_ready(),
        "official_pytorch": official_torch}, repeats)
    result["encoder"]["gflops"] = encoder_flops(config, 1) / 1e9
    result["encoder"]["flop_floor_s"] = result["encoder"]["gflops"] / result["matmul_gflops_per_s"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    import time

    import torch

    from checkpoints_convert import reference_model
    from checkpoints_convert.official import official_to_flax
    from sam_jax.export import export_model

    config = CONFIGS[args.model_type]
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    reference = reference_model.build_official_for(config).eval()
    params = official_to_flax(reference_model.state_dict_numpy(reference), config)
    model = Sam(config)
    import onnxruntime

    result = {"model_type": args.model_type, "repeats": args.repeats, "dtype": "float32",
              "threads": os.cpu_count(), "cpu": cpu_model(), "jax": jax.__version__, "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "matmul_gflops_per_s": matmul_rate() / 1e9, "export": {}}
    output = args.output or Path("workdir/benchmarks") / f"export_{args.model_type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = Path(tmp)
        for fmt in ("onnx", "stablehlo"):
            start = time.perf_counter()
            export_model(model, params, folder / fmt, fmt)
            manifest = json.loads((folder / fmt / "export.json").read_text())
            result["export"][fmt] = {"seconds": time.perf_counter() - start,
                                     "bytes": {f: (folder / fmt / f).stat().st_size
                                               for part in manifest["parts"].values() for f in part["files"]}}
            print(f"export {fmt}: {result['export'][fmt]}", flush=True)
        bench_decoder(result, config, model, params, reference, folder, args.repeats)
        output.write_text(json.dumps(result, indent=2) + "\n")
        bench_encoder(result, config, model, params, reference, folder, args.repeats)
    return finish(result, output)


if __name__ == "__main__":
    main()
