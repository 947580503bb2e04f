"""Placeholder: replaced by its implementation."""


def dlpfc(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("dlpfc is not implemented yet")

