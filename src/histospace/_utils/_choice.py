"""Choosing one name among a SpatialData's elements or coordinate systems when the user gave none."""

from __future__ import annotations

from collections.abc import Sequence


def only_one(names: Sequence[str], msg: str, *, empty_msg: str | None = None) -> str:
    """The only entry of `names`.

    Raises `ValueError(msg)` when there are several (or none and no `empty_msg`), `KeyError(empty_msg)` when there are
    none and `empty_msg` is given (nothing to choose from: a missing element rather than an ambiguous choice).
    """
    if len(names) == 1:
        return names[0]
    if not names and empty_msg is not None:
        raise KeyError(empty_msg)
    raise ValueError(msg)
