"""`sam_synthetic`: procedural scenes (`sam_jax.data.synthetic`) with exact nested masks, no download.

Records follow `features.instance_features` plus, per mask,

    masks/parent  (N,) int64   index of the containing mask in the same image, -1 for a whole
    masks/level   (N,) int64   0 whole, 1 part, 2 subpart

Images are stored as PNG, so decoded pixels equal the generated ones. Example
`index` of `split` is generated from SeedSequence(config.seed, spawn_key=
(split code, index)) alone (`example_scene`), so any example can be rebuilt on
its own and the train and validation streams never share a seed.

    builder = SamSynthetic(config="small", data_dir=...)
    builder.download_and_prepare()
    builder.as_data_source("validation")[0]
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from sam_jax.data import rle
from sam_jax.data.bad_records import BadRecordPolicy
from sam_jax.data.features import instance_features
from sam_jax.data.masks import farthest_from_boundary
from sam_jax.data.synthetic import Scene, generate_scene, sample_size

SPLIT_CODES = {"train": 0, "validation": 1}


@dataclasses.dataclass
class SamSyntheticConfig(tfds.core.BuilderConfig):
    num_train: int = 0
    num_validation: int = 0
    min_side: int = 96  # each image side is log-uniform in [min_side, max_side]
    max_side: int = 256
    seed: int = 0


def example_scene(config: SamSyntheticConfig, split: str, index: int) -> Scene:
    """The scene of example `index` of `split`, from (config.seed, split, index) alone."""
    size_seed, scene_seed = np.random.SeedSequence(config.seed, spawn_key=(SPLIT_CODES[split], index)).spawn(2)
    height, width = sample_size(np.random.default_rng(size_seed), config.min_side, config.max_side)
    return generate_scene(scene_seed, height, width)


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (encoded here rather than by TensorFlow, whose start-up costs seconds)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def scene_record(scene: Scene, image_id: int, file_name: str) -> dict:
    """A scene as a record of `instance_features` plus masks/parent and masks/level."""
    h, w = scene.image.shape[:2]
    counts = [rle.encode(m) for m in scene.masks]
    return {
        "image": png_bytes(scene.image),
        "image_id": image_id,
        "file_name": file_name,
        "masks": {
            "counts": counts,
            "bbox": rle.boxes_xywh(counts, (h, w)),
            "area": scene.masks.sum(axis=(1, 2)).astype(np.int64),
            "point": np.array([farthest_from_boundary(m) for m in scene.masks], np.float32).reshape(-1, 2),
            "id": np.arange(len(scene.masks), dtype=np.int64),
            "parent": scene.parent,
            "level": scene.level,
        },
    }


class SamSynthetic(tfds.core.GeneratorBasedBuilder):
    """Procedural scenes with whole / part / subpart masks, occlusion and touching objects."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        SamSyntheticConfig(
            name="default", description="2,000 train + 200 validation images, sides 384-1024 px.",
            num_train=2_000, num_validation=200, min_side=384, max_side=1024, seed=0,
        ),
        SamSyntheticConfig(
            name="small", description="48 train + 16 validation images, sides 96-256 px; for tests and demos.",
            num_train=48, num_validation=16, min_side=96, max_side=256, seed=1,
        ),
        SamSyntheticConfig(
            name="cpu", description="4,000 train + 100 validation images, sides 96-256 px; the CPU training run.",
            num_train=4_000, num_validation=100, min_side=96, max_side=256, seed=2,
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def __init__(self, *, on_bad_record: str = "error", file_format: str = "array_record", **kwargs):
        # Generated records cannot be bad; the argument is taken so every builder is called alike.
        self._policy = BadRecordPolicy(on_bad_record)
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=instance_features({
                "parent": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "level": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            }),
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/facebookresearch/segment-anything",
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        self.info.metadata["bad_records"] = {split: self._policy.report() for split in SPLIT_CODES}
        return {
            "train": self._generate_examples("train", config.num_train),
            "validation": self._generate_examples("validation", config.num_validation),
        }

    def _generate_examples(self, split: str, count: int):
        for index in range(count):
            scene = example_scene(self.builder_config, split, index)
            yield index, scene_record(scene, image_id=index, file_name=f"{split}_{index:06d}.png")
