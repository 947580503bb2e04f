"""mclSTExp: train a reference model, predict expression from H&E image features."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from histospace._constants import FEATURES_KEY, LIBRARY_KEY, MCLSTEXP_KEY
from histospace._utils import check_unique_obs_names, doc_params, version_string
from histospace._utils._data import check_key_added, uns_safe
from histospace._utils._sdata import as_table, table_output

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from histospace.models import MclSTExp


@doc_params()
def mclstexp_train(
    adata_ref: AnnData | SpatialData,
    *,
    table_key: str | None = None,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 1000,
    features_key: str = FEATURES_KEY,
    library_key: str | None = LIBRARY_KEY,
    preset: Literal["reference"] | None = None,
    max_epochs: int | None = None,
    n_models: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-4,
    model_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    devices: int = 1,
    random_state: int | None = 0,
    progress_bar: bool = True,
) -> MclSTExp:
    """Build and train an :class:`~histospace.models.MclSTExp` model on reference slides (a thin wrapper).

    The defaults are the settings the expression benchmark validated (see :class:`~histospace.models.MclSTExp`);
    `preset='reference'` gives the published ones.

    Parameters
    ----------
    adata_ref
        Reference: one or more slides with counts, image features in `.obsm` and positions (an AnnData, or a
        SpatialData whose table `table_key` holds them).
    table_key
        {table_key}
    layer
        Layer with the counts; `None` uses `adata_ref.X`.
    genes
        Gene panel; `None` chooses `n_top_genes` highly variable genes of the reference.
    n_top_genes
        Panel size when `genes` is `None`.
    features_key
        Key in `adata_ref.obsm` with the image features (:func:`histospace.pp.image_features`).
    library_key
        Column of `adata_ref.obs` telling the slides apart (`None`: one slide).
    preset
        `None` (validated settings) or `'reference'` (the published settings).
    max_epochs
        Training epochs (default 30; 90 with the reference preset).
    n_models
        Models of the seed ensemble (default 5; 1 with the reference preset).
    batch_size
        Spots per mini-batch.
    lr
        Adam learning rate.
    model_kwargs
        Other arguments of :class:`~histospace.models.MclSTExp` (e.g. `position_key`, `projection_dim`,
        `spot_encoder`, `freeze_encoder`).
    train_kwargs
        Other arguments of :meth:`~histospace.models.MclSTExp.train` (e.g. `weight_decay`).
    device
        {device}
    devices
        {devices}
    random_state
        {random_state}
    progress_bar
        {progress_bar}

    Returns
    -------
    The trained model. Nothing is written to `adata_ref`.
    """
    from histospace.models import MclSTExp

    model = MclSTExp(
        adata_ref,
        table_key=table_key,
        layer=layer,
        genes=genes,
        n_top_genes=n_top_genes,
        features_key=features_key,
        library_key=library_key,
        preset=preset,
        **(model_kwargs or {}),
    )
    return model.train(
        max_epochs=max_epochs,
        n_models=n_models,
        batch_size=batch_size,
        lr=lr,
        device=device,
        devices=devices,
        random_state=random_state,
        progress_bar=progress_bar,
        **(train_kwargs or {}),
    )


@doc_params()
def mclstexp_predict(
    adata: AnnData | SpatialData,
    *,
    table_key: str | None = None,
    model: MclSTExp,
    n_neighbors: int = 200,
    weighting: Literal["inverse_square", "uniform", "softmax"] | None = None,
    smooth_neighbors: int = 0,
    img=None,
    image_key: str | None = None,
    mpp: float | None = None,
    batch_size: int = 4096,
    gene_scores: dict | pd.DataFrame | None = None,
    progress_bar: bool = True,
    key_added: str = MCLSTEXP_KEY,
    copy: bool = False,
) -> AnnData | SpatialData | None:
    """Predict the expression of the model's gene panel from the H&E image features of `adata`.

    Each query spot (or tile) is embedded by the model's image side; its expression is the weighted mean of the
    normalised expression of its `n_neighbors` nearest reference spots (cosine similarity in the joint space).
    The output is the same whatever genes the query holds (an H&E-only AnnData with no genes included): the
    predictions always go to `obsm`, and also to `layers` when the query holds exactly the model's genes. The joint
    -space embedding of every spot goes to `obsm['X_' + key_added]`, for :func:`histospace.tl.domains` or
    :func:`scanpy.pp.neighbors` (`use_rep='X_mclstexp'`): domains of an H&E-only slide. A seed ensemble also gives the
    per-spot spread of its members' predictions, and `gene_scores=` records how predictable each gene was in
    cross-validation, so that a user can keep the genes worth trusting.

    Parameters
    ----------
    adata
        {adata}
        It needs the image features the model was trained on (`adata.obsm[model.features_key]`, from
        :func:`histospace.pp.image_features` with the reference's settings, `**model.image_features_kwargs`), or an
        image: without those features they are computed here with the settings recorded from the reference
        (:attr:`~histospace.models.MclSTExp.feature_settings`) at the reference's physical scale, i.e. patches of
        the same µm whatever the query's magnification (see `mpp`); a model with a fine-tuned encoder reads patches
        from `img=` or `adata.uns['spatial']`. Expression is not needed (H&E-only slides and tiles from
        :func:`histospace.pp.tile_image` work). Features that were made with other settings (encoder, weights,
        layers, patch size in µm, ...) or at an unknown scale raise a `ValueError`: delete them to have them
        recomputed here, or recompute them. A model that reads the query's neighbourhood (`model.smooth_predictions
        > 0`, the default: each prediction mixed with the mean of its ring-1 neighbours; or `model.spatial_context
        > 0`) reads the query's spatial graph `adata.obsp[model.connectivity_key]` (from
        :func:`histospace.pp.spatial_graph`), or builds one from `adata.obsm['spatial']` with that function's
        defaults (nothing written).
    table_key
        {table_key}
    model
        A trained :class:`~histospace.models.MclSTExp` (from :func:`mclstexp_train` or
        :meth:`~histospace.models.MclSTExp.load`).
    n_neighbors
        Reference spots averaged per query (reference: 200); at most the number of reference spots.
    weighting
        `'softmax'`: softmax of the model's logits over the neighbours (the default); `'inverse_square'`: weights
        `1/d^2` of the Euclidean embedding distance (the reference, default with `preset='reference'`); `'uniform'`.
    smooth_neighbors
        Average each query's image embedding with those of its `smooth_neighbors` nearest spatial neighbours
        (`obsm['spatial']`, within a slide) before the search. `0` (reference) switches it off.
    img
        Full-resolution image (array, path, or dict per library) for a model with a fine-tuned encoder, or to
        compute the features of an AnnData query from.
    image_key
        With a SpatialData whose features are computed here: the H&E element of `sdata.images` (`None`: the only
        one).
    mpp
        µm per full-resolution pixel of the query (of `obsm['spatial']`; with a SpatialData, of the image's
        full-resolution level), used when its features are computed here. `None` reads it from the query
        (`uns['spatial'][library_id]['metadata']`: `microns_per_pixel`, or `spot_diameter_um` with
        `scalefactors['spot_diameter_fullres']`; a SpatialData's µm per unit); when it is unknown there a
        `ValueError` is raised before any work. Never guessed.
    batch_size
        Query rows per chunk of the nearest-neighbour search.
    gene_scores
        Cross-validated predictability of the panel genes, recorded with the predictions: the dict returned by
        :func:`~histospace.tl.mclstexp_cross_validate` run with the model's settings on its training slides (its
        `['gene_scores']['mclstexp']` table is used), or a :class:`~pandas.DataFrame` indexed by gene with a `'pcc'`
        column (and optionally `'fdr'` and the other columns of that table). Panel genes without a score get NaN.
    progress_bar
        Show a progress bar while the query's image features are computed.
    key_added
        Key of the `obsm`, `layers` and `uns` entries.
    copy
        {copy}

    Returns
    -------
    Returns `None` if `copy=False`, else returns an `AnnData` object. Sets the following fields:

    `adata.obsm['mclstexp' | key_added]` : :class:`pandas.DataFrame` (dtype `float32`)
        Predicted normalised expression, one column per gene of the model's panel (`model.genes` order), indexed
        by `obs_names`. Always written.
    `adata.layers['mclstexp' | key_added]` : :class:`numpy.ndarray` (dtype `float32`)
        The same predictions in the gene order of `adata`; written only when `adata` holds exactly the model's genes
        (same set, any order), e.g. to compare with the observed expression.
    `adata.obsm['X_mclstexp' | 'X_' + key_added]` : :class:`numpy.ndarray` (dtype `float32`)
        Joint-space image embedding `(n_obs, projection_dim)`, L2-normalised (so Euclidean neighbours are the cosine
        neighbours the prediction searches), before `smooth_neighbors`. With a seed ensemble, the first member's:
        the members' spaces are not aligned, so their mean would not be an embedding. Always written.
    `adata.obsm['mclstexp_std' | key_added + '_std']` : :class:`pandas.DataFrame` (dtype `float32`)
        Seed ensembles only (`n_models > 1`): per spot and gene, the sample standard deviation of the members'
        predictions (columns as `obsm[key_added]`); large where the members disagree.
    `adata.layers['mclstexp_std' | key_added + '_std']` : :class:`numpy.ndarray` (dtype `float32`)
        The same in the gene order of `adata`, when `layers[key_added]` is written and the model is an ensemble.
    `adata.var['mclstexp_pcc' | key_added + '_pcc']`, `adata.var['mclstexp_fdr' | key_added + '_fdr']` : float
        With `gene_scores` and when `adata` holds panel genes: each gene's cross-validated Pearson r and FDR (the
        latter when the scores have one); NaN for genes outside the panel or without a score.
    `adata.obsm[model.features_key]` : :class:`numpy.ndarray` (dtype `float32`), `adata.uns[model.features_key]`
        Only when the query had no image features: those computed here (as by :func:`histospace.pp.image_features`
        with :attr:`~histospace.models.MclSTExp.image_features_kwargs`, its `uns` entry with them).
    `adata.uns['mclstexp' | key_added]` : :class:`dict`
        `params` (n_neighbors, weighting, model parameters including `context`, genes, the embedding key, `features_computed`, and the
        query's `mpp` when given) and `version`; with
        `gene_scores`, also `gene_scores`: `'gene'` (the panel, `model.genes` order) and one float64 array per
        numeric column of the scores (`pcc`, `fdr`, ...), for every query, genes or not.

    Outputs of an earlier call with the same `key_added` that this call does not write (`_std` entries, the `var`
    score columns, the layer) are removed, so the slots always describe one prediction.

    Examples
    --------
    To get an AnnData with the predicted genes as `X` (e.g. for `sc.pl.spatial` of an H&E-only slide)::

        pred = anndata.AnnData(adata.obsm["mclstexp"], obsm={"spatial": adata.obsm["spatial"]}, uns=adata.uns)

    Record the cross-validated trust of each gene, then keep the predictable ones::

        cv = hs.tl.mclstexp_cross_validate(ref)  # the same settings as the model
        hs.tl.mclstexp_predict(query, model=model, gene_scores=cv)
        scores = pd.DataFrame(query.uns["mclstexp"]["gene_scores"]).set_index("gene")
        trusted = scores.index[scores["fdr"] < 0.05]
        query.obsm["mclstexp"][trusted]

    Spatial domains of an H&E-only slide from the learned embedding::

        hs.tl.domains(tiles, use_rep="X_mclstexp", n_clusters=5, refine=False)
    """
    from histospace.models import MclSTExp
    from histospace.tl._gene_scores import scores_from

    if not isinstance(model, MclSTExp):
        msg = f"`model` must be a trained `hs.models.MclSTExp`, got {type(model).__name__}."
        raise TypeError(msg)
    check_key_added(key_added)
    adata, ctx = as_table(adata, table_key)
    check_unique_obs_names(adata)
    scores = None
    if gene_scores is not None:
        scores = scores_from(gene_scores, method="mclstexp", where="gene_scores")
        found = scores.index.isin(model.genes).sum()
        if found == 0:
            msg = (
                f"`gene_scores` holds none of the model's {len(model.genes)} genes (e.g. {model.genes[:3]}); pass the "
                "cross-validation of the same gene panel."
            )
            raise ValueError(msg)
        scores = scores.reindex(pd.Index(model.genes))
        if found < len(model.genes):
            warnings.warn(
                f"`gene_scores` has no score for {len(model.genes) - found} of the model's {len(model.genes)} genes; "
                "they get NaN.",
                UserWarning,
                stacklevel=2,
            )
    weighting = model.default_weighting if weighting is None else weighting
    features, features_uns = model._missing_features(  # made here, as the reference's
        adata,
        ctx,
        (n_neighbors, weighting, smooth_neighbors, batch_size),
        image_key=image_key,
        img=img,
        mpp=mpp,
        progress_bar=progress_bar,
    )
    start = logg.info(f"predicting {len(model.genes)} genes for {adata.n_obs} spots with mclSTExp")
    pred, std, emb = model._predict(
        adata,
        n_neighbors=n_neighbors,
        weighting=weighting,
        smooth_neighbors=smooth_neighbors,
        img=img,
        batch_size=batch_size,
        with_std=True,
        with_embedding=True,
        features=features,
    )
    emb_key, std_key = f"X_{key_added}", f"{key_added}_std"
    uns = {
        "params": uns_safe(
            {
                "n_neighbors": int(n_neighbors),
                "weighting": weighting,
                "smooth_neighbors": int(smooth_neighbors),
                "features_key": model.features_key,
                "normalize": model.normalize,
                "preset": model.preset,
                "spot_encoder": model.config["spot_encoder"],
                "spatial_context": int(model.spatial_context),
                "smooth_predictions": float(model.smooth_predictions),
                "expression_rank": int(model.expression_rank),
                "n_reference_spots": int(model.reference_expression.shape[0]),
                "n_models": int(model.n_models_),
                "genes": list(model.genes),
                "embedding_key": emb_key,
                "features_computed": features is not None,
                **({"mpp": float(mpp)} if mpp is not None else {}),
            }
        ),
        "version": version_string(),
    }
    if scores is not None:
        uns["gene_scores"] = {"gene": list(model.genes)} | {
            str(c): scores[c].to_numpy(dtype=np.float64) for c in scores.columns
        }
    out = adata.copy() if copy else adata
    genes_index = pd.Index(model.genes)
    # outputs of an earlier call with this key that this call may not rewrite
    for slot, k in ((out.obsm, std_key), (out.layers, key_added), (out.layers, std_key)):
        if k in slot:
            del slot[k]
    stale = [c for c in (f"{key_added}_pcc", f"{key_added}_fdr") if c in out.var.columns]
    if stale:
        out.var = out.var.drop(columns=stale)
    out.obsm[key_added] = pd.DataFrame(
        np.ascontiguousarray(pred, dtype=np.float32), index=out.obs_names.copy(), columns=genes_index.copy()
    )
    out.obsm[emb_key] = emb
    deep = f"added\n    {key_added!r}, predicted expression (adata.obsm)\n    {emb_key!r}, joint-space embedding (adata.obsm)"
    if features is not None:
        out.obsm[model.features_key] = features
        out.uns[model.features_key] = features_uns
        deep += f"\n    {model.features_key!r}, image features made with the model's settings (adata.obsm, adata.uns)"
    if std is not None:
        out.obsm[std_key] = pd.DataFrame(std, index=out.obs_names.copy(), columns=genes_index.copy())
        deep += f"\n    {std_key!r}, standard deviation over the {model.n_models_} models (adata.obsm)"
    if out.n_vars == len(model.genes) and set(out.var_names) == set(model.genes):
        order = genes_index.get_indexer(out.var_names)
        out.layers[key_added] = np.ascontiguousarray(pred[:, order], dtype=np.float32)
        deep += f"\n    {key_added!r}, predicted expression in the gene order of adata (adata.layers)"
        if std is not None:
            out.layers[std_key] = np.ascontiguousarray(std[:, order], dtype=np.float32)
            deep += f"\n    {std_key!r}, ensemble standard deviation in the gene order of adata (adata.layers)"
    if scores is not None and out.var_names.isin(genes_index).any():
        for col in ("pcc", "fdr"):
            if col in scores.columns:
                out.var[f"{key_added}_{col}"] = scores[col].reindex(out.var_names).to_numpy(dtype=np.float64)
                deep += f"\n    {key_added + '_' + col!r}, cross-validated {col} per gene (adata.var)"
    out.uns[key_added] = uns
    logg.info("    finished", time=start, deep=deep + f"\n    {key_added!r}, parameters (adata.uns)")
    return table_output(ctx, out, copy)
