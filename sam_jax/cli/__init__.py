"""The `sam-jax` command line.

    sam-jax convert sam_vit_b_01ec64.pth converted/vit_b
    sam-jax convert-clip open_clip_model.safetensors converted/clip --config vit_l14_336
    sam-jax segment --checkpoint converted/vit_b --input photo.jpg --output out/ --point-coords "500,375"
    sam-jax segment --checkpoint converted/vit_b --input photos/ --output out/ --prompts prompts.json
    sam-jax segment --checkpoint converted/text_model --clip-checkpoint converted/clip --input photo.jpg \
        --output out/ --text "a wheel"
    sam-jax amg --checkpoint converted/vit_b --input photos/ --output masks/ [--convert-to-rle]
    sam-jax serve --checkpoint converted/vit_b [--images photos/]     # then open the printed URL
    sam-jax export --checkpoint converted/vit_b --format onnx --output exported/   # or stablehlo

`sam-jax <command> --help` describes each. Bad input (a missing or
unreadable file, a malformed prompt, a checkpoint of the wrong kind) is one
line on stderr, `sam-jax: error: ...`, with exit status 2 and nothing written.
Also `python -m sam_jax.cli`.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn, Optional

from sam_jax.cli import amg, export, segment, serve
from sam_jax.cli.common import PROG, UsageError
from sam_jax.errors import CheckpointError

__all__ = ["main"]

NUMERIC_VALUE_FLAGS = ("--point-coords", "--point-labels", "--box")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (argparse prints the usage block too)."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     epilog=f"`{PROG} <command> --help` for each command's options.")
    subparsers = parser.add_subparsers(dest="command", metavar="{segment,amg,serve,export,convert,convert-clip}",
                                       required=True)
    segment.add_parser(subparsers)
    amg.add_parser(subparsers)
    serve.add_parser(subparsers)
    export.add_parser(subparsers)
    add_convert_parser(subparsers)
    add_convert_clip_parser(subparsers)
    return parser


def add_convert_parser(subparsers) -> None:
    """`sam-jax convert`: `python -m checkpoints_convert.convert`'s arguments and run."""
    from checkpoints_convert import convert

    parser = subparsers.add_parser("convert", help="official .pth or Hugging Face weights -> a sam_jax checkpoint folder",
                                   description=convert.DESCRIPTION)
    convert.add_arguments(parser)
    parser.set_defaults(run=convert.run)


def add_convert_clip_parser(subparsers) -> None:
    """`sam-jax convert-clip`: `python -m checkpoints_convert.clip`'s arguments and run."""
    from checkpoints_convert import clip

    parser = subparsers.add_parser("convert-clip", help="open_clip or Hugging Face CLIP weights -> a sam_jax "
                                   "CLIP checkpoint folder (the text encoder of text prompts)",
                                   description=clip.DESCRIPTION)
    clip.add_arguments(parser)
    parser.set_defaults(run=clip.run)


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--point-coords -1,5` -> `--point-coords=-1,5`: argparse takes "-1,5" for an option and
    would answer "expected one argument"; joined, the prompt check names the point instead."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in NUMERIC_VALUE_FLAGS and re.match(r"-[\d.]", arg):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Optional[list[str]] = None) -> int:
    """Runs `sam-jax` with `argv` (default: sys.argv[1:]); returns the exit status."""
    try:
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        args = build_parser().parse_args(_join_negative_values(argv))
        if getattr(args, "check_args", None) is not None:  # combinations of arguments; may exit as argparse
            args.check_args(args)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.run(args)
    except (CheckpointError, UsageError, ValueError, OSError) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130

