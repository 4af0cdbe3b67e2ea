"""Output folders that appear only when complete: written under a temporary name beside the
target and renamed into place, so a folder that exists is whole (checkpoints, exports)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_directory(directory: Path) -> Iterator[Path]:
    """Yields an empty folder to fill; on a clean exit it becomes `directory` (an existing one is
    swapped out, then removed); on any error nothing is left, `directory` untouched."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".staging", dir=directory.parent))
    try:
        staged = staging / "staged"
        staged.mkdir()
        yield staged
        if directory.exists():
            os.replace(directory, staging / "replaced")
        os.replace(staged, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
