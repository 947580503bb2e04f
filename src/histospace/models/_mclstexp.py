"""Placeholder: replaced by its implementation."""


class MclSTExp:  # noqa: D101
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("MclSTExp is not implemented yet")

