"""What the `sam-jax` subcommands share: the folder-run skeleton, input listing, checkpoint checks,
argument types and help texts."""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

from sam_jax.configs import CONFIGS
from sam_jax.errors import CheckpointError
from sam_jax.folder_runner import FolderRunner, Job, exit_code, report
from sam_jax.image_io import list_images
from sam_jax.weights import read_metadata

PROG = "sam-jax"


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit status 2."""


def note(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr)


def resolve_inputs(input_path: str) -> tuple[list[Path], bool]:
    """(image files, whether --input named a single file). A folder is read non-recursively."""
    path = Path(input_path)
    if not path.exists():
        raise UsageError(f"--input {path}: no such file or folder")
    if not path.is_dir():
        return [path], True
    images, others = list_images(path)
    if not images:
        extra = f" ({len(others)} file(s) with other extensions)" if others else ""
        raise UsageError(f"--input {path}: the folder holds no image files{extra}")
    if others:
        shown = ", ".join(p.name for p in others[:3]) + (", ..." if len(others) > 3 else "")
        note(f"ignoring {len(others)} file(s) that are not images by extension in {path}: {shown}")
    return images, False


def make_jobs(images: list, output_dir: str, suffix: str = "", prefix: str = "") -> list[Job]:
    """One job per input (an image Path, or any input with a `.stem`), output
    `<output_dir>/<prefix><stem><suffix>`; refuses two inputs with one output."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output {output_dir}: exists and is not a folder")
    by_name: dict[str, Any] = {}
    for image in images:
        name = prefix + image.stem + suffix
        if name in by_name:
            raise UsageError(
                f"{_label(by_name[name])} and {_label(image)} would both be written to {output_dir / name}; "
                "rename one of them"
            )
        by_name[name] = image
    return [Job(image, output_dir / name) for name, image in by_name.items()]


def _label(image) -> str:
    return image.name if isinstance(image, Path) else str(image)


def check_checkpoint(path: str, model_type: Optional[str] = None) -> dict:
    """Fails early, in one line, unless `path` is a converted sam_jax checkpoint folder."""
    checkpoint = Path(path)
    if checkpoint.is_file():
        raise CheckpointError(
            f"--checkpoint {checkpoint} is a file, not a converted sam_jax checkpoint folder; "
            f"convert it first: {PROG} convert {checkpoint} CONVERTED_DIR"
        )
    metadata = read_metadata(checkpoint)
    name = metadata.get("config", {}).get("name")
    if model_type is not None and name != model_type:
        raise CheckpointError(
            f"--checkpoint {checkpoint} is a {name} checkpoint, not --model-type {model_type}")
    return metadata


def run_images(args: argparse.Namespace, jobs: list[Job], single: bool, *, kind: str,
               is_complete: Callable[[Path], bool], prepare: Callable[[Path], Any],
               load: Callable[[dict], Any], process: Callable[[Path, Any, Path, Any], None], desc: str) -> int:
    """The run of `segment` and `amg` over their jobs (`make_jobs`); returns the exit status.

    Checks the checkpoint, skips finished images, and for a
    single input image runs `prepare(source)` (reading it, raising ValueError) before the
    model loads, so that its problems are fatal and cheap. Then `load(checkpoint
    metadata)` makes the model (only if there is work) and each image's output is written
    atomically by `process(source, prepared, output path, model)` under a FolderRunner
    (`kind`, `is_complete`: see FolderRunner).
    """
    metadata = check_checkpoint(args.checkpoint, args.model_type)
    runner = FolderRunner(args.output, kind, is_complete, args.overwrite)
    pending, skipped = runner.pending(jobs)
    if single:
        for job in pending:
            job.data = prepare(job.source)
    model = load(metadata) if pending else None

    def run_one(job: Job, output: Path) -> None:
        prepared = job.data if job.data is not None else prepare(job.source)
        job.data = None  # free the image once used
        process(job.source, prepared, output, model)

    summary = runner.run(pending, run_one, desc=desc, skipped=skipped)
    report(summary, Path(args.output))
    return exit_code(summary)


# ----------------------------------------------------------------------------- argument types


def _number(kind: type, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False, what: str = "") -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
        return value

    return parse


positive_int = _number(int, 1, what="an integer >= 1")
non_negative_int = _number(int, 0, what="an integer >= 0")
any_float = _number(float, -math.inf, what="a finite number")
non_negative_float = _number(float, 0.0, what="a number >= 0")
unit_float = _number(float, 0.0, 1.0, what="a number in [0, 1]")
fraction = _number(float, 0.0, 1.0, low_open=True, what="a number in (0, 1]")
overlap_ratio = _number(float, 0.0, 1.0, high_open=True, what="a number in [0, 1)")


# ----------------------------------------------------------------------------- shared options and help

INPUT_HELP = "--input is an image file or a folder of images (read non-recursively)."
IMAGE_HELP = """\
Images are read as the official scripts/amg.py (cv2.imread) reads them: 8-bit
RGB as is; grayscale, palette and CMYK converted to RGB; an alpha channel
dropped (not composited); 16-bit images reduced to their high byte
(value >> 8); the EXIF orientation applied; the first frame of multi-frame
files. 32-bit integer and floating-point images are refused (no fixed range)."""
RUN_HELP = """\
Folders: files with image extensions are read (hidden files and subfolders
are not); a progress bar shows on a terminal. Each image's output is written
under a hidden temporary name and renamed when complete, so a re-run skips
finished images and redoes (and cleans up after) an interrupted one;
--overwrite redoes finished ones too. In a folder, an image that fails
(unreadable, prompt outside it) is reported in one line and the run goes on;
a single --input image that fails is an error. Exit status: 0 all done or
skipped, 1 some images in a folder failed, 2 bad arguments, input or
checkpoint (nothing written), 130 interrupted (run again to resume)."""


def description(doc: str) -> str:
    """A subcommand's --help description: its module docstring's first paragraph, without the name."""
    first = " ".join(doc.split("\n\n")[0].split()).split(": ", 1)[-1]
    return textwrap.fill(f"{first[0].upper()}{first[1:]} {INPUT_HELP}", 79)


def epilog(doc: str) -> str:
    """A subcommand's --help epilog: the rest of its module docstring, how images and folders are read."""
    return f"{doc.split(chr(10), 2)[2].strip()}\n\n{IMAGE_HELP}\n\n{RUN_HELP}"


def add_command(subparsers, name: str, help: str, doc: str) -> argparse.ArgumentParser:
    """A subcommand over images: help texts from its module docstring `doc`, and the
    --checkpoint / --input / --output / --model-type / --overwrite arguments."""
    parser = subparsers.add_parser(name, help=help, description=description(doc), epilog=epilog(doc),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_arguments(parser)
    return parser


def add_model_command(subparsers, name: str, doc: str, help: str) -> argparse.ArgumentParser:
    """A subcommand over one model (serve, export): its module docstring's second paragraph as
    the description, and --checkpoint."""
    parser = subparsers.add_parser(name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   description=textwrap.fill(" ".join(doc.split("\n\n")[1].split()), 79))
    add_checkpoint_argument(parser)
    return parser


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help=f"a converted sam_jax checkpoint folder (make one with `{PROG} convert`)")


def add_io_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--input", required=True, metavar="IMAGE_OR_FOLDER",
                        help="an image file or a folder of images")
    parser.add_argument("--output", required=True, metavar="OUTDIR", help="folder for the outputs")
    parser.add_argument("--model-type", choices=sorted(CONFIGS),
                        help="fail unless the checkpoint is this model (optional; the checkpoint records it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo images whose output already exists (default: skip them)")

