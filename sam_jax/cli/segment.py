"""`sam-jax segment`: prompted masks (points, a box and/or a text) for an image or a folder of images.

Per input image `<stem>` it writes the folder `OUTPUT/<stem>/`:
  mask_0.png ... mask_{C-1}.png   the predicted masks, 8-bit, 255 inside, image-sized
  overlay.png                     the masks tinted on the image, one tile per mask, prompt drawn
  result.json                     prompt, image size and mode, IoU predictions, mask files
C is 3 with --multimask (the default), 1 with --no-multimask. A re-run skips
images that already have an output even when the prompt has changed: pass
--overwrite (or delete the image's folder) to redo them.

Text prompts (--text, or "text" in --prompts) need a checkpoint trained with
them (its config has a text_embed_dim) and --clip-checkpoint, a CLIP checkpoint
folder of that embedding size (make one with `python -m checkpoints_convert.clip`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from sam_jax.cli import common
from sam_jax.cli.overlay import overlay
from sam_jax.cli.prompt_args import Prompt, prompt_from_args, read_prompts_file
from sam_jax.errors import CheckpointError
from sam_jax.image_io import read_image
from sam_jax.predictor import SamPredictor
from sam_jax.weights import load_sam

RESULT_FILE = "result.json"


def add_parser(subparsers) -> None:
    parser = common.add_command(subparsers, "segment", "masks from point and box prompts", __doc__)
    prompt = parser.add_argument_group("prompt (pixels in the original image)")
    prompt.add_argument("--point-coords", metavar="'x,y;x,y'", help="points, ';'-separated")
    prompt.add_argument("--point-labels", metavar="'1,0'",
                        help="one label per point: 1 foreground, 0 background (default: all 1)")
    prompt.add_argument("--box", metavar="'x0,y0,x1,y1'", help="a box, XYXY with x1 > x0, y1 > y0")
    prompt.add_argument("--text", metavar="'a phrase'",
                        help="a text prompt (needs --clip-checkpoint and a checkpoint trained with text "
                             "prompts); alone or with points / a box")
    prompt.add_argument("--prompts", metavar="prompts.json",
                        help='per-image prompts: {"a.jpg": {"point_coords": [[x, y]], "point_labels": [1], '
                             '"box": [x0, y0, x1, y1], "text": "a phrase"}, ...}; an entry replaces the '
                             "command-line prompt for its image")
    parser.add_argument("--clip-checkpoint", metavar="DIR",
                        help="a converted CLIP checkpoint folder, the text encoder of text prompts "
                             "(make one with `python -m checkpoints_convert.clip`)")
    parser.add_argument("--truncate-text", action="store_true",
                        help="cut text prompts longer than CLIP's context length (default: refuse them)")
    parser.add_argument("--multimask", action=argparse.BooleanOptionalAction, default=True,
                        help="three masks per prompt (default) or one")
    parser.set_defaults(run=run, check_args=lambda args: check_args(parser, args))


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument combinations argparse does not check itself: a usage error (exit 2) on `parser`."""
    if args.text is not None and args.clip_checkpoint is None:
        parser.error("--text needs --clip-checkpoint DIR (a CLIP checkpoint folder, the text encoder)")


def run(args: argparse.Namespace) -> int:
    default_prompt = prompt_from_args(args.point_coords, args.point_labels, args.box, args.text)
    images, single = common.resolve_inputs(args.input)
    per_image = read_prompts_file(args.prompts, [p.name for p in images]) if args.prompts else {}
    if default_prompt is None and not per_image:
        raise common.UsageError("no prompt: give --point-coords (and --point-labels), --box, --text, or --prompts")
    with_text = any(p is not None and p.text is not None for p in (default_prompt, *per_image.values()))
    if with_text:
        check_text_prompts(args, default_prompt, per_image)

    def prompt_for(image: Path) -> Prompt:
        prompt = per_image.get(image.name, default_prompt)
        if prompt is None:
            raise ValueError(f"no prompt for {image.name} in {args.prompts} and none on the command line")
        return prompt

    model_info = {"checkpoint": str(args.checkpoint)}

    def load(metadata: dict) -> SamPredictor:
        model_info["model_type"] = metadata["config"]["name"]
        text_encoder = None
        if with_text:
            from sam_jax.clip.text_encoder import ClipTextEncoder

            text_encoder = ClipTextEncoder.from_directory(args.clip_checkpoint, truncate=args.truncate_text)
            model_info["clip_checkpoint"] = str(args.clip_checkpoint)
        return SamPredictor(*load_sam(args.checkpoint), text_encoder=text_encoder)

    def process(source: Path, prepared, folder: Path, predictor: SamPredictor) -> None:
        image, mode, prompt = prepared
        predictor.set_image(image)
        masks, scores, _ = predictor.predict(
            point_coords=prompt.point_coords, point_labels=prompt.point_labels, box=prompt.box,
            multimask_output=args.multimask, text=prompt.text,
        )
        write_result(folder, source, image, mode, prompt, masks, scores, args.multimask, model_info)

    return common.run_images(
        args, common.make_jobs(images, args.output), single, kind="dir", is_complete=lambda p: (p / RESULT_FILE).is_file(),
        prepare=lambda source: _prepare(source, prompt_for), load=load, process=process, desc="segment")


def check_text_prompts(args: argparse.Namespace, default_prompt: Optional[Prompt],
                       per_image: dict[str, Prompt]) -> None:
    """Before anything is written, that text prompts can run: --clip-checkpoint given, a CLIP
    checkpoint whose embedding size is the text-prompt head's of --checkpoint, which has one;
    and that every phrase tokenizes (not empty, not over CLIP's context length unless
    --truncate-text). UsageError / CheckpointError / ValueError otherwise."""
    from sam_jax.clip.checkpoint import read_clip_config
    from sam_jax.clip.tokenizer import ClipTokenizer

    if args.clip_checkpoint is None:
        raise common.UsageError(f"--prompts {args.prompts} has text prompts: they need --clip-checkpoint DIR "
                                "(a CLIP checkpoint folder, the text encoder)")
    metadata = common.check_checkpoint(args.checkpoint, args.model_type)
    config = metadata.get("config", {})
    if config.get("text_embed_dim") is None:
        raise CheckpointError(f"--checkpoint {args.checkpoint} ({config.get('name')}) was not trained with text "
                              "prompts (its config has no text_embed_dim): text prompts need a text-enabled "
                              "checkpoint")
    try:
        clip = read_clip_config(args.clip_checkpoint)
    except CheckpointError as err:
        raise CheckpointError(f"--clip-checkpoint: {err}") from None
    if clip.embed_dim != config["text_embed_dim"]:
        raise CheckpointError(f"--clip-checkpoint {args.clip_checkpoint} (CLIP {clip.name}) makes "
                              f"{clip.embed_dim}-dim text embeddings; --checkpoint {args.checkpoint} takes "
                              f"{config['text_embed_dim']}-dim ones")
    tokenizer = ClipTokenizer()
    prompts = {"--text": default_prompt,
               **{f"--prompts {args.prompts}, {name!r}": p for name, p in per_image.items()}}
    for where, prompt in prompts.items():
        if prompt is not None and prompt.text is not None:
            try:
                tokenizer(prompt.text, context_length=clip.text.context_length, truncate=args.truncate_text)
            except ValueError as err:
                raise common.UsageError(f"{where}: {err}") from None


def _prepare(source: Path, prompt_for) -> tuple[np.ndarray, str, Prompt]:
    """Reads the image and checks its prompt against it (both raise ValueError)."""
    image, mode = read_image(source)
    prompt = prompt_for(source)
    prompt.check_inside(image.shape[1], image.shape[0], source)
    return image, mode, prompt


def write_result(folder: Path, source: Path, image: np.ndarray, mode: str, prompt: Prompt,
                 masks: np.ndarray, scores: np.ndarray, multimask: bool,
                 model_info: Optional[dict] = None) -> None:
    """Writes the mask PNGs, overlay.png and result.json of one image into `folder`."""
    records = []
    for i, (mask, score) in enumerate(zip(masks, scores)):
        name = f"mask_{i}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / name)
        ys, xs = np.nonzero(mask)
        # XYWH with w = x_max - x_min, as the official generator's records have it
        bbox = ([int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]
                if len(xs) else [0, 0, 0, 0])
        records.append({"file": name, "predicted_iou": float(score), "area": int(mask.sum()), "bbox": bbox})
    overlay(image, masks, scores, prompt).save(folder / "overlay.png")
    result = {
        "image": {"file": str(source), "width": int(image.shape[1]), "height": int(image.shape[0]),
                  "mode": mode},
        "prompt": {**prompt.to_json(), "multimask_output": bool(multimask)},
        "iou_predictions": [float(s) for s in scores],
        "masks": records,
        "overlay": "overlay.png",
        **({"model": model_info} if model_info else {}),
    }
    (folder / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
