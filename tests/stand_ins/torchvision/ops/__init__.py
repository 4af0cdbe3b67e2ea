"""The torchvision.ops functions the official automatic mask generator imports (see ../../README.md)."""

from torchvision.ops.boxes import batched_nms, box_area, nms

__all__ = ["batched_nms", "box_area", "nms"]
