"""The data engine's loop closed: automatic labels (`sam-jax amg --sa1b`) -> `prepare_data sa1b` ->
a training run on them, held-out images taken as a slice of the one split -> a model that loads.
The labels come from the model the project trained (tests/data), whose masks follow objects;
random weights give near-whole-image masks that training rightly has no use for.
(The annotation stage's files go through `prepare_data` in test_serve_annotate.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from checkpoints_convert.official import official_to_flax
from experiments import prepare_data
from experiments.train_configs import SYNTHETIC_MODEL
from sam_jax import load_sam, save_params
from sam_jax.data.builders.sam_synthetic import SamSynthetic, example_scene
from sam_jax.data.pipeline import open_source
from test_automatic_mask_generator import TRAINED
from test_cli import cli
from test_train_run import run_train


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def test_automatic_labels_train_a_model(capsys, tmp_path, cache_dir):
    stored = np.load(TRAINED)
    params = official_to_flax({k: stored[k].astype(np.float32) for k in stored.files if k != "source"},
                              SYNTHETIC_MODEL)
    checkpoint = save_params(tmp_path / "trained", params, SYNTHETIC_MODEL, source="tests/data")
    photos = tmp_path / "photos"
    photos.mkdir()
    cpu = next(c for c in SamSynthetic.BUILDER_CONFIGS if c.name == "cpu")
    for i in range(8):
        Image.fromarray(example_scene(cpu, "validation", i).image).save(photos / f"scene_{i}.jpg", quality=95)
    engine = tmp_path / "engine"
    code, out, _ = cli(capsys, "amg", "--checkpoint", checkpoint, "--input", photos, "--output", engine / "auto",
                       "--sa1b", "--points-per-side", "8", "--pred-iou-thresh", "0.2", "--stability-score-thresh",
                       "0.5", "--stability-score-offset", "0.1", "--max-area-fraction", "0.9")
    assert code == 0 and "8 done" in out

    data_dir = tmp_path / "tfds"
    assert prepare_data.main(["sa1b", "--manual-dir", str(engine), "--data-dir", str(data_dir)]) == 0
    train = open_source("sa1b", "train[:75%]", str(data_dir))
    held_out = open_source("sa1b", "train[75%:]", str(data_dir))
    assert (len(train), len(held_out)) == (6, 2)

    workdir = tmp_path / "run"
    code, _, err = run_train(workdir, str(data_dir), cache_dir, "data.dataset=sa1b", "data.train_split=train[:75%]",
                             "data.eval_split=train[75%:]", "data.eval_images=2", "optimizer.total_steps=4",
                             "single_prompt_steps=2")
    assert code == 0, err
    evaluation = json.loads((workdir / "eval.json").read_text())
    assert evaluation["num_images"] == 2
    model, trained = load_sam(workdir / "model")
    assert model.config.image_size == 128
