"""tensorflow-datasets builders; importing this package registers them with tfds.

    sam_synthetic   procedural scenes with exact nested masks (no download)
    sa1b            SA-1B from its tar files or extracted folders (manual dir)
    coco_instances  any COCO-format instance segmentation JSON + image folder
"""

from sam_jax.data.builders.coco_instances import CocoInstances
from sam_jax.data.builders.sa1b import Sa1b
from sam_jax.data.builders.sam_synthetic import SamSynthetic

NAMES = ("sam_synthetic", "sa1b", "coco_instances")

__all__ = ["CocoInstances", "NAMES", "Sa1b", "SamSynthetic"]
