"""CLIP in Flax for the paper's text prompts (section 7.5): image and text towers,
configs, CLIP's BPE tokenizer, checkpoints in sam_jax's format (`save_clip` / `load_clip`) and
`ClipTextEncoder` (phrases -> the embeddings SAM's text prompts take). Converting open_clip /
Hugging Face checkpoints: `python -m checkpoints_convert.clip SRC OUT`."""

from sam_jax.clip.configs import CLIP_CONFIGS, ClipConfig, ClipTextConfig, ClipVisionConfig, get_clip_config
from sam_jax.clip.model import CLIP, CLIP_MEAN, CLIP_STD, init_clip_params, preprocess
from sam_jax.clip.tokenizer import ClipTokenizer
from sam_jax.clip.checkpoint import load_clip, save_clip
from sam_jax.clip.text_encoder import ClipTextEncoder

__all__ = ["CLIP", "CLIP_CONFIGS", "CLIP_MEAN", "CLIP_STD", "ClipConfig", "ClipTextConfig", "ClipTextEncoder",
           "ClipTokenizer", "ClipVisionConfig", "get_clip_config", "init_clip_params", "load_clip", "preprocess",
           "save_clip"]
