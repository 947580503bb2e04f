"""Placeholder: replaced by its implementation."""


def stereomm(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("stereomm is not implemented yet")

