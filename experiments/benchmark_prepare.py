"""Preparing `sa1b` in one process and on the Beam DirectRunner: records per second, as JSON.

  python -m experiments.benchmark_prepare [--tars 4 --images-per-tar 48 --masks 100 \\
      --beam-runs multi_processing:2,multi_processing:1,in_memory:1]

The shards are synthetic, at SA-1B's size: `--tars` tars of `--images-per-tar`
textured 1500x2250 JPEGs (about 1 MB each) with `--masks` elliptical masks in
the official JSON. They are generated once into `--work-dir` and kept; every
run prepares them into a fresh data dir. Times cover the whole
`download_and_prepare` (for Beam: pipeline and worker start, Reshuffle, the
writer's shuffle), so small sets understate what Beam gains on large ones.
Needs apache-beam (pip install 'sam_jax[beam]').
"""

import argparse
import io
import json
import os
import shutil
import tarfile
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from sam_jax.data import rle
from sam_jax.data.beam_prepare import pipeline_options
from sam_jax.data.builders.sa1b import Sa1b


def mask_pool(rng, h: int, w: int, count: int) -> list:
    """`count` ellipse masks of varied size and place, as (counts str, bbox XYWH, area)."""
    pool = []
    for _ in range(count):
        ry, rx = rng.uniform(0.02, 0.3) * h, rng.uniform(0.02, 0.3) * w
        cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
        y0, y1, x0, x1 = int(cy - ry), int(cy + ry) + 1, int(cx - rx), int(cx + rx) + 1
        y, x = np.mgrid[y0:y1, x0:x1]
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        bbox = [float(xs[0]), float(ys[0]), float(xs[-1] + 1 - xs[0]), float(ys[-1] + 1 - ys[0])]
        pool.append((rle.encode(mask).decode(), bbox, int(mask.sum())))
    return pool


def sa1b_pair(rng, image_id: int, h: int, w: int, pool: list, n_masks: int):
    """(jpg bytes, json bytes) of one synthetic SA-1B image: a smooth colour field plus noise."""
    coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR)).astype(np.int16)
    pixels = np.clip(pixels + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    annotations = []
    for k, i in enumerate(rng.choice(len(pool), n_masks, replace=n_masks > len(pool))):
        counts, bbox, area = pool[i]
        annotations.append({
            "id": image_id * 1000 + k, "segmentation": {"size": [h, w], "counts": counts}, "bbox": bbox,
            "area": area, "predicted_iou": float(rng.uniform(0.8, 1)), "point_coords": [[bbox[0] + 1, bbox[1] + 1]],
            "crop_box": [0.0, 0.0, float(w), float(h)], "stability_score": float(rng.uniform(0.9, 1)),
        })
    image = {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"}
    return buffer.getvalue(), json.dumps({"image": image, "annotations": annotations}).encode()


def make_shards(manual_dir: str, tars: int, images_per_tar: int, h: int, w: int, n_masks: int) -> None:
    rng = np.random.default_rng(0)
    pool = mask_pool(rng, h, w, 2 * n_masks)
    os.makedirs(manual_dir)
    for t in range(tars):
        with tarfile.open(os.path.join(manual_dir, f"sa_{t:06d}.tar"), "w") as tar:
            for i in range(images_per_tar):
                image_id = t * images_per_tar + i + 1
                for ext, data in zip((".jpg", ".json"), sa1b_pair(rng, image_id, h, w, pool, n_masks)):
                    info = tarfile.TarInfo(f"sa_{image_id}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def timed_prepare(manual_dir: str, data_dir: str, beam_options=None) -> dict:
    start = time.perf_counter()
    builder = Sa1b(data_dir=data_dir)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, beam_options=beam_options)
    builder.download_and_prepare(download_config=config)
    seconds = time.perf_counter() - start
    records = builder.info.splits["train"].num_examples
    shutil.rmtree(data_dir)
    return {"seconds": round(seconds, 2), "records": records, "records_per_s": round(records / seconds, 2)}


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tars", type=int, default=4)
    parser.add_argument("--images-per-tar", type=int, default=48)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--width", type=int, default=2250)
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--beam-runs", default="multi_processing:2,multi_processing:1,in_memory:1",
                        help="DirectRunner running mode:workers, comma-separated")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "sam_jax_benchmark_prepare"))
    parser.add_argument("--output", default=os.path.join("workdir", "benchmarks", "prepare.json"))
    args = parser.parse_args(argv)

    shape = (args.tars, args.images_per_tar, args.height, args.width, args.masks)
    manual_dir = os.path.join(args.work_dir, "sa1b_{}x{}_{}x{}_{}masks".format(*shape))
    if not os.path.isdir(manual_dir):
        make_shards(manual_dir, *shape)
    tar_mb = sum(os.path.getsize(os.path.join(manual_dir, n)) for n in os.listdir(manual_dir)) / 2**20
    runs = {"single_process": timed_prepare(manual_dir, os.path.join(args.work_dir, "single"))}
    for run in args.beam_runs.split(","):
        mode, workers = run.split(":")
        options = pipeline_options("DirectRunner", int(workers), [f"direct_running_mode={mode}"])
        runs[f"beam_direct_{mode}_{workers}"] = timed_prepare(manual_dir, os.path.join(args.work_dir, mode), options)
    result = {
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count()},
        "shards": {"tars": args.tars, "images_per_tar": args.images_per_tar, "size": [args.height, args.width],
                   "masks_per_image": args.masks, "megabytes": round(tar_mb, 1)},
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
