"""Input pipeline throughput on SA-1B-sized records, written as JSON.

  python -m experiments.benchmark_input [--images 8 --height 1500 --width 2250 --workers 0,2]

Records are synthetic scenes (`sam_jax.data.synthetic`) at SA-1B's image size
(short side 1500) held in memory, so the figures are the pipeline's own cost:
RLE decode, resize / jitter / flip of the image and up to 64 masks to 1024,
low-res targets, batching and the device transfer. Reported per example, for
one process in preprocess_record alone and for the full pipeline with
0 and N grain workers. Compare with the train step time for the same batch.
"""

import argparse
import io
import json
import os
import time

import jax
import numpy as np
from PIL import Image

from sam_jax.data.builders.sam_synthetic import scene_record
from sam_jax.data.pipeline import InputPipeline, PipelineConfig
from sam_jax.data.preprocess import PreprocessConfig, preprocess_record
from sam_jax.data.synthetic import generate_scene


def make_records(count: int, height: int, width: int) -> list:
    records = []
    for i in range(count):
        record = scene_record(generate_scene(i, height, width), image_id=i, file_name=f"bench_{i}.png")
        record["image"] = np.asarray(Image.open(io.BytesIO(record["image"])))  # what the data source hands over
        records.append(record)
    return records


def time_preprocess(records, config: PreprocessConfig, repeats: int) -> float:
    rng = np.random.default_rng(0)
    preprocess_record(records[0], config, rng)
    start = time.perf_counter()
    for _ in range(repeats):
        for record in records:
            preprocess_record(record, config, rng)
    return (time.perf_counter() - start) / (repeats * len(records))


def time_pipeline(records, config: PipelineConfig, batches: int) -> float:
    pipeline = InputPipeline(records, config)
    jax.block_until_ready(next(pipeline))  # workers started, first batch built
    start = time.perf_counter()
    for _ in range(batches):
        jax.block_until_ready(next(pipeline))
    elapsed = time.perf_counter() - start
    pipeline.close()
    return elapsed / (batches * config.global_batch_size)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--width", type=int, default=2250)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--output", default=os.path.join("workdir", "benchmarks", "input_pipeline.json"))
    args = parser.parse_args(argv)

    records = make_records(args.images, args.height, args.width)
    plain = PreprocessConfig()
    jitter = PreprocessConfig(scale_range=(0.1, 2.0), horizontal_flip=True)
    result = {
        "machine": {"cpu_count": os.cpu_count(), "devices": [str(d) for d in jax.devices()]},
        "records": {
            "images": args.images, "size": [args.height, args.width],
            "masks_per_image": float(np.mean([len(r["masks"]["counts"]) for r in records])),
        },
        "preprocess_s_per_example": {
            "resize_64_masks_1024_and_256": time_preprocess(records, plain, 2),
            "large_scale_jitter_and_flip": time_preprocess(records, jitter, 2),
        },
        "pipeline_s_per_example": {},
    }
    for workers in (int(w) for w in args.workers.split(",")):
        config = PipelineConfig(global_batch_size=args.batch, worker_count=workers, preprocess=jitter)
        result["pipeline_s_per_example"][f"{workers}_workers"] = time_pipeline(records, config, args.batches)
        print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
