"""Errors sam_jax raises for bad user input, each naming what is wrong."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt, or of another model.

    The message is one line that names the file and, where it applies, the
    offending keys and shapes.
    """
