"""The demo job: convert an official-layout SAM checkpoint, load it, segment an image.

    python -m experiments.convert_and_segment                       # random-weight vit_b
    python -m experiments.convert_and_segment --checkpoint sam_vit_b_01ec64.pth

Without --checkpoint (official weights cannot be downloaded here) it writes a
seeded, randomly initialised official vit_b checkpoint with the released key
layout, so the masks are meaningless but every step is the real one:
`.pth` -> converter -> `load_sam` -> preprocess -> encoder -> prompts ->
decoder -> postprocess. When the official PyTorch model is installed it
runs the same weights through it and reports the parity and both timings.
Outputs in --workdir: the converted checkpoint, masks.npz and summary.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints_convert.convert import convert_checkpoint
from experiments.sample_image import synthetic_image
from sam_jax import load_sam
from sam_jax.configs import CONFIGS
from sam_jax.modeling import Sam, postprocess_masks, preprocess


def write_random_official_checkpoint(model_type: str, path: Path, seed: int = 0) -> None:
    import torch

    from checkpoints_convert import reference_model

    torch.manual_seed(seed)
    model = reference_model.build_official_for(CONFIGS[model_type])
    reference_model.randomize_zero_initialised(model, seed)
    torch.save(model.state_dict(), path)


def official_outputs(checkpoint: Path, model_type: str, image, coords, labels, box, input_size):
    """The official model's embedding, logits and IoU on the same inputs, and its encoder time."""
    import torch

    from checkpoints_convert import reference_model

    model = reference_model.build_official_for(CONFIGS[model_type])
    model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    with torch.no_grad():
        start = time.perf_counter()
        x = model.preprocess(torch.from_numpy(image).permute(2, 0, 1).float())[None]
        embedding = model.image_encoder(x)
        encoder_s = time.perf_counter() - start
        sparse, dense = model.prompt_encoder(
            (torch.from_numpy(coords), torch.from_numpy(labels)), torch.from_numpy(box), None)
        low_res, iou = model.mask_decoder(
            embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
        logits = model.postprocess_masks(low_res, input_size, image.shape[:2])
    return embedding.numpy().transpose(0, 2, 3, 1), logits.numpy(), iou.numpy(), encoder_s


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="official sam_vit_*.pth or HF weights")
    parser.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"],
                        help="model for the random-weight checkpoint when --checkpoint is not given")
    parser.add_argument("--workdir", type=Path, default=Path("workdir/demo"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    summary: dict = {}

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.workdir / f"sam_{args.model_type}_random_init.pth"
        print(f"writing a random-weight official {args.model_type} checkpoint to {checkpoint}")
        write_random_official_checkpoint(args.model_type, checkpoint)
        summary["weights"] = "random (seeded), official key layout"
    converted = args.workdir / "converted"
    shutil.rmtree(converted, ignore_errors=True)  # the demo owns its workdir
    start = time.perf_counter()
    config = convert_checkpoint(checkpoint, converted)
    summary["convert_s"] = time.perf_counter() - start
    print(f"converted {checkpoint} ({config.name}) in {summary['convert_s']:.1f} s -> {converted}")

    model, params = load_sam(converted)
    s = config.image_size
    image = synthetic_image(3 * s // 4, s)  # non-square, already at the model's input scale
    input_size, original_size = image.shape[:2], image.shape[:2]
    coords = np.array([[[s * 0.4, s * 0.3], [s * 0.7, s * 0.5]]], np.float32)
    labels = np.array([[1, 0]], np.int32)
    box = np.array([[s * 0.2, s * 0.1, s * 0.6, s * 0.5]], np.float32)

    encode = jax.jit(lambda p, im: model.apply({"params": p}, preprocess(im, config)[None],
                                               method=Sam.encode_image))
    decode = jax.jit(lambda p, emb: model.apply({"params": p}, emb, coords, labels, box, None, True,
                                                method=Sam.decode))
    start = time.perf_counter()
    embedding = encode(params, jnp.asarray(image)).block_until_ready()
    summary["encoder_first_call_s"] = time.perf_counter() - start
    start = time.perf_counter()
    embedding = encode(params, jnp.asarray(image)).block_until_ready()
    summary["encoder_s"] = time.perf_counter() - start
    low_res, iou = decode(params, embedding)
    logits = postprocess_masks(low_res, input_size, original_size, s)
    masks = np.asarray(logits > config.mask_threshold)
    summary.update(
        model_type=config.name, image_shape=list(image.shape),
        iou_predictions=[round(float(x), 4) for x in np.asarray(iou)[0]],
        mask_pixels=masks[0].reshape(3, -1).sum(1).tolist(),
    )
    print(f"sam_jax encoder {summary['encoder_s']:.2f} s (first call with compile "
          f"{summary['encoder_first_call_s']:.1f} s); IoU predictions {summary['iou_predictions']}")

    try:
        reference = official_outputs(checkpoint, config.name, image, coords, labels, box,
                                     input_size)
    except ImportError:
        print("official segment-anything / torch not installed: skipping the parity check")
    else:
        ref_embedding, ref_logits, ref_iou, summary["official_encoder_s"] = reference
        summary["parity_relative_error"] = {
            "image_embedding": relative_error(embedding, ref_embedding),
            "mask_logits": relative_error(logits, ref_logits),
            "iou_predictions": relative_error(iou, ref_iou),
        }
        print(f"official PyTorch encoder {summary['official_encoder_s']:.2f} s; parity (relative L2): "
              + ", ".join(f"{k} {v:.1e}" for k, v in summary["parity_relative_error"].items()))

    np.savez_compressed(args.workdir / "masks.npz", image=image, masks=masks, logits=np.asarray(logits))
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.workdir / 'masks.npz'} and {args.workdir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
