"""Placeholder: replaced by its implementation."""


def training_history(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("training_history is not implemented yet")

