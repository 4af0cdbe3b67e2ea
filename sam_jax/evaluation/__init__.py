"""Evaluation: the paper's interactive point protocol (`clicks`, `point_protocol`) and
box-prompted COCO mask AP (`box_prompts`), on records read by `instances`."""
