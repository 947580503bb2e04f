"""Internal helpers (not public API)."""

from ._device import resolve_device
from ._docs import doc_params
from ._random import make_generator, seed_everything
from ._validate import (
    check_no_nan,
    check_number,
    check_obsm,
    check_obsp,
    check_random_state,
    check_unique_obs_names,
    get_matrix,
    version_string,
)

__all__ = [
    "check_no_nan",
    "check_number",
    "check_obsm",
    "check_obsp",
    "check_random_state",
    "check_unique_obs_names",
    "doc_params",
    "get_matrix",
    "make_generator",
    "resolve_device",
    "seed_everything",
    "version_string",
]
