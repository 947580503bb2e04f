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


def element_key(elements, key: str | None, *, slot: str, msg: str, empty_msg: str | None = None) -> str:
    """`key`, checked to be in `elements` (a SpatialData's `images`, `tables`, ...), or the only key when it is `None`.

    `slot` names the container in messages (`'sdata.images'`); `msg` and `empty_msg` are those of :func:`only_one`.
    A `key` that is not there raises `KeyError` listing the keys.
    """
    names = list(elements)
    if key is None:
        return only_one(names, msg, empty_msg=empty_msg)
    if key not in elements:
        error = f"`{slot}[{key!r}]` not found; {slot.rsplit('.', 1)[-1]}: {names}."
        raise KeyError(error)
    return key
