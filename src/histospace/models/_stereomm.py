"""StereoMM model class: input checks, feature preprocessing, training, latent, save/load."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData
from scanpy import logging as logg

from histospace._constants import CONNECTIVITIES_KEY, FEATURES_KEY, SPATIAL_KEY, connectivity_key_in
from histospace._image.features._slot import feature_settings
from histospace._nn._stereomm import StereoMMModule
from histospace._spatial._slide import table_centres
from histospace._utils import (
    check_number,
    check_obsm,
    check_obsp,
    check_random_state,
    check_unique_obs_names,
    get_matrix,
    resolve_device,
)
from histospace._utils._data import binary_adjacency, check_genes
from histospace._utils._graph import GraphBatch, make_tiles, sparse_adjacency
from histospace._utils._preprocess import Preprocessor
from histospace._utils._sdata import as_table
from histospace.models import _ddp as ddp
from histospace.models import _stereomm_config as settings
from histospace.models._base import BaseModelClass

if TYPE_CHECKING:
    from spatialdata import SpatialData


class StereoMM(BaseModelClass):
    """StereoMM: cross-modal attention between expression and H&E features, then a VGAE over the spatial graph.

    Fuses spot expression, image features and the spatial graph (:cite:p:`Luo2024`). Expression features ``X_t``
    and image features ``X_m`` (both brought to a common width ``s``) exchange information through one shared
    attention module with residuals (``X_ta = X_t + A(X_t, X_m, X_m)``, ``X_ma = X_m + A(X_m, X_t, X_t)``);
    ``[X_ma, X_ta]`` (image first) goes through a variational graph autoencoder with GCN layers whose decoder
    reconstructs the pre-attention features ``[X_m, X_t]``. The latent mean is the embedding.

    Default pipeline (``preset=None``; tuned on DLPFC 151673/151674, see ``benchmarks/domains.py``):

    - expression: counts are detected (integer values) and normalised (``normalize_total`` to 1e4 + ``log1p``);
      3000 highly variable genes (scanpy's `highly_variable_genes`, Seurat flavour); z-score; PCA to 50 dimensions
      (scanpy's `pca`, ARPACK with a fixed start; sparse input stays sparse);
    - image features: z-score, PCA to the same width;
    - each block scaled to mean per-dimension variance 1, then the image block multiplied by ``image_weight=0.1``
      (low-resolution H&E features are weak and noisy; at higher weights they pull the latent away from the tissue
      layers on DLPFC, see the domain benchmark);
    - attention ``'auto'``: exact global attention (frozen Q/K/V, cached, the reference's "brief" mode) up to
      100,000 spots, local attention (neighbours only, also frozen and cached) beyond; projection 256, one head;
      output projection initialised at zero (the attention starts as the identity instead of adding
      random-attention noise);
    - graph VAE hidden ``[256, 64]``, latent 32, linear last decoder layer, correct log-variance KL weighted ``1/n``;
      ``graph_weight='auto'``: the GCN layers average each spot with its neighbours when graph neighbours are alike
      (neighbour dissimilarity of the first 10 expression PCs below 0.5: Visium DLPFC 0.25-0.26) and keep each spot's
      own features when they are nearly as different as random spots (Stereo-seq bin20 embryo sections 0.75-0.78, where
      tissues one bin thick border each other and averaging mixes them; see ``benchmarks/domains_stereoseq.py``);
    - training (:meth:`train`): Adam, lr 1e-3, weight decay 1e-4, gradient-norm clip 5, float32; full batch up to
      20,000 spots for 300 epochs, beyond that spatial tiles of 16,384 spots (plus a halo covering the receptive
      field) for about 300 optimiser steps in all, so that the cost grows linearly with the number of spots;
    - a seed ensemble of 3 models (``n_models=3``): the latent is their three latents side by side, and
      `hs.tl.domains` clusters the principal components of the three together. One model's domains change with its
      seed; those of three change less (see the stability benchmark).

    The reference defaults (StereoMMv1: 2048 top-variance genes of `X` as given, z-scored, no PCA, hidden
    ``[2048, 256]``, latent 100, lr 1e-4, 100 epochs) train little in 100 full-batch steps and smooth the
    expression less; PCA inputs and a higher learning rate give better domains on DLPFC (ARI, see the benchmark).
    ``preset='reference'`` restores them; explicit arguments override a preset.

    Parameters
    ----------
    adata
        Annotated data matrix with expression, image features in `.obsm` and a spatial graph in `.obsp`; or a
        SpatialData whose table `table_key` holds them.
    table_key
        With a SpatialData: the table to use; `None` takes the only table.
    layer
        Layer with the expression (counts or normalised, non-negative); `None` uses `adata.X`.
    features_key
        Key in `adata.obsm` with image features (e.g. from `hs.pp.image_features`); `None` trains on expression
        and the graph only (ablation; the attention is then skipped).
    connectivity_key
        Key in `adata.obsp` with the spatial graph (squidpy layout), or the graph's base name (`key_added` of
        `hs.pp.spatial_graph`: `'x'` reads `obsp['x_connectivities']`). It is symmetrised and binarised, self loops are
        added. Spots without a neighbour (e.g. after QC filtering) get their latent from their own features; a
        warning counts them.
    spatial_key
        Key in `adata.obsm` with spot coordinates, used to cut spatial tiles for mini-batch training (without it,
        tiles follow the order of the spots). With a SpatialData, the centres of the shapes its table annotates are
        used (as `hs.pp` and `hs.pl` read them), and this key only when they cannot be resolved.
    preset
        `None` for the histospace defaults, `'reference'` for the StereoMMv1 README settings.
    gene_selection
        `'hvg'` (Seurat dispersion on log data), `'top_variance'` (the reference: top variance of the expression)
        or `'all'`.
    n_top_genes
        Number of genes selected.
    normalize
        `'auto'` (normalise + log1p when the values are integers), `'log1p'` (always) or `'none'` (use as given).
    n_pcs
        PCA width for both modalities; `None` keeps the z-scored genes (the wider side is then reduced by PCA to the
        narrower width, as both sides must have the same width).
    hidden
        Widths of the graph VAE's encoder layers (the decoder mirrors them).
    n_latent
        Width of the latent.
    proj_dim
        Width of the attention query/key/value projections.
    n_heads
        Attention heads.
    attention
        `'global'` (exact, frozen Q/K/V as in the reference, cached), `'global_trainable'`, `'local'` (spatial
        neighbours only, O(edges), frozen and cached like `'global'`), `'local_trainable'`, `'none'`, or `'auto'`
        (`'global'` up to 100,000 spots, `'local'` beyond).
    chunk_size
        Queries per chunk of global attention; `None` picks a chunk with about 128 MiB of scores.
    decoder_last_relu
        Reproduce the reference's ReLU after the last decoder layer (a defect: z-scores below 0 are unreachable).
    image_weight
        Factor on the (block-scaled) image features, in the input and in the reconstruction target (default 0.1;
        1 in the reference). Low-resolution H&E features are weak and noisy; a smaller weight lets them inform the
        latent without dominating the expression.
    zero_init_attention
        Start the attention output projection at zero, so that the attention starts as the identity (default
        `True`; `False` in the reference, whose random frozen attention then adds noise to both modalities).
    graph_weight
        Weight of the neighbours in the graph convolutions, ``D^-1/2 (I + graph_weight * A) D^-1/2``: 1 is the usual
        GCN (the reference), 0 keeps each spot's own features (the graph then only serves `hs.tl.domains`'
        refinement and, beyond 100,000 spots, nothing else). `'auto'` (default): 1 when graph neighbours are alike,
        0 when they are nearly as different as random spots: Geary's ratio of the first 10 expression PCs over the
        graph (mean squared distance of neighbours over that of random pairs; all z-scored genes with `n_pcs=None`)
        below 0.65 or not (chosen by the domain validation protocol, `benchmarks/domain_protocol.py`). The ratio is
        kept in `config['neighbour_dissimilarity']`.
    contrastive_weight
        Weight of a contrastive term added to the loss (default 0: none): Deep Graph Infomax as in GraphST, each
        spot's latent told apart from that of shuffled features against the mean latent of its graph neighbours.
        An ablation of the domain validation protocol; at 0.1 and 1 it lowered the held-out ARI there.
    """

    def __init__(
        self,
        adata: AnnData | SpatialData,
        *,
        table_key: str | None = None,
        layer: str | None = None,
        features_key: str | None = FEATURES_KEY,
        connectivity_key: str = CONNECTIVITIES_KEY,
        spatial_key: str = SPATIAL_KEY,
        preset: Literal["reference"] | None = None,
        gene_selection: Literal["hvg", "top_variance", "all"] | None = None,
        n_top_genes: int | None = None,
        normalize: Literal["auto", "log1p", "none"] | None = None,
        n_pcs: int | None | Literal["default"] = "default",
        hidden: list[int] | tuple[int, ...] | None = None,
        n_latent: int | None = None,
        proj_dim: int | None = None,
        n_heads: int | None = None,
        attention: Literal["auto", "global", "global_trainable", "local", "local_trainable", "none"] | None = None,
        chunk_size: int | None = None,
        decoder_last_relu: bool | None = None,
        image_weight: float | None = None,
        zero_init_attention: bool | None = None,
        graph_weight: float | Literal["auto"] | None = None,
        contrastive_weight: float | None = None,
        _preprocessor: Preprocessor | None = None,
    ):
        super().__init__(self._init_params_of(locals()))
        if preset not in (None, "reference"):
            msg = f"preset={preset!r} is not one of None, 'reference'."
            raise ValueError(msg)
        base = dict(settings.REFERENCE if preset == "reference" else settings.DEFAULTS)
        given = {
            "gene_selection": gene_selection,
            "n_top_genes": n_top_genes,
            "normalize": normalize,
            "hidden": list(hidden) if hidden is not None else None,
            "n_latent": n_latent,
            "proj_dim": proj_dim,
            "n_heads": n_heads,
            "attention": attention,
            "decoder_last_relu": decoder_last_relu,
            "image_weight": image_weight,
            "zero_init_attention": zero_init_attention,
            "graph_weight": graph_weight,
            "contrastive_weight": contrastive_weight,
        }
        cfg = {**base, **{k: v for k, v in given.items() if v is not None}}
        if n_pcs != "default":
            cfg["n_pcs"] = n_pcs
        settings.check_config(cfg)
        # ---- inputs -------------------------------------------------------------------------------------------
        adata, ctx = as_table(adata, table_key)
        check_unique_obs_names(adata)
        x_expr = get_matrix(adata, layer, counts=True)
        if adata.n_obs < 3:
            msg = f"StereoMM needs at least 3 spots; `adata` has {adata.n_obs}."
            raise ValueError(msg)
        x_img = None
        #: how the image features were made (see `MclSTExp.feature_settings`): recorded, not reused, as StereoMM is
        #: transductive (a model is never applied to a new section, so no query features are made from them)
        self.feature_settings: dict[str, Any] = {}
        if features_key is not None:
            x_img = np.asarray(check_obsm(adata, features_key, hint=settings.IMAGE_HINT), dtype=np.float32)  # no copy
            uns_f = adata.uns.get(features_key)
            self.feature_settings = feature_settings(uns_f.get("params") if isinstance(uns_f, Mapping) else None)
        connectivity_key = connectivity_key_in(adata.obsp, connectivity_key)  # `key_added` of pp.spatial_graph too
        adj = check_obsp(adata, connectivity_key, hint=settings.GRAPH_HINT)
        if adj.shape != (adata.n_obs, adata.n_obs):
            msg = f"`adata.obsp[{connectivity_key!r}]` has shape {adj.shape}; expected ({adata.n_obs}, {adata.n_obs})."
            raise ValueError(msg)
        a = binary_adjacency(adj)
        if a.nnz == 0:
            msg = f"`adata.obsp[{connectivity_key!r}]` has no edges. {settings.GRAPH_HINT}"
            raise ValueError(msg)
        if _preprocessor is not None:
            check_genes(
                _preprocessor.genes,
                adata.var_names,
                where="adata.var_names",
                fix="Load the model onto the AnnData it was trained on (the genes of the saved model are missing).",
                error=ValueError,
            )
            if x_img is not None and x_img.shape[1] != len(_preprocessor.arrays["img_mean"]):
                msg = (
                    f"`adata.obsm[{features_key!r}]` has {x_img.shape[1]} columns; the saved model was trained on "
                    f"{len(_preprocessor.arrays['img_mean'])}."
                )
                raise ValueError(msg)
        settings.warn_isolated(adata, a, connectivity_key)
        if cfg["attention"] == "auto":
            cfg["attention"] = "global" if adata.n_obs <= settings.AUTO_GLOBAL_MAX else "local"
        self.layer, self.features_key, self.connectivity_key, self.preset = (
            layer,
            features_key,
            connectivity_key,
            preset,
        )
        self.config = cfg
        self.obs_names = np.asarray(adata.obs_names).astype(str)
        # ---- features ---------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        if _preprocessor is None:
            _preprocessor = Preprocessor.fit(
                x_expr,
                x_img,
                gene_selection=cfg["gene_selection"],
                n_top_genes=cfg["n_top_genes"],
                normalize=cfg["normalize"],
                n_pcs=cfg["n_pcs"],
                var_names=adata.var_names,
            )
        self._pre = _preprocessor
        # normalisation uses all genes, then the model's genes are taken
        xt, xm = self._pre.transform(x_expr, x_img, gene_index=adata.var_names.get_indexer(self._pre.genes))
        self.preprocess_seconds_ = time.perf_counter() - t0
        self._x_t = torch.from_numpy(xt)
        self._x_m = None if xm is None else torch.from_numpy(xm * np.float32(cfg["image_weight"]))
        self.dim = xt.shape[1]
        settings.resolve_graph_weight(cfg, xt, a)
        cfg["graph_weight"] = float(cfg["graph_weight"])
        self._edge_index, self._edge_weight = settings.weighted_gcn_edges(a, cfg["graph_weight"])
        self._adj_t = sparse_adjacency(self._edge_index, self._edge_weight, adata.n_obs)
        self._coords = table_centres(ctx) if ctx is not None else None
        if self._coords is None and spatial_key in adata.obsm:
            self._coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
        self._tiles: list[GraphBatch] | None = None
        self._members: list[dict[str, torch.Tensor]] = []  # state_dicts of a seed ensemble
        self.member_histories: list[dict[str, list[float]]] = []
        self.module = StereoMMModule(
            self.dim,
            use_image=x_img is not None,
            hidden=cfg["hidden"],
            n_latent=cfg["n_latent"],
            proj_dim=cfg["proj_dim"],
            n_heads=cfg["n_heads"],
            attention=cfg["attention"],
            chunk_size=chunk_size,
            decoder_last_relu=cfg["decoder_last_relu"],
            zero_init_attention=cfg["zero_init_attention"],
            contrastive=cfg["contrastive_weight"] > 0,
        )
        self._readout_graph = a if cfg["contrastive_weight"] > 0 else None  # the contrastive term's neighbours
        logg.info(
            f"StereoMM: {adata.n_obs} spots, width {self.dim} per modality "
            f"({'expression + image' if x_img is not None else 'expression only'}), attention={cfg['attention']!r}"
        )

    _loss_method = "loss"
    _trained_attrs = ("history", "is_trained", "train_params", "_members", "member_histories")

    @property
    def n_obs(self) -> int:
        """Number of spots."""
        return self._x_t.shape[0]

    def _repr_fields(self) -> list[str]:
        return [
            f"n_obs={self.n_obs}",
            f"width={self.dim}",
            f"features={self.features_key!r}",
            f"attention={self.config['attention']!r}",
            f"hidden={self.config['hidden']}",
            f"n_latent={self.config['n_latent']}",
        ] + ([f"{self.n_models} models"] if self.n_models > 1 else [])

    def _auto_batch_size(self) -> int | None:
        return settings.auto_batch_size(self.config, self.dim * (2 if self._x_m is not None else 1), self.n_obs)

    def _make_tiles(self, batch_size: int | None) -> list[GraphBatch] | None:
        if batch_size is None:
            return None
        w = sp.csr_matrix(
            (self._edge_weight.numpy(), (self._edge_index[1].numpy(), self._edge_index[0].numpy())),
            shape=(self.n_obs, self.n_obs),
        )
        return make_tiles(w, self._coords, batch_size, self.module.n_hops)

    def _inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        dev = self.device
        return self._x_t.to(dev), (None if self._x_m is None else self._x_m.to(dev))

    # ---- one epoch, one step (the loop is the base class's) -----------------------------------------------------
    def _batches(self, generator: torch.Generator):
        if self._tiles is None:
            yield None
            return
        for i in torch.randperm(len(self._tiles), generator=generator).tolist():
            yield self._tiles[i]

    def _step(self, batch: GraphBatch | None):
        x_t, x_m = self._train_inputs
        if batch is None:
            kw = self._contrastive.get(None, {})
            loss, rec, kl = self._loss_fn(x_t, x_m, self._train_adj, self._train_ei, kl_weight=self._kl_weight, **kw)
            return loss, 1.0, {"reconstruction": rec, "kl": kl}
        dev = self.device
        loss, rec, kl = self._loss_fn(
            x_t,
            x_m,
            batch.adj.to(dev),
            batch.edge_index.to(dev),
            idx=batch.nodes.to(dev),
            n_seeds=batch.n_seeds,
            kl_weight=self._kl_weight,
            **self._contrastive.get(id(batch), {}),
        )
        return loss, float(batch.n_seeds), {"reconstruction": rec, "kl": kl}

    def train(
        self,
        *,
        max_epochs: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        batch_size: int | Literal["auto", "full"] = "auto",
        clip_norm: float = 5.0,
        kl_weight: float | None = None,
        n_models: int | None = None,
        device: str | torch.device | None = None,
        devices: int = 1,
        random_state: int | None = 0,
        progress_bar: bool = True,
    ) -> StereoMM:
        """Train the model (Adam, gradient-norm clipping) and return `self`.

        Parameters
        ----------
        max_epochs
            Passes over all spots. `None`: 300 with full-batch training; with tiles, as many epochs as give about
            300 optimiser steps (``ceil(300 / n_tiles)``, at least 5), so the compute grows linearly with the
            number of spots; 100 with `preset='reference'`.
        lr
            Adam learning rate (default 1e-3; 1e-4 with `preset='reference'`).
        weight_decay
            Adam weight decay (default 1e-4).
        batch_size
            `'auto'`: full batch up to 20,000 spots (while the estimated memory stays under 2 GiB), otherwise
            spatial tiles of 16,384 spots plus a halo of as many graph hops as the model's receptive field (exact for
            the tile's spots). `'full'` forces full batch, an int forces tiles of that many spots.
        clip_norm
            Maximum gradient norm.
        kl_weight
            Weight of the KL term; `None` uses ``1 / n_obs`` as the reference.
        n_models
            Seed ensemble: train `n_models` models from seeds `random_state`, `random_state + 1`, ... (fresh weights
            each); :meth:`get_latent_representation` then returns their latents side by side. Default 3 (1 with
            `preset='reference'`); `n_models=1` is 3 times faster, with domains that depend more on the seed.
        device
            Torch device; `None` picks CUDA when available.
        devices
            Processes for DDP training (gloo on CPU, NCCL on CUDA; torchrun's ranks or spawned; the tiles of an epoch
            shared among them, the full batch split in one tile each; `docs/scaling_training.md`). 1: one process.
        random_state
            Seed for `random`, `numpy`, `torch` and the tile order (of the first model); `None` leaves them unseeded.
            The same seed (and `devices`) gives the same latent on the CPU.
        progress_bar
            Show one progress bar per model.
        """
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "devices")}  # as given, for spawned ranks
        defaults = settings.REFERENCE_TRAIN if self.preset == "reference" else settings.DEFAULT_TRAIN
        auto_epochs = max_epochs is None and self.preset != "reference"
        max_epochs = defaults["max_epochs"] if max_epochs is None else max_epochs
        lr = defaults["lr"] if lr is None else lr
        weight_decay = defaults["weight_decay"] if weight_decay is None else weight_decay
        n_models = defaults["n_models"] if n_models is None else n_models
        random_state = check_random_state(random_state)
        n_models = check_number(n_models, "n_models", integer=True, low=1)
        max_epochs = check_number(max_epochs, "max_epochs", integer=True, low=1)
        lr = check_number(lr, "lr", low=0, low_inclusive=False)
        weight_decay = check_number(weight_decay, "weight_decay", low=0)
        clip_norm = check_number(clip_norm, "clip_norm", low=0, low_inclusive=False)
        kl_weight = check_number(kl_weight, "kl_weight", low=0, allow_none=True)
        devices = ddp.check_devices(devices)
        bs = settings.resolve_batch_size(batch_size, self._auto_batch_size(), self.n_obs)
        t0 = time.perf_counter()
        done, dev = self._start_devices(devices, resolve_device(device), kwargs)
        if done:  # trained by spawned processes
            self._tiles = self._make_tiles(int(self.train_params["batch_size"]))
            return self
        self.to_device(dev)
        if devices > 1 and bs is None:  # one tile per process
            bs = math.ceil(self.n_obs / devices)
        self._tiles = self._make_tiles(bs)
        if auto_epochs and self._tiles is not None:  # about 300 optimiser steps (one step takes `devices` tiles)
            max_epochs = max(math.ceil(max_epochs / math.ceil(len(self._tiles) / devices)), settings.MIN_TILE_EPOCHS)
        start = logg.info(
            f"training StereoMM on {dev}: {max_epochs} epochs, "
            + ("full batch" if bs is None else f"{len(self._tiles)} tiles of {bs} spots + halo per epoch")
            + (f", {n_models} models" if n_models > 1 else "")
        )
        x_t, x_m = self._inputs()
        ei = self._edge_index.to(dev)
        self._train_inputs, self._train_adj, self._train_ei = (x_t, x_m), self._adj_t.to(dev), ei
        self._kl_weight = 1.0 / self.n_obs if kl_weight is None else float(kl_weight)
        self._contrastive = settings.contrastive_kwargs(
            self.config["contrastive_weight"], self._readout_graph, self._tiles, dev
        )
        members, histories, t_cache = [], [], 0.0
        try:
            for i in range(n_models):
                seed = None if random_state is None else random_state + i
                self._seed(seed)
                self.module.reset_parameters()  # fresh weights: same seed -> same result, whatever ran before
                self.module.to(dev)
                t_prep = time.perf_counter()
                self.module.prepare(x_t, x_m, ei)  # the frozen attention of these weights
                t_cache += time.perf_counter() - t_prep
                histories.append(
                    self._fit(
                        max_epochs=int(max_epochs),
                        lr=lr,
                        weight_decay=weight_decay,
                        clip_norm=clip_norm,
                        random_state=seed,
                        progress_bar=progress_bar,
                    )
                )
                if n_models > 1:
                    members.append(self._snapshot())
        finally:
            del self._train_inputs, self._train_adj, self._train_ei, self._contrastive
            self._stop_devices()
        self._members = members
        self.member_histories = histories
        self.history = {
            k: np.mean([h[k] for h in histories], axis=0).tolist() if histories[0][k] else [] for k in histories[0]
        }
        self.is_trained = True
        self.train_params = {
            "max_epochs": int(max_epochs),
            "lr": float(lr),
            "weight_decay": float(weight_decay),
            "batch_size": "full" if bs is None else int(bs),
            "clip_norm": float(clip_norm),
            "kl_weight": float(self._kl_weight),
            "n_models": int(n_models),
            "device": str(dev),
            "random_state": random_state,
            "fit_seconds": float(time.perf_counter() - t0),
            "attention_cache_seconds": float(t_cache),
            **self._devices_params(devices),
        }
        logg.info("    finished training", time=start)
        return self

    @torch.no_grad()
    def get_latent_representation(self, *, sample: bool = False, random_state: int | None = 0) -> np.ndarray:
        """Return the latent of every spot: the mean (or a sample when asked).

        float32 ``(n_obs, n_latent)``; for a seed ensemble (``n_models > 1`` in :meth:`train`) the latents of the
        members side by side, ``(n_obs, n_models * n_latent)`` (member ``m`` in columns ``m * n_latent`` to
        ``(m + 1) * n_latent``).
        """
        if not self.is_trained:
            warnings.warn("StereoMM is not trained; the latent comes from random weights.", UserWarning, stacklevel=2)
        if sample:
            self._seed(random_state)
        if not self._members:
            return self._latent(sample)
        current = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        try:
            out = []
            for state in self._members:
                self.module.load_state_dict(state)
                self.module.attention.clear_cache()  # the cache belongs to the weights it was built with
                out.append(self._latent(sample))
        finally:
            self.module.load_state_dict(current)
            self.module.attention.clear_cache()
        return np.ascontiguousarray(np.hstack(out), dtype=np.float32)

    @property
    def n_models(self) -> int:
        """Number of models trained (a seed ensemble when more than 1)."""
        return max(len(self._members), 1)

    def _latent(self, sample: bool) -> np.ndarray:
        self.module.eval()
        dev = self.device
        x_t, x_m = self._inputs()
        ei = self._edge_index.to(dev)
        self.module.prepare(x_t, x_m, ei)
        if self._tiles is None:
            _, mu, _, z = self.module(x_t, x_m, self._adj_t.to(dev), ei, sample=sample)
            out = (z if sample else mu).cpu().numpy()
        else:
            out = np.empty((self.n_obs, self.config["n_latent"]), dtype=np.float32)
            for b in self._tiles:
                nodes = b.nodes.to(dev)
                _, mu, _, z = self.module(x_t, x_m, b.adj.to(dev), b.edge_index.to(dev), idx=nodes, sample=sample)
                out[b.nodes[: b.n_seeds].numpy()] = (z if sample else mu)[: b.n_seeds].cpu().numpy()
        self.module.train()
        return np.ascontiguousarray(out, dtype=np.float32)

    # ---- save and load ------------------------------------------------------------------------------------------
    _arrays_file = "preprocessing.npz"

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"obs_names": self.obs_names, **self._pre.arrays}

    def _meta(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "n_obs": self.n_obs,
            "n_models": self.n_models,
            "feature_settings": self.feature_settings,
        }

    def _save_extra(self, folder: Path) -> None:
        if self._members:
            torch.save(self._members, folder / "members.pt")
        elif (folder / "members.pt").exists():  # overwrite=True over an ensemble
            (folder / "members.pt").unlink()

    @classmethod
    def load(
        cls, dir_path: str | Path, *, adata: AnnData | SpatialData, device: str | torch.device | None = "cpu"
    ) -> StereoMM:
        """Load a model saved with :meth:`save` onto `adata` (the same spots, and the genes the model uses).

        StereoMM is transductive: its latent is that of the spots it was trained on, so `adata` must hold them (for a
        SpatialData, its table `table_key` of the saved model).
        """
        folder, meta, arrays = cls._read_folder(dir_path)
        adata, _ = as_table(adata, meta["init"].get("table_key"))
        obs_names = arrays.pop("obs_names")
        if adata.n_obs != len(obs_names) or not np.array_equal(np.asarray(adata.obs_names).astype(str), obs_names):
            msg = (
                f"`adata` has other spots than the saved model ({adata.n_obs} vs {len(obs_names)} spots, or other "
                "`obs_names`); StereoMM is transductive: load it onto the AnnData it was trained on."
            )
            raise ValueError(msg)
        model = cls(adata, **meta["init"], _preprocessor=Preprocessor(**arrays))
        model._restore(folder, meta, device)
        if meta.get("feature_settings"):  # as trained (the AnnData's `uns` may have lost them since)
            model.feature_settings = dict(meta["feature_settings"])
        if int(meta.get("n_models", 1)) > 1:
            if not (folder / "members.pt").exists():
                msg = f"{folder} holds a {meta['n_models']}-model ensemble but `members.pt` is missing."
                raise FileNotFoundError(msg)
            model._members = cls._read_torch(folder / "members.pt")
        bs = model.train_params.get("batch_size", "full")
        model._tiles = model._make_tiles(None if bs == "full" else int(bs))
        return model
