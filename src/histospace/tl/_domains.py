"""Placeholder: replaced by its implementation."""


def domains(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("domains is not implemented yet")

