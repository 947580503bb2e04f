"""Renamed keyword arguments: the old name keeps working for a release, with a FutureWarning."""

from __future__ import annotations

import warnings
from typing import Any


def renamed_argument(new: Any, old: Any, *, new_name: str, old_name: str, func: str, stacklevel: int = 3) -> Any:
    """The value of keyword `new_name`, taking the deprecated `old_name` when only that was passed.

    Raises a :class:`ValueError` naming both when both are passed, and warns (:class:`FutureWarning`) when the old
    name is used. `func` names the public function in the messages (e.g. `'hs.io.add_image'`).
    """
    if old is None:
        return new
    if new is not None:
        msg = f"Pass `{new_name}=` only (`{old_name}=` is its deprecated alias), not both."
        raise ValueError(msg)
    warnings.warn(
        f"`{old_name}=` of `{func}` is deprecated; pass `{new_name}=` (µm per pixel, the name every histospace "
        "function uses).",
        FutureWarning,
        stacklevel=stacklevel,
    )
    return old
