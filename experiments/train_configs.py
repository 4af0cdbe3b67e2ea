"""Training configurations: the paper's vit_b / vit_l / vit_h recipes and a small synthetic CPU run.

    python -m experiments.train --config synthetic_cpu            (the README's main job)
    python -m experiments.train --config vit_h --set data.dataset=sa1b

`--set path=value` overrides any field (`optimizer.learning_rate=1e-4`,
`init_checkpoint=/ckpt/sam_vit_b`, `optimizer.freeze_image_encoder=True`).

Paper numbers (SAM, appendix "Training algorithm" / "Training recipe"): AdamW
(b1 0.9, b2 0.999), linear warmup 250 iterations, peak lr 8e-4, step decay by
10x; ViT-H 90k iterations at batch 256 images (decay at 60k and 86,666),
layer decay 0.8, drop path 0.4; ViT-B / ViT-L 180k iterations at batch 128,
lr 8e-4 / 4e-4, layer decay 0.6 / 0.8, drop path 0.6 / 0.4; weight decay 0.1;
large-scale jitter 0.1-2.0; up to 64 masks per image; 11 interactive
iterations; bf16 compute. The optimizer half is `PAPER_RECIPES`.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Optional

from sam_jax.configs import CONFIGS as MODEL_CONFIGS
from sam_jax.configs import ImageEncoderConfig, SamConfig
from sam_jax.data.preprocess import PreprocessConfig
from sam_jax.training.interactive import InteractiveConfig
from sam_jax.training.optimizer import PAPER_RECIPES, OptimizerConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str  # a prepared data set: "sam_synthetic/cpu", "sa1b", "coco_instances", or its directory
    global_batch_size: int
    preprocess: PreprocessConfig
    data_dir: Optional[str] = None  # default: <workdir>/../tensorflow_datasets (where prepare_data writes)
    train_split: str = "train"
    eval_split: str = "validation"
    worker_count: int = 0  # grain worker processes for preprocessing
    prefetch_batches: int = 2
    eval_images: int = 100  # held-out images for the point-protocol evaluation
    eval_batch_size: int = 4
    eval_max_masks: int = 64  # masks per held-out image (all of them for the synthetic sets)

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
    dtype: str = "float32"  # compute dtype; params stay float32
    scan_blocks: bool = False
    remat_policy: Optional[str] = None
    drop_path_rate: float = 0.0
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
        """The interactive loop that step `step` (1-based) trains."""
        if step <= self.single_prompt_steps:
            return dataclasses.replace(self.interactive, num_correction_points=0, num_mask_only=0)
        return self.interactive

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.optimizer.total_steps is None:
            raise ValueError("optimizer.total_steps must be set for a training run")
        if not 0 <= self.single_prompt_steps <= self.optimizer.total_steps:
            raise ValueError(f"single_prompt_steps must be in [0, optimizer.total_steps="
                             f"{self.optimizer.total_steps}], got {self.single_prompt_steps}")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_in_a_row", "eval_clicks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# A 1.2M-parameter SAM: every structural feature of the released models (windowed and
# global blocks, relative positions, neck, two-way decoder) at a size this CPU trains in minutes.
SYNTHETIC_MODEL = SamConfig(
    "vit_synthetic",
    ImageEncoderConfig(128, 4, 4, (1, 3), image_size=256, patch_size=16, window_size=8, out_chans=64),
    prompt_embed_dim=64,
    decoder_mlp_dim=256,
    decoder_num_heads=4,
    iou_head_hidden_dim=64,
)


def synthetic_cpu() -> TrainConfig:
    """The README's main job on `sam_synthetic/cpu`, about 12 minutes on 2 CPU cores: 1,500 steps of
    the loop's first iteration (~0.21 s each: 4 images x 6 masks), then 200 steps of the paper's
    full 11-iteration loop (~1.1 s each), lr / 10 for the last 100."""
    return TrainConfig(
        model=SYNTHETIC_MODEL,
        data=DataConfig(
            dataset="sam_synthetic/cpu",
            global_batch_size=4,
            preprocess=PreprocessConfig(image_size=256, low_res_size=64, max_masks=6, horizontal_flip=True),
            eval_images=50,
        ),
        optimizer=OptimizerConfig(
            learning_rate=2e-3, warmup_steps=50, decay_steps=(1_600,), total_steps=1_700, layer_decay=None,
            weight_decay=0.05, grad_clip_norm=1.0,
        ),
        single_prompt_steps=1_500,
        log_every=10,
        checkpoint_every=250,
    )


def synthetic_smoke() -> TrainConfig:
    """Seconds-long: the tiny test model on `sam_synthetic/small`, for tests and checking a setup."""
    return TrainConfig(
        model=MODEL_CONFIGS["vit_tiny"],
        data=DataConfig(
            dataset="sam_synthetic/small",
            global_batch_size=2,
            preprocess=PreprocessConfig(image_size=256, low_res_size=64, max_masks=3),
            eval_images=4,
            eval_batch_size=2,
        ),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=2, decay_steps=(), total_steps=6, layer_decay=None),
        interactive=InteractiveConfig(num_correction_points=2, num_mask_only=1),
        single_prompt_steps=3,
        log_every=2,
        checkpoint_every=2,
        eval_clicks=3,
        sample_images=2,
    )


def _paper(model: str, batch_size: int, drop_path_rate: float) -> TrainConfig:
    return TrainConfig(
        model=MODEL_CONFIGS[model],
        data=DataConfig(
            dataset="sa1b",
            global_batch_size=batch_size,
            preprocess=PreprocessConfig(image_size=1024, low_res_size=256, max_masks=64, scale_range=(0.1, 2.0)),
            worker_count=8,
            eval_images=500,
            eval_batch_size=8,
        ),
        optimizer=PAPER_RECIPES[model],
        dtype="bfloat16",
        scan_blocks=True,
        remat_policy="nothing_saveable",
        drop_path_rate=drop_path_rate,
        log_every=50,
        eval_every=5_000,
        checkpoint_every=1_000,
    )


CONFIGS = {
    "synthetic_cpu": synthetic_cpu,
    "synthetic_smoke": synthetic_smoke,
    "vit_b": lambda: _paper("vit_b", 128, 0.6),
    "vit_l": lambda: _paper("vit_l", 128, 0.4),
    "vit_h": lambda: _paper("vit_h", 256, 0.4),
}


def get_config(name: str, overrides: tuple[str, ...] = ()) -> TrainConfig:
    """A named config with `path=value` overrides applied (values are Python literals, or strings).

    All overrides are gathered first and each config node is rebuilt once, so fields checked
    against each other (`optimizer.total_steps` and `optimizer.decay_steps`, `single_prompt_steps`)
    can be changed together in any order; a later override of the same path wins."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}")
    config = CONFIGS[name]()
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


def _apply(node: Any, changes: dict[str, Any]) -> Any:
    """`node` with `changes` applied, children first, then one `dataclasses.replace` (one validation)."""
    fields = {}
    for key, change in changes.items():
        if isinstance(change, _Override):
            value = change.value
            if isinstance(getattr(node, key), tuple) and isinstance(value, list):
                value = tuple(value)
        else:
            value = _apply(getattr(node, key), change)
        fields[key] = value
    return dataclasses.replace(node, **fields)
