# ruff: noqa: B018 - a bare name at the end of a cell shows it in the notebook
# %% [markdown]
# # Expression from H&E with mclSTExp on her2st
#
# mclSTExp (Min et al. 2024) learns a joint embedding of spots and H&E patches by contrastive learning: the spot side
# encodes the expression of a gene panel together with the spot's position (a small Transformer over a set of spots),
# the image side projects CNN features of the patch. For a new slide, each patch is embedded and its expression is
# predicted as the weighted mean of the expression of its nearest reference spots in the joint space. The slide
# needs no sequencing: H&E is enough.
#
# We use the HER2-positive breast tumour data of Andersson et al. (2021), legacy Spatial Transcriptomics (100 µm
# spots), patient C, the five sections with a full-resolution image (C2-C6): train on C3-C6, predict C2 and compare
# with its measured expression; then evaluate leave-one-slide-out; then predict over tiles of the C2 image as if it
# had never been sequenced.
#
# - **Runtime**: {{ runtime }}, for the whole notebook. It was built on a machine shared with other jobs;
#   on two free cores expect a wall-clock time between half and all of the CPU time.
# - **GPU**: not needed. The image encoder is frozen (features computed once), so training runs on the CPU; a GPU is
#   used automatically when PyTorch sees one.
# - **Data**: her2st counts, spot files and H&E JPEGs (about 9300 × 9900 px) of C2-C6, the 785-gene panel of
#   HisToGene/Hist2ST and the ImageNet MobileNetV2 weights, read from the folder named by `HISTOSPACE_DATA`.

# %%
import os
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

# import-time notices of dependencies, not of this analysis
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"IProgress not found")
warnings.filterwarnings("ignore", message=r"'.*' is not a valid key!", category=SyntaxWarning)

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
import squidpy as sq

import histospace as hs

DATA = Path(os.environ.get("HISTOSPACE_DATA", "../../shared/data"))
WEIGHTS = DATA / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
PANEL = DATA / "her2st" / "gene_lists" / "her2st_785genes_hist2st.txt"
# CI runs this notebook on three sections with few epochs; the published notebook is the full run
FAST = os.environ.get("HISTOSPACE_TUTORIAL_FAST") == "1"
PROGRESS = False  # progress bars off to keep the stored notebook short; leave the default (True) when you work

sc.settings.verbosity = 1
sc.set_figure_params(dpi=80, dpi_save=150, facecolor="white", frameon=False)
plt.rcParams["axes.grid"] = False  # no grid lines over the H&E images
print(", ".join(f"{p} {version(p)}" for p in ["histospace", "scanpy", "anndata", "torch"]))

# %% [markdown]
# ## Load the sections and compute H&E features
#
# `hs.datasets.her2st` keeps a downscaled copy of the H&E in `uns['spatial'][section]['images']['hires']` and the
# path of the full-resolution JPEG in `...['metadata']['source_image_path']`. `hs.pp.image_features` reads the
# full-resolution image around every spot and runs the frozen MobileNetV2 on it → `obsm['img_features']`. For
# mclSTExp we use the image features that its benchmark validated (the same as `histospace predict` computes):
#
# - a 224-px patch (about 150 µm, a spot and its margin, as mclSTExp does on this dataset);
# - `layers='stages'`: the pooled output of each stage of the CNN, not only the last one (texture and cell-scale
#   features as well as the most abstract ones);
# - `context=2`: the same features of a patch twice as wide, appended (the tissue around the spot);
# - `dihedral=True`: the mean over the 8 flips and rotations of the patch (H&E has no preferred orientation);
# - `tf_padding=True`: these MobileNetV2 weights were trained in TensorFlow, whose convolutions pad differently from
#   PyTorch's; with torchvision's own ImageNet weights (`weights='imagenet'`) leave it out.

# %%
FEATURES = {"patch_size": 224, "layers": "stages", "context": 2, "dihedral": True, "tf_padding": True}
sections = ["C2", "C3", "C4"] if FAST else ["C2", "C3", "C4", "C5", "C6"]
slides = {}
for s in sections:
    a = hs.datasets.her2st(s)
    hs.pp.image_features(a, weights=WEIGHTS, **FEATURES, progress_bar=PROGRESS)
    slides[s] = a
    print(f"{s}: {a.n_obs} spots x {a.n_vars} genes, features {a.obsm['img_features'].shape}")

# %% [markdown]
# The gene panel: the 785 genes used by HisToGene, Hist2ST and THItoGene on her2st (highly variable genes of the
# whole dataset). Reference and query must share the genes, so we keep those measured in every section.

# %%
panel = PANEL.read_text().split()
genes = [g for g in panel if all(g in a.var_names for a in slides.values())]
print(f"{len(genes)} of {len(panel)} panel genes are measured in every section")

# %% [markdown]
# ERBB2 (HER2) itself is **not** in this panel, nor are GRB7, STARD3 or MIEN1, its neighbours in the 17q12 amplicon
# (they are measured in the counts, but the published panel left them out). Two amplicon genes are in it, PNMT and
# PPP1R1B, co-amplified with ERBB2 in HER2-positive tumours, and so are luminal epithelial markers (GATA3, KRT8,
# TFF3, AGR2), immune genes (IGKC, CD74) and stroma (COL3A1, POSTN). We keep the published panel, so that the numbers
# compare with the literature:

# %%
for g in ["ERBB2", "GRB7", "STARD3", "MIEN1", "PNMT", "PPP1R1B", "GATA3", "KRT8", "TFF3", "AGR2", "IGKC", "COL3A1"]:
    print(f"{g:8s} in panel: {g in genes}")

# %% [markdown]
# ## Train on C3-C6, predict C2
#
# The reference is the four other sections in one AnnData (`obs['library_id']` tells them apart, each keeps its image
# in `uns['spatial']`). `hs.tl.mclstexp_train` builds and trains a `hs.models.MclSTExp` with its default settings and
# returns it; nothing is written to the reference. The defaults are those the leave-one-slide-out benchmark
# validated: L2-normalised embeddings with a learned temperature, 30 epochs, a seed ensemble of 5 models, softmax
# weights over the nearest reference spots (`preset='reference'` gives the published settings, which predicted worse
# here).

# %%
ref = ad.concat([slides[s] for s in sections[1:]], join="inner", uns_merge="unique")
query = slides["C2"][:, genes].copy()
print(ref.obs["library_id"].value_counts().sort_index().to_dict())

model = hs.tl.mclstexp_train(
    ref, genes=genes, max_epochs=5 if FAST else None, n_models=2 if FAST else None, progress_bar=PROGRESS
)
model

# %% [markdown]
# `hs.tl.mclstexp_predict` embeds the query patches and averages the expression of their nearest reference spots in
# the joint space (`n_neighbors`), for each model of the ensemble, and writes:
#
# - `obsm['mclstexp']`: the predicted `ln(1 + CP10k)` expression (normalised over the panel, as the model's targets),
#   a DataFrame with one column per panel gene; as the query holds exactly the panel's genes, also
#   `layers['mclstexp']`;
# - `obsm['mclstexp_std']` / `layers['mclstexp_std']`: the spread of the 5 models' predictions, per spot and gene;
# - `obsm['X_mclstexp']`: each spot's image embedding in the joint space.

# %%
hs.tl.mclstexp_predict(query, model=model)
query

# %% [markdown]
# To compare, normalise the measured counts of C2 the same way and compute one Pearson correlation per gene across
# the spots (the measure of the mclSTExp and BLEEP papers):

# %%
counts = query.X.toarray().astype(np.float64)
observed = np.log1p(1e4 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1))
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # constant genes get NaN
    pcc = hs.metrics.pearson_per_gene(observed, query.layers["mclstexp"], var_names=query.var_names)
print(f"C2: mean per-gene PCC {pcc.mean():.3f} over {pcc.notna().sum()} genes; median {pcc.median():.3f}")
pcc.sort_values(ascending=False).head(10).round(3)

# %%
ax = hs.pl.gene_correlation(pcc, show=False)
ax.set_xlabel("Pearson r per gene (C2, across its spots)")
ax.set_title("C2 predicted from C3-C6")
plt.show()

# %% [markdown]
# Observed (left) and predicted (right) expression over the C2 H&E, for the two 17q12-amplicon genes in the panel, a
# luminal marker, and the best-predicted gene; the title of each prediction gives its correlation with the
# observation.

# %%
show_genes = ["PNMT", "PPP1R1B", "GATA3"]
show_genes += [g for g in pcc.sort_values(ascending=False).index if g not in show_genes][:1]
hs.pl.predicted_vs_observed(query, genes=show_genes)

# %% [markdown]
# Where the models disagree, the prediction deserves less trust: the ensemble's spread is larger where the error is
# larger (Spearman correlation per spot between the mean spread and the mean absolute error):

# %%
from scipy.stats import spearmanr

err = np.abs(query.layers["mclstexp"] - observed).mean(axis=1)
spread = query.layers["mclstexp_std"].mean(axis=1)
print(f"Spearman rho(spread, |error|) over the C2 spots: {spearmanr(spread, err)[0]:.2f}")

# %% [markdown]
# The model object records its loss per epoch (`model.history`, the mean over the models); it can be saved and loaded
# again (weights and init parameters; the reference embeddings are kept with it, so a loaded model predicts straight
# away).

# %%
hs.pl.training_history(model)

# %%
model_dir = Path(tempfile.mkdtemp()) / "mclstexp_C3-C6"
model.save(model_dir)
reloaded = hs.models.MclSTExp.load(model_dir)
again = hs.tl.mclstexp_predict(query, model=reloaded, copy=True)
print("same prediction after reloading:", np.allclose(again.layers["mclstexp"], query.layers["mclstexp"]))

# %% [markdown]
# ## Leave-one-slide-out evaluation
#
# `hs.tl.mclstexp_cross_validate` holds out each section in turn, trains on the others with the same default
# settings and predicts the held-out one (the panel and the normalisation are fixed from the training part). Two
# baselines are fitted on the same folds, genes and image features: a ridge regression on the first 256 principal
# components of the features (the HEST-Benchmark protocol) and a k-nearest-neighbour regression. The model predicts
# from the reference expression on its first 16 principal axes (`expression_rank=16`, the default), so the
# baselines' predictions are put on the same axes, and that step is not credited to mclSTExp. The summary has one
# row per method and fold: the mean per-gene Pearson r over the panel (`pcc_all`) and over the 50 genes with the
# highest mean expression in the held-out section (`pcc_top`).

# %%
all_slides = ad.concat(list(slides.values()), join="inner", uns_merge="unique")
cv = hs.tl.mclstexp_cross_validate(
    all_slides,
    genes=genes,
    train_kwargs={"max_epochs": 3, "n_models": 1} if FAST else None,
    groups=["C2"] if FAST else None,  # CI: one fold only
)
cv["summary"][["method", "fold", "n_train", "n_test", "pcc_all", "pcc_top", "train_time_s"]].round(3)

# %%
cv["overall"].round(3)

# %% [markdown]
# `cv['gene_scores']` gives, per method, each gene's held-out Pearson r over the folds with a false discovery rate that accounts for
# the spatial autocorrelation of the spots (Dutilleul's test): the genes worth reading off the H&E.

# %%
scores = cv["gene_scores"]["mclstexp"]
print(f"{(scores['fdr'] < 0.05).sum()} of {len(scores)} genes predicted better than chance at FDR < 0.05")
scores.sort_values("pcc", ascending=False).head(10)[["pcc", "pcc_sd", "n_eff", "fdr"]].round(3)

# %%
fig, axs = plt.subplots(1, 2, figsize=(11, 4))
hs.pl.gene_correlation(cv, ax=axs[0], show=False)
hs.pl.top_genes(cv, n=10, ax=axs[1], show=False)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Prediction from H&E alone: tiles over the C2 image
#
# For a slide that was never sequenced we start from the image file. `hs.pp.tile_image` cuts it into 224-px tiles
# over the tissue (found from the saturation of a downscaled copy) and returns an AnnData of tiles without genes;
# `hs.pp.image_features` gives their features as for spots (the same settings), and `hs.tl.mclstexp_predict` writes
# the panel's predicted expression to `tiles.obsm['mclstexp']`. A 224-px tile is about 155 µm wide, so the tiles lie
# closer together than the ST spots (200 µm apart) and also cover tissue between and around them.

# %%
he_path = slides["C2"].uns["spatial"]["C2"]["metadata"]["source_image_path"]
tiles = hs.pp.tile_image(he_path, tile_size=448 if FAST else 224, library_id="C2_HE")
hs.pp.image_features(tiles, weights=WEIGHTS, **FEATURES, progress_bar=PROGRESS)
hs.tl.mclstexp_predict(tiles, model=model)
tiles.obsm["mclstexp"].iloc[:5, :6].round(2)

# %% [markdown]
# For scanpy and squidpy plots that colour by gene, make an AnnData with the predictions as `X`:

# %%
pred = ad.AnnData(tiles.obsm["mclstexp"], obsm={"spatial": tiles.obsm["spatial"]}, uns=tiles.uns)
pred

# %%
tile_genes = ["PNMT", "PPP1R1B", "GATA3", "IGKC"]
xy = pred.obsm["spatial"]
margin = 300  # full-resolution pixels around the outermost tiles
# squidpy's crop box: (left, top, right, bottom) in full-resolution pixels
crop = (xy[:, 0].min() - margin, xy[:, 1].min() - margin, xy[:, 0].max() + margin, xy[:, 1].max() + margin)
axs = sq.pl.spatial_scatter(
    pred,
    color=tile_genes,
    library_id="C2_HE",
    shape="square",
    alpha=0.6,
    cmap="viridis",
    crop_coord=crop,
    title=[f"{g} predicted from H&E tiles" for g in tile_genes],
    ncols=2,
    wspace=0.3,
    figsize=(5, 5),
    return_ax=True,
)
for cax in [a for a in axs[0].figure.axes if a not in list(axs)]:  # the colour bars
    cax.set_ylabel("predicted ln(1 + CP10k)")
plt.show()

# %% [markdown]
# ## Domains of the H&E-only slide from the learned embedding
#
# `hs.tl.mclstexp_predict` also writes each tile's embedding in the joint space to `obsm['X_mclstexp']` (the image
# side of the model, L2-normalised; with a seed ensemble, the first model's). The embedding was trained to match
# expression, so clustering it gives expression-informed regions of a slide that was never sequenced, as the mclSTExp
# paper does for pathologist-annotated regions. Like any latent representation, it feeds `hs.tl.domains` (or
# `sc.pp.neighbors(tiles, use_rep="X_mclstexp")` and Leiden). The tiles lie on a square grid: their 8 neighbours form
# the spatial graph of the refinement.

# %%
hs.pp.spatial_graph(tiles, coord_type="grid", n_neighs=8)
hs.tl.domains(tiles, use_rep="X_mclstexp", n_clusters=5)
sq.pl.spatial_scatter(
    tiles,
    color="mclstexp_domain",
    library_id="C2_HE",
    shape="square",
    alpha=0.6,
    crop_coord=crop,
    title="domains from the mclSTExp embedding (H&E only)",
    figsize=(5, 5),
)

# %% [markdown]
# ## Next
#
# - `hs.models.MclSTExp(..., freeze_encoder=False)` fine-tunes the image encoder on patches, as the published code
#   does (a GPU is advised for that).
# - The methods page explains where histospace differs from the published mclSTExp code and why.
