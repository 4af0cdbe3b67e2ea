"""The paper's text prompts (section 7.5), built small and measured end to end on synthetic data.

    python -m experiments.text_prompt_demo            # ~15-25 min on 2 CPU cores; each stage resumes

1. `experiments.train_clip`: a tiny CLIP learns captions ("large red ellipse") of the synthetic
   objects from (mask crop, caption) pairs -> workdir/text_demo/clip/ (skipped when its
   checkpoint exists).
2. `experiments.train --config synthetic_text`: the main job with half the masks' first prompt the
   tiny CLIP's image embedding of a crop around them (never text) -> workdir/text_demo/sam/
   (resumed or skipped when finished, as any training run).
3. `sam_jax.evaluation.text_prompts` on the first `--num-images` held-out scenes of the main job's
   validation split, rebuilt with their captions: every object whose caption is unique in its
   image, prompted by its caption's CLIP text embedding (alone, and with one corrective click),
   by one click (and two), by a random embedding (the control) and by its crop's CLIP image
   embedding (the training-time prompt). Writes <sam-workdir>/text_eval.json and prints a
   Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from experiments import train, train_clip
from experiments.train_configs import TEXT_DEMO_CLIP, get_config
from sam_jax.clip.checkpoint import load_clip
from sam_jax.clip.text_encoder import ClipTextEncoder
from sam_jax.clip import CLIP
from sam_jax.data.builders.sam_synthetic import example_scene
from sam_jax.data.captions import unique_captions
from sam_jax.evaluation.text_prompts import PROMPTS, CaptionedImage, evaluate_text_prompts
from sam_jax.predictor import SamPredictor
from sam_jax.weights import load_sam

WORKDIR = Path("workdir/text_demo")
MIN_INPUT_AREA = 625  # input-frame pixels (25^2 at 256: the paper's 100^2 at 1024), as in training


def captioned_images(num_images: int, image_size: int, dataset: str) -> List[CaptionedImage]:
    """The first `num_images` validation scenes of `dataset` with their uniquely captioned objects
    of at least MIN_INPUT_AREA pixels once in the `image_size` input frame."""
    config = train_clip.dataset_config(dataset)
    images = []
    for index in range(num_images):
        scene = example_scene(config, "validation", index)
        h, w = scene.image.shape[:2]
        min_area = MIN_INPUT_AREA * (max(h, w) / image_size) ** 2  # the same objects as at the input frame
        captions = unique_captions(scene, min_area=int(np.ceil(min_area)))
        indices = sorted(captions)
        images.append(CaptionedImage(scene.image, scene.masks[indices], [captions[i] for i in indices]))
    return images


def markdown(summary: dict) -> str:
    names = {"text": "text", "text_1_click": "text + 1 click", "point": "1 click", "point_2_clicks": "2 clicks",
             "random_embedding": "random embedding (control)", "crop_embedding": "crop embedding (training prompt)"}
    lines = ["| prompt | mIoU |", "|---|---|"]
    lines += [f"| {names[p]} | {summary['miou'][p]:.3f} |" for p in PROMPTS]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=100, help="held-out scenes evaluated (default 100)")
    parser.add_argument("--sam-workdir", type=Path, default=WORKDIR / "sam",
                        help="the text-prompt training run (trained here with --config synthetic_text if absent)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="overrides of the synthetic_text config for the training run (see experiments.train)")
    parser.add_argument("--output", type=Path, help="default: <sam-workdir>/text_eval.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if not Path(TEXT_DEMO_CLIP, "sam_jax.json").exists():
        train_clip.main(["--workdir", str(Path(TEXT_DEMO_CLIP).parent)])
    sam_dir = args.sam_workdir
    if not (sam_dir / "model").exists():
        overrides = [arg for override in args.overrides for arg in ("--set", override)]
        code = train.main(["--config", "synthetic_text", "--workdir", str(sam_dir), *overrides]
                          + (["--no-progress"] if args.no_progress else []))
        if code:
            sys.exit(code)

    config = get_config("synthetic_text", tuple(args.overrides))
    model, params = load_sam(sam_dir / "model")
    clip_config, clip_params = load_clip(TEXT_DEMO_CLIP)
    predictor = SamPredictor(model, params, text_encoder=ClipTextEncoder(clip_config, clip_params))
    images = captioned_images(args.num_images, config.data.preprocess.image_size, config.data.dataset)
    image_params = {"visual": clip_params["visual"], "logit_scale": clip_params["logit_scale"]}
    result = evaluate_text_prompts(predictor, CLIP(clip_config), image_params, images)
    summary = dict(result.summary(), clip_metrics=json.loads((Path(TEXT_DEMO_CLIP).parent / "metrics.json").read_text()))
    output = args.output or sam_dir / "text_eval.json"
    output.write_text(json.dumps(dict(summary, per_object=result.per_object), indent=2) + "\n")
    print(markdown(summary))
    print(f"{result.num_objects} objects on {result.num_images} held-out images; wrote {output}")
    return summary


if __name__ == "__main__":
    main()
