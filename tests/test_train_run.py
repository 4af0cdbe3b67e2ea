"""`experiments.train` end to end on the seconds-long `synthetic_smoke` config: what a run
writes, `sam-jax segment` on its export, exact resume after SIGKILL, and refused inputs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import train
from experiments.train_configs import get_config
from sam_jax.data.pipeline import evaluation_batches, open_source
from sam_jax.evaluation import point_protocol
from sam_jax.training.loop import check_workdir_config
from sam_jax import load_sam
from sam_jax.tree_paths import flatten

ROOT = Path(__file__).resolve().parents[1]
# The smoke config's vit_tiny cut to 2 blocks at 128 px (test_train_step.py's micro model): every run
# here compiles its steps, and what these tests check is the run, not the model's size.
MICRO = ("model.encoder.depth=2", "model.encoder.global_attn_indexes=(1,)", "model.decoder_depth=1",
         "model.encoder.image_size=128", "model.encoder.window_size=4", "data.preprocess.image_size=128",
         "data.preprocess.low_res_size=32")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def run_train(workdir, synthetic_data_dir, cache_dir, *overrides, wait=True):
    """`experiments.train` on the micro model in a subprocess (at conftest's FAST_COMPILE, inherited)."""
    command = [sys.executable, "-m", "experiments.train", "--config", "synthetic_smoke", "--workdir", str(workdir),
               "--data-dir", synthetic_data_dir, "--compilation-cache", cache_dir, "--no-progress"]
    for override in (*MICRO, *overrides):
        command += ["--set", override]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    out, err = process.communicate(timeout=900)
    return process.returncode, out, err


def params_of(directory):
    return flatten(load_sam(directory)[1])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_data_dir, cache_dir):
    workdir = tmp_path_factory.mktemp("run") / "smoke"
    code, out, err = run_train(workdir, synthetic_data_dir, cache_dir, "optimizer.total_steps=8")
    assert code == 0, err
    return workdir, out


def test_a_run_writes_logs_pictures_and_a_loadable_model(finished_run, synthetic_data_dir):
    workdir, out = finished_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/total_loss" in r]
    # Every 2 steps, and at step 3 where the single-prompt steps end.
    assert [r["step"] for r in train_rows] == [2, 3, 4, 6, 8]
    for row in train_rows:
        assert np.isfinite(row["train/total_loss"]) and row["train/learning_rate"] > 0
        iterations = 1 if row["step"] <= 3 else 4  # then 1 + 2 corrections + 1 mask-only
        assert {k for k in row if k.startswith("train/miou_iter_")} == {
            f"train/miou_iter_{k}" for k in range(1, iterations + 1)}
        assert row["train/steps_per_s"] > 0 and row["train/grad_norm"] > 0
    eval_row = rows[-1]
    assert eval_row["step"] == 8 and set(eval_row) >= {"eval/miou_1_clicks", "eval/miou_3_clicks",
                                                        "eval/iou_head_picks_best"}
    assert json.loads(out) == json.loads((workdir / "eval.json").read_text())
    assert json.loads(out)["num_images"] == 4
    assert eval_row["eval/iou_head_picks_best"] == json.loads(out)["iou_head_first_click"]["picks_best"]
    # The first click again on the held-out images made uniform grey (here by hand): what the model scores blind.
    config = get_config("synthetic_smoke", (*MICRO, "optimizer.total_steps=8"))
    batches = evaluation_batches(open_source(config.data.dataset, config.data.eval_split, synthetic_data_dir),
                                 config.data.eval_preprocess, config.data.eval_batch_size, config.data.eval_images)
    model, params = load_sam(workdir / "model")
    blind = point_protocol.evaluate(model, params, (dict(b, image=np.full_like(b["image"], 128)) for b in batches),
                                    point_protocol.ProtocolConfig(num_clicks=1, seed=config.seed)).summary()
    assert json.loads(out)["gray_images_first_click"] == pytest.approx(
        {"miou": blind["miou"]["1"], "oracle_miou": blind["oracle_miou"]["1"]}, abs=1e-6)
    assert eval_row["eval/gray_images_miou_1_clicks"] == json.loads(out)["gray_images_first_click"]["miou"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/total_loss")] == [2, 3, 4, 6, 8]
    assert [e.value for e in events.Scalars("train/total_loss")] == pytest.approx(
        [r["train/total_loss"] for r in train_rows], rel=1e-6)
    assert events.Scalars("eval/miou_1_clicks")[0].value == pytest.approx(eval_row["eval/miou_1_clicks"])

    for picture in ("curves.png", "samples.png"):
        with Image.open(workdir / picture) as image:
            assert image.size[0] > 200 and image.size[1] > 100
    params = params_of(workdir / "model")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "6", "8"]  # keep_checkpoints=3
    assert len(params) > 50 and all(np.isfinite(v).all() for v in params.values())
    (start,) = json.loads((workdir / "run_info.json").read_text())["starts"]  # one start: a fresh run
    assert start["step"] == 0 and start["devices"] == 1 and start["matmul_gflops_per_s"] > 0
    assert start["cpu"] and start["backend"] == "cpu"


def test_sam_jax_segment_runs_on_the_exported_model(finished_run, tmp_path):
    from sam_jax.cli import main

    workdir, _ = finished_run
    samples = workdir / "samples"
    prompts = json.loads((workdir / "sample_prompts.json").read_text())
    assert len(prompts) == 2
    code = main(["segment", "--checkpoint", str(workdir / "model"), "--input", str(samples),
                 "--prompts", str(workdir / "sample_prompts.json"), "--output", str(tmp_path / "out")])
    assert code == 0
    for name in prompts:
        result = json.loads((tmp_path / "out" / Path(name).stem / "result.json").read_text())
        with Image.open(samples / name) as image:
            assert (result["image"]["height"], result["image"]["width"]) == (image.height, image.width)
            assert result["prompt"]["point_coords"] == prompts[name]["point_coords"]


def test_a_finished_run_restarted_does_not_train_again(finished_run, synthetic_data_dir, cache_dir):
    workdir, out = finished_run
    before = (workdir / "metrics.jsonl").read_text()
    code, out2, err = run_train(workdir, synthetic_data_dir, cache_dir, "optimizer.total_steps=8")
    assert code == 0, err
    assert "resumed from the checkpoint of step 8" in err
    assert json.loads(out2) == json.loads(out)
    assert (workdir / "metrics.jsonl").read_text() == before


def test_sigkill_and_restart_reach_bit_identical_params(finished_run, tmp_path, synthetic_data_dir, cache_dir):
    reference, _ = finished_run
    workdir = tmp_path / "killed"
    process = run_train(workdir, synthetic_data_dir, cache_dir, "optimizer.total_steps=8", wait=False)
    checkpoint = workdir / "checkpoints" / "4"
    deadline = time.monotonic() + 600
    while not (checkpoint / "_CHECKPOINT_METADATA").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint of step 4 within 10 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (workdir / "model").exists()

    code, _, err = run_train(workdir, synthetic_data_dir, cache_dir, "optimizer.total_steps=8")
    assert code == 0, err
    assert "resumed from the checkpoint of step" in err
    resumed = int(err.split("resumed from the checkpoint of step ")[1].split()[0])
    starts = json.loads((workdir / "run_info.json").read_text())["starts"]
    assert [start["step"] for start in starts] == [0, resumed]  # each start recorded
    expected, got = params_of(reference / "model"), params_of(workdir / "model")
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6, 8, 8]  # rows past the restored step were dropped, none repeated


def test_a_changed_config_on_resume_is_refused(finished_run, synthetic_data_dir, cache_dir, capsys):
    workdir, _ = finished_run
    code = train.main(["--config", "synthetic_smoke", "--workdir", str(workdir), "--data-dir", synthetic_data_dir,
                       "--compilation-cache", cache_dir, "--set", "optimizer.total_steps=8",
                       "--set", "optimizer.learning_rate=0.5", *(f"--set={o}" for o in MICRO)])
    assert code == 2
    assert "another config (changed: optimizer.learning_rate)" in capsys.readouterr().err


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path, synthetic_data_dir, cache_dir):
    code, _, err = run_train(tmp_path / "nan", synthetic_data_dir, cache_dir, "optimizer.learning_rate=1e30",
                             "optimizer.warmup_steps=0", "optimizer.total_steps=12", "max_nonfinite_in_a_row=3",
                             "single_prompt_steps=0")  # one loop: one compile
    assert code == 2
    assert "3 steps in a row" in err and "non-finite" in err
    assert f"The last finite checkpoint is in {tmp_path / 'nan' / 'checkpoints'}" in err
    import jax
    import orbax.checkpoint as ocp

    for step_dir in (tmp_path / "nan" / "checkpoints").iterdir():  # whatever was saved is finite
        leaves = jax.tree.leaves(ocp.StandardCheckpointer().restore(step_dir / "state"))
        assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(np.asarray(x).dtype, np.floating))


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.learning_rate"], "path=value"),
    (["optimizer.nope=1"], "no field 'nope' in OptimizerConfig"),
    (["dtype=float16"], "dtype must be"),
    (["single_prompt_steps=7"], r"single_prompt_steps must be in \[0, optimizer.total_steps=6\], got 7"),
    (["optimizer.total_steps=4", "single_prompt_steps=5"], r"total_steps=4\], got 5"),
    (["optimizer.decay_steps=(3,)", "optimizer.total_steps=3"], r"OptimizerConfig.decay_steps must be before total_steps=3"),
    (["dtype='float32'", "dtype.x=1"], "str has no field 'x'"),
    (["data='x'", "data.dataset=y"], "conflicts with the earlier --set data='x'"),
    # A value of the wrong type for its field is named, not an AttributeError deep in the run.
    (["model=5"], "--set model=5: TrainConfig.model must be SamConfig, got int 5"),
    (["optimizer.learning_rate=fast"], "OptimizerConfig.learning_rate must be float, got str 'fast'"),
    (["scan_blocks=1"], "TrainConfig.scan_blocks must be bool, got int 1"),
    (["init_checkpoint=3"], r"TrainConfig.init_checkpoint must be Optional\[str\], got int 3"),
    (["data.preprocess.scale_range=(1, 'a')"], "PreprocessConfig.scale_range must be"),
    (["data.global_batch_size=0"], "data.global_batch_size must be >= 1, got 0"),
    (["parallelism=tpu"], r"parallelism must be one of \('fsdp', 'pmap'\), got 'tpu'"),
    (["interactive.max_masks=4"], r"interactive.max_masks=4 must be <= data.preprocess.max_masks=3"),
    (["interactive.mask_chunks=3", "interactive.max_masks=2"], "mask_chunks=3 must divide interactive.max_masks=2"),
])
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("synthetic_smoke", tuple(overrides))


@pytest.mark.parametrize("overrides, expected", [
    (("optimizer.total_steps=800", "optimizer.total_steps=3000", "optimizer.decay_steps=(2000,)",
      "single_prompt_steps=2500"), (3000, (2000,), 2500)),  # the later total_steps wins
    (("single_prompt_steps=2500", "optimizer.decay_steps=[2000]", "optimizer.total_steps=3000"), (3000, (2000,), 2500)),
    (("optimizer.decay_steps=()", "optimizer.total_steps=800", "single_prompt_steps=800"), (800, (), 800)),
])
def test_overrides_checked_against_each_other_apply_in_any_order(overrides, expected):
    config = get_config("synthetic_cpu", overrides)  # synthetic_cpu: 2,200 steps, decay at 1,950, 1,500 single-prompt
    assert (config.optimizer.total_steps, config.optimizer.decay_steps, config.single_prompt_steps) == expected
    assert config.data == get_config("synthetic_cpu").data


def test_single_prompt_steps_train_the_first_iteration_then_the_full_loop():
    config = get_config("synthetic_smoke")
    assert [config.interactive_at(step).num_iterations for step in range(1, 7)] == [1, 1, 1, 4, 4, 4]
    assert config.interactive_at(1).box_probability == config.interactive.box_probability
    assert get_config("synthetic_smoke", ("single_prompt_steps=0",)).interactive_at(1) == config.interactive
    # interactive.max_masks limits the full loop; single-prompt steps train every mask.
    limited = get_config("synthetic_smoke", ("interactive.max_masks=1",))
    assert limited.interactive_at(1).max_masks is None and limited.interactive_at(6).max_masks == 1


def test_unprepared_real_data_set_says_how_to_prepare(tmp_path, capsys):
    code = train.main(["--config", "synthetic_smoke", "--workdir", str(tmp_path / "w"), "--data-dir",
                       str(tmp_path / "empty"), "--compilation-cache", "", "--set", "data.dataset=sa1b"])
    assert code == 2
    assert "python -m experiments.prepare_data sa1b" in capsys.readouterr().err
    assert not (tmp_path / "w" / "config.json").exists()  # nothing to resume: no config to refuse the next


def test_a_run_that_fails_before_a_checkpoint_does_not_block_the_corrected_one(tmp_path, capsys,
                                                                               synthetic_data_dir):
    """The config is recorded with the first checkpoint, so a refused config leaves none behind."""
    workdir = tmp_path / "w"
    common = ["--config", "synthetic_smoke", "--workdir", str(workdir), "--data-dir", synthetic_data_dir,
              "--compilation-cache", ""]
    assert train.main(common + ["--set", "data.global_batch_size=0"]) == 2
    assert "data.global_batch_size must be >= 1" in capsys.readouterr().err
    assert train.main(common + ["--set", "data.eval_split=test"]) == 2  # refused once the data set is open
    assert "has splits ['train', 'validation'], not 'test'" in capsys.readouterr().err
    assert not (workdir / "config.json").exists()
    check_workdir_config(workdir, get_config("synthetic_smoke"))  # the corrected command is not refused


def test_every_process_input_state_is_gathered_for_the_checkpoint(tmp_path):
    from device_workers import run_workers

    results = run_workers(str(Path(__file__).parent / "gather_states_worker.py"), tmp_path, 2, 1)
    expected = [{"process": p, "position": [3, 5 + p], "pad": "x" * (7 * p)} for p in range(2)]
    for result in results:
        assert json.loads(str(result["gathered"])) == expected


@pytest.mark.parametrize("num_correction_points, num_mask_only", [(0, 0), (8, 2)])
def test_curves_are_drawn_for_any_number_of_iterations(tmp_path, num_correction_points, num_mask_only):
    from sam_jax.training import report as training_report
    from sam_jax.training.interactive import InteractiveConfig

    interactive = InteractiveConfig(num_correction_points=num_correction_points, num_mask_only=num_mask_only)
    parts = {"train/total_loss": 2.0, "train/focal": 0.05, "train/dice": 0.5, "train/iou_loss": 0.1,
             "train/learning_rate": 1e-3}
    rows = [dict(parts, step=s, **{f"train/miou_iter_{k}": 0.1 * k for k in range(1, interactive.num_iterations + 1)})
            for s in (10, 20)]
    rows.append({"step": 20, "eval/miou_1_clicks": 0.2, "eval/miou_3_clicks": 0.3})
    training_report.write_curves(tmp_path / "curves.png", rows, interactive)
    assert (tmp_path / "curves.png").stat().st_size > 1000
