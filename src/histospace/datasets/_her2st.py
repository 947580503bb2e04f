"""Placeholder: replaced by its implementation."""


def her2st(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("her2st is not implemented yet")

