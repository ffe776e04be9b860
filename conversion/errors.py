"""Errors raised while reading and converting checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe or does not fit the model; the message names the file."""
