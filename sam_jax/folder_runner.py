"""A resumable loop over input images, each written atomically to its own output.

Every input image has one output path in the output folder: a folder (the
per-image PNGs of `sam-jax segment` / `sam-jax amg`) or a single file (the
COCO RLE JSON of `sam-jax amg --convert-to-rle`). An output is written under
a hidden temporary name in the same folder that names its writer
(`.<name>.sam-jax-tmp-<host>-<pid>-<random>`) and renamed into place only
when complete, so

* an output that exists is complete, and a re-run skips it (or, with
  `overwrite`, replaces it, again by rename);
* an interrupted run (Ctrl-C, a crash, a kill) leaves at most a temporary
  entry, which the next run over the same output folder removes before it
  starts (when its process is gone), and that image is done again;
* a run never removes the temporary entry of a live run: another process
  of this host that is still running, or any process of another host (which
  it cannot check). Two runs over one folder each skip what the other has
  finished when they reach it and may both write an image in progress: the
  later rename wins, and both outputs are complete.

A failure on one image (unreadable file, prompt outside it) is reported in
one line and counted; the loop goes on with the next image.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

TEMP_MARK = ".sam-jax-tmp-"
# Per-image failures that are the input's fault: reported and counted, the run goes on.
# (ImageError and CheckpointError are ValueErrors.) Anything else is a bug and propagates.
IMAGE_FAILURES = (ValueError, OSError)


@dataclasses.dataclass
class Job:
    """One input image and where its output goes."""

    source: Path
    output: Path  # the final output path: a folder or a file, per the runner's `kind`
    data: Any = None  # whatever the caller has already prepared for this image


@dataclasses.dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    cleaned: int = 0  # leftover temporary entries removed at the start

    def line(self) -> str:
        return f"{self.done} done, {self.skipped} skipped (already done), {len(self.failed)} failed"


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and TEMP_MARK in path.name


def writer_tag() -> str:
    """This process's part of a temporary name: "<host>-<pid>"."""
    return f"{socket.gethostname()}-{os.getpid()}"


def is_abandoned(path: Path) -> bool:
    """Whether a temporary entry's writer is gone: a process of this host that no longer runs,
    or a name without a writer (left by an older version). Another host's entries are live."""
    tag = path.name.split(TEMP_MARK, 1)[1]
    host, _, rest = tag.rpartition("-")  # "<host>-<pid>-<random>": rest is <random>
    host, _, pid = host.rpartition("-")
    if not host or not pid.isdigit():
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class FolderRunner:
    """Writes each job's output atomically into `output_dir`.

    kind: "dir" (the job's output is a folder; `process` fills a fresh
    temporary folder) or "file" (`process` writes one file at the temporary
    path it is given).
    is_complete: tells whether an existing output is a finished one; an
    existing output that is not (not made by this runner) is reported as a
    failure rather than overwritten.
    """

    def __init__(self, output_dir: str | os.PathLike, kind: str,
                 is_complete: Callable[[Path], bool] = Path.exists, overwrite: bool = False,
                 log: Callable[[str], None] = lambda line: tqdm.write(line, file=sys.stderr)):
        if kind not in ("dir", "file"):
            raise ValueError(f"kind must be 'dir' or 'file'; got {kind!r}")
        self.output_dir = Path(output_dir)
        self.kind = kind
        self.is_complete = is_complete
        self.overwrite = overwrite
        self.log = log

    def pending(self, jobs: Iterable[Job]) -> tuple[list[Job], int]:
        """(jobs still to run, number skipped because their output is complete)."""
        todo, skipped = [], 0
        for job in jobs:
            if not self.overwrite and job.output.exists() and self.is_complete(job.output):
                skipped += 1
            else:
                todo.append(job)
        return todo, skipped

    def clean_leftovers(self) -> int:
        """Removes temporary entries that interrupted runs left in the output folder."""
        if not self.output_dir.is_dir():
            return 0
        leftovers = [p for p in self.output_dir.iterdir() if is_temp(p) and is_abandoned(p)]
        for path in leftovers:
            remove(path)
        return len(leftovers)

    def run(self, jobs: list[Job], process: Callable[[Job, Path], None], desc: str = "",
            skipped: int = 0) -> Summary:
        """Runs `process(job, temp_path)` for each job and renames the result into place. An
        output folder this call made is removed again if nothing was written to it."""
        created = not self.output_dir.exists()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._run_all(jobs, process, desc, skipped)
        finally:
            if created and not any(self.output_dir.iterdir()):
                self.output_dir.rmdir()

    def _run_all(self, jobs: list[Job], process: Callable[[Job, Path], None], desc: str, skipped: int) -> Summary:
        summary = Summary(skipped=skipped, cleaned=self.clean_leftovers())
        if summary.cleaned:
            self.log(f"sam-jax: removed {summary.cleaned} unfinished output(s) of an interrupted run")
        with tqdm(jobs, desc=desc, unit="image", file=sys.stderr, disable=None, leave=False) as bar:
            for job in bar:
                try:
                    self._run_one(job, process)
                except IMAGE_FAILURES as err:
                    message = " ".join(str(err).split()) or type(err).__name__
                    if str(job.source) not in message:
                        message = f"{job.source}: {message}"
                    summary.failed.append((job.source, message))
                    self.log(f"sam-jax: failed: {message}")
                else:
                    summary.done += 1
        return summary

    def _run_one(self, job: Job, process: Callable[[Job, Path], None]) -> None:
        final = job.output
        if final.exists() or final.is_symlink():
            if not self.is_complete(final):
                raise FileExistsError(
                    f"{final} exists but is not a complete output; remove it to redo this image")
            if not self.overwrite:  # completed by someone else since the run was planned
                return
        temp = self._temp_path(final)
        try:
            if self.kind == "dir":
                temp.mkdir()
            process(job, temp)
            if final.exists():  # overwrite: move the old output aside, then swap
                old = self._temp_path(final)
                os.replace(final, old)
                os.replace(temp, final)
                remove(old)
            else:
                os.replace(temp, final)
        finally:
            remove(temp)

    def _temp_path(self, final: Path) -> Path:
        return final.parent / f".{final.name}{TEMP_MARK}{writer_tag()}-{secrets.token_hex(4)}"


def report(summary: Summary, output_dir: Path, stream=None) -> None:
    """The end-of-run line: counts and where the outputs are."""
    print(f"sam-jax: {summary.line()}; outputs in {output_dir}", file=stream or sys.stdout)


def exit_code(summary: Summary) -> int:
    """0 when every image is done or skipped, 1 when any failed."""
    return 1 if summary.failed else 0

