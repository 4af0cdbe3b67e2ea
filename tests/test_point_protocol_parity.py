"""The point protocol at original resolution (`evaluate_images`): equal to the official
predictor driven by the same clicks on the same random weights, and unchanged by how
images are grouped (zero padding) or by crowd regions.

Official predictor: `segment_anything.predictor.SamPredictor`, called as its users do,
one image and one prompt at a time with only the real clicks (no padding points)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import official_module
from sam_jax.batch_predictor import SamBatchPredictor
from sam_jax.data.builders.sam_synthetic import SamSynthetic, example_scene
from sam_jax.evaluation.instances import Instances
from sam_jax.evaluation.point_protocol import ProtocolConfig, evaluate_images
from sam_jax.modeling import Sam
from sam_jax.modeling.prompt_encoder import PADDING

NUM_IMAGES = 4


def scene_instances(index: int, split: str = "validation") -> Instances:
    """Example `index` of sam_synthetic/small, as `read_instances` gives it."""
    config = next(c for c in SamSynthetic.BUILDER_CONFIGS if c.name == "small")
    scene = example_scene(config, split, index)
    n = len(scene.masks)
    return Instances(scene.image, index, f"{index}.png", scene.masks, np.zeros((n, 4), np.float32),
                     np.arange(n), np.ones(n, np.int64), np.zeros(n, bool))


class OfficialBatchPredictor:
    """`SamBatchPredictor`'s set_images / predict_batch over the official `SamPredictor`."""

    def __init__(self, sam):
        self.predictor = official_module("predictor").SamPredictor(sam)
        self.images, self.current = [], None

    def set_images(self, images):
        self.images, self.current = list(images), None

    def predict_batch(self, prompts, multimask_output=True):
        results = []
        for i, prompt in enumerate(prompts):
            if self.current != i:
                self.predictor.set_image(self.images[i])
                self.current = i
            outputs = []
            for j, (coords, labels) in enumerate(zip(prompt["point_coords"], prompt["point_labels"])):
                real = labels != PADDING
                mask_input = np.array(prompt["mask_input"][j]) if "mask_input" in prompt else None
                outputs.append(self.predictor.predict(coords[real], labels[real], mask_input=mask_input,
                                                      multimask_output=multimask_output))
            results.append(tuple(np.stack(x) for x in zip(*outputs)))
        return results


class Recording:
    """Wraps a predictor and keeps every (point_coords, point_labels) it is given."""

    def __init__(self, predictor):
        self.predictor, self.clicks = predictor, []

    def set_images(self, images):
        self.predictor.set_images(images)

    def predict_batch(self, prompts, multimask_output=True):
        self.clicks.append([(p["point_coords"].copy(), p["point_labels"].copy()) for p in prompts])
        return self.predictor.predict_batch(prompts, multimask_output=multimask_output)


@pytest.fixture(scope="module")
def instances():
    return [scene_instances(i) for i in range(NUM_IMAGES)]


@pytest.fixture(scope="module")
def ours(tiny):
    config, _, params = tiny
    return SamBatchPredictor(Sam(config), params)


def test_one_and_five_click_miou_equal_the_official_predictor(tiny, ours, instances):
    config = ProtocolConfig(num_clicks=5)
    official = Recording(OfficialBatchPredictor(tiny[1]))
    mine = Recording(ours)
    result = evaluate_images(mine, instances, config, batch_images=2)
    reference = evaluate_images(official, instances, config, batch_images=2)

    assert result.num_masks == sum(len(x.masks) for x in instances) > 20
    for clicks in (1, 5):
        assert abs(result.miou()[clicks - 1] - reference.miou()[clicks - 1]) <= 1e-3
        assert abs(result.miou(oracle=True)[clicks - 1] - reference.miou(oracle=True)[clicks - 1]) <= 1e-3
    # Both were driven by the same click sequence: every click, every mask.
    assert len(mine.clicks) == len(official.clicks) == 2 * config.num_clicks
    for call, ref_call in zip(mine.clicks, official.clicks):
        for (coords, labels), (ref_coords, ref_labels) in zip(call, ref_call):
            np.testing.assert_array_equal(labels, ref_labels)
            np.testing.assert_array_equal(coords, ref_coords)
    # Not a degenerate case: masks score differently and corrections add background clicks.
    assert result.iou[:, 0].std() > 0.01
    assert any((labels == 0).any() for call in mine.clicks for _, labels in call)
    print(f"[parity] protocol mIoU 1/5 clicks: ours {result.miou()[[0, 4]]}, official {reference.miou()[[0, 4]]}")


def test_grouping_images_changes_nothing(ours, instances):
    """Images of different sizes share a zero-padded batch; alone, each has its own size."""
    config = ProtocolConfig(num_clicks=3, first_click="random", seed=1)
    together = evaluate_images(ours, instances, config, batch_images=3)
    alone = evaluate_images(ours, instances, config, batch_images=1)
    np.testing.assert_array_equal(together.image_ids, alone.image_ids)
    np.testing.assert_allclose(together.iou, alone.iou, atol=1e-6)
    np.testing.assert_allclose(together.oracle_iou, alone.oracle_iou, atol=1e-6)


class PerfectPredictor:
    """Returns, for each prompt, the ground-truth mask under its first click."""

    def __init__(self, instances):
        self.by_image = {id(x.image): x for x in instances}

    def set_images(self, images):
        self.current = [self.by_image[id(image)] for image in images]

    def predict_batch(self, prompts, multimask_output=True):
        c = 3 if multimask_output else 1
        results = []
        for x, prompt in zip(self.current, prompts):
            masks = x.masks[~x.iscrowd]
            n = len(prompt["point_coords"])
            assert n == len(masks), "crowd regions are not prompted"
            low_res = np.zeros((n, c, 64, 64), np.float32)
            results.append((np.repeat(masks[:, None], c, axis=1), np.zeros((n, c), np.float32), low_res))
        return results


def test_a_perfect_predictor_scores_one_and_crowds_are_not_prompted(instances):
    marked = [Instances(**{**vars(x), "iscrowd": np.arange(len(x.masks)) % 3 == 0}) for x in instances]
    result = evaluate_images(PerfectPredictor(marked), marked, ProtocolConfig(num_clicks=2), batch_images=3)
    assert result.num_masks == sum(int((~x.iscrowd).sum()) for x in marked)
    np.testing.assert_array_equal(result.iou, 1.0)


def test_no_masks_and_bad_batch_size_are_named(ours, instances):
    empty = Instances(**{**vars(instances[0]), "iscrowd": np.ones(len(instances[0].masks), bool)})
    with pytest.raises(ValueError, match="no images with masks"):
        evaluate_images(ours, [empty], ProtocolConfig(num_clicks=1))
    with pytest.raises(ValueError, match="batch_images"):
        evaluate_images(ours, instances, ProtocolConfig(num_clicks=1), batch_images=0)
