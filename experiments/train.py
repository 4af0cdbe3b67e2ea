"""Trains SAM with the paper's interactive loop; resumes from its work directory by itself.

    python -m experiments.train                                   # synthetic_cpu -> workdir/synthetic_cpu
    python -m experiments.train --config vit_b --workdir /ckpt/vit_b --set data.dataset=sa1b
    python -m experiments.train --config vit_b --set init_checkpoint=/ckpt/sam_vit_b \\
        --set optimizer.freeze_image_encoder=True                 # fine-tune the decoder only

Configs and `--set` overrides: `experiments/train_configs.py`. The synthetic
data set is prepared on first use; SA-1B and COCO data sets are prepared
beforehand with `python -m experiments.prepare_data`.

The work directory holds
    config.json                  the resolved config (a restart must use the same one)
    checkpoints/<step>/          orbax: train state, input-iterator state per process, meta
    metrics.jsonl                one row per log step and per evaluation
    tensorboard/                 the same scalars as TensorBoard event files
    curves.png                   loss, training mIoU per interactive iteration, lr, held-out mIoU
    samples.png                  held-out images: ground truth, 1-click and 5-click predictions
    eval.json                    the last point-protocol evaluation (mIoU after 1, 2, 3, 5, 9 clicks)
    model/                       the final params as a converted checkpoint (`sam_jax.load_sam`,
                                 `sam-jax segment --checkpoint`)
    samples/, sample_prompts.json  held-out images and their first clicks, for `sam-jax segment`

Killed at any point and restarted with the same command, a run continues
from its last checkpoint and reaches bit-identical params (on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments import training_report
from experiments.prepare_data import DEFAULT_DATA_DIR
from experiments.train_configs import TrainConfig, get_config
from sam_jax.checkpoint import load_params, save_params
from sam_jax.data.pipeline import InputPipeline, PipelineConfig, evaluation_batches, open_source
from sam_jax.evaluation import point_protocol
from sam_jax.modeling import Sam
from sam_jax.training.checkpointing import TrainCheckpointer
from sam_jax.training.optimizer import learning_rate_schedule, make_optimizer
from sam_jax.training.train_step import create_train_state, fsdp_sharding, make_train_step, sharded_train_step

log = logging.getLogger("sam_jax.train")


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


def config_json(config: TrainConfig) -> Dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def check_workdir_config(workdir: Path, config: TrainConfig) -> None:
    """Refuses to resume a run in `workdir` that was started with another config."""
    path = workdir / "config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != config_json(config):
            changed = _differences(saved, config_json(config))
            raise TrainingError(
                f"{workdir} holds a run with another config (changed: {', '.join(changed[:6])}); "
                "resume it with the same config, or choose a new --workdir"
            )


def write_workdir_config(workdir: Path, config: TrainConfig) -> None:
    if jax.process_index() == 0 and not (workdir / "config.json").exists():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_json(config), indent=2) + "\n")


def host_params(params):
    """Params as numpy on every host (FSDP shards of other hosts gathered)."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def _differences(a: Any, b: Any, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def ensure_data(config: TrainConfig, data_dir: str):
    """The train and eval sources; the synthetic set is generated when missing."""
    dataset = config.data.dataset

    def sources():
        return (open_source(dataset, config.data.train_split, data_dir),
                open_source(dataset, config.data.eval_split, data_dir))

    try:
        return sources()
    except FileNotFoundError as err:
        if not dataset.startswith("sam_synthetic"):
            raise TrainingError(
                f"data set {dataset!r} is not prepared under {data_dir} ({err}); prepare it with "
                f"`python -m experiments.prepare_data {dataset} --data-dir {data_dir} --manual-dir ...`"
            ) from err
    import tensorflow_datasets as tfds

    from sam_jax.data import builders  # noqa: F401  registers the builders

    print(f"preparing {dataset} in {data_dir} (once)", file=sys.stderr)
    tfds.builder(dataset, data_dir=data_dir).download_and_prepare()
    return sources()


def build_model(config: TrainConfig) -> Sam:
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    return Sam(config.model, dtype=dtype, scan_blocks=config.scan_blocks, remat_policy=config.remat_policy,
               drop_path_rate=config.drop_path_rate)


def initial_params(config: TrainConfig, model: Sam):
    if config.init_checkpoint:
        loaded_config, params = load_params(config.init_checkpoint, scan_blocks=config.scan_blocks)
        if loaded_config != config.model:
            raise TrainingError(
                f"init_checkpoint {config.init_checkpoint} is a {loaded_config.name} model, but the config "
                f"trains {config.model.name}; use the matching --config or model"
            )
        return params
    n, low = config.model.image_size, config.model.low_res_mask_size
    return jax.jit(model.init)(
        jax.random.PRNGKey(config.seed), jnp.zeros((1, n, n, 3)), jnp.zeros((1, 1, 2)), jnp.ones((1, 1), jnp.int32),
        jnp.zeros((1, 4)), jnp.zeros((1, 1, low, low)),
    )["params"]


def gather_data_states(state: Dict[str, Any]) -> List[Any]:
    """Every process's input-iterator state (JSON), in process order."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: encoded.size] = encoded
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(rows, np.ravel(lengths))]


class MetricsLog:
    """metrics.jsonl and TensorBoard events, written by process 0; a resumed run drops rows past its step."""

    def __init__(self, workdir: Path, resumed_step: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.rows: List[Dict[str, Any]] = []
        if not self.enabled:
            return
        if self.path.exists():
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [row for row in kept if row["step"] <= resumed_step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


def summarize_window(metrics: List[Dict[str, Any]]) -> Dict[str, float]:
    """Means over the steps of a log window; per-iteration arrays become train/miou_iter_<k>."""
    host = jax.device_get(metrics)
    out: Dict[str, float] = {}
    for key in ("total_loss", "grad_norm", "learning_rate"):
        out[f"train/{key}"] = float(np.mean([m[key] for m in host]))
    for key in ("focal", "dice", "iou_loss"):
        out[f"train/{key}"] = float(np.mean([np.sum(m[key]) for m in host]))
    miou = np.mean([m["miou"] for m in host], axis=0)
    for k, value in enumerate(miou, 1):
        out[f"train/miou_iter_{k}"] = float(value)
    out["train/skipped_steps"] = int(np.sum([m["skipped"] for m in host]))
    return out


def evaluate(config: TrainConfig, model: Sam, params, eval_source, progress: bool = False):
    from tqdm import tqdm

    protocol = point_protocol.ProtocolConfig(num_clicks=config.eval_clicks, seed=config.seed)
    batches = evaluation_batches(eval_source, config.data.eval_preprocess, config.data.eval_batch_size,
                                 config.data.eval_images)
    total = min(config.data.eval_images, len(eval_source))
    with tqdm(total=total, desc="eval", unit="image", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        return point_protocol.evaluate(model, params, batches, protocol, progress=bar).summary()


def eval_row(step: int, summary: Dict[str, Any]) -> Dict[str, Any]:
    row = {"step": step}
    row.update({f"eval/miou_{c}_clicks": v for c, v in summary["miou"].items()})
    row.update({f"eval/oracle_miou_{c}_clicks": v for c, v in summary["oracle_miou"].items()})
    return row


def export_model(workdir: Path, params, config: TrainConfig, step: int) -> Path:
    """Writes the params as a converted checkpoint at workdir/model (replacing an older export)."""
    final = workdir / "model"
    staging = workdir / f"model.{step}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    save_params(staging, jax.device_get(params), config.model, source=f"experiments.train step {step}")
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def train(config: TrainConfig, workdir: Path, data_dir: str, progress: bool = True) -> Dict[str, Any]:
    workdir = workdir.absolute()
    check_workdir_config(workdir, config)
    train_source, eval_source = ensure_data(config, data_dir)
    model = build_model(config)
    params = initial_params(config, model)
    optimizer = make_optimizer(config.optimizer, params, config.model)
    schedule = learning_rate_schedule(config.optimizer)
    state = create_train_state(params, optimizer, config.seed)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    state_shapes = jax.eval_shape(lambda: state)
    compiled_steps: Dict[Any, Any] = {}  # InteractiveConfig -> (compiled step, XLA FLOPs per step)

    def step_for(step_number: int, batch):
        """The compiled step of the loop that step `step_number` trains (compiled on first use)."""
        interactive = config.interactive_at(step_number)
        if interactive not in compiled_steps:
            step_fn = make_train_step(model, optimizer, interactive, learning_rate=schedule,
                                      freeze_image_encoder=config.optimizer.freeze_image_encoder)
            compiled_steps[interactive] = compile_step(sharded_train_step(step_fn, state_shapes, mesh)[0], state, batch)
        return compiled_steps[interactive]

    state = jax.device_put(state, jax.tree.map(fsdp_sharding(mesh), state_shapes))
    write_workdir_config(workdir, config)

    pipeline_config = PipelineConfig(
        global_batch_size=config.data.global_batch_size, seed=config.seed, worker_count=config.data.worker_count,
        prefetch_batches=config.data.prefetch_batches, preprocess=config.data.preprocess,
    )
    pipeline = InputPipeline(train_source, pipeline_config)
    checkpointer = TrainCheckpointer(workdir, max_to_keep=config.keep_checkpoints)
    start_step = 0
    if checkpointer.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, data_states, meta = checkpointer.restore(abstract)
        pipeline.set_state(data_states[jax.process_index()])
        start_step = int(state.step)
        print(f"resumed from the checkpoint of step {start_step} in {checkpointer.directory}", file=sys.stderr)
    metrics_log = MetricsLog(workdir, start_step)

    total = config.total_steps
    bar = _progress_bar(total, start_step, progress)
    window: List[Dict[str, Any]] = []
    window_start = time.perf_counter()
    pending = None  # the previous step's metrics: read one step late so the host never stalls the device
    nonfinite_in_a_row = 0
    try:
        for step_number in range(start_step + 1, total + 1):
            batch = next(pipeline)
            compile_start = time.perf_counter()
            step, flops_per_step = step_for(step_number, batch)
            window_start += time.perf_counter() - compile_start  # compiling is not training throughput
            state, metrics = step(state, batch)
            if pending is not None:
                nonfinite_in_a_row = nonfinite_in_a_row + 1 if bool(pending["skipped"]) else 0
                if nonfinite_in_a_row >= config.max_nonfinite_in_a_row:
                    raise TrainingError(
                        f"{nonfinite_in_a_row} steps in a row up to step {step_number - 1} had a non-finite loss or "
                        f"gradient and were skipped; lower optimizer.learning_rate, set optimizer.grad_clip_norm, "
                        f"or check the data. The last finite checkpoint is in {checkpointer.directory}"
                    )
            pending = metrics
            window.append(metrics)
            if step_number % config.checkpoint_every == 0 or step_number == total:
                checkpointer.save(step_number, state, gather_data_states(pipeline.get_state()),
                                  {"step": step_number})
            # The window closes where the single-prompt steps end: its rows have one iteration's metrics.
            if step_number % config.log_every == 0 or step_number in (total, config.single_prompt_steps):
                row = summarize_window(window)
                elapsed = time.perf_counter() - window_start
                row["train/steps_per_s"] = len(window) / elapsed
                row["train/images_per_s"] = len(window) * config.data.global_batch_size / elapsed
                if flops_per_step:
                    row["train/xla_gflops_per_step"] = flops_per_step / 1e9
                    row["train/gflops_per_s"] = flops_per_step * len(window) / elapsed / 1e9
                row["step"] = step_number
                metrics_log.write(row)
                last = config.interactive_at(step_number).num_iterations
                bar.set_postfix(loss=f"{row['train/total_loss']:.3f}", miou=f"{row['train/miou_iter_1']:.3f}"
                                f"/{row[f'train/miou_iter_{last}']:.3f}")
                window, window_start = [], time.perf_counter()
            if config.eval_every and step_number % config.eval_every == 0 and step_number < total:
                metrics_log.write(eval_row(step_number, evaluate(config, model, host_params(state.params),
                                                                 eval_source, progress)))
                window_start = time.perf_counter()  # evaluation time is not training throughput
            bar.update(1)
        checkpointer.wait_until_finished()
        # The final evaluation; a finished run restarted re-evaluates its restored params
        # (the same figures) without logging them again.
        params = host_params(state.params)
        summary = evaluate(config, model, params, eval_source, progress)
        if start_step < total:
            metrics_log.write(eval_row(total, summary))
    finally:
        bar.close()
        pipeline.close()
        checkpointer.close()
        metrics_log.close()

    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        export_model(workdir, params, config, total)
        training_report.write_curves(workdir / "curves.png", metrics_log.rows, config.interactive)
        training_report.write_samples(workdir, config, model, params, eval_source)
    return summary


def compile_step(step, state, batch):
    """Compiles the step ahead of time; returns it and the FLOPs XLA counts in one step (0 if unknown:
    these include the rematerialised forward passes, so they exceed the model's own FLOPs)."""
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, float((cost or {}).get("flops", 0.0))


def _progress_bar(total: int, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


def restart_with_huge_pages() -> None:
    """Re-executes this command with glibc's malloc putting large blocks on transparent huge pages.

    XLA's CPU runtime allocates a step's temporary buffers afresh on every call, and glibc serves
    large blocks with mmap, so each call first touches fresh 4 KiB pages: ~15,000 page faults per
    decoder gradient of the interactive loop. With huge pages a synthetic_cpu step is 10-20%
    faster. glibc reads the tunable only at start-up; other C libraries ignore it.
    """
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
        os.execv(sys.executable, sys.orig_argv)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="synthetic_cpu", help="a name from experiments/train_configs.py")
    parser.add_argument("--workdir", help="default: workdir/<config>")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"prepared data sets (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a config field, e.g. optimizer.total_steps=100 (repeatable)")
    parser.add_argument("--compilation-cache", default=os.path.join("workdir", "jax_cache"),
                        help="persistent XLA compilation cache, so a restarted run does not compile again "
                             "(default workdir/jax_cache; '' turns it off)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compilation_cache))
    try:
        config = get_config(args.config, tuple(args.overrides))
        workdir = Path(args.workdir or os.path.join("workdir", args.config))
        summary = train(config, workdir, args.data_dir, progress=not args.no_progress)
    except (TrainingError, ValueError, FileNotFoundError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())
