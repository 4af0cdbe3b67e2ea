"""A training run's configuration, and `path=value` overrides of any field.

    config = apply_overrides(TrainConfig(...), ("optimizer.learning_rate=1e-4", "parallelism=pmap"))

Named configs (the paper's vit_b / vit_l / vit_h recipes, the synthetic CPU
run) live in `experiments/train_configs.py`; `python -m experiments.train
--set path=value` applies overrides with `apply_overrides`. Every config node
validates itself; an override names a field, and its value must have the
field's type.
"""

from __future__ import annotations

import ast
import dataclasses
import numbers
import typing
from typing import Any, Optional

from sam_jax.configs import SamConfig
from sam_jax.data.preprocess import PreprocessConfig
from sam_jax.modeling.attention import check_attention_impl
from sam_jax.training.interactive import InteractiveConfig
from sam_jax.training.optimizer import OptimizerConfig

PARALLELISMS = ("fsdp", "pmap")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str  # a prepared data set: "sam_synthetic/cpu", "sa1b", "coco_instances", or its directory
    global_batch_size: int
    preprocess: PreprocessConfig
    train_split: str = "train"
    eval_split: str = "validation"
    worker_count: int = 0  # grain worker processes for preprocessing
    prefetch_batches: int = 2
    eval_images: int = 100  # held-out images for the point-protocol evaluation
    eval_batch_size: int = 4
    eval_max_masks: int = 64  # masks per held-out image (all of them for the synthetic sets)

    def __post_init__(self):
        for name in ("global_batch_size", "prefetch_batches", "eval_images", "eval_batch_size", "eval_max_masks"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.worker_count < 0:
            raise ValueError(f"data.worker_count must be >= 0, got {self.worker_count}")

    @property
    def eval_preprocess(self) -> PreprocessConfig:
        """Held-out examples: the training resolution, no augmentation, up to eval_max_masks masks."""
        return dataclasses.replace(self.preprocess, max_masks=self.eval_max_masks, scale_range=None,
                                   horizontal_flip=False, input_res_masks=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: SamConfig
    data: DataConfig
    optimizer: OptimizerConfig
    interactive: InteractiveConfig = InteractiveConfig()
    # Steps 1..single_prompt_steps train the loop's first iteration only (one point or box per
    # mask, the 3-mask output), then every step runs the full loop. The paper runs the full loop
    # from the start; from scratch on a CPU, the single-prompt steps are ~5x cheaper and teach
    # iteration 1 faster, and the full loop then learns corrections from a model that can segment.
    single_prompt_steps: int = 0
    init_checkpoint: Optional[str] = None  # a converted checkpoint (official weights) to start from
    # Text-prompt training (`interactive.text.probability` > 0): a sam_jax CLIP checkpoint
    # (`sam_jax.clip.checkpoint`) whose image tower embeds the mask crops, frozen.
    clip_checkpoint: Optional[str] = None
    dtype: str = "float32"  # compute dtype; params stay float32
    scan_blocks: bool = False
    remat_policy: Optional[str] = None
    drop_path_rate: float = 0.0
    attention_impl: str = "auto"  # the encoder's attention (sam_jax.modeling.attention); "auto" by backend
    # "fsdp": one jit over a Mesh of every device, params and optimizer state FSDP-sharded;
    # "pmap": jax.pmap over each host's devices, the state replicated (data parallel only).
    parallelism: str = "fsdp"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    eval_clicks: int = 9
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_nonfinite_in_a_row: int = 10
    sample_images: int = 4  # held-out images drawn with their predicted masks (samples.png)

    @property
    def total_steps(self) -> int:
        return self.optimizer.total_steps

    def interactive_at(self, step: int) -> InteractiveConfig:
        """The interactive loop that step `step` (1-based) trains: a single-prompt step trains
        the loop's first iteration on every mask the pipeline gives (`interactive.max_masks`
        limits the full loop only)."""
        if step <= self.single_prompt_steps:
            return dataclasses.replace(self.interactive, num_correction_points=0, num_mask_only=0, max_masks=None)
        return self.interactive

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check_attention_impl(self.attention_impl)
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism must be one of {PARALLELISMS}, got {self.parallelism!r}")
        if self.optimizer.total_steps is None:
            raise ValueError("optimizer.total_steps must be set for a training run")
        if not 0 <= self.single_prompt_steps <= self.optimizer.total_steps:
            raise ValueError(f"single_prompt_steps must be in [0, optimizer.total_steps="
                             f"{self.optimizer.total_steps}], got {self.single_prompt_steps}")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_in_a_row", "eval_clicks",
                     "sample_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.interactive.text.probability > 0 and (not self.model.has_text_prompts or not self.clip_checkpoint):
            raise ValueError(f"interactive.text.probability={self.interactive.text.probability} trains text prompts: "
                             f"it needs model.text_embed_dim (now {self.model.text_embed_dim}) and clip_checkpoint "
                             f"(now {self.clip_checkpoint!r})")
        masks = self.data.preprocess.max_masks
        loop_masks = masks if self.interactive.max_masks is None else self.interactive.max_masks
        if loop_masks > masks:
            raise ValueError(f"interactive.max_masks={loop_masks} must be <= data.preprocess.max_masks={masks}")
        for name, count in (("data.preprocess.max_masks", masks), ("interactive.max_masks", loop_masks)):
            if count % self.interactive.mask_chunks:
                raise ValueError(f"interactive.mask_chunks={self.interactive.mask_chunks} must divide {name}={count}")


# ----------------------------------------------------------------------------- overrides


def apply_overrides(config: Any, overrides: tuple[str, ...] = ()) -> Any:
    """`config` (a dataclass tree) with `path=value` overrides applied; values are Python
    literals, or strings.

    All overrides are gathered first and each config node is rebuilt once, so fields checked
    against each other (`optimizer.total_steps` and `optimizer.decay_steps`, `single_prompt_steps`)
    can be changed together in any order; a later override of the same path wins. A value of
    the wrong type for its field is a ValueError naming the field and the type it needs."""
    changes: dict[str, Any] = {}  # nested by path; leaves are _Override
    for override in overrides:
        path, sep, text = override.partition("=")
        if not sep or not path:
            raise ValueError(f"--set takes path=value, got {override!r}")
        keys = path.split(".")
        _check_path(config, keys, override)
        node = changes
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if isinstance(node, _Override):
                raise ValueError(f"--set {override}: conflicts with the earlier --set {node.text}")
        node[keys[-1]] = _Override(override, _literal(text))
    return _apply(config, changes)


@dataclasses.dataclass(frozen=True)
class _Override:
    text: str  # the whole path=value, for messages
    value: Any


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word or path is a string


def _check_path(node: Any, keys: list[str], override: str) -> None:
    for key in keys:
        if not dataclasses.is_dataclass(node):
            raise ValueError(f"--set {override}: {type(node).__name__} has no field {key!r}")
        names = [f.name for f in dataclasses.fields(node)]
        if key not in names:
            raise ValueError(f"--set {override}: no field {key!r} in {type(node).__name__} (fields: {', '.join(names)})")
        node = getattr(node, key)


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` fits the type hint of a config field (ints pass for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Union:
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, hint)


def _apply(node: Any, changes: dict[str, Any]) -> Any:
    """`node` with `changes` applied, children first, then one `dataclasses.replace` (one validation)."""
    hints = typing.get_type_hints(type(node))
    fields = {}
    for key, change in changes.items():
        if isinstance(change, _Override):
            value = change.value
            if isinstance(value, list):
                value = tuple(value)
            hint = hints[key]
            if not _matches(value, hint):
                # A class by its name; a generic (Optional[str], tuple[float, float]) as written.
                needs = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
                raise ValueError(f"--set {change.text}: {type(node).__name__}.{key} must be {needs}, "
                                 f"got {type(value).__name__} {value!r}")
        else:
            value = _apply(getattr(node, key), change)
        fields[key] = value
    return dataclasses.replace(node, **fields)
