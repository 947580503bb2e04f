"""The reference of an mclSTExp model: its gene panel, normalised expression, positions and image side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from histospace._image.features._slot import (
    FEATURE_PARAMS,
    FEATURES_HINT,
    feature_pca,
    feature_settings,
    read_features,
)
from histospace._utils import check_no_nan, check_unique_obs_names, get_matrix
from histospace._utils._data import as_dense, check_genes, library_labels, log_normalize, normalize_expression
from histospace._utils._library import PatchStream
from histospace._utils._preprocess import covariance_pca, highly_variable_genes


def grid_positions(xy: np.ndarray, libs: np.ndarray) -> np.ndarray:
    """Quantise pixel coordinates to a grid (pitch = median nearest-neighbour distance) per slide; `(x, y)`."""
    from scipy.spatial import cKDTree

    out = np.zeros((xy.shape[0], 2), dtype=np.int64)
    for lib in np.unique(libs):
        m = libs == lib
        p = xy[m]
        if p.shape[0] > 1:
            d, _ = cKDTree(p).query(p, k=2)
            pitch = float(np.median(d[:, 1])) or 1.0
        else:
            pitch = 1.0
        out[m] = np.rint((p - p.min(axis=0)) / pitch).astype(np.int64)
    return out


@dataclass
class ReferenceData:
    """What an mclSTExp model knows of its reference slides.

    Built from an AnnData (:meth:`from_anndata`: everything, the model can train) or from a saved model
    (:meth:`from_saved`: what prediction needs — genes, normalised expression, feature scaling).
    """

    genes: list[str]
    expression: np.ndarray
    obs_names: np.ndarray
    n_x: int
    n_y: int
    img_dim: int | None
    feature_params: dict = field(default_factory=dict)
    feature_settings: dict = field(default_factory=dict)
    feature_pca: dict | None = None
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None
    positions: np.ndarray | None = None
    libs: np.ndarray | None = None
    features: np.ndarray | None = None
    views: list[np.ndarray] = field(default_factory=list)
    patches: PatchStream | None = None
    #: principal axes of :attr:`expression` (`'mean'`, `'components'` rows), computed once by :meth:`on_axes`
    expression_pca: dict | None = None
    _at_rank: tuple[int, int, np.ndarray] | None = field(default=None, repr=False)

    @property
    def trainable(self) -> bool:
        """Whether the reference holds what training needs (an AnnData was given)."""
        return self.positions is not None and (self.features is not None or self.patches is not None)

    @classmethod
    def from_anndata(
        cls,
        adata: AnnData,
        *,
        layer: str | None,
        genes: Sequence[str] | None,
        n_top_genes: int,
        normalize: str,
        library_key: str | None,
        position_key: Sequence[str],
        spatial_key: str,
        use_positions: bool,
        freeze_encoder: bool,
        features_key: str,
        augment_keys: Sequence[str],
        scale_features: bool,
        patch_stream: dict[str, Any],
        context_ops: Sequence[Any] = (),
    ) -> ReferenceData:
        """Check and prepare the reference slides of `adata` (see :class:`~histospace.models.MclSTExp`).

        `context_ops`: the ring operators of the reference's spatial graph (:mod:`histospace.models._context`); the
        features (and views) are then the spots' features beside their ring means, and the scaling is theirs.
        """
        if not isinstance(adata, AnnData):
            msg = f"`adata` must be an AnnData, got {type(adata).__name__}."
            raise TypeError(msg)
        check_unique_obs_names(adata)
        if adata.n_obs < 2:
            msg = "The reference needs at least 2 spots."
            raise ValueError(msg)
        libs = library_labels(adata, library_key)
        counts = get_matrix(adata, layer, counts=normalize != "none")
        if genes is None:
            x_log = counts if normalize == "none" else log_normalize(counts)
            genes = list(adata.var_names[highly_variable_genes(x_log, adata.var_names, n_top_genes, batch=libs)])
        else:
            genes = [str(g) for g in genes]
            if len(set(genes)) != len(genes):
                msg = "`genes` holds duplicates; pass each gene once."
                raise ValueError(msg)
            check_genes(
                genes,
                adata.var_names,
                where="adata.var_names",
                fix="Subset `genes=` to the genes measured in every reference slide (the panel genes of the reference).",
            )
        if len(genes) == 0:
            msg = (
                "The gene panel is empty: no gene is expressed in enough reference spots to be chosen "
                f"({adata.n_obs} spots). Pass `genes=` or a larger reference."
            )
            raise ValueError(msg)
        x_panel = as_dense(counts[:, adata.var_names.get_indexer(genes)])
        check_no_nan(x_panel, "adata.X" if layer is None else f"adata.layers[{layer!r}]")
        _check_slides(x_panel, libs, genes)
        pos = _positions(adata, libs, position_key, spatial_key) if use_positions else np.zeros((adata.n_obs, 2), int)
        ref = cls(
            genes=list(genes),
            expression=normalize_expression(x_panel, normalize),
            obs_names=np.asarray(adata.obs_names.astype(str)),
            n_x=int(pos[:, 0].max()) + 1,
            n_y=int(pos[:, 1].max()) + 1,
            img_dim=None,
            positions=pos,
            libs=libs,
        )
        if not freeze_encoder:
            ref.patches = PatchStream(adata, libs, spatial_key=spatial_key, **patch_stream)
            return ref
        ref.features = read_features(adata, features_key)
        for k in augment_keys:
            v = read_features(adata, k, f"(in `augment_keys`) {FEATURES_HINT}")
            if v.shape != ref.features.shape:
                msg = f"`adata.obsm[{k!r}]` has shape {v.shape}; expected {ref.features.shape} as `adata.obsm[{features_key!r}]`."
                raise ValueError(msg)
            ref.views.append(v)
        uns_f = adata.uns.get(features_key, {})
        if isinstance(uns_f, Mapping) and isinstance(uns_f.get("params"), Mapping):
            ref.feature_params = {
                k: v for k, v in uns_f["params"].items() if k in FEATURE_PARAMS and isinstance(v, str | int | float)
            }
            ref.feature_settings = feature_settings(uns_f["params"])
            ref.feature_pca = feature_pca(uns_f) if ref.feature_settings else None
        ref.img_dim = int(ref.features.shape[1])
        if context_ops:
            from histospace.models._context import context_rows

            ref.features = context_rows(ref.features, list(context_ops))
            ref.views = [context_rows(v, list(context_ops)) for v in ref.views]
        if scale_features:
            ref.feature_mean = ref.features.mean(axis=0).astype(np.float32)
            ref.feature_std = np.maximum(ref.features.std(axis=0), 1e-6).astype(np.float32)
        return ref

    @classmethod
    def from_saved(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> ReferenceData:
        """The reference of a saved model (no AnnData): what prediction needs, nothing to train on."""
        return cls(
            genes=list(meta["genes"]),
            expression=arrays["reference_expression"],
            obs_names=arrays["reference_obs_names"],
            n_x=int(meta["n_x"]),
            n_y=int(meta["n_y"]),
            img_dim=meta["img_dim"],
            feature_params=dict(meta.get("feature_params", {})),
            feature_settings=dict(meta.get("feature_settings", {})),
            feature_pca=(
                {"mean": arrays["feature_pca_mean"], "components": arrays["feature_pca_components"]}
                if "feature_pca_mean" in arrays
                else None
            ),
            feature_mean=arrays.get("feature_mean"),
            feature_std=arrays.get("feature_std"),
            expression_pca=(
                {"mean": arrays["expression_pca_mean"], "components": arrays["expression_pca_components"]}
                if "expression_pca_mean" in arrays
                else None
            ),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays a saved model keeps of its reference."""
        out = {"reference_expression": self.expression, "reference_obs_names": np.asarray(self.obs_names).astype(str)}
        if self.feature_mean is not None:
            out["feature_mean"], out["feature_std"] = self.feature_mean, self.feature_std
        if self.feature_pca is not None:
            out["feature_pca_mean"] = self.feature_pca["mean"]
            out["feature_pca_components"] = self.feature_pca["components"]
        if self.expression_pca is not None:
            out["expression_pca_mean"] = self.expression_pca["mean"]
            out["expression_pca_components"] = self.expression_pca["components"]
        return out

    def meta(self) -> dict[str, Any]:
        """The JSON entries a saved model keeps of its reference."""
        return {
            "genes": self.genes,
            "n_x": self.n_x,
            "n_y": self.n_y,
            "img_dim": self.img_dim,
            "feature_params": self.feature_params,
            "feature_settings": self.feature_settings,
        }

    def expression_at_rank(self, rank: int) -> np.ndarray:
        """:attr:`expression` on its first `rank` principal axes (:meth:`on_axes`), kept for the last rank asked."""
        if self._at_rank is None or self._at_rank[:2] != (rank, id(self.expression)):
            self._at_rank = (rank, id(self.expression), self.on_axes(self.expression, rank))
        return self._at_rank[2]

    def on_axes(self, x: np.ndarray, rank: int) -> np.ndarray:
        """Rows `x` (spots x genes) on the first `rank` principal axes of :attr:`expression`, in its range; float32.

        The axes are those of a centred PCA over the reference spots (exact: :func:`covariance_pca`, the covariance
        accumulated in row chunks and eigendecomposed, as for image features), computed once and kept (saved with the
        model); each gene is then clipped to its reference range. `rank=0`, or a rank that spans every axis, leaves
        `x` as it is.
        """
        y = self.expression
        n, g = y.shape
        if rank == 0 or rank >= min(g, n - 1):
            return np.asarray(x, dtype=np.float32)
        pca = self.expression_pca
        if pca is None or pca["components"].shape[0] < rank:
            mean, comps = covariance_pca(y, rank)
            pca = {"mean": mean.astype(np.float32), "components": comps.T.astype(np.float32)}
            self.expression_pca = pca
        v, mean = pca["components"][:rank], pca["mean"]
        low, lo, hi = np.empty(x.shape, dtype=np.float32), y.min(axis=0), y.max(axis=0)
        for start in range(0, x.shape[0], 65536):  # chunks: a reference of 10^6 bins never needs a float64 copy
            part = (np.asarray(x[start : start + 65536], dtype=np.float32) - mean) @ v.T @ v + mean
            low[start : start + 65536] = np.clip(part, lo, hi)
        return low

    def scale(self, feats: np.ndarray) -> np.ndarray:
        """Standardise image features with the reference's mean and standard deviation (when `scale_features`)."""
        if self.feature_mean is None:
            return feats.astype(np.float32)
        return ((feats - self.feature_mean) / self.feature_std).astype(np.float32)


def _check_slides(x_panel: np.ndarray, libs: np.ndarray, genes: list[str]) -> None:
    """Raise when most panel genes are all zero in one slide of several (genes missing from that slide)."""
    if len(pd.unique(libs)) < 2:
        return
    for lib in pd.unique(libs):
        zero = np.flatnonzero(np.abs(x_panel[libs == lib]).sum(axis=0) == 0)
        if zero.size > 0.5 * len(genes):
            msg = (
                f"{zero.size} of {len(genes)} panel genes are all zero in reference slide {lib!r} (e.g. "
                f"{[genes[i] for i in zero[:5]]}); the panel genes look missing from that slide. Pass "
                "`genes=` measured in every slide, or drop the slide."
            )
            raise ValueError(msg)


def _positions(adata: AnnData, libs: np.ndarray, position_key: Sequence[str], spatial_key: str) -> np.ndarray:
    """Integer `(x, y)` positions: array coordinates from `obs`, else pixel coordinates quantised per slide."""
    rk, ck = position_key
    if rk in adata.obs and ck in adata.obs:
        rows = pd.to_numeric(adata.obs[rk], errors="coerce").to_numpy()
        cols = pd.to_numeric(adata.obs[ck], errors="coerce").to_numpy()
        if not (np.isfinite(rows).all() and np.isfinite(cols).all()):
            msg = f"`adata.obs[{rk!r}]`/`adata.obs[{ck!r}]` hold missing values; fill them or drop the spots."
            raise ValueError(msg)
        if (rows < 0).any() or (cols < 0).any():
            msg = f"`adata.obs[{rk!r}]`/`adata.obs[{ck!r}]` must be non-negative array coordinates."
            raise ValueError(msg)
        return np.column_stack([np.rint(cols), np.rint(rows)]).astype(np.int64)
    if spatial_key in adata.obsm:
        xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
        check_no_nan(xy, f"adata.obsm[{spatial_key!r}]")
        logg.info(f"    no `obs[{rk!r}]`/`obs[{ck!r}]`: positions quantised from `obsm[{spatial_key!r}]`")
        return grid_positions(xy, libs)
    msg = (
        f"The reference has no positions: neither `adata.obs[{rk!r}]`/`adata.obs[{ck!r}]` (array "
        f"coordinates) nor `adata.obsm[{spatial_key!r}]` (pixels). Add them, or pass `use_positions=False`."
    )
    raise KeyError(msg)
