"""Input checks shared by the public functions. They raise before any work and never write to the AnnData."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData


def version_string() -> str:
    """Return the installed histospace version (for `uns[...]['version']`)."""
    from histospace import __version__

    return __version__


def check_obsm(adata: AnnData, key: str, *, hint: str, n_cols: int | None = None, finite: bool = True) -> np.ndarray:
    """Return `adata.obsm[key]` as a float array after checking it exists, has `n_obs` rows and is finite."""
    if key not in adata.obsm:
        msg = f"`adata.obsm[{key!r}]` not found. {hint}"
        raise KeyError(msg)
    x = adata.obsm[key]
    if hasattr(x, "to_numpy"):
        x = x.to_numpy()
    if sp.issparse(x):
        x = x.toarray()
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] != adata.n_obs:
        msg = f"`adata.obsm[{key!r}]` has shape {x.shape}; expected ({adata.n_obs}, d), one row per spot."
        raise ValueError(msg)
    if n_cols is not None and x.shape[1] != n_cols:
        msg = f"`adata.obsm[{key!r}]` has {x.shape[1]} columns; expected {n_cols}."
        raise ValueError(msg)
    if not np.issubdtype(x.dtype, np.number):
        msg = f"`adata.obsm[{key!r}]` has dtype {x.dtype}; expected numbers."
        raise TypeError(msg)
    if finite:
        check_no_nan(x, f"adata.obsm[{key!r}]")
    return x


def check_obsp(adata: AnnData, key: str, *, hint: str) -> sp.csr_matrix:
    """Return `adata.obsp[key]` as CSR after checking it exists, is square and sparse."""
    if key not in adata.obsp:
        msg = f"`adata.obsp[{key!r}]` not found. {hint}"
        raise KeyError(msg)
    g = adata.obsp[key]
    if not sp.issparse(g):
        msg = (
            f"`adata.obsp[{key!r}]` is a dense {type(g).__name__}; spatial graphs must be sparse. "
            f"Convert it with `adata.obsp[{key!r}] = scipy.sparse.csr_matrix(...)` or rebuild it with "
            "`hs.pp.spatial_graph`."
        )
        raise TypeError(msg)
    return sp.csr_matrix(g)


def check_no_nan(x, name: str) -> None:
    """Raise `ValueError` when `x` (dense or sparse) holds NaN or infinite values."""
    data = x.data if sp.issparse(x) else np.asarray(x)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        msg = f"`{name}` contains {n_bad} NaN or infinite values; remove or impute them first."
        raise ValueError(msg)


def get_matrix(adata: AnnData, layer: str | None, *, counts: bool = False):
    """Return `adata.X` or `adata.layers[layer]` (sparse stays sparse), checked for NaN and, if `counts`, negatives."""
    if layer is None:
        x, name = adata.X, "adata.X"
    else:
        if layer not in adata.layers:
            msg = f"`adata.layers[{layer!r}]` not found; available layers: {[k for k in adata.layers if k is not None]}. Pass `layer=None` to use `adata.X`."
            raise KeyError(msg)
        x, name = adata.layers[layer], f"adata.layers[{layer!r}]"
    if x is None:
        msg = f"`{name}` is empty; pass `layer=` naming a layer with expression."
        raise ValueError(msg)
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        msg = f"`{name}` has dtype {dtype}; expected numbers (counts or normalised expression)."
        raise TypeError(msg)
    check_no_nan(x, name)
    if counts:
        data = x.data if sp.issparse(x) else np.asarray(x)
        if data.size and data.min() < 0:
            msg = (
                f"`{name}` has negative values; pass raw or normalised non-negative expression (e.g. `layer='counts'`)."
            )
            raise ValueError(msg)
    return x


def check_unique_obs_names(adata: AnnData) -> None:
    """Raise `ValueError` for duplicated `obs_names`."""
    if not adata.obs_names.is_unique:
        msg = "`adata.obs_names` are not unique; call `adata.obs_names_make_unique()` first."
        raise ValueError(msg)


def check_random_state(random_state) -> int | None:
    """Return `random_state` as int or None; raise `TypeError` otherwise."""
    if random_state is None:
        return None
    if isinstance(random_state, bool) or not isinstance(random_state, int | np.integer):
        msg = f"`random_state` must be an int or None, got {type(random_state).__name__}."
        raise TypeError(msg)
    return int(random_state)


def check_number(
    value,
    name: str,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    allow_none: bool = False,
):
    """Return `value` as int or float after checking it is a finite real number in range.

    Numpy scalars are accepted; `bool`, NaN and infinity are refused. Raises `TypeError` for something that is not a
    number (a bool included) and `ValueError` for a number out of range, not whole when `integer`, or not finite; the
    message names `name` and the range.
    """
    import numbers

    if integer:
        kind = "int"
    else:
        kind = "number"
    if low == 0 and not low_inclusive and high is None:
        want = f"a positive {kind}"
    elif low == 1 and integer and high is None:
        want = "a positive int"
    elif low == 0 and high is None:
        want = f"a non-negative {kind}"
    elif low is not None and high is not None:
        want = f"a{'n' if kind == 'int' else ''} {kind} in {'[' if low_inclusive else '('}{low:g}, {high:g}]"
    elif low is not None:
        want = f"a{'n' if kind == 'int' else ''} {kind} {'>=' if low_inclusive else '>'} {low:g}"
    else:
        want = f"a{'n' if kind == 'int' else ''} finite {kind}"
    if allow_none:
        want += " or None"
    if value is None:
        if allow_none:
            return None
        msg = f"`{name}` must be {want}, got None."
        raise TypeError(msg)
    if isinstance(value, bool | np.bool_):  # bool is an int subclass, but True is not a count of anything
        msg = f"`{name}` must be {want}, got the bool {value!r}."
        raise TypeError(msg)
    if not isinstance(value, numbers.Real):
        msg = f"`{name}` must be {want}, got {type(value).__name__} {value!r}."
        raise TypeError(msg)
    v = float(value)
    bad = not np.isfinite(v) or (integer and v != int(v))
    bad = bad or (low is not None and (v < low or (v == low and not low_inclusive))) or (high is not None and v > high)
    if bad:
        msg = f"`{name}` must be {want}, got {value!r}."
        raise ValueError(msg)
    return int(v) if integer else v
