"""Throughput of the data engine's fully automatic stage: `sam-jax amg --sa1b` with 1 and 2 processes.

  python -m experiments.benchmark_amg --checkpoint workdir/synthetic_cpu/model \\
      --input tfds:sam_synthetic/cpu:validation --images 40 --processes 1,2
  python -m experiments.benchmark_amg --model-type vit_b --image-size 1500x2250 --images 6   # random weights

Each run is the real command line in fresh processes (under `jax.distributed` when
there are several), over the first --images inputs, into an empty folder. A run's wall
time holds each process's start (imports, checkpoint, compiling); a second run over as
many images as processes measures that, and the steady rate is
(images - processes) / (wall - start wall). Writes JSON (--output) with the host's CPU
model and matmul rate, images/s, masks/image and masks/s, and the 11M-image estimate
(SA-1B's size) at the steady rate, stated as an estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sam_jax.data.pipeline import DEFAULT_DATA_DIR
from sam_jax.host import cpu_model, matmul_rate

SA1B_IMAGES = 11_000_000
ROOT = Path(__file__).resolve().parents[1]


def write_inputs(args: argparse.Namespace, folder: Path) -> str:
    """The --input for the runs: a folder of the first --images inputs."""
    from PIL import Image

    folder.mkdir()
    if args.input is None:  # synthetic photos of --image-size
        from experiments.sample_image import synthetic_image

        h, w = (int(v) for v in args.image_size.split("x"))
        for i in range(args.images):
            Image.fromarray(synthetic_image(h, w, seed=i)).save(folder / f"{i:05d}.jpg", quality=95)
        return str(folder)
    if args.input.startswith("tfds:"):
        from sam_jax.data.pipeline import open_source

        name, _, split = args.input[len("tfds:"):].rpartition(":")
        source = open_source(name, split, args.data_dir)
        for i in range(min(args.images, len(source))):
            Image.fromarray(source[i]["image"]).save(folder / f"{i:05d}.png")
        return str(folder)
    for path in sorted(Path(args.input).iterdir())[: args.images]:
        shutil.copy(path, folder / path.name)
    return str(folder)


def run(checkpoint: str, inputs: str, output: Path, processes: int, amg_args: list[str]) -> float:
    """Wall seconds of `sam-jax amg --sa1b` over `inputs` in `processes` processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "sam_jax.cli", "amg", "--checkpoint", checkpoint, "--input", inputs,
               "--output", str(output), "--sa1b", *amg_args]
    if processes > 1:
        command += ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(processes)]
    start = time.perf_counter()
    workers = [subprocess.Popen(command + (["--process-id", str(i)] if processes > 1 else []), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(processes)]
    logs = [w.communicate()[0] for w in workers]
    seconds = time.perf_counter() - start
    if any(w.returncode for w in workers):
        raise RuntimeError("amg failed:\n" + "\n".join(logs))
    return seconds


def masks_per_image(output: Path) -> float:
    counts = [len(json.loads(p.read_text())["annotations"]) for p in output.glob("sa_*.json")]
    return float(np.mean(counts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a converted sam_jax checkpoint (default: random --model-type)")
    parser.add_argument("--model-type", default="vit_b", help="random official-layout weights of this size")
    parser.add_argument("--input", help="a folder or tfds:NAME:SPLIT (default: synthetic photos)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--image-size", default="1500x2250", help="HxW of the synthetic photos")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--amg", default="", help="extra amg options, e.g. '--preset sa1b'")
    parser.add_argument("--output", type=Path, help="JSON result (default workdir/benchmarks/amg_<model>.json)")
    args = parser.parse_args(argv)
    counts = [int(p) for p in args.processes.split(",")]
    amg_args = args.amg.split()

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        checkpoint, weights = args.checkpoint, args.checkpoint
        if checkpoint is None:
            import torch

            from checkpoints_convert import reference_model
            from checkpoints_convert.official import official_to_flax
            from sam_jax.configs import CONFIGS
            from sam_jax.weights import save_params

            torch.manual_seed(0)
            config = CONFIGS[args.model_type]
            reference = reference_model.build_official_for(config).eval()
            params = official_to_flax(reference_model.state_dict_numpy(reference), config)
            checkpoint = str(save_params(work / args.model_type, params, config, source="random official layout"))
            weights = f"random {args.model_type} (official layout, seed 0)"
            del reference, params
        inputs = write_inputs(args, work / "inputs")
        n = len(os.listdir(inputs))
        result = {"command": shlex.join(["python", "-m", "experiments.benchmark_amg", *(argv or sys.argv[1:])]),
                  "checkpoint": weights, "images": n, "amg": args.amg, "cpu": cpu_model(),
                  "threads": os.cpu_count(), "matmul_gflops_before": matmul_rate() / 1e9, "runs": []}
        for p in counts:
            start_inputs = work / f"start_{p}"
            start_inputs.mkdir()
            for name in sorted(os.listdir(inputs))[:p]:
                shutil.copy(Path(inputs) / name, start_inputs / name)
            start_wall = run(checkpoint, str(start_inputs), work / f"start_out_{p}", p, amg_args)
            output = work / f"out_{p}"
            wall = run(checkpoint, inputs, output, p, amg_args)
            steady = (n - p) / (wall - start_wall)
            per_image = masks_per_image(output)
            row = {"processes": p, "wall_s": wall, "start_and_one_image_per_process_s": start_wall,
                   "images_per_s": n / wall, "steady_images_per_s": steady, "masks_per_image": per_image,
                   "steady_masks_per_s": steady * per_image,
                   "sa1b_11m_images_estimate_days_per_host": SA1B_IMAGES / steady / 86400}
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
        result["matmul_gflops_after"] = matmul_rate() / 1e9
    name = Path(args.checkpoint).name if args.checkpoint else args.model_type
    output = args.output or ROOT / "workdir" / "benchmarks" / f"amg_{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
