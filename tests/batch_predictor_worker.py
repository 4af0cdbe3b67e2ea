"""Runs `SamBatchPredictor` on the test images in a fresh process and saves its results.

Used by test_batch_predictor.py to run on 8 fake CPU devices, or as one of two
`jax.distributed` processes on localhost (each taking its share of the images):

  python tests/batch_predictor_worker.py OUT.npz [--process-id I --num-processes P --port N]

XLA_FLAGS=--xla_force_host_platform_device_count=K must be set by the caller.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax
import numpy as np

import device_workers


def main() -> None:
    args = device_workers.init_worker()
    from test_batch_predictor import IMAGE_SIZES, batch_inputs, model_and_params

    from sam_jax.batch_predictor import SamBatchPredictor

    model, params = model_and_params()
    images, prompts = batch_inputs()
    mine = np.array_split(np.arange(len(IMAGE_SIZES)), args.num_processes)[args.process_id]
    predictor = SamBatchPredictor(model, params)
    predictor.set_images([images[i] for i in mine])
    results = predictor.predict_batch([prompts[i] for i in mine], return_logits=True)
    arrays = {"device_count": jax.device_count()}
    for i, (logits, iou, low_res) in zip(mine, results):
        arrays.update({f"logits_{i}": logits, f"iou_{i}": iou, f"low_res_{i}": low_res})
    np.savez(args.out, **arrays)


if __name__ == "__main__":
    main()
