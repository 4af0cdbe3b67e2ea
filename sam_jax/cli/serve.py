"""`sam-jax serve`: click on an image in a browser and see its masks.

Starts a local web server holding one model and prints its URL. The page
opens an image (upload, drag and drop, or pick from --images), embeds it once,
then shows the mask under the cursor; a click adds a foreground point,
shift-click or right-click a background point, a drag draws a box. The JSON
API the page uses (/embed, /predict, /everything) is documented at /docs.

With --annotate the page steps through the --images folder to make a data set
(the data engine's assisted-manual and semi-automatic stages): masks made with
clicks, and the automatic generator's proposals, accepted, fixed or rejected,
are saved as SA-1B files in --annotations, which `prepare_data sa1b
--manual-dir` reads; started again, it resumes at the first image not done.
"""

from __future__ import annotations

import argparse
import socket
import threading
from pathlib import Path

from sam_jax.cli import common


def add_parser(subparsers) -> None:
    parser = common.add_model_command(subparsers, "serve", __doc__, "interactive segmentation in the browser")
    parser.add_argument("--images", metavar="FOLDER", help="a folder of images the page can pick from")
    parser.add_argument("--annotate", action="store_true",
                        help="annotate the --images folder: accepted masks are saved as SA-1B files")
    parser.add_argument("--annotations", metavar="FOLDER",
                        help="with --annotate: where the SA-1B files go (default IMAGES/annotations)")
    parser.add_argument("--proposal-setting", metavar="NAME=VALUE", action="append", default=[],
                        help="with --annotate: a generator setting for the proposals (repeatable; e.g. "
                             "points_per_side=16; the official defaults otherwise)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=common.non_negative_int, default=8000, help="default 8000; 0 picks a free one")
    parser.add_argument("--cache-mb", type=common.positive_int, default=2048,
                        help="memory for cached image embeddings, MiB (default 2048; 4 MiB per image "
                             "for the released models, plus 3 bytes per pixel of the decoded image)")
    parser.add_argument("--max-upload-mb", type=common.positive_int, default=50,
                        help="largest image file accepted, MiB (default 50)")
    parser.add_argument("--max-megapixels", type=common.positive_int, default=50,
                        help="largest image accepted, millions of pixels (default 50)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from sam_jax.serve.annotations import AnnotationStore
    from sam_jax.serve.api import create_app
    from sam_jax.serve.service import EVERYTHING_DEFAULTS, MiB, SegmentationService
    from sam_jax.weights import load_sam

    metadata = common.check_checkpoint(args.checkpoint)
    if args.images is not None and not Path(args.images).is_dir():
        raise common.UsageError(f"--images {args.images}: no such folder")
    if not args.annotate and (args.annotations or args.proposal_setting):
        raise common.UsageError("--annotations and --proposal-setting go with --annotate")
    if args.annotate and args.images is None:
        raise common.UsageError("--annotate needs --images: the folder of images to annotate")
    proposal_settings = dict(setting(text, EVERYTHING_DEFAULTS) for text in args.proposal_setting)
    sock = listen(args.host, args.port)  # before loading: a taken port fails in one line, at once
    service = SegmentationService(
        *load_sam(args.checkpoint), images_folder=args.images, cache_bytes=args.cache_mb * MiB,
        max_upload_bytes=args.max_upload_mb * MiB, max_image_pixels=args.max_megapixels * 10**6)
    annotations = None
    if args.annotate:
        folder = Path(args.annotations) if args.annotations else Path(args.images) / "annotations"
        annotations = AnnotationStore(service, folder, proposal_settings)
        summary = annotations.summary()["progress"]
        common.note(f"annotating {summary['images']} images into {folder} ({summary['images_done']} done, "
                    f"{summary['masks_saved']} masks saved)")
    common.note(f"loaded {metadata['config']['name']} from {args.checkpoint}; compiling the encoder ...")
    service.warm_up()
    # The decoder's common prompt shapes compile while the server already answers.
    threading.Thread(target=service.warm_up_decoder, name="warm-up-decoder", daemon=True).start()
    host, port = sock.getsockname()[:2]
    print(f"{common.PROG}: serving on http://{f'[{host}]' if ':' in host else host}:{port}/ "
          "(API docs at /docs); Ctrl-C stops", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(service, annotations), log_level="warning")).run(sockets=[sock])
    return 0


def setting(text: str, defaults: dict) -> tuple[str, float]:
    """"NAME=VALUE" -> (NAME, VALUE as the type of its default), or a UsageError naming the problem."""
    name, sep, value = text.partition("=")
    if not sep or name not in defaults:
        raise common.UsageError(f"--proposal-setting {text!r}: expected NAME=VALUE, NAME one of {sorted(defaults)}")
    try:
        return name, type(defaults[name])(value)
    except ValueError:
        raise common.UsageError(f"--proposal-setting {text!r}: {value!r} is not "
                                f"{'an integer' if isinstance(defaults[name], int) else 'a number'}") from None


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port), or an OSError naming them."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        raise OSError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None
    return sock
