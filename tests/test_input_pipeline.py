"""InputPipeline: determinism, exact resume, per-process shards, epochs, multi-device batches, errors."""

import json
import os

import jax
import numpy as np
import pytest

import device_workers
from data_records import make_record, make_source

from sam_jax.data.pipeline import InputPipeline, PipelineConfig, host_dataset, process_slice
from sam_jax.data.preprocess import PreprocessConfig, unpack_masks

SOURCE_SIZE = 12
WORKER = os.path.join(os.path.dirname(__file__), "input_pipeline_worker.py")


def config(**overrides) -> PipelineConfig:
    preprocess = PreprocessConfig(image_size=64, low_res_size=16, max_masks=4, scale_range=(0.5, 1.5), horizontal_flip=True)
    return PipelineConfig(**{"global_batch_size": 2, "seed": 3, "preprocess": preprocess, **overrides})


@pytest.fixture(scope="module")
def source():
    return make_source(SOURCE_SIZE)


def take(iterator, n):
    return [jax.tree.map(np.asarray, next(iterator)) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_have_the_documented_shapes(source):
    batch = next(InputPipeline(source, config()))
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {
        "image": ((2, 64, 64, 3), np.uint8),
        "image_size": ((2, 2), np.int32),
        "masks": ((2, 4, 64, 64), np.bool_),
        "masks_low_res": ((2, 4, 16, 16), np.bool_),
        "boxes": ((2, 4, 4), np.float32),
        "points": ((2, 4, 2), np.float32),
        "point_valid": ((2, 4), np.bool_),
        "mask_valid": ((2, 4), np.bool_),
        "image_id": ((2,), np.int32),
    }
    assert all(isinstance(v, jax.Array) for v in batch.values())


def test_same_seed_same_batches_other_seed_other_batches(source):
    first = take(InputPipeline(source, config()), 4)
    assert_batches_equal(first, take(InputPipeline(source, config()), 4))
    other = take(InputPipeline(source, config(seed=4)), 4)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


@pytest.mark.parametrize("prefetch_batches", [1, 3])
def test_resume_sees_exactly_the_uninterrupted_batches(source, prefetch_batches):
    uninterrupted = take(InputPipeline(source, config(prefetch_batches=prefetch_batches)), 9)
    first = InputPipeline(source, config(prefetch_batches=prefetch_batches))
    assert_batches_equal(take(first, 5), uninterrupted[:5])
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    first.close()
    resumed = InputPipeline(source, config(prefetch_batches=prefetch_batches))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), uninterrupted[5:])  # 9 batches cross an epoch (12 images, batch 2)


def test_resume_with_worker_processes(source):
    uninterrupted = take(InputPipeline(source, config(worker_count=2)), 4)
    assert_batches_equal(uninterrupted, take(InputPipeline(source, config()), 4))  # workers change nothing
    first = InputPipeline(source, config(worker_count=2))
    take(first, 2)
    state = first.get_state()
    first.close()
    resumed = InputPipeline(source, config(worker_count=2))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 2), uninterrupted[2:])
    resumed.close()


def test_epochs_are_permutations_and_reshuffled(source):
    ds = host_dataset(source, config(global_batch_size=1, num_epochs=2), process_index=0, process_count=1)
    ids = [int(b["image_id"][0]) for b in ds]
    assert sorted(ids[:SOURCE_SIZE]) == sorted(ids[SOURCE_SIZE:]) == list(range(SOURCE_SIZE))
    assert ids[:SOURCE_SIZE] != ids[SOURCE_SIZE:]
    pipeline = InputPipeline(source, config(global_batch_size=1, num_epochs=1))
    assert len(take(pipeline, SOURCE_SIZE)) == SOURCE_SIZE
    with pytest.raises(StopIteration):
        next(pipeline)


def test_each_process_reads_its_own_contiguous_records(source):
    seen = []
    for i in range(3):
        ds = host_dataset(source, config(global_batch_size=3, num_epochs=1), process_index=i, process_count=3)
        ids = sorted(int(x) for b in ds for x in b["image_id"])
        assert ids == list(range(SOURCE_SIZE)[process_slice(SOURCE_SIZE, i, 3)])
        seen += ids
    assert seen == list(range(SOURCE_SIZE))


def test_examples_without_a_usable_mask_are_dropped():
    whole, _ = make_record(40, 40, [(0, 0, 40, 40)], image_id=100)  # covers 100% > 90%
    source = make_source(4) + [whole]
    ds = host_dataset(source, config(global_batch_size=1, num_epochs=1), process_index=0, process_count=1)
    assert sorted(int(b["image_id"][0]) for b in ds) == [0, 1, 2, 3]


def test_a_split_without_a_usable_mask_is_an_error_not_a_hang():
    whole = [make_record(40, 40, [(0, 0, 40, 40)], image_id=i)[0] for i in range(3)]  # each covers 100% > 90%
    pipeline = InputPipeline(whole, config())
    with pytest.raises(ValueError, match=r"106 examples in a row had no mask to train on.*max_mask_fraction=0.9"):
        next(pipeline)


def test_bad_record_error_names_the_record(source):
    bad = dict(source[0], image=np.zeros((8, 8), np.uint8), file_name=b"broken.jpg")
    pipeline = InputPipeline([bad] * 4, config())
    with pytest.raises(ValueError, match=r"record 'broken.jpg' \(image_id 0\).*\(H, W, 3\) uint8"):
        next(pipeline)


@pytest.mark.parametrize(
    "kwargs, call, message",
    [
        (dict(global_batch_size=0), None, "global_batch_size must be positive"),
        (dict(prefetch_batches=0), None, "prefetch_batches >= 1"),
        (dict(global_batch_size=4), dict(process_index=0, process_count=3), "does not split over 3 processes"),
        (dict(global_batch_size=3), dict(process_index=3, process_count=3), r"process_index 3 is not in \[0, 3\)"),
    ],
)
def test_config_errors(source, kwargs, call, message):
    with pytest.raises(ValueError, match=message):
        host_dataset(source, config(**kwargs), **(call or {}))


@pytest.mark.parametrize("num_processes, devices_per_process", [(1, 8), (2, 2)])
def test_global_batches_over_devices_and_processes(source, tmp_path, num_processes, devices_per_process):
    """Each process's rows of the global batch are exactly its own host batches, sharded one row per device."""
    from input_pipeline_worker import STEPS

    results = device_workers.run_workers(WORKER, tmp_path, num_processes, devices_per_process)
    devices = num_processes * devices_per_process
    local = devices // num_processes
    for i, arrays in enumerate(results):
        assert int(arrays["device_count"]) == devices and int(arrays["process_count"]) == num_processes
        expected = iter(host_dataset(source, config(global_batch_size=devices), process_index=i, process_count=num_processes))
        for step in range(STEPS):
            batch = next(expected)
            batch["masks"] = unpack_masks(batch["masks"])
            for key, value in batch.items():
                np.testing.assert_array_equal(arrays[f"{step}/{key}"], value, err_msg=f"process {i} step {step} {key}")
                np.testing.assert_array_equal(arrays[f"{step}/{key}/rows"], np.arange(i * local, (i + 1) * local))
