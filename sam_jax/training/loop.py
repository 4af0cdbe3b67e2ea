"""The training run: `train_and_evaluate(config, workdir)` trains, logs, checkpoints, evaluates
and exports, and resumes from its work directory by itself.

    from sam_jax.training.loop import train_and_evaluate
    summary = train_and_evaluate(config, Path("/ckpt/vit_b"), data_dir="/data/tfds")

Every process of a multi-process run makes the same call. The work directory holds
    config.json                  the resolved config (a restart must use the same one)
    checkpoints/<step>/          orbax: train state, input-iterator state per process, meta
    metrics.jsonl, tensorboard/  one row per log step and per evaluation (`metrics_log`)
    run_info.json                per start: the step, CPU model, devices and the fp32 matmul rate
                                 measured there (the yardstick for the GFLOP/s in the log rows)
    curves.png, samples.png      loss, training mIoU, lr, held-out mIoU; held-out predictions
    eval.json                    the last point-protocol evaluation (mIoU after 1, 2, 3, 5, 9 clicks)
                                 and the first click's on the images made uniform grey
    model/                       the final params as a converted checkpoint (`sam_jax.load_sam`,
                                 `sam-jax segment --checkpoint`)
    samples/, sample_prompts.json  held-out images and their first clicks, for `sam-jax segment`

Killed at any point and restarted with the same config, a run continues from its
last checkpoint and reaches bit-identical params (on the CPU).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp

from sam_jax.clip import CLIP
from sam_jax.clip.checkpoint import load_clip
from sam_jax.data.pipeline import DEFAULT_DATA_DIR, InputPipeline, PipelineConfig, evaluation_batches, open_source
from sam_jax.evaluation import point_protocol
from sam_jax.host import cpu_model, matmul_rate, xla_flops
from sam_jax.modeling import Sam
from sam_jax.training import report
from sam_jax.training.config import TrainConfig
from sam_jax.training.interactive import InteractiveConfig
from sam_jax.training.metrics_log import MetricsLog, eval_row, summarize_window
from sam_jax.training.optimizer import OptimizerConfig
from sam_jax.training.parallel import PARALLEL, gather_data_states
from sam_jax.training.state_checkpoints import TrainStateCheckpointer
from sam_jax.training.train_step import create_train_state, make_train_step
from sam_jax.weights import init_params, load_params, save_params

CONFIG_FILE = "config.json"
MODEL_DIR = "model"
RUN_INFO_FILE = "run_info.json"


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


def config_json(config: TrainConfig) -> Dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def check_workdir_config(workdir: Path, config: TrainConfig) -> None:
    """Refuses to resume a run in `workdir` that was started with another config."""
    path = workdir / CONFIG_FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TrainingError(f"{path}: not a readable config ({err}); remove it or choose a new --workdir") from err
        if saved != config_json(config):
            changed = _differences(saved, config_json(config))
            raise TrainingError(
                f"{workdir} holds a run with another config (changed: {', '.join(changed[:6])}); "
                "resume it with the same config, or choose a new --workdir"
            )


def write_workdir_config(workdir: Path, config: TrainConfig) -> None:
    """Records the config beside the first checkpoint: until a checkpoint exists there is
    nothing to resume, so a run that fails before one leaves no config to refuse the next."""
    if jax.process_index() == 0 and not (workdir / CONFIG_FILE).exists():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / CONFIG_FILE).write_text(json.dumps(config_json(config), indent=2) + "\n")


def record_start(workdir: Path, step: int, matmul_gflops_per_s: float) -> None:
    """Appends this start of the run to run_info.json (process 0): where it ran, and the fp32
    matmul rate measured there, which the log rows' GFLOP/s are a share of."""
    if jax.process_index() != 0:
        return
    path = workdir / RUN_INFO_FILE
    info = json.loads(path.read_text()) if path.exists() else {"starts": []}
    info["starts"].append({
        "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_model(), "jax": jax.__version__,
        "backend": jax.default_backend(), "devices": jax.device_count(), "processes": jax.process_count(),
        "matmul_gflops_per_s": matmul_gflops_per_s,
    })
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")


def _differences(a: Any, b: Any, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def open_data(config: TrainConfig, data_dir: str):
    """The train and eval sources; the synthetic sets are generated when missing."""
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

    print(f"preparing {dataset} in {data_dir} (once)", file=sys.stderr)
    tfds.builder(dataset, data_dir=data_dir).download_and_prepare()
    return sources()


def build_model(config: TrainConfig) -> Sam:
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    return Sam(config.model, dtype=dtype, scan_blocks=config.scan_blocks, remat_policy=config.remat_policy,
               drop_path_rate=config.drop_path_rate, attention_impl=config.attention_impl)


def initial_params(config: TrainConfig, model: Sam):
    if config.init_checkpoint:
        loaded_config, params = load_params(config.init_checkpoint, scan_blocks=config.scan_blocks)
        if loaded_config != config.model:
            raise TrainingError(
                f"init_checkpoint {config.init_checkpoint} is a {loaded_config.name} model, but the config "
                f"trains {config.model.name}; use the matching --config or model"
            )
        return params
    return init_params(model, config.seed)


def text_prompt_tower(config: TrainConfig) -> tuple[Optional[CLIP], Any]:
    """The CLIP module and the frozen train-state params of text-prompt training:
    (None, None) without it, else (CLIP, {"clip": its image tower's params})."""
    if config.interactive.text.probability == 0:
        return None, None
    clip_config, clip_params = load_clip(config.clip_checkpoint)
    if clip_config.embed_dim != config.model.text_embed_dim:
        raise TrainingError(f"clip_checkpoint {config.clip_checkpoint} embeds to {clip_config.embed_dim} dims, the "
                            f"model's text head takes model.text_embed_dim={config.model.text_embed_dim}")
    return CLIP(clip_config), {"clip": {"visual": clip_params["visual"], "logit_scale": clip_params["logit_scale"]}}


def evaluate(config: TrainConfig, model: Sam, params, eval_source, progress: bool = False) -> Dict[str, Any]:
    """The point protocol on the held-out split at the training resolution; its summary, with
    "gray_images_first_click": the first click's mIoU (most confident, oracle) on the same
    images replaced by uniform grey. A model whose figure there equals its real one has learnt
    only where prompts fall, not what the image shows."""
    from tqdm import tqdm

    protocol = point_protocol.ProtocolConfig(num_clicks=config.eval_clicks, seed=config.seed)
    batches = lambda: evaluation_batches(eval_source, config.data.eval_preprocess, config.data.eval_batch_size,
                                         config.data.eval_images)
    total = min(config.data.eval_images, len(eval_source))
    with tqdm(total=total, desc="eval", unit="image", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        summary = point_protocol.evaluate(model, params, batches(), protocol, progress=bar).summary()
    gray = point_protocol.evaluate(model, params, point_protocol.gray_images(batches()),
                                   dataclasses.replace(protocol, num_clicks=1)).summary()
    summary["gray_images_first_click"] = {"miou": gray["miou"]["1"], "oracle_miou": gray["oracle_miou"]["1"]}
    return summary


def step_flops(model: Sam, optimizer_config: OptimizerConfig, interactive: InteractiveConfig, state, batch,
               clip: Optional[CLIP] = None) -> float:
    """XLA's FLOPs of one train step of a (host or abstract) state on the global batch `batch`
    (arrays or shapes), all devices' work together; 0 if the backend counts none. They include
    the forward passes that rematerialisation recomputes, so they exceed the model's own FLOPs,
    and every iteration of the step's loops (`host.xla_flops`)."""
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return xla_flops(make_train_step(model, optimizer_config, interactive, clip=clip), shapes(state), shapes(batch))


def train_and_evaluate(config: TrainConfig, workdir: Path, data_dir: str = DEFAULT_DATA_DIR,
                       progress: bool = True) -> Dict[str, Any]:
    """Trains `config` in `workdir` (resuming what is there), evaluates and exports; returns
    the final point-protocol summary (what eval.json holds)."""
    workdir = Path(workdir).absolute()
    check_workdir_config(workdir, config)
    train_source, eval_source = open_data(config, data_dir)
    # Measured before the input pipeline's workers start, which would share the cores; only
    # process 0 records it.
    matmul_gflops_per_s = round(matmul_rate(2048, 5) / 1e9, 1) if jax.process_index() == 0 else 0.0
    model = build_model(config)
    clip, frozen = text_prompt_tower(config)
    state = create_train_state(initial_params(config, model), config.optimizer, config.model, config.seed, frozen)
    state_shapes = jax.eval_shape(lambda: state)
    parallel = PARALLEL[config.parallelism](state_shapes)
    compiled_steps: Dict[Any, Any] = {}  # InteractiveConfig -> (compiled step, XLA FLOPs per step)

    def step_for(step_number: int, global_batch, batch):
        """The compiled step of the loop that step `step_number` trains (compiled on first use for
        `batch`, the step's input, and its FLOPs counted on `global_batch`, the pipeline's)."""
        interactive = config.interactive_at(step_number)
        if interactive not in compiled_steps:
            step = parallel.train_step(model, config.optimizer, interactive, clip)
            compiled_steps[interactive] = (step.lower(state, batch).compile(),
                                           step_flops(model, config.optimizer, interactive, state_shapes,
                                                      global_batch, clip))
        return compiled_steps[interactive]

    pipeline = InputPipeline(train_source, PipelineConfig(
        global_batch_size=config.data.global_batch_size, seed=config.seed, worker_count=config.data.worker_count,
        prefetch_batches=config.data.prefetch_batches, preprocess=config.data.preprocess,
    ))
    checkpointer = TrainStateCheckpointer(workdir, max_to_keep=config.keep_checkpoints)
    start_step = 0
    try:
        if checkpointer.latest_step() is not None:
            restored, data_states, _ = checkpointer.restore(parallel.abstract_state())
            pipeline.set_state(data_states[jax.process_index()])
            start_step = int(restored.step)
            state = restored
            print(f"resumed from the checkpoint of step {start_step} in {checkpointer.directory}", file=sys.stderr)
        state = parallel.place(state)
    except BaseException:
        pipeline.close()
        checkpointer.close()
        raise
    metrics_log = MetricsLog(workdir, start_step)
    record_start(workdir, start_step, matmul_gflops_per_s)
    print(f"training on {jax.device_count()} devices ({config.parallelism})", file=sys.stderr)

    total = config.total_steps
    bar = _progress_bar(total, start_step, progress)
    window: List[Dict[str, Any]] = []
    window_start = time.perf_counter()
    pending = None  # the previous step's metrics: read one step late so the host never stalls the device
    nonfinite_in_a_row = 0
    try:
        for step_number in range(start_step + 1, total + 1):
            global_batch = next(pipeline)
            batch = parallel.batch(global_batch)
            compile_start = time.perf_counter()
            step, flops_per_step = step_for(step_number, global_batch, batch)
            window_start += time.perf_counter() - compile_start  # compiling is not training throughput
            state, metrics = step(state, batch)
            metrics = parallel.metrics(metrics)
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
                write_workdir_config(workdir, config)
                checkpointer.save(step_number, parallel.checkpointed(state), gather_data_states(pipeline.get_state()),
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
                metrics_log.write(eval_row(step_number, evaluate(config, model, parallel.host_params(state),
                                                                 eval_source, progress)))
                window_start = time.perf_counter()  # evaluation time is not training throughput
            bar.update(1)
        checkpointer.wait_until_finished()
        # The final evaluation; a finished run restarted re-evaluates its restored params
        # (the same figures) without logging them again.
        params = parallel.host_params(state)
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
        save_params(workdir / MODEL_DIR, params, config.model, source=f"sam_jax.training step {total}",
                    overwrite=True)
        report.write_curves(workdir / "curves.png", metrics_log.rows, config.interactive)
        report.write_samples(workdir, config, model, params, eval_source)
    return summary


def _progress_bar(total: int, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
