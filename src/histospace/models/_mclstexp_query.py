"""The query side of :class:`~histospace.models.MclSTExp`: image embeddings, the neighbour search, predictions."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from anndata import AnnData

from histospace._nn._mclstexp import knn_predict
from histospace._utils import check_no_nan, check_number
from histospace._utils._data import as_dense, library_labels, smooth_over_neighbors
from histospace._utils._library import PatchStream
from histospace.models._reference import FEATURES_HINT, check_feature_params

_WEIGHTING = ("inverse_square", "uniform", "softmax")


class QueryMixin:
    """Embedding and prediction of query spots or tiles (mixed into :class:`~histospace.models.MclSTExp`)."""

    def check_query(self, adata: AnnData, *, img=None) -> None:
        """Raise if `adata` cannot be embedded by this model (missing, mis-sized, NaN or foreign image features)."""
        if not isinstance(adata, AnnData):
            msg = f"`adata` must be an AnnData, got {type(adata).__name__}."
            raise TypeError(msg)
        if not self.freeze_encoder:
            if self.spatial_key not in adata.obsm:
                msg = f"`adata.obsm[{self.spatial_key!r}]` not found; patches need spot centres in pixels."
                raise KeyError(msg)
            if img is None and "spatial" not in adata.uns:
                msg = (
                    "This model fine-tunes its image encoder, so the query needs an image: pass `img=` or store it "
                    "in `adata.uns['spatial']` (e.g. from `hs.pp.tile_image`)."
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
        check_feature_params(self.reference.feature_params, qp if isinstance(qp, dict) else None, key)

    def _check_width(self, shape: tuple, name: str) -> None:
        if len(shape) != 2 or shape[1] != self.img_dim:
            msg = (
                f"`{name}` has shape {tuple(shape)} but the model was trained on {self.img_dim}-d image features. "
                "Compute the query features with the same encoder and settings as the reference (`hs.pp.image_features`)."
            )
            raise ValueError(msg)

    @torch.no_grad()
    def get_image_embedding(
        self, adata: AnnData | None = None, *, features: np.ndarray | None = None, img=None, batch_size: int = 4096
    ) -> np.ndarray:
        """Joint-space embeddings of the query's image features (or patches when fine-tuned), `(n_obs, dim)`.

        With a seed ensemble, those of the first model (:attr:`module`); :meth:`predict` uses all of them.
        """
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
            x = self.reference.scale(features)
            for lo in range(0, x.shape[0], batch_size):
                out.append(module.embed_image(torch.from_numpy(x[lo : lo + batch_size]).to(dev)).float().cpu())
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
            self.reference_expression,
            n_neighbors=n_neighbors,
            weighting=weighting,
            logit_scale=float(self.module.logit_scale),
            batch_size=batch_size,
            device=self.device,
        )

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
        batch_size: int = 4096,
        return_std: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
        """Predicted normalised expression `(adata.n_obs, n_genes)` of the query (columns in `self.genes` order).

        For a seed ensemble (`n_models > 1` in :meth:`train`), the mean of the members' predictions. See
        :func:`histospace.tl.mclstexp_predict` for the parameters. With `return_std=True`, returns `(mean, std)`:
        `std` is the per-spot, per-gene sample standard deviation over the members (float32, `n_models - 1` in the
        denominator), or `None` for a single model.
        """
        mean, std, _ = self._predict(
            adata,
            n_neighbors=n_neighbors,
            weighting=weighting,
            smooth_neighbors=smooth_neighbors,
            img=img,
            batch_size=batch_size,
            with_std=bool(return_std),
            with_embedding=False,
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
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """`(mean, std or None, embedding or None)` in one pass over the members (see :meth:`predict`).

        The embedding is the first member's image embedding (before `smooth_neighbors`), L2-normalised, float32.
        """
        self._check_trained()
        weighting = self._weighting(weighting)
        smooth_neighbors = check_number(smooth_neighbors, "smooth_neighbors", integer=True, low=0)
        batch_size = check_number(batch_size, "batch_size", integer=True, low=1)
        self.check_query(adata, img=img)
        if smooth_neighbors > 0 and self.spatial_key not in adata.obsm:
            msg = f"`adata.obsm[{self.spatial_key!r}]` not found; `smooth_neighbors > 0` needs spot coordinates."
            raise KeyError(msg)
        out = m2 = first_emb = None
        n = max(len(self._members), 1)
        try:
            for i in range(n):
                if self._members:
                    self._use_member(i)
                emb = self.get_image_embedding(adata, img=img, batch_size=batch_size)
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
