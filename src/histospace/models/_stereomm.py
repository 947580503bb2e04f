"""Placeholder: replaced by its implementation."""


class StereoMM:  # noqa: D101
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("StereoMM is not implemented yet")

