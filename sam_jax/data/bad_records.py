"""What happens to bad data: an error naming the file and record, or a counted skip.

Every reader takes `on_bad_record="error" | "skip"`. With "error" the first
bad record raises BadRecordError; with "skip" it is dropped, counted by
reason, and the counts (with the first few examples of each) are reported at
the end and stored with the prepared data set.
"""

import collections
import logging
from typing import Dict, List

MODES = ("error", "skip")
EXAMPLES_KEPT = 5  # examples kept per reason


class BadRecordError(ValueError):
    """A record that cannot be used. `reason` is a short key, `where` names file and record."""

    def __init__(self, reason: str, where: str, message: str):
        self.reason = reason
        self.where = where
        super().__init__(f"{where}: {message}")


class BadRecordPolicy:
    """Raises or counts BadRecordErrors according to `mode`."""

    def __init__(self, mode: str = "error"):
        if mode not in MODES:
            raise ValueError(f"on_bad_record must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.counts: Dict[str, int] = collections.Counter()
        self.examples: Dict[str, List[str]] = collections.defaultdict(list)

    def handle(self, error: BadRecordError) -> None:
        """Re-raises `error` in "error" mode, else counts it and logs it."""
        if self.mode == "error":
            raise error
        self.counts[error.reason] += 1
        if len(self.examples[error.reason]) < EXAMPLES_KEPT:
            self.examples[error.reason].append(str(error))
        logging.warning("skipped bad record: %s", error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> Dict[str, object]:
        """JSON-able summary: {"skipped": {reason: n}, "examples": {reason: [msg]}}."""
        return {"skipped": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}
