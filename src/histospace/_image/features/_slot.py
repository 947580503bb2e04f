"""The image-feature slot: `obsm[key]` and its provenance `uns[key]` ('params', 'pca', 'version'), written,
read and compared in one place.

:func:`pp.image_features <histospace.pp.image_features>` is the one writer (:func:`feature_params`,
:func:`write_features`). The readers are the models (mclSTExp's reference and query, StereoMM's record), the evaluation
and the CLI: :func:`read_features` checks the slot, :func:`feature_settings` turns `uns[key]['params']` into the
settings a model records, and :func:`settings_mismatch` is the one answer to "were these features made like those":
the models compare a query with their reference, the CLI compares stored features with the requested ones
(`keys=`: only the settings the command asks for).
"""  # noqa: D205

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from anndata import AnnData

from histospace._image._sources import PADDING
from histospace._utils._data import as_dense
from histospace._utils._validate import check_no_nan

__all__ = [
    "FEATURES_HINT",
    "feature_params",
    "feature_pca",
    "feature_settings",
    "read_features",
    "settings_mismatch",
    "write_features",
]

FEATURES_HINT = (
    "Compute image features first, e.g. `hs.pp.image_features(adata, encoder='mobilenet_v2', weights=...)`, "
    "or pass `features_key=` naming the `adata.obsm` key that holds them."
)
#: image-feature parameters recorded with the model and compared with a query's
FEATURE_PARAMS = ("encoder", "weights", "patch_size_px", "patch_size_um", "layers", "context")


def read_features(adata: AnnData, key: str, hint: str = FEATURES_HINT) -> np.ndarray:
    """`adata.obsm[key]` as float32 `(n_obs, d)`, checked for shape and NaN."""
    if key not in adata.obsm:
        msg = f"`adata.obsm[{key!r}]` not found. {hint}"
        raise KeyError(msg)
    f = as_dense(adata.obsm[key]).astype(np.float32)
    if f.ndim != 2 or f.shape[0] != adata.n_obs:
        msg = f"`adata.obsm[{key!r}]` has shape {f.shape}; expected ({adata.n_obs}, d)."
        raise ValueError(msg)
    check_no_nan(f, f"adata.obsm[{key!r}]")
    return f


#: how image features were made, recorded with the model (see :func:`feature_settings`); defaults of absent keys
SETTING_DEFAULTS: dict[str, Any] = {"tf_padding": False, "layers": "last", "dihedral": False, "input_size": 224}
#: settings compared exactly between the model and a query's `uns[features_key]['params']`
SETTINGS_COMPARED = (
    "encoder", "weights", "random_state", "tf_padding", "layers", "dihedral", "context", "input_size", "n_components"
)  # fmt: skip
#: relative tolerance on the patch size in µm between the model and a query
UM_RTOL = 0.01
#: reference slides whose patches span at most this ratio of µm record their median (else no µm is recorded)
UM_SPREAD = 1.25


def _uniform(value) -> float | None:
    """One float from a recorded value that is a number or an array of equal numbers; `None` otherwise."""
    if value is None or isinstance(value, str | bool):
        return None
    v = np.asarray(value, dtype=np.float64).ravel()
    if v.size == 0 or not np.isfinite(v).all() or not np.allclose(v, v[0], rtol=1e-6, atol=0):
        return None
    return float(v[0])


def feature_settings(params: Mapping | None) -> dict[str, Any]:
    """The settings of :func:`histospace.pp.image_features` recorded in its `uns[key]['params']` (JSON-able).

    `encoder`, `weights` (label or path), `mean`, `std`, `tf_padding`, `layers`, `dihedral`, `context`, `input_size`,
    `method`, `n_components`, `random_state` (random weights), `patch_size_px` and, when the image's µm per pixel was
    known, `patch_size_um` and `mpp` (µm per full-resolution pixel, `patch_size_um / patch_size_px`). Per-slide
    values that differ are left out, except the µm of slides cut with one pixel patch at resolutions within 25% of
    each other: their median, with `patch_size_um_range` (min, max). `{}` when `params` does not come from
    `image_features` (no `encoder`).
    """
    if not isinstance(params, Mapping) or not isinstance(params.get("encoder"), str):
        return {}
    out: dict[str, Any] = {"encoder": str(params["encoder"]), "weights": str(params.get("weights", "imagenet"))}
    for k in ("mean", "std"):
        if params.get(k) is not None:
            out[k] = [float(v) for v in np.atleast_1d(np.asarray(params[k], dtype=np.float64))]
    out["tf_padding"] = bool(params.get("tf_padding", False))
    out["layers"] = str(params.get("layers", "last"))
    out["dihedral"] = bool(params.get("dihedral", False))
    if params.get("context") is not None:
        out["context"] = float(params["context"])
    out["input_size"] = int(params.get("input_size", 224))
    method = params.get("method")
    out["method"] = str(method) if isinstance(method, str) else "auto"
    for k in ("n_components", "random_state"):
        if params.get(k) is not None:
            out[k] = int(params[k])
    px, um = _uniform(params.get("patch_size_px")), _uniform(params.get("patch_size_um"))
    if px is not None:
        out["patch_size_px"] = px
    if um is None and params.get("patch_size_um") is not None:  # slides of the same pixel patch at other µm
        v = np.asarray(params["patch_size_um"], dtype=np.float64).ravel()
        if v.size and np.isfinite(v).all() and v.min() > 0 and v.max() / v.min() <= UM_SPREAD:
            um = float(np.median(v))
            out["patch_size_um_range"] = [float(v.min()), float(v.max())]
    if um is not None:
        out["patch_size_um"] = um
        if px is not None:
            out["mpp"] = um / px
    return out


def feature_pca(uns_f: Mapping | None) -> dict[str, np.ndarray] | None:
    """The PCA of `uns[features_key]['pca']` (`mean`, `components`, float64) when the features were reduced."""
    pca = uns_f.get("pca") if isinstance(uns_f, Mapping) else None
    if not isinstance(pca, Mapping) or "mean" not in pca or "components" not in pca:
        return None
    return {"mean": np.asarray(pca["mean"], np.float64), "components": np.asarray(pca["components"], np.float64)}


def settings_mismatch(
    model: Mapping, query: Mapping, *, keys: Iterable[str] | None = None
) -> tuple[str, Any, Any] | None:
    """`(setting, query value, model value)` of the first setting in which the query's features differ, else `None`.

    Both are :func:`feature_settings` (or requested settings in the same form). The patch size is compared in µm
    (relative tolerance 1%) when the model knows it: the same tissue whatever the magnification; a query without µm
    gives `('patch_size_um', None, um)`. Without µm in the model, in pixels. `keys`: compare only these settings (the
    CLI's request names some of them); absent settings take their defaults (:data:`SETTING_DEFAULTS`).
    """
    only = None if keys is None else set(keys)
    for k in SETTINGS_COMPARED:
        if only is not None and k not in only:
            continue
        a, b = query.get(k, SETTING_DEFAULTS.get(k)), model.get(k, SETTING_DEFAULTS.get(k))
        if a != b:
            return k, a, b
    for k in ("mean", "std"):
        if only is not None and k not in only:
            continue
        a, b = query.get(k), model.get(k)
        if a is not None and b is not None and (len(a) != len(b) or not np.allclose(a, b, rtol=1e-5, atol=1e-6)):
            return k, a, b
    if "patch_size_um" in model and (only is None or "patch_size_um" in only):
        um = query.get("patch_size_um")
        if um is None or not np.isclose(um, model["patch_size_um"], rtol=UM_RTOL, atol=0):
            return "patch_size_um", um, model["patch_size_um"]
    elif "patch_size_px" in model and (only is None or "patch_size_px" in only):
        if only is not None and "patch_size_px" not in query:
            return "patch_size_px", None, model["patch_size_px"]
        if "patch_size_px" in query and not np.isclose(
            query["patch_size_px"], model["patch_size_px"], rtol=1e-6, atol=0
        ):
            return "patch_size_px", query["patch_size_px"], model["patch_size_px"]
    return None


def check_feature_params(ref: Mapping | None, query: Mapping | None, features_key: str) -> None:
    """Compare `uns[features_key]['params']` of the reference and the query (encoder, weights, patch size, ...).

    The check of models saved before the settings were recorded (:func:`feature_settings` does the newer one).
    """
    if not ref or not query:
        return
    for k in FEATURE_PARAMS:
        if k in ref and k in query and str(ref[k]) != str(query[k]):
            msg = (
                f"`adata.uns[{features_key!r}]['params'][{k!r}]` is {query[k]!r} but the model was trained on features "
                f"with {k}={ref[k]!r}. Recompute the query features with the same settings "
                "(`hs.pp.image_features`) as the reference."
            )
            raise ValueError(msg)


def feature_params(info: Mapping, records: dict, *, input_size: int, spatial_key: str | None, library_key, preset,
                   tf_padding: bool, layers: str, dihedral: bool, context: float | None, weights, encoder,
                   random_state: int | None, sdata_keys: tuple[str, ...]) -> dict:  # fmt: skip
    """`uns[key]['params']` of `pp.image_features`: the encoder's record `info`, the options, and per slide `records`
    (values shared by every slide are lifted to the top; differing ones become lists or arrays).

    `spatial_key=None` with a SpatialData (its centres come from the shapes); `sdata_keys` are the per-slide keys of
    the SpatialData elements that are recorded as strings.
    """  # noqa: D205
    from torch import nn

    params = {
        "encoder": info["encoder"],
        "weights": info["weights"],
        "input_size": int(input_size),
        "mean": np.asarray(info["mean"], dtype=np.float64),
        "std": np.asarray(info["std"], dtype=np.float64),
        "padding": PADDING,
        "spatial_key": spatial_key,
        "library_ids": [str(k) for k in records],
        "libraries": records,
    }
    if library_key is not None:
        params["library_key"] = library_key
    if preset is not None:
        params["preset"] = preset
    if tf_padding:
        params["tf_padding"] = True
    if layers != "last":
        params["layers"] = layers
    if dihedral:
        params["dihedral"] = True
    if context is not None:
        params["context"] = float(context)
    for k in ("pooling", "mpp"):
        if info.get(k) is not None:
            params[k] = info[k]
    for k in ("image", "scale", "patch_size_px", "patch_size_um", "method", "halo", "n_tiles") + tuple(sdata_keys):
        vals = [r[k] for r in records.values() if k in r]
        if not vals:
            continue
        if len(vals) == len(records) and all(v == vals[0] for v in vals):
            params[k] = vals[0]
        elif k == "image" or k in sdata_keys:
            params[k] = [str(v) for v in vals]
        else:
            params[k] = np.asarray(vals, dtype=np.float64)
    if weights is None and not isinstance(encoder, nn.Module) and random_state is not None:
        params["random_state"] = int(random_state)

    if spatial_key is None:
        params.pop("spatial_key")
    return params


def write_features(adata: AnnData, key: str, features: np.ndarray, params: dict, *, pca=None, n_fit: int = 0) -> None:
    """Write `obsm[key] = features` and `uns[key] = {'params': params, 'version': ...}` (+ `'pca'` when given).

    With a PCA, `params['n_components']` is its width and `uns[key]['pca']` holds `mean`, `components` and `n_fit`.
    """
    from histospace._utils import version_string

    adata.obsm[key] = features
    adata.uns[key] = {"params": params, "version": version_string()}
    if pca is not None:
        params["n_components"] = int(features.shape[1])
        adata.uns[key]["pca"] = {"mean": pca[0], "components": pca[1], "n_fit": int(n_fit)}
