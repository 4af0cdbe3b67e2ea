"""sam_jax: Segment Anything in JAX/Flax."""

from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.batch_predictor import SamBatchPredictor
from sam_jax.configs import CONFIGS, ImageEncoderConfig, SamConfig, get_config
from sam_jax.errors import CheckpointError
from sam_jax.modeling import Sam, postprocess_masks, preprocess
from sam_jax.predictor import SamPredictor
from sam_jax.utils.transforms import ResizeLongestSide
from sam_jax.weights import load_sam, save_params

__all__ = [
    "CONFIGS",
    "CheckpointError",
    "ImageEncoderConfig",
    "ResizeLongestSide",
    "Sam",
    "SamAutomaticMaskGenerator",
    "SamBatchPredictor",
    "SamConfig",
    "SamPredictor",
    "get_config",
    "load_sam",
    "postprocess_masks",
    "preprocess",
    "save_params",
]
