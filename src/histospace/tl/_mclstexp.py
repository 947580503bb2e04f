"""Placeholder: replaced by its implementation."""


def mclstexp_train(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("mclstexp_train is not implemented yet")


def mclstexp_predict(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("mclstexp_predict is not implemented yet")

