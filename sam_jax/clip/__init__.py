"""CLIP in Flax for the paper's text prompts (section 7.5): image and text towers,
configs, and CLIP's BPE tokenizer. Converting open_clip / Hugging Face checkpoints:
`checkpoints_convert.clip`."""

from sam_jax.clip.configs import CLIP_CONFIGS, ClipConfig, ClipTextConfig, ClipVisionConfig, get_clip_config
from sam_jax.clip.model import CLIP, CLIP_MEAN, CLIP_STD, init_clip_params, preprocess
from sam_jax.clip.tokenizer import ClipTokenizer

__all__ = ["CLIP", "CLIP_CONFIGS", "CLIP_MEAN", "CLIP_STD", "ClipConfig", "ClipTextConfig", "ClipTokenizer",
           "ClipVisionConfig", "get_clip_config", "init_clip_params", "preprocess"]
