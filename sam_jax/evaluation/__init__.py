"""Evaluation: the paper's interactive point protocol (`clicks`, `point_protocol`)."""
