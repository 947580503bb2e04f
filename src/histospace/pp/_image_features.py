"""Placeholder: replaced by its implementation."""


def image_features(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("image_features is not implemented yet")

