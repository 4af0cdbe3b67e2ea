"""torchvision.ops.boxes `nms`, `batched_nms` and `box_area` in plain torch (see ../../README.md).

`nms` is the CPU kernel (torchvision/csrc/ops/cpu/nms_kernel.cpp) line by line:
boxes taken in `scores.sort(stable=True, descending=True)` order (equal scores
in input order, as there: tests/test_stand_ins.py checks ties against real
torchvision's answers), IoU in the boxes' dtype, a box suppressed when its IoU
with a kept box is > iou_threshold. `batched_nms` dispatches as torchvision does: the
coordinate trick up to 4000 box values on CPU, per-category `nms` above.
"""

import torch
from torch import Tensor


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    if boxes.dim() != 2 or boxes.size(1) != 4 or scores.dim() != 1 or scores.size(0) != boxes.size(0):
        raise RuntimeError(f"nms expects (N, 4) boxes and (N,) scores; got {boxes.shape}, {scores.shape}")
    if boxes.dtype != scores.dtype:
        raise RuntimeError("dets should have the same type as scores")
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = scores.sort(stable=True, dim=0, descending=True)[1]
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for _i in range(len(order)):
        i = order[_i]
        if suppressed[i]:
            continue
        keep.append(int(i))
        j = order[_i + 1 :]  # the kernel skips suppressed j; recomputing them changes nothing
        w = (torch.minimum(x2[i], x2[j]) - torch.maximum(x1[i], x1[j])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[j]) - torch.maximum(y1[i], y1[j])).clamp(min=0)
        inter = w * h
        ovr = inter / (areas[i] + areas[j] - inter)
        suppressed[j] |= ovr.double() > iou_threshold  # the kernel compares in double
    return torch.tensor(keep, dtype=torch.int64)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    if boxes.numel() > 4000:
        return _batched_nms_vanilla(boxes, scores, idxs, iou_threshold)
    return _batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)


def _batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold):
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    boxes_for_nms = boxes + offsets[:, None]
    return nms(boxes_for_nms, scores, iou_threshold)


def _batched_nms_vanilla(boxes, scores, idxs, iou_threshold):
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):
        curr_indices = torch.where(idxs == class_id)[0]
        curr_keep_indices = nms(boxes[curr_indices], scores[curr_indices], iou_threshold)
        keep_mask[curr_indices[curr_keep_indices]] = True
    keep_indices = torch.where(keep_mask)[0]
    return keep_indices[scores[keep_indices].sort(descending=True)[1]]


def box_area(boxes: Tensor) -> Tensor:
    if boxes.is_floating_point():
        boxes = boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.float()
    else:
        boxes = boxes if boxes.dtype in (torch.int32, torch.int64) else boxes.int()
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
