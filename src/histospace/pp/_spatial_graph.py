"""Placeholder: replaced by its implementation."""


def spatial_graph(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("spatial_graph is not implemented yet")

