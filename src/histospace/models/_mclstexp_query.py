"""The query side of :class:`~histospace.models.MclSTExp`: image embeddings, the neighbour search, predictions."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scanpy import logging as logg

from histospace._image.features._slot import (
    FEATURES_HINT,
    UM_RTOL,
    check_feature_params,
    feature_settings,
    settings_mismatch,
)
from histospace._nn._mclstexp import knn_predict
from histospace._spatial._slide import anndata_mpp
from histospace._spatial._uns import has_uns, share_uns, uns_libraries, uns_path
from histospace._utils import check_no_nan, check_number
from histospace._utils._data import as_dense, library_labels, smooth_over_neighbors
from histospace._utils._library import PatchStream
from histospace.models._context import (
    can_smooth,
    check_context_input,
    context_ops,
    context_rows,
    smooth_rows,
)

#: how to give a query image its resolution (named in the errors)
MPP_FIX = (
    "Give the query's µm per full-resolution pixel: `mpp=` of `hs.tl.mclstexp_predict` (or of `model.predict`), "
    "`hs.pp.tile_image(img, mpp=...)` for tiles, `hs.io.add_image(sdata, path, mpp=...)` (or "
    f"`hs.io.set_microns_per_unit`) for a SpatialData, or `{uns_path(obj='')}[library_id]['metadata']"
    "['spot_diameter_um']` with `scalefactors['spot_diameter_fullres']` for spots."
)

_WEIGHTING = ("inverse_square", "uniform", "softmax")


def _query_table(adata, table_key: str | None):
    """The table of a SpatialData query (`table_key` or its only table); an AnnData (or anything else) as given."""
    from histospace._utils._sdata import as_table, is_spatialdata

    return as_table(adata, table_key)[0] if is_spatialdata(adata) else adata


class QueryMixin:
    """Embedding and prediction of query spots or tiles (mixed into :class:`~histospace.models.MclSTExp`)."""

    def check_query(self, adata: AnnData, *, img=None, table_key: str | None = None) -> None:
        """Raise if `adata` cannot be embedded by this model (missing, mis-sized, NaN or foreign image features).

        `adata` may be a SpatialData: its table `table_key` (or its only table) is checked.
        """
        adata = _query_table(adata, table_key)
        if not isinstance(adata, AnnData):
            msg = f"`adata` must be an AnnData, got {type(adata).__name__}."
            raise TypeError(msg)
        if not self.freeze_encoder:
            if self.spatial_key not in adata.obsm:
                msg = f"`adata.obsm[{self.spatial_key!r}]` not found; patches need spot centres in pixels."
                raise KeyError(msg)
            if img is None and not has_uns(adata):
                msg = (
                    "This model fine-tunes its image encoder, so the query needs an image: pass `img=` or store it "
                    f"in `{uns_path()}` (e.g. from `hs.pp.tile_image`)."
                )
                raise KeyError(msg)
            return
        key = self.features_key
        if key not in adata.obsm:
            msg = f"`adata.obsm[{key!r}]` not found. {FEATURES_HINT}"
            raise KeyError(msg)
        self._check_width(adata.obsm[key].shape, f"adata.obsm[{key!r}]")
        check_no_nan(as_dense(adata.obsm[key]), f"adata.obsm[{key!r}]")
        uns_f = adata.uns.get(key, {})
        qp = uns_f.get("params") if isinstance(uns_f, dict) else None
        if not isinstance(qp, dict):
            return
        if not self.reference.feature_settings:  # a model saved before the settings were recorded
            check_feature_params(self.reference.feature_params, qp, key)
            return
        self._check_settings(feature_settings(qp), f"adata.uns[{key!r}]['params']")

    def _check_settings(self, query: dict[str, Any], where: str) -> None:
        """Raise when image features made with the settings `query` (from `where`) are not the model's."""
        key = self.features_key
        bad = settings_mismatch(self.reference.feature_settings, query)
        if bad is None:
            return
        k, got, want = bad
        fix = (
            f"Delete `adata.obsm[{key!r}]` so that `hs.tl.mclstexp_predict` computes the features with the model's "
            f"settings, or recompute them: `hs.pp.image_features(adata, **model.image_features_kwargs)`."
        )
        if k == "patch_size_um" and got is None:
            msg = (
                f"The query's image features (`{where}`) were made at an unknown scale (no `patch_size_um`: the "
                f"image's µm per pixel was not known), but the model's patches are {want:g} µm wide; a pixel size "
                f"would be a guess. {MPP_FIX} Then {fix[0].lower()}{fix[1:]}"
            )
        else:
            msg = f"`{where}[{k!r}]` is {got!r} but the model's image features were made with {k}={want!r}. {fix}"
        raise ValueError(msg)

    def _smooths(self, adata: AnnData, *, warn: bool = False) -> bool:
        """Whether predictions for `adata` are smoothed (`smooth_predictions > 0` and a graph or centres)."""
        return can_smooth(adata, self.smooth_predictions, self.connectivity_key, self.spatial_key, warn=warn)

    def _context_ops(self, adata: AnnData, *, prediction: bool = False) -> list:
        """Ring operators of `adata`'s graph for the spatial context (`[]`: none); at least ring 1 when `prediction`
        and the predictions are smoothed.
        """  # noqa: D205
        rings = self.spatial_context if self.freeze_encoder else 0
        rings = max(rings, int(prediction and self._smooths(adata)))
        return context_ops(adata, rings, self.connectivity_key, self.spatial_key, self.library_key)

    # ---- the query's image features, made as the reference's -----------------------------------------------------
    @property
    def feature_settings(self) -> dict[str, Any]:
        """How the reference's image features were made (recorded at training, saved with the model).

        The settings of :func:`histospace.pp.image_features` found in the reference's
        `uns[features_key]['params']`: `encoder`, `weights`, `mean`, `std`, `tf_padding`, `layers`, `dihedral`,
        `context`, `input_size`, `method`, `n_components` (with a PCA, also saved), `patch_size_px` and, when the
        reference's µm per pixel was known, `patch_size_um` and `mpp` (the reference's µm per full-resolution
        pixel). `{}` when the reference's features came without those parameters.
        """
        return dict(self.reference.feature_settings)

    @property
    def image_features_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`histospace.pp.image_features` that make a query's features as the reference's.

        The patch is given in µm (`patch_size_um`) when the reference's µm per pixel was known, so that a query at
        another magnification sees the same tissue; else in pixels (`patch_size`). With a PCA, `pca=` projects onto
        the reference's. Use as `hs.pp.image_features(query, **model.image_features_kwargs)`.
        """
        s = self.reference.feature_settings
        key = self.features_key
        if not s:
            msg = (
                f"The model does not record how its image features were made: the reference's "
                f"`adata.uns[{key!r}]['params']` was absent when it was trained. Compute the query's features with the "
                f"reference's settings yourself (`hs.pp.image_features`), or train on features from `hs.pp.image_features`."
            )
            raise ValueError(msg)
        if s["weights"] == "module":
            msg = (
                "The reference's features were made with a user `torch.nn.Module` encoder, which the model does not "
                f"keep; compute `adata.obsm[{key!r}]` of the query with the same module (`hs.pp.image_features`)."
            )
            raise ValueError(msg)
        kw: dict[str, Any] = {
            "encoder": s["encoder"],
            "weights": None if s["weights"] == "random" else s["weights"],
            "tf_padding": s["tf_padding"],
            "layers": s["layers"],
            "dihedral": s["dihedral"],
            "input_size": s["input_size"],
            "method": s["method"],
            "key_added": key,
        }
        for k in ("mean", "std"):
            if k in s:
                kw[k] = s[k][0] if len(s[k]) == 1 else tuple(s[k])
        if "context" in s:
            kw["context"] = s["context"]
        if s["weights"] == "random":
            kw["random_state"] = s.get("random_state", 0)
        if "patch_size_um" in s:
            kw["patch_size_um"] = s["patch_size_um"]
        elif "patch_size_px" in s:
            kw["patch_size"] = s["patch_size_px"]
        if self.reference.feature_pca is not None:
            kw["pca"] = {k: np.asarray(v) for k, v in self.reference.feature_pca.items()}
        return kw

    def query_features(
        self,
        adata,
        *,
        table_key: str | None = None,
        image_key: str | None = None,
        img=None,
        mpp: float | None = None,
        progress_bar: bool = False,
    ) -> tuple[np.ndarray, dict]:
        """Image features of a query made as the reference's, at the reference's µm: `(features, uns entry)`.

        The settings are :attr:`image_features_kwargs`; the patch is `patch_size_um` wide whatever the query's
        magnification (cut from the closest pyramid level and resized to `input_size`). The query's µm per pixel comes
        from `mpp` (µm per full-resolution pixel, i.e. per unit of `obsm['spatial']`; for a SpatialData per pixel
        of the image's full-resolution level), else from its metadata; when it is unknown a `ValueError` naming
        `mpp=` is raised before any work. Nothing is written to `adata`.

        Parameters
        ----------
        adata
            The query: an AnnData with `obsm['spatial']` and an image (`img=` or `uns['spatial']`), or a SpatialData
            whose table `table_key` annotates shapes over the image `image_key`.
        table_key, image_key
            With a SpatialData: the table and the H&E image (`None`: the only one).
        img
            With an AnnData: the full-resolution image, as `img=` of :func:`histospace.pp.image_features`.
        mpp
            µm per full-resolution pixel of the query, when its metadata lacks it (or to override it).
        progress_bar
            Show the progress bar of :func:`histospace.pp.image_features`.
        """
        import histospace as hs
        from histospace._utils._sdata import as_table

        s = self.reference.feature_settings
        if not s:
            key = self.features_key
            msg = (
                f"`adata.obsm[{key!r}]` not found, and the model cannot make it: the reference's "
                f"`adata.uns[{key!r}]['params']` (how its features were made) was absent at training. {FEATURES_HINT}"
            )
            raise KeyError(msg)
        kw = self.image_features_kwargs
        um = s.get("patch_size_um")
        if um is None:
            msg = (
                f"The model's reference had no µm scale (its `{uns_path(obj='')}[...]['metadata']['spot_diameter_um']` or "
                "the SpatialData's µm per unit was unknown), so its patches cannot be matched on a query of another "
                "magnification. Compute the query's features yourself "
                "(`hs.pp.image_features(query, **model.image_features_kwargs)`: the same patch in pixels) when both "
                "are at the same magnification, or retrain on a reference with a known resolution."
            )
            raise ValueError(msg)
        mpp = check_number(mpp, "mpp", low=0, low_inclusive=False, allow_none=True)
        table, ctx = as_table(adata, table_key)
        if ctx is None:
            q_mpp, kw_query = self._anndata_mpp(table, img=img, mpp=mpp)
        else:
            if img is not None:
                msg = "With a SpatialData the image is an element of `sdata.images`: pass `image_key=`, not `img=`."
                raise ValueError(msg)
            q_mpp, kw_query = _sdata_mpp(ctx, image_key, mpp)
        kw.pop("patch_size_um")
        kw["patch_size"] = um / q_mpp
        ref_mpp = s.get("mpp")
        if ref_mpp is not None and not np.isclose(q_mpp, ref_mpp, rtol=UM_RTOL, atol=0):
            logg.warning(
                f"the query is at {q_mpp:.4g} µm/px and the model's reference at {ref_mpp:.4g} µm/px: the query's "
                f"patches are cut at the model's {um:.4g} µm ({um / q_mpp:.1f} px instead of {um / ref_mpp:.1f}) and "
                f"resampled to {kw['input_size']} px"
            )
        start = logg.info(f"computing the query's image features with the model's settings ({um:.4g} µm patches)")
        kw |= {"device": self.device, "progress_bar": progress_bar, **kw_query}
        if (
            ctx is None
        ):  # into a light AnnData of the query's spots, slides and images (nothing copied, nothing written)
            light = AnnData(obs=pd.DataFrame(index=table.obs_names.copy()))
            for col in {kw_query.get("library_key")} - {None}:
                light.obs[col] = table.obs[col].to_numpy()
            light.obsm[self.spatial_key] = np.asarray(table.obsm[self.spatial_key])
            share_uns(table, light)
            hs.pp.image_features(light, img=img, spatial_key=self.spatial_key, **kw)
            res = light
        else:  # a copy of the table in a new SpatialData that shares the elements
            res = hs.pp.image_features(ctx.sdata, table_key=ctx.table_key, copy=True, **kw).tables[ctx.table_key]
        feats = np.ascontiguousarray(res.obsm[self.features_key], dtype=np.float32)
        logg.info("    finished", time=start)
        return feats, res.uns[self.features_key]

    def _anndata_mpp(self, adata: AnnData, *, img, mpp: float | None) -> tuple[float, dict[str, Any]]:
        """The query's µm per full-resolution pixel (one for all its slides) and the slide option of image_features."""
        if self.spatial_key not in adata.obsm:
            msg = f"`adata.obsm[{self.spatial_key!r}]` not found; the query's patches need spot centres in pixels."
            raise KeyError(msg)
        uns_libs = uns_libraries(adata)
        lk = self.library_key
        kw: dict[str, Any] = {}
        if lk is not None and lk in adata.obs and len(uns_libs) > 1 and img is None:
            libs = [str(v) for v in pd.unique(adata.obs[lk].astype(str))]
            kw["library_key"] = lk
        else:
            libs = uns_libs[:1] if len(uns_libs) == 1 else []
        if mpp is not None:
            return float(mpp), kw
        found = {lib: m for lib in libs if (m := anndata_mpp(adata, lib)) is not None}
        if not libs or len(found) < len(libs):
            which = [lib for lib in libs if lib not in found] or [f"(no library in `{uns_path()}`)"]
            msg = (
                f"The query's resolution is unknown (slides {which[:5]}: no µm per pixel in "
                f"`{uns_path()}[library_id]['metadata']`), so the model's "
                f"{self.reference.feature_settings['patch_size_um']:g}-µm patches cannot be cut from it without a "
                f"guess. {MPP_FIX}"
            )
            raise ValueError(msg)
        vals = np.asarray(list(found.values()))
        if not np.allclose(vals, vals[0], rtol=1e-6, atol=0):
            msg = (
                f"The query's slides have different µm per pixel ({dict(list(found.items())[:5])}); predict them one "
                "slide at a time."
            )
            raise ValueError(msg)
        return float(vals[0]), kw

    def _check_width(self, shape: tuple, name: str) -> None:
        if len(shape) != 2 or shape[1] != self.img_dim:
            msg = (
                f"`{name}` has shape {tuple(shape)} but the model was trained on {self.img_dim}-d image features. "
                "Compute the query features with the same encoder and settings as the reference (`hs.pp.image_features`)."
            )
            raise ValueError(msg)

    @torch.no_grad()
    def get_image_embedding(
        self,
        adata: AnnData | None = None,
        *,
        features: np.ndarray | None = None,
        img=None,
        batch_size: int = 4096,
        table_key: str | None = None,
        _context_ops: list | None = None,
    ) -> np.ndarray:
        """Joint-space embeddings of the query's image features (or patches when fine-tuned), `(n_obs, dim)`.

        With a seed ensemble, those of the first model (:attr:`module`); :meth:`predict` uses all of them. `adata` may
        be a SpatialData: the spots of its table `table_key` (or its only table). With a spatial context
        (`context > 0`), `adata` is needed for its spatial graph (also when `features` are given); the widened
        features are made batch by batch.
        """
        if adata is not None:
            adata = _query_table(adata, table_key)
        if self.spatial_context and self.freeze_encoder and adata is None:
            msg = f"This model uses the spatial context (spatial_context={self.spatial_context}): pass `adata` for its spatial graph."
            raise ValueError(msg)
        module = self.module.eval()
        dev = self.device
        out = []
        if self.freeze_encoder:
            if features is None:
                self.check_query(adata)
                features = as_dense(adata.obsm[self.features_key])
            features = np.asarray(features, dtype=np.float32)
            self._check_width(features.shape, "features")
            check_no_nan(features, "features")
            if adata is not None and features.shape[0] != adata.n_obs:
                msg = f"`features` has {features.shape[0]} rows for {adata.n_obs} query spots."
                raise ValueError(msg)
            ops = (self._context_ops(adata) if _context_ops is None else _context_ops) if self.spatial_context else []
            ops = ops[: self.spatial_context]
            for lo in range(0, features.shape[0], batch_size):
                rows = slice(lo, lo + batch_size)
                x = self.reference.scale(context_rows(features, ops, rows) if ops else features[rows])
                out.append(module.embed_image(torch.from_numpy(x).to(dev)).float().cpu())
        else:
            ft = self._fine_tune
            stream = PatchStream(
                adata,
                library_labels(adata, self.library_key),
                img=img,
                spatial_key=self.spatial_key,
                patch_size=ft["patch_size"],
                input_size=ft["input_size"],
            )
            bs = min(batch_size, 128)
            for lo in range(0, adata.n_obs, bs):
                x = stream(np.arange(lo, min(lo + bs, adata.n_obs))).to(dev)
                out.append(module.embed_image(x).float().cpu())
        if not out:
            return np.zeros((0, self.config["projection_dim"]), dtype=np.float32)
        return torch.cat(out).numpy()

    @torch.no_grad()
    def predict_from_embedding(
        self,
        emb: np.ndarray,
        *,
        n_neighbors: int = 200,
        weighting: Literal["inverse_square", "uniform", "softmax"] | None = None,
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Expression `(n, n_genes)` as the weighted mean over the cosine top-`n_neighbors` reference spots.

        Weights: `'softmax'` of the model's logits (`logit_scale * q . k`; the default); `'inverse_square'` `1/d^2`
        of the Euclidean distance between the embeddings (the reference, default with `preset='reference'`);
        `'uniform'`. With a seed ensemble, the search is in the first model's space (:attr:`reference_embeddings`);
        :meth:`predict` uses all of them.
        """
        self._check_trained()
        weighting = self._weighting(weighting)
        n_ref = self.reference_embeddings.shape[0]
        n_neighbors = check_number(n_neighbors, "n_neighbors", integer=True, low=1, high=n_ref)
        batch_size = check_number(batch_size, "batch_size", integer=True, low=1)
        emb = np.asarray(emb, dtype=np.float32)
        dim = self.config["projection_dim"]
        if emb.ndim != 2 or emb.shape[1] != dim:
            msg = f"`emb` has shape {emb.shape}; expected (n, {dim}) joint-space embeddings of this model."
            raise ValueError(msg)
        check_no_nan(emb, "emb")
        check_no_nan(self.reference_embeddings, "reference embeddings of the model")
        return knn_predict(
            emb,
            self.reference_embeddings,
            self.reference.expression_at_rank(self.expression_rank),
            n_neighbors=n_neighbors,
            weighting=weighting,
            logit_scale=float(self.module.logit_scale),
            batch_size=batch_size,
            device=self.device,
        )

    def _missing_features(
        self, table: AnnData, ctx, options: tuple, *, image_key, img, mpp, progress_bar: bool = False
    ) -> tuple[np.ndarray | None, dict | None]:
        """`(features, params)` made with the reference's settings when the query `table` has none, else `(None, None)`.

        `ctx` is the table's SpatialData context (`None` for an AnnData); `options` are `(n_neighbors, weighting,
        smooth_neighbors, batch_size)`, checked before the features are computed.
        """
        if not self.freeze_encoder or self.features_key in table.obsm:
            return None, None
        self._check_options(table, *options)
        return self.query_features(
            table if ctx is None else ctx.sdata,
            table_key=None if ctx is None else ctx.table_key,
            image_key=image_key,
            img=img,
            mpp=mpp,
            progress_bar=progress_bar,
        )

    def _check_options(
        self, adata: AnnData, n_neighbors: int, weighting: str | None, smooth_neighbors: int, batch_size: int
    ) -> tuple[str, int, int]:
        """Check the options of a prediction before any work: `(weighting, smooth_neighbors, batch_size)`."""
        self._check_trained()
        if not isinstance(adata, AnnData):
            msg = f"`adata` must be an AnnData, got {type(adata).__name__}."
            raise TypeError(msg)
        weighting = self._weighting(weighting)
        check_number(n_neighbors, "n_neighbors", integer=True, low=1, high=self.reference_embeddings.shape[0])
        smooth_neighbors = check_number(smooth_neighbors, "smooth_neighbors", integer=True, low=0)
        batch_size = check_number(batch_size, "batch_size", integer=True, low=1)
        if smooth_neighbors > 0 and self.spatial_key not in adata.obsm:
            msg = f"`adata.obsm[{self.spatial_key!r}]` not found; `smooth_neighbors > 0` needs spot coordinates."
            raise KeyError(msg)
        if self.spatial_context and self.freeze_encoder:
            check_context_input(adata, self.spatial_context, self.connectivity_key, self.spatial_key)
        return weighting, smooth_neighbors, batch_size

    def _weighting(self, weighting: str | None) -> str:
        if weighting is None:
            return self.default_weighting
        if weighting not in _WEIGHTING:
            msg = f"`weighting` must be one of {_WEIGHTING}, got {weighting!r}."
            raise ValueError(msg)
        return weighting

    def predict(
        self,
        adata: AnnData,
        *,
        n_neighbors: int = 200,
        weighting: Literal["inverse_square", "uniform", "softmax"] | None = None,
        smooth_neighbors: int = 0,
        img=None,
        mpp: float | None = None,
        batch_size: int = 4096,
        return_std: bool = False,
        table_key: str | None = None,
        image_key: str | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
        """Predicted normalised expression `(adata.n_obs, n_genes)` of the query (columns in `self.genes` order).

        For a seed ensemble (`n_models > 1` in :meth:`train`), the mean of the members' predictions. See
        :func:`histospace.tl.mclstexp_predict` for the parameters. With `return_std=True`, returns `(mean, std)`:
        `std` is the per-spot, per-gene sample standard deviation over the members (float32, `n_models - 1` in the
        denominator), or `None` for a single model.

        When `adata.obsm[features_key]` is absent, the features are computed with the reference's settings at its
        µm (:meth:`query_features`; `mpp=` gives the query's µm per pixel when its metadata lacks it); they are not
        written to `adata`. `adata` may be a SpatialData: the spots of its table `table_key` (or its only table), with
        features from its image `image_key` when they are computed.
        """
        from histospace._utils._sdata import as_table

        table, ctx = as_table(adata, table_key)
        features, _ = self._missing_features(
            table, ctx, (n_neighbors, weighting, smooth_neighbors, batch_size), image_key=image_key, img=img, mpp=mpp
        )
        mean, std, _ = self._predict(
            table,
            n_neighbors=n_neighbors,
            weighting=weighting,
            smooth_neighbors=smooth_neighbors,
            img=img,
            batch_size=batch_size,
            with_std=bool(return_std),
            with_embedding=False,
            features=features,
        )
        return (mean, std) if return_std else mean

    def _predict(
        self,
        adata: AnnData,
        *,
        n_neighbors: int,
        weighting: str | None,
        smooth_neighbors: int,
        img,
        batch_size: int,
        with_std: bool,
        with_embedding: bool,
        features: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """`(mean, std or None, embedding or None)` in one pass over the members (see :meth:`predict`).

        The embedding is the first member's image embedding (before `smooth_neighbors`), L2-normalised, float32.
        `features`: the query's image features when they are not in `adata.obsm` (from :meth:`query_features`).
        """
        weighting, smooth_neighbors, batch_size = self._check_options(
            adata, n_neighbors, weighting, smooth_neighbors, batch_size
        )
        if features is None:
            self.check_query(adata, img=img)
        else:
            features = np.asarray(features, dtype=np.float32)
            self._check_width(features.shape, "features")
            check_no_nan(features, "features")
            if features.shape[0] != adata.n_obs:
                msg = f"`features` has {features.shape[0]} rows for {adata.n_obs} query spots."
                raise ValueError(msg)
        smooth = self._smooths(adata, warn=True)
        ops = self._context_ops(adata, prediction=True)
        out = m2 = first_emb = None
        n = max(len(self._members), 1)
        try:
            for i in range(n):
                if self._members:
                    self._use_member(i)
                emb = self.get_image_embedding(
                    adata, features=features, img=img, batch_size=batch_size, _context_ops=ops
                )
                if with_embedding and i == 0:
                    norm = np.linalg.norm(emb, axis=1, keepdims=True)
                    first_emb = np.ascontiguousarray(emb / np.maximum(norm, 1e-12), dtype=np.float32)
                if smooth_neighbors > 0:
                    xy = np.asarray(adata.obsm[self.spatial_key], dtype=np.float64)[:, :2]
                    libs = library_labels(adata, self.library_key)
                    emb = smooth_over_neighbors(emb, xy, libs, n_neighbors=smooth_neighbors)
                p = self.predict_from_embedding(
                    emb, n_neighbors=n_neighbors, weighting=weighting, batch_size=batch_size
                )
                if smooth:
                    p = smooth_rows(p, ops[0], self.smooth_predictions)
                if with_std and n > 1:  # Welford's sum of squared deviations, the running mean taken from the sum
                    if m2 is None:
                        m2 = np.zeros_like(p)
                    else:
                        m2 += (p - out / np.float32(i)) * (p - (out + p) / np.float32(i + 1))
                out = p if out is None else out + p
        finally:
            if self._members:
                self._use_member(0)
        std = None
        if m2 is not None:
            std = np.sqrt(np.maximum(m2, 0) / np.float32(n - 1)).astype(np.float32, copy=False)
        return (out / np.float32(n) if n > 1 else out), std, first_emb


def _sdata_mpp(ctx, image_key: str | None, mpp: float | None) -> tuple[float, dict[str, Any]]:
    """µm per pixel of the full-resolution level of the SpatialData query's image (`mpp`, else its coordinate
    system's µm per unit) and the image option of image_features; raises naming `mpp=` when unknown.
    """  # noqa: D205
    from histospace._image import coordinate_system_to_pixels
    from histospace._spatial._affine import affine_scale
    from histospace._spatial._images import sdata_image_key
    from histospace.io import microns_per_unit

    sdata = ctx.sdata
    image_key = sdata_image_key(sdata, image_key)
    kw = {"image_key": image_key}
    if mpp is not None:
        return float(mpp), kw
    shapes_key = ctx.shapes_key(None)
    cs = ctx.coordinate_system(None, [shapes_key, image_key])
    um_per_unit = microns_per_unit(sdata, cs, table_key=ctx.table_key)
    if um_per_unit is None:
        msg = (
            f"The query's resolution is unknown: the coordinate system {cs!r} of `sdata.images[{image_key!r}]` has no "
            f"µm scale (a slide without µm-per-pixel metadata), so the model's patches cannot be cut from it without "
            f"a guess. {MPP_FIX}"
        )
        raise ValueError(msg)
    to_image = coordinate_system_to_pixels(sdata, image_key=image_key, coordinate_system=cs, level=0)
    return float(um_per_unit) / affine_scale(to_image), kw
