"""Converters from official SAM and Hugging Face SAM weights to sam_jax checkpoints."""
