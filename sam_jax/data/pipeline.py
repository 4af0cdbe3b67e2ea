"""The training input pipeline: prepared records -> sharded global batches on device.

    source (ArrayRecord via tfds.data_source, random access, no TensorFlow)
      -> this process's contiguous slice of records
      -> shuffle (a new permutation every epoch) -> repeat
      -> preprocess_record (rng from (seed, process, position): deterministic)
         [in grain worker processes, if asked]
      -> drop examples left with no mask -> batch (per-process batch)
      -> a thread that builds global jax.Arrays ahead of the step

Every stage is a function of (seed, position), so the iterator's state is
just positions: `get_state()` after batch k, then `set_state()` in a fresh
pipeline, gives exactly batches k+1, k+2, ... of the uninterrupted run.

Batch (B = global batch; see `sam_jax.data.preprocess` for per-example shapes),
every leaf sharded over its leading axis; `masks` travel bit-packed (host
batches from `host_dataset` hold them so) and are unpacked on device:
    image (B, T, T, 3) uint8, image_size (B, 2), masks (B, M, T, T), masks_low_res
    (B, M, L, L), boxes (B, M, 4), points (B, M, 2), point_valid, mask_valid (B, M), image_id (B,)
"""

import dataclasses
import os
import queue
import threading
from typing import Any, Dict, Iterator, Optional

import grain
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sam_jax.data.preprocess import PreprocessConfig, preprocess_record

# Where `python -m experiments.prepare_data` writes prepared data sets and the commands look for them.
DEFAULT_DATA_DIR = os.path.join("workdir", "tensorflow_datasets")

@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Batching, order and parallelism of the input pipeline."""

    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = None  # None: repeat forever
    worker_count: int = 0  # grain worker processes running preprocess_record (0: in this process)
    prefetch_batches: int = 2  # global batches built ahead of the consumer
    preprocess: PreprocessConfig = PreprocessConfig()

    def __post_init__(self):
        if self.global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {self.global_batch_size}")
        if self.worker_count < 0 or self.prefetch_batches < 1:
            raise ValueError(
                f"worker_count must be >= 0 and prefetch_batches >= 1, got {self.worker_count}, {self.prefetch_batches}"
            )


def open_source(dataset: str, split: str, data_dir: Optional[str] = None, decoders: Optional[dict] = None):
    """A prepared split as a random-access source.

    `dataset` is a registered name with optional config ("sam_synthetic/small",
    "sa1b") found under `data_dir`, or the directory of a prepared version
    (".../sam_synthetic/small/1.0.0"); `split` a split or a slice of one
    (tfds's "train[:95%]", "train[95%:]": held-out images of a one-split set); `decoders`
    as tfds takes them (`{"image": tfds.decode.SkipDecoding()}`: the image's bytes, undecoded).
    """
    import tensorflow_datasets as tfds  # reading needs tfds, not TensorFlow

    from sam_jax.data import builders  # noqa: F401  registers this package's builders

    if os.path.isfile(os.path.join(dataset, "dataset_info.json")):
        builder = tfds.builder_from_directory(dataset)
    else:
        try:
            builder = tfds.builder(dataset, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(
                f"unknown data set {dataset!r}: expected one of {builders.NAMES} (with an optional /config) "
                "or the directory of a prepared version"
            ) from None
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"data set {dataset!r} is not prepared under {builder.data_dir}; prepare it first "
                "(python -m experiments.prepare_data --help)"
            )
    base = split.partition("[")[0]
    if base not in builder.info.splits:
        raise ValueError(f"data set {dataset!r} has splits {sorted(builder.info.splits)}, not {base!r}")
    try:
        return builder.as_data_source(split, decoders=decoders)
    except (ValueError, AssertionError) as err:  # a malformed slice: "train[:x]"
        raise ValueError(f"split {split!r} of data set {dataset!r}: {' '.join(str(err).split())}") from None


def process_slice(num_records: int, process_index: int, process_count: int) -> slice:
    """Contiguous record range of one process: the files it reads are (nearly) its own."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if num_records < process_count:
        raise ValueError(f"{num_records} records cannot feed {process_count} processes")
    return slice(num_records * process_index // process_count, num_records * (process_index + 1) // process_count)


class _Preprocess(grain.transforms.RandomMap):
    def __init__(self, config: PreprocessConfig):
        self._config = config

    def random_map(self, record, rng: np.random.Generator):
        try:
            return preprocess_record(record, self._config, rng)
        except Exception as e:
            name = record.get("file_name", b"?")
            name = name.decode() if isinstance(name, bytes) else name
            raise ValueError(f"record {name!r} (image_id {record.get('image_id')}): {e}") from e


class _HasMasks:
    """Keeps examples with at least one target mask. `limit` examples in a row without one
    mean that the split has no mask the preprocessing keeps (all empty, or all over
    max_mask_fraction of their image): a ValueError then, where the filter would spin forever."""

    def __init__(self, limit: int, max_mask_fraction: float):
        self._limit = limit
        self._max_mask_fraction = max_mask_fraction
        self._misses = 0

    def __call__(self, example) -> bool:
        if example["mask_valid"].any():
            self._misses = 0
            return True
        self._misses += 1
        if self._misses >= self._limit:
            raise ValueError(
                f"{self._misses} examples in a row had no mask to train on: no mask of this split is both "
                f"non-empty and within max_mask_fraction={self._max_mask_fraction} of its image (after the crop); "
                "check the data set's masks"
            )
        return False


def host_dataset(
    source, config: PipelineConfig, process_index: Optional[int] = None, process_count: Optional[int] = None
) -> grain.IterDataset:
    """This process's batches (numpy, per-process batch size), as a grain IterDataset."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if config.global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} does not split over {process_count} processes"
        )
    ds = grain.MapDataset.source(source)[process_slice(len(source), process_index, process_count)]
    # Distinct streams per process: equal positions in different shards must not share augmentations.
    ds = ds.seed(int(np.random.SeedSequence([config.seed, process_index]).generate_state(1)[0]))
    if config.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(config.num_epochs)
    ds = ds.random_map(_Preprocess(config.preprocess)).to_iter_dataset()
    if config.worker_count:
        # grain's workers read absl flags; a program without absl.app has not parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Workers take positions round-robin and hand them back in order; filtering
        # and batching after them keep the batches independent of worker_count.
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    # Two passes over this process's records without a mask: none will come.
    limit = 2 * len(range(len(source))[process_slice(len(source), process_index, process_count)]) + 100
    ds = ds.filter(_HasMasks(limit, config.preprocess.max_mask_fraction)).batch(config.global_batch_size // process_count, drop_remainder=True)
    return ds


@jax.jit
def _unpack_bits(packed: jax.Array) -> jax.Array:
    """(..., T, T // 8) uint8 -> (..., T, T) bool, on the devices that hold `packed`."""
    return jnp.unpackbits(packed, axis=-1).astype(bool)


def data_sharding() -> NamedSharding:
    """Leading (batch) axis over every device of every process."""
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), PartitionSpec("data"))


class InputPipeline:
    """Iterator of global batches (dict of jax.Array), built ahead on a thread; checkpointable.

    `get_state()` is the state after the last batch returned by `next`, not
    after the batches built ahead, so a restore never skips one.
    """

    def __init__(self, source, config: PipelineConfig, sharding: Optional[jax.sharding.Sharding] = None):
        self._sharding = data_sharding() if sharding is None else sharding
        local_devices = len(self._sharding.addressable_devices)
        local_batch = config.global_batch_size // jax.process_count()
        if local_batch % local_devices:
            raise ValueError(
                f"per-process batch {local_batch} does not split over this process's {local_devices} devices"
            )
        self._global_batch_size = config.global_batch_size
        self._prefetch = config.prefetch_batches
        self._host: Iterator = iter(host_dataset(source, config))
        self._state = self._host.get_state()
        self._start()

    def _to_global(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
        def put(x):
            shape = (self._global_batch_size,) + x.shape[1:]
            return jax.make_array_from_process_local_data(self._sharding, x, shape)

        batch = jax.tree.map(put, batch)
        if "masks" in batch:
            batch["masks"] = _unpack_bits(batch["masks"])
        return batch

    def _produce(self, stop: threading.Event, out: "queue.Queue") -> None:
        item: Any
        while not stop.is_set():
            try:
                batch = next(self._host)
                item = (self._host.get_state(), self._to_global(batch))
            except StopIteration:
                item = StopIteration()
            except Exception as e:  # handed to the consumer, which re-raises it
                item = e
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(item, BaseException):
                return

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue: "queue.Queue" = queue.Queue(maxsize=self._prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._stop, self._queue), daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()

    def __iter__(self) -> "InputPipeline":
        return self

    def __next__(self) -> Dict[str, jax.Array]:
        item = self._queue.get()
        if isinstance(item, StopIteration):
            self._queue.put(item)  # stays exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        self._state, batch = item
        return batch

    def get_state(self) -> Dict[str, Any]:
        """JSON-serialisable position after the last batch returned."""
        return self._state

    def set_state(self, state: Dict[str, Any]) -> None:
        """Continues from a state saved by `get_state` (of a pipeline with the same source and config)."""
        self._halt()
        self._host.set_state(state)
        self._state = self._host.get_state()
        self._start()

    def close(self) -> None:
        self._halt()


def evaluation_batches(
    source, preprocess: PreprocessConfig, batch_size: int, num_images: Optional[int] = None
) -> Iterator[Dict[str, np.ndarray]]:
    """The first `num_images` records (all by default) in order, preprocessed without augmentation,
    as numpy batches with unpacked (B, M, T, T) masks; the last batch is padded with
    examples whose masks are all invalid. Evaluation wants every mask: give
    `preprocess.max_masks` at least the largest mask count of the split."""
    if preprocess.scale_range is not None or preprocess.horizontal_flip or not preprocess.input_res_masks:
        raise ValueError("evaluation preprocessing takes no jitter or flip and needs input_res_masks=True")
    total = len(source) if num_images is None else min(num_images, len(source))
    for start in range(0, total, batch_size):
        examples = [preprocess_record(source[i], preprocess, np.random.default_rng(i))
                    for i in range(start, min(start + batch_size, total))]
        while len(examples) < batch_size:
            pad = jax.tree.map(np.zeros_like, examples[0])
            examples.append(pad)
        batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
        batch["masks"] = np.unpackbits(batch["masks"], axis=-1).astype(bool)
        yield batch
