"""Writes torchvision_golden.npz: real torchvision's answers for the functions `tests/stand_ins`
replaces, so the tests check the stand-ins (and sam_jax) against torchvision itself.

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow numpy
    /tmp/tv/bin/python tests/data/make_torchvision_golden.py      # from the repository root

Resize: `np.array(resize(to_pil_image(image), (h, w)))`, as `segment_anything.utils.transforms.
ResizeLongestSide.apply_image` calls it, to the official target shape. NMS: `torchvision.ops.nms`
and `batched_nms` (CPU) on boxes with tied scores, where a stable and an unstable sort differ.
"""

import os

import numpy as np
import torch
import torchvision
from torchvision.ops import batched_nms, nms
from torchvision.transforms.functional import resize, to_pil_image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_golden.npz")
RESIZE_CASES = [((37, 53), 64), ((53, 37), 64), ((5, 300), 64), ((90, 131), 128), ((64, 48), 128), ((1, 1), 16)]


def preprocess_shape(h, w, target):  # the official ResizeLongestSide.get_preprocess_shape
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def main():
    rng = np.random.default_rng(0)
    out = {"torchvision_version": np.array(torchvision.__version__)}
    for k, ((h, w), target) in enumerate(RESIZE_CASES):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out[f"resize_{k}_image"] = image
        out[f"resize_{k}_target"] = np.array(target)
        out[f"resize_{k}_output"] = np.array(resize(to_pil_image(image), preprocess_shape(h, w, target)))

    cases = []
    disjoint = np.array([[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(64)], np.float32)
    cases.append((disjoint, rng.integers(0, 3, 64).astype(np.float32), np.zeros(64, np.int64), 0.5))
    for n, threshold in ((200, 0.3), (300, 0.7)):
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(5, 60, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        scores = np.round(rng.uniform(0, 1, n), 1).astype(np.float32)  # many ties
        cases.append((boxes, scores, rng.integers(0, 4, n), threshold))
    for k, (boxes, scores, idxs, threshold) in enumerate(cases):
        b, s, i = torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(idxs)
        out[f"nms_{k}_boxes"], out[f"nms_{k}_scores"], out[f"nms_{k}_idxs"] = boxes, scores, idxs
        out[f"nms_{k}_threshold"] = np.array(threshold)
        out[f"nms_{k}_keep"] = nms(b, s, threshold).numpy()
        out[f"nms_{k}_batched_keep"] = batched_nms(b, s, i, threshold).numpy()
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} (torchvision {torchvision.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
