"""mclSTExp: contrastive spot/image embedding and expression prediction by nearest reference spots.

See :class:`MclSTExp`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scanpy import logging as logg

from histospace._constants import CONNECTIVITIES_KEY, FEATURES_KEY, LIBRARY_KEY, POSITION_KEYS, SPATIAL_KEY
from histospace._nn._mclstexp import MclSTExpModule, augment
from histospace._utils import check_number, check_random_state, resolve_device
from histospace._utils._data import PANEL_NORMALIZATIONS
from histospace._utils._sdata import as_table
from histospace.models import _ddp as ddp
from histospace.models import _mclstexp_config as settings
from histospace.models._base import BaseModelClass
from histospace.models._mclstexp_query import QueryMixin
from histospace.models._reference import ReferenceData

if TYPE_CHECKING:
    from spatialdata import SpatialData


class MclSTExp(QueryMixin, BaseModelClass):
    """mclSTExp :cite:p:`Min2024`: learn a joint embedding of spots and H&E patches, predict expression from H&E.

    The spot side encodes the normalised expression of a gene panel plus learned x/y position tables with a small
    Transformer whose sequence is a set of spots (the reference's mini-batch); the image side projects image
    features (frozen encoder, `freeze_encoder=True`) or fine-tunes an image encoder on patches
    (`freeze_encoder=False`). Both are trained with a symmetric CLIP loss. A query patch's expression is the
    weighted mean of the expression of its nearest reference spots in the joint space.

    Defaults (`preset=None`) are the settings the expression benchmark validated (her2st C2-C6 leave-one-slide-out,
    `benchmarks/expression.py`): L2-normalised embeddings with a learned temperature starting at 0.1; in
    :meth:`train` 30 epochs and a seed ensemble of 5 models; in :meth:`predict` softmax weights over the 200 nearest
    reference spots. `preset='reference'` gives the published settings (T = 1 on unnormalised embeddings, 90 epochs,
    one model, weights `1/d^2`); explicit arguments override a preset.

    Parameters
    ----------
    adata
        Reference: one or more slides with counts, image features and positions (an AnnData, or a SpatialData whose
        table `table_key` holds them).
    table_key
        With a SpatialData: the table to use; `None` takes the only table.
    layer
        Layer with the counts (or normalised expression when `normalize='none'`); `None` uses `adata.X`.
    genes
        Gene panel. `None` chooses `n_top_genes` highly variable genes from the reference only.
    n_top_genes
        Panel size when `genes` is `None`.
    features_key
        `adata.obsm` key with the image features (frozen path).
    augment_keys
        Frozen path: `adata.obsm` keys with features of augmented views of the same patches (e.g. flipped or rotated,
        computed by :func:`histospace.pp.image_features` with a wrapping `encoder=`). During training each spot's
        image features are drawn at random, per epoch, among `features_key` and these keys (feature-level
        augmentation, standing in for the reference's image augmentation); the reference and queries use
        `features_key`.
    library_key
        `adata.obs` column telling the slides apart (`None`: one slide).
    position_key
        Two `adata.obs` columns `(row, col)` with integer array coordinates. When absent, pixel coordinates in
        `adata.obsm[spatial_key]` are quantised to a grid per slide.
    spatial_key
        `adata.obsm` key with full-resolution pixel coordinates.
    preset
        `None` (the validated settings) or `'reference'` (the published ones).
    normalize
        `'log1p_cp10k'`: `ln(1 + 1e4 x / s)` with `s` the spot's total over the panel genes; `'log10_cp10k'`: the
        reference code's `log10(1 + 1e4 x / s)`; `'none'`: use the values as given (already normalised).
    scale_features
        Standardise the image features with the reference mean and standard deviation (applied to queries too).
    freeze_encoder
        `True` (CPU path): train on the features in `adata.obsm[features_key]`. `False`: fine-tune `encoder` end to
        end on image patches with augmentation (colour jitter, flips, right-angle rotations); the patches are cut
        around `adata.obsm[spatial_key]` from `img` or from the slide's image in `adata.uns['spatial']` (as
        :func:`histospace.pp.image_features` finds it), batch by batch. Queries then need an image too (`img=` of
        :func:`histospace.tl.mclstexp_predict`). GPU advised.
    encoder, encoder_weights
        Fine-tuning path: a torchvision architecture name (`'mobilenet_v2'`, `'resnet50'`, `'densenet121'`) with a
        local state_dict path (`None`: random init), or a `torch.nn.Module` mapping `(n, 3, h, w)` to `(n, d)`.
    img
        Fine-tuning path: the image(s) to cut patches from (path, array, `ImageContainer`, or a dict per library).
    patch_size, input_size
        Fine-tuning path: patch side in full-resolution pixels, and the side it is resized to.
    image_mean, image_std
        Fine-tuning path: per-channel normalisation of images in [0, 1]; `None`: the statistics of the encoder's
        weights (see :func:`histospace.pp.image_features`).
    spot_encoder
        `'transformer'` (mclSTExp) or `'none'` (BLEEP: the expression goes straight into the projection head).
    use_positions
        Add the learned x/y position tables (mclSTExp); `False` for BLEEP.
    n_heads, dim_head, n_layers
        Spot Transformer: heads, width per head, blocks (MLP width = number of genes, no dropout).
    projection_dim
        Width of the joint space.
    dropout
        Dropout in the projection heads (reference: 0).
    temperature
        Logit temperature (the start value when learned): default 0.1; 1 with the reference preset.
    l2_normalize
        L2-normalise embeddings before the dot product (CLIP; default). The reference does not (its LayerNorm outputs
        have a norm of about 16, so T = 1 gives very peaked logits).
    learn_temperature
        Learn the temperature (default), starting at `temperature`.
    reference_batch_size
        Spots per sequence when embedding the reference after training (default: the training batch size).
    spatial_context
        Spatial context of the image side (frozen path): each spot's image features are joined by the means of the
        features over rings `1..spatial_context` of its slide's spatial graph (ring `k`: the spots `k` hops away), in the
        reference during training and in every query at prediction, so a spot is seen with its neighbourhood.
        `None`: 0 (off: nested validation on her2st preferred no context, see the expression benchmark); it needs
        `freeze_encoder=True`.
    smooth_predictions
        Mix each query spot's predicted expression with the mean prediction of its ring-1 neighbours on the query's
        spatial graph: `(1 - w) * p + w * mean(p over ring 1)` (a spot without neighbours keeps its own). `None`:
        0 (off; nested validation on her2st chose w = 0.5, +0.006 mean PCC on all genes, -0.002 on the top 50, not
        confirmed on a second tissue: `benchmarks/expression_context.py`). Needs the query's graph or spot centres.
    expression_rank
        Predict from the reference expression on its first `expression_rank` principal axes (a centred PCA over the
        reference spots, clipped to each gene's reference range), so a gene borrows the programme it belongs to.
        `None`: 16 (0 with `preset='reference'`); 0: the expression as measured. See the expression benchmark.
    connectivity_key
        The spatial graph of the reference and of each query (`adata.obsp`; the base name of
        :func:`histospace.pp.spatial_graph`'s `key_added` or the full key). When absent it is built with
        :func:`histospace.pp.spatial_graph`'s defaults for the platform, per slide of `library_key`, from
        `adata.obsm[spatial_key]` (nothing is written to `adata`).

    Notes
    -----
    The spot Transformer attends over the spots passed together, so a spot's embedding depends on its companions.
    Training draws random mini-batches over all reference spots. After training, the reference embeddings are
    computed deterministically: each slide's spots are permuted with a fixed seed (`random_state` of
    :meth:`train`) and split into nearly equal chunks of at most `reference_batch_size` spots, each chunk one
    sequence — so spots see random companions of their own slide, as during training, and never another slide's.
    Queries only use the image side, so their predictions do not depend on batching.

    The model records how the reference's image features were made (:attr:`feature_settings`, from
    `adata.uns[features_key]['params']` of :func:`histospace.pp.image_features`; saved and loaded with it), including
    the patch size in µm. A query without features gets them made with those settings at the same µm, whatever its
    magnification (:meth:`query_features`, called by :func:`histospace.tl.mclstexp_predict`); features that were
    made otherwise, or at an unknown scale, are refused.
    """

    _arrays_file = "reference.npz"

    def __init__(
        self,
        adata: AnnData | SpatialData | None,
        *,
        table_key: str | None = None,
        layer: str | None = None,
        genes: Sequence[str] | None = None,
        n_top_genes: int = 1000,
        features_key: str = FEATURES_KEY,
        augment_keys: Sequence[str] = (),
        library_key: str | None = LIBRARY_KEY,
        position_key: tuple[str, str] = POSITION_KEYS,
        spatial_key: str = SPATIAL_KEY,
        preset: Literal["reference"] | None = None,
        normalize: Literal["log1p_cp10k", "log10_cp10k", "none"] = "log1p_cp10k",
        scale_features: bool = True,
        freeze_encoder: bool = True,
        encoder: str | torch.nn.Module = "mobilenet_v2",
        encoder_weights: str | Path | None = None,
        img=None,
        patch_size: float = 224,
        input_size: int = 224,
        image_mean: float | tuple[float, float, float] | None = None,
        image_std: float | tuple[float, float, float] | None = None,
        spot_encoder: Literal["transformer", "none"] = "transformer",
        use_positions: bool = True,
        n_heads: int = 8,
        dim_head: int = 64,
        n_layers: int = 2,
        projection_dim: int = 256,
        dropout: float = 0.0,
        temperature: float | None = None,
        l2_normalize: bool | None = None,
        learn_temperature: bool | None = None,
        reference_batch_size: int | None = None,
        spatial_context: int | None = None,
        smooth_predictions: float | None = None,
        expression_rank: int | None = None,
        connectivity_key: str = CONNECTIVITIES_KEY,
        _reference: ReferenceData | None = None,
    ):
        init = self._init_params_of(locals())
        init.pop("img")  # an image is not a parameter (it is not saved either)
        super().__init__(init)
        if preset not in (None, "reference"):
            msg = f"preset={preset!r} is not one of None, 'reference'."
            raise ValueError(msg)
        cfg = dict(settings.REFERENCE if preset == "reference" else settings.DEFAULTS)
        given = {"temperature": temperature, "l2_normalize": l2_normalize, "learn_temperature": learn_temperature}
        cfg.update({k: v for k, v in given.items() if v is not None})
        if normalize not in PANEL_NORMALIZATIONS:
            msg = f"`normalize` must be one of {tuple(PANEL_NORMALIZATIONS)}, got {normalize!r}."
            raise ValueError(msg)
        if spot_encoder not in ("transformer", "none"):
            msg = f"`spot_encoder` must be 'transformer' or 'none', got {spot_encoder!r}."
            raise ValueError(msg)
        cfg["temperature"] = check_number(cfg["temperature"], "temperature", low=0, low_inclusive=False)
        for name, v in (("n_heads", n_heads), ("dim_head", dim_head), ("projection_dim", projection_dim)):
            check_number(v, name, integer=True, low=1)
        check_number(n_layers, "n_layers", integer=True, low=0)
        check_number(n_top_genes, "n_top_genes", integer=True, low=1)
        check_number(dropout, "dropout", low=0, high=1)
        check_number(reference_batch_size, "reference_batch_size", integer=True, low=2, allow_none=True)
        check_number(spatial_context, "spatial_context", integer=True, low=0, allow_none=True)
        if spatial_context is None:
            spatial_context = 0 if preset == "reference" or not freeze_encoder else settings.DEFAULT_CONTEXT
        elif spatial_context > 0 and not freeze_encoder:
            msg = (
                f"spatial_context={spatial_context} needs image features (`freeze_encoder=True`); the fine-tuned "
                "encoder sees one patch per spot. Pass `spatial_context=0`."
            )
            raise ValueError(msg)
        if not freeze_encoder:
            check_number(patch_size, "patch_size", low=0, low_inclusive=False)
            check_number(input_size, "input_size", integer=True, low=1)
        self.preset = preset
        #: the neighbour weighting :meth:`predict` uses when none is given
        self.default_weighting = settings.REFERENCE_WEIGHTING if preset == "reference" else settings.DEFAULT_WEIGHTING
        self.config = {
            **cfg,
            "spot_encoder": spot_encoder,
            "use_positions": bool(use_positions),
            "n_heads": int(n_heads),
            "dim_head": int(dim_head),
            "n_layers": int(n_layers) if spot_encoder == "transformer" else 0,
            "projection_dim": int(projection_dim),
            "dropout": float(dropout),
        }
        self.layer, self.normalize = layer, normalize
        self.features_key, self.spatial_key = features_key, spatial_key
        self.library_key = library_key
        self.freeze_encoder = bool(freeze_encoder)
        self.reference_batch_size = reference_batch_size
        #: rings of the spatial graph beside each spot's image features (0: none)
        self.spatial_context = int(spatial_context)
        self.init_params_["spatial_context"] = self.spatial_context  # resolved: a saved model rebuilds the width
        if smooth_predictions is None:
            smooth_predictions = 0.0 if preset == "reference" else settings.DEFAULT_SMOOTHING
        #: weight of the ring-1 mean of the predictions over the query's graph (0: none)
        self.smooth_predictions = float(check_number(smooth_predictions, "smooth_predictions", low=0, high=1))
        self.init_params_["smooth_predictions"] = self.smooth_predictions
        if expression_rank is None:
            expression_rank = 0 if preset == "reference" else settings.DEFAULT_RANK
        self.expression_rank = int(check_number(expression_rank, "expression_rank", integer=True, low=0))
        self.init_params_["expression_rank"] = self.expression_rank
        self.connectivity_key = connectivity_key
        self._encoder_spec = (encoder, None if encoder_weights is None else str(encoder_weights))
        self._fine_tune = {
            "patch_size": float(patch_size),
            "input_size": int(input_size),
            "mean": image_mean,  # checked by the encoder builder (a number or three)
            "std": image_std,
        }
        if adata is None:
            if _reference is None:
                msg = "`adata` must be an AnnData (the reference slides)."
                raise TypeError(msg)
            self.reference = _reference
        else:
            table = as_table(adata, table_key)[0]
            ops = self._context_ops(table) if self.spatial_context else ()
            self.reference = ReferenceData.from_anndata(
                table,
                layer=layer,
                genes=genes,
                n_top_genes=n_top_genes,
                normalize=normalize,
                library_key=library_key,
                position_key=position_key,
                spatial_key=spatial_key,
                use_positions=bool(use_positions),
                freeze_encoder=self.freeze_encoder,
                features_key=features_key,
                augment_keys=augment_keys,
                scale_features=bool(scale_features),
                patch_stream={"img": img, "patch_size": patch_size, "input_size": input_size},
                context_ops=ops,
            )
        self._build()
        self.reference_embeddings: np.ndarray | None = None
        self._members: list[tuple[dict[str, torch.Tensor], np.ndarray]] = []
        self.n_models_ = 1
        self.batch_size_: int | None = None
        self.random_state_: int | None = None

    @property
    def genes(self) -> list[str]:
        """The gene panel (columns of the predictions)."""
        return self.reference.genes

    @property
    def reference_expression(self) -> np.ndarray:
        """Normalised panel expression of the reference spots, `(n_reference, n_genes)` float32."""
        return self.reference.expression

    @property
    def n_x(self) -> int:
        """Rows of the x position table."""
        return self.reference.n_x

    @property
    def n_y(self) -> int:
        """Rows of the y position table."""
        return self.reference.n_y

    @property
    def img_dim(self) -> int | None:
        """Width of the image features (or of the fine-tuned encoder's output)."""
        return self.reference.img_dim

    # ---- the module ------------------------------------------------------------------------------------------
    def _build(self) -> None:
        """Build :attr:`module` with fresh weights (drawn from torch's global generator), on the model's device."""
        c = self.config
        image_encoder = None
        if not self.freeze_encoder:
            from histospace._image import build_encoder

            encoder, weights = self._encoder_spec
            ft = self._fine_tune
            image_encoder, d, _ = build_encoder(
                encoder, weights, mean=ft["mean"], std=ft["std"], input_size=ft["input_size"]
            )
            self.reference.img_dim = int(d)
        self.module = MclSTExpModule(
            n_genes=len(self.genes),
            img_dim=self.img_dim * (1 + self.spatial_context) if self.freeze_encoder else self.img_dim,
            n_x=self.n_x,
            n_y=self.n_y,
            n_heads=c["n_heads"],
            dim_head=c["dim_head"],
            n_layers=c["n_layers"],
            use_positions=c["use_positions"],
            projection_dim=c["projection_dim"],
            dropout=c["dropout"],
            image_encoder=image_encoder,
            temperature=c["temperature"],
            l2_normalize=c["l2_normalize"],
            learn_temperature=c["learn_temperature"],
        )
        self.module.to(self.device)

    def _repr_fields(self) -> list[str]:
        kind = "BLEEP-style" if self.config["spot_encoder"] == "none" else "mclSTExp"
        image = f"image {'features' if self.freeze_encoder else 'encoder'} {self.img_dim}-d"
        fields = [kind, f"{len(self.genes)} genes", f"{self.reference_expression.shape[0]} reference spots", image]
        return fields + ([f"{self.n_models_} models"] if self.n_models_ > 1 else [])

    def _image_input(self, idx: np.ndarray, augmented: bool) -> torch.Tensor:
        """Image side of the spots `idx` for one training batch (features, a random view, or streamed patches)."""
        dev = self.device
        idx_d = torch.from_numpy(idx).to(dev)
        if self._train_feats is not None:
            if self._train_feats.ndim == 3:  # views: one drawn per spot
                view = torch.randint(0, self._train_feats.shape[0], (len(idx),), generator=self._generator).to(dev)
                return self._train_feats[view, idx_d]
            return self._train_feats[idx_d]
        x = self.reference.patches(idx).to(dev)
        return augment(x, self._generator) if augmented else x

    # ---- one epoch, one step (the loop is the base class's) ---------------------------------------------------
    _trained_attrs = (
        *("history", "is_trained", "train_params", "train_time_", "_members", "n_models_", "batch_size_"),
        *("random_state_", "reference_embeddings"),
    )

    def _batches(self, generator: torch.Generator):
        n = self.reference.expression.shape[0]
        perm = torch.randperm(n, generator=generator).numpy()
        for lo in range(0, n, self._batch_size):
            idx = perm[lo : lo + self._batch_size]
            if idx.size >= 2:
                yield idx

    def _step(self, idx: np.ndarray):
        dev = self.device
        image = self._image_input(idx, augmented=True)
        t = torch.from_numpy(idx).to(dev)
        loss = self._loss_fn(image, self._train_expr[t], self._train_pos[t])  # the module, or DDP's wrapper
        return loss, float(idx.size), {}

    def train(
        self,
        *,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-4,
        weight_decay: float = 1e-3,
        n_models: int | None = None,
        device: str | torch.device | None = None,
        devices: int = 1,
        random_state: int | None = 0,
        progress_bar: bool = True,
    ) -> MclSTExp:
        """Train with Adam on the symmetric CLIP loss, then embed the reference spots.

        Parameters
        ----------
        max_epochs
            Passes over the reference spots: 30 by default (the benchmark's nested validation chose it; more epochs
            overfit the four training sections there), 90 with `preset='reference'`.
        batch_size
            Spots per mini-batch (the spot Transformer's sequence).
        lr, weight_decay
            Adam learning rate and L2 weight decay (reference: 1e-4, 1e-3).
        n_models
            Seed ensemble: train `n_models` models from seeds `random_state`, `random_state + 1`, ... (fresh weights
            each) and predict with the mean of their predictions (each model searches its own embedding of the
            reference). Default 5 (1 with `preset='reference'`). Training and prediction time grow linearly.
        device
            Torch device; `None` picks CUDA when available.
        devices
            Processes for DDP training (gloo on the CPU, NCCL on CUDA with one GPU each): torchrun's ranks, or
            spawned here; the spot batches of an epoch are shared among them (see `docs/scaling_training.md`).
        random_state
            Seed for the weights, the batch order, augmentation and the reference batching; `None` leaves them
            unseeded. Same seed, device and `devices` give identical results on the CPU.
        progress_bar
            Show one progress bar per model.

        Returns
        -------
        The model itself (trained); `history['loss']` holds the mean loss per epoch (averaged over the models of an
        ensemble). After training, :attr:`module` and :attr:`reference_embeddings` are those of the first model;
        :meth:`predict` averages over all of them.
        """
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "devices")}  # as given, for spawned ranks
        if not self.reference.trainable:
            msg = "This model was loaded from a folder: it predicts, but has no reference data to train on."
            raise RuntimeError(msg)
        defaults = settings.REFERENCE_TRAIN if self.preset == "reference" else settings.DEFAULT_TRAIN
        max_epochs = defaults["max_epochs"] if max_epochs is None else max_epochs
        n_models = defaults["n_models"] if n_models is None else n_models
        random_state = check_random_state(random_state)
        max_epochs = check_number(max_epochs, "max_epochs", integer=True, low=0)
        batch_size = check_number(batch_size, "batch_size", integer=True, low=2)
        n_models = check_number(n_models, "n_models", integer=True, low=1)
        lr = check_number(lr, "lr", low=0, low_inclusive=False)
        weight_decay = check_number(weight_decay, "weight_decay", low=0)
        devices = ddp.check_devices(devices)
        done, dev = self._start_devices(devices, resolve_device(device), kwargs)
        if done:  # trained by spawned processes
            return self
        self.to_device(dev)
        start = logg.info(
            f"training mclSTExp on {self.reference.expression.shape[0]} spots, {len(self.genes)} genes"
            + (f", {n_models} models" if n_models > 1 else "")
        )
        t0 = time.perf_counter()
        self._batch_size = int(batch_size)
        ref = self.reference
        self._train_expr = torch.from_numpy(ref.expression).to(dev)
        self._train_pos = torch.from_numpy(ref.positions).to(dev)
        self._train_feats = None
        if ref.features is not None:
            feats = torch.from_numpy(ref.scale(ref.features)).to(dev)
            if ref.views:
                feats = torch.stack([feats] + [torch.from_numpy(ref.scale(v)).to(dev) for v in ref.views])
            self._train_feats = feats
        members, losses = [], []
        try:
            for i in range(n_models):
                seed = None if random_state is None else random_state + i
                self._seed(seed)
                self._build()  # fresh weights: same seed -> same model whatever ran before
                hist = self._fit(
                    max_epochs=int(max_epochs),
                    lr=lr,
                    weight_decay=weight_decay,
                    clip_norm=None,
                    random_state=seed,
                    progress_bar=progress_bar,
                )
                losses.append(hist.get("loss", []))
                emb = self._embed_reference(int(batch_size), seed)
                if n_models > 1:
                    members.append((self._snapshot(), emb))
                else:
                    self.reference_embeddings = emb
        finally:
            del self._train_expr, self._train_pos, self._train_feats
            self._stop_devices()
        self.history = {"loss": np.mean(np.asarray(losses, dtype=np.float64), axis=0).tolist() if max_epochs else []}
        self._members = members
        if members:
            self._use_member(0)
        self.n_models_ = max(len(members), 1)
        self.batch_size_, self.random_state_ = int(batch_size), random_state
        self.is_trained = True
        self.train_params = {
            "max_epochs": int(max_epochs),
            "batch_size": int(batch_size),
            "lr": float(lr),
            "weight_decay": float(weight_decay),
            "n_models": n_models,
            "device": str(dev),
            "random_state": random_state,
            "fit_seconds": float(time.perf_counter() - t0),
            **self._devices_params(devices),
        }
        self.train_time_ = self.train_params["fit_seconds"]
        logg.info("    finished", time=start)
        return self

    def _use_member(self, i: int) -> None:
        """Load the weights and reference embeddings of ensemble member `i` into :attr:`module`."""
        state, emb = self._members[i]
        self.module.load_state_dict(state)
        self.reference_embeddings = emb

    @torch.no_grad()
    def _embed_reference(self, batch_size: int, random_state: int | None) -> np.ndarray:
        """Deterministic reference embeddings: per slide, a seeded permutation cut into nearly equal chunks."""
        bs = self.reference_batch_size or batch_size
        module = self.module.eval()
        dev = self.device
        rng = np.random.default_rng(0 if random_state is None else random_state)
        ref = self.reference
        out = np.zeros((ref.expression.shape[0], self.config["projection_dim"]), dtype=np.float32)
        for lib in pd.unique(ref.libs):
            m = np.flatnonzero(ref.libs == lib)
            m = m[rng.permutation(m.size)]
            for chunk in np.array_split(m, max(1, math.ceil(m.size / bs))):
                e = torch.from_numpy(ref.expression[chunk]).to(dev)
                p = torch.from_numpy(ref.positions[chunk]).to(dev)
                out[chunk] = module.embed_spot(e, p).float().cpu().numpy()
        return out

    def _check_trained(self) -> None:
        if not self.is_trained or self.reference_embeddings is None:
            msg = "The model is not trained; call `model.train()` (or `hs.tl.mclstexp_train`) first."
            raise RuntimeError(msg)

    # ---- save and load ------------------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        self._check_trained()
        arrays = {"reference_embeddings": self.reference_embeddings, **self.reference.arrays()}
        if self._members:
            arrays["member_embeddings"] = np.stack([emb for _, emb in self._members])
        return arrays

    def _meta(self) -> dict[str, Any]:
        meta = {"n_models": self.n_models_, "batch_size": self.batch_size_, "random_state": self.random_state_}
        return {**self.reference.meta(), **meta}

    def _save_extra(self, folder: Path) -> None:
        if self._members:
            torch.save([state for state, _ in self._members], folder / "members.pt")
        elif (folder / "members.pt").exists():  # overwrite=True over an ensemble
            (folder / "members.pt").unlink()

    @classmethod
    def load(
        cls, dir_path: str | Path, *, device: str | torch.device | None = "cpu", encoder: torch.nn.Module | None = None
    ) -> MclSTExp:
        """Load a model saved by :meth:`save`; it predicts with no reference AnnData.

        Pass `encoder=` (the same architecture) for a model fine-tuned with a custom `torch.nn.Module` encoder.
        """
        folder, meta, arrays = cls._read_folder(dir_path)
        init = {"expression_rank": 0, **meta["init"]}  # saved before `expression_rank`: predictions as they were
        custom = isinstance(init.get("encoder"), dict)
        if custom and not init.get("freeze_encoder", True) and encoder is None:
            msg = "This model was fine-tuned with a custom encoder module; pass the same architecture as `encoder=`."
            raise ValueError(msg)
        if custom:
            init["encoder"] = encoder if encoder is not None else "mobilenet_v2"
        if not init.get("freeze_encoder", True):
            init["encoder_weights"] = None  # the fine-tuned weights come from model.pt
        model = cls(None, **init, _reference=ReferenceData.from_saved(meta, arrays))
        model._restore(folder, meta, device)
        model.batch_size_, model.random_state_ = meta.get("batch_size"), meta.get("random_state")
        model.reference_embeddings = arrays["reference_embeddings"]
        n_models = int(meta.get("n_models", 1))
        if n_models > 1:
            if "member_embeddings" not in arrays or not (folder / "members.pt").exists():
                msg = f"{folder} holds a {n_models}-model ensemble but `members.pt` or its embeddings are missing."
                raise FileNotFoundError(msg)
            states = cls._read_torch(folder / "members.pt")
            model._members = list(zip(states, list(arrays["member_embeddings"]), strict=True))
            model.n_models_ = n_models
        return model
