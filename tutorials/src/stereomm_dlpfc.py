# ruff: noqa: B018 - a bare name at the end of a cell shows it in the notebook
# %% [markdown]
# # Spatial domains with StereoMM on DLPFC 151673
#
# StereoMM (Luo et al. 2024) fuses three views of a spatial transcriptomics section: the expression of each spot,
# features of the H&E image around it, and the spatial neighbour graph. Expression and image features exchange
# information through cross-modal attention, and a variational graph autoencoder (VGAE) over the spatial graph
# compresses the result into a latent `obsm['X_stereomm']`. Clustering that latent gives spatial domains.
#
# Here we run it on the 10x Visium section 151673 of the human dorsolateral prefrontal cortex (Maynard et al. 2021),
# whose six cortical layers and white matter were annotated by hand (`obs['layer_guess_reordered']`), and measure how
# well the seven domains recover them (adjusted Rand index, ARI).
#
# - **Runtime**: {{ runtime }}, for the whole notebook. It was built on a machine shared with other jobs;
#   on two free cores expect a wall-clock time between half and all of the CPU time.
# - **GPU**: not needed. Everything runs on the CPU; a GPU is used automatically when PyTorch sees one.
# - **Data**: the DLPFC section (3,639 spots, 5,000 genes, low-resolution H&E) and ImageNet MobileNetV2 weights, read
#   from the folder named by `HISTOSPACE_DATA` (`hs.datasets.dlpfc` downloads the public files on a connected machine).
#
# First the one-call path (`hs.tl.stereomm`), then the model object behind it (`hs.models.StereoMM`).

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

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc

import histospace as hs

DATA = Path(os.environ.get("HISTOSPACE_DATA", "../../shared/data"))
WEIGHTS = DATA / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
# CI runs this notebook on a slice of the section with few epochs; the published notebook is the full run
FAST = os.environ.get("HISTOSPACE_TUTORIAL_FAST") == "1"
PROGRESS = False  # progress bars off to keep the stored notebook short; leave the default (True) when you work

sc.settings.verbosity = 1
sc.set_figure_params(dpi=80, dpi_save=150, facecolor="white", frameon=False)
plt.rcParams["axes.grid"] = False  # no grid lines over the H&E images
print(", ".join(f"{p} {version(p)}" for p in ["histospace", "scanpy", "anndata", "torch"]))

# %% [markdown]
# ## Load the section
#
# `hs.datasets.dlpfc` returns an AnnData in the scanpy/squidpy Visium layout: raw counts in `X`, spot centres in
# full-resolution pixels in `obsm['spatial']`, the H&E image and its scale factors in `uns['spatial']`.

# %%
adata = hs.datasets.dlpfc("151673")
library_id = "151673"
if FAST:  # a band of columns that still crosses every layer
    adata = adata[adata.obs["array_col"].between(40, 52)].copy()
adata

# %%
adata.obs["layer_guess_reordered"].value_counts(dropna=False).sort_index()

# %% [markdown]
# ## The one-call path
#
# Four steps, each writing AnnData slots that scanpy and squidpy know:
#
# 1. `hs.pp.image_features`: a CNN feature vector of the H&E around every spot → `obsm['img_features']`. The defaults:
#    the ImageNet MobileNetV2 (here the weights file shipped with the data; histospace recognises it and applies
#    its own input scaling), a patch of 3 spot diameters around each spot, and `method='auto'`, which on a
#    section this size runs the CNN once over overlapping tiles of the whole image and reads each spot's features
#    off the feature map (`method='dense'`) instead of cropping one patch per spot. Only the low-resolution image
#    (600 × 600 px) is available here, so a spot's patch is 13 px of it, upsampled; histospace warns that such
#    patches carry little detail. With the full-resolution TIFF, pass `img=` or set
#    `metadata['source_image_path']`.
# 2. `hs.pp.spatial_graph`: the Visium hexagonal grid (6 neighbours) → `obsp['spatial_connectivities']`, the same
#    layout as `squidpy.gr.spatial_neighbors_grid`.
# 3. `hs.tl.stereomm`: train StereoMM with its defaults (printed further down) → `obsm['X_stereomm']`,
#    `uns['stereomm']`. By default three models are trained from seeds 0, 1, 2 and their latents are stored side by
#    side (3 × 32 columns): one model's domains change with its seed, those of three together less.
# 4. `hs.tl.domains`: Gaussian mixtures on 10 principal components of the three latents together (each spot takes
#    the majority label of 50 fits from different starts), refined by a majority vote over the spatial neighbours →
#    `obs['stereomm_domain']`.

# %%
hs.pp.image_features(adata, weights=WEIGHTS, progress_bar=PROGRESS)
print(adata.obsm["img_features"].shape, adata.uns["img_features"]["params"]["method"])

# %%
hs.pp.spatial_graph(adata)
hs.tl.stereomm(adata, max_epochs=30 if FAST else None, progress_bar=PROGRESS)
hs.tl.domains(adata, n_clusters=7)
adata

# %%
ari = hs.metrics.ari(adata.obs["layer_guess_reordered"], adata.obs["stereomm_domain"])
nmi = hs.metrics.nmi(adata.obs["layer_guess_reordered"], adata.obs["stereomm_domain"])
print(f"ARI = {ari:.3f}, NMI = {nmi:.3f} against the manual layers (unlabelled spots left out)")

# %% [markdown]
# The H&E image, the manual annotation and the domains over it (`hs.pl.domains` draws with
# `squidpy.pl.spatial_scatter`, spots at their true size; with `groundtruth_key` the ARI goes into the title):

# %%
fig, axs = plt.subplots(1, 3, figsize=(16, 5.2))
axs[0].imshow(adata.uns["spatial"][library_id]["images"]["lowres"])
axs[0].set_title("H&E (low resolution)")
axs[0].set_axis_off()
hs.pl.domains(adata, key="layer_guess_reordered", title="manual annotation", alpha=0.7, ax=axs[1], show=False)
hs.pl.domains(adata, groundtruth_key="layer_guess_reordered", alpha=0.7, ax=axs[2], show=False)
fig.tight_layout()
plt.show()

# %% [markdown]
# Which domain covers which layer (spots per pair):

# %%
pd.crosstab(adata.obs["stereomm_domain"], adata.obs["layer_guess_reordered"])

# %% [markdown]
# StereoMM keeps a record of what it did in `uns['stereomm']` (parameters, loss per epoch averaged over the three
# models, version), so the training curve can be drawn from the AnnData alone:

# %%
print(
    {
        k: v
        for k, v in adata.uns["stereomm"]["params"].items()
        if k in ("n_latent", "n_models", "max_epochs", "lr", "n_pcs")
    }
)
p = adata.uns["stereomm_domain"]["params"]
print(f"domains: {p['ensemble']} clustering of {p['n_models']} models, vote of {p['n_init']} mixtures, each of which")
print("agrees with the vote on a fraction", round(p["consensus_agreement"], 3), "of the spots (mean)")
hs.pl.training_history(adata, key="stereomm")

# %% [markdown]
# ## UMAP of the latent
#
# `X_stereomm` is an ordinary representation for scanpy: neighbours, UMAP, Leiden, PAGA all take
# `use_rep='X_stereomm'`.

# %%
sc.pp.neighbors(adata, use_rep="X_stereomm", random_state=0)
sc.tl.umap(adata, random_state=0)
sc.pl.umap(adata, color=["layer_guess_reordered", "stereomm_domain"], wspace=0.35, frameon=True)

# %% [markdown]
# ## The model object
#
# `hs.tl.stereomm` is a thin wrapper around `hs.models.StereoMM`. The object lets you change the architecture, train
# on another device or for longer, look at the loss terms, and save the trained weights. Here we build the default
# model with a smaller latent (`n_latent=16`) and train one model (`n_models=1`) for half the default number of
# epochs, to keep the notebook short.

# %%
half = adata.uns["stereomm"]["params"]["max_epochs"] // 2
model = hs.models.StereoMM(adata, features_key="img_features", n_latent=16)
model.train(max_epochs=half, n_models=1, random_state=0, progress_bar=PROGRESS)
model

# %% [markdown]
# `model.history` holds one value per epoch for the total loss and its two terms (reconstruction of the features and
# the KL divergence of the VGAE). The KL term is weighted by `1 / n_obs` in the total, so the total's curve lies under
# the reconstruction's:

# %%
print({k: len(v) for k, v in model.history.items()})
hs.pl.training_history(model)

# %%
adata.obsm["X_stereomm16"] = model.get_latent_representation()
hs.tl.domains(adata, use_rep="X_stereomm16", n_clusters=7)  # -> obs['stereomm16_domain']
ari16 = hs.metrics.ari(adata.obs["layer_guess_reordered"], adata.obs["stereomm16_domain"])
print(f"latent {adata.obsm['X_stereomm16'].shape}: ARI = {ari16:.3f} (default model above: {ari:.3f})")

# %% [markdown]
# Save and load: the weights, the init parameters (JSON) and the fitted preprocessing go into a folder; the AnnData is
# not saved with them, so `load` takes it again (the same spots and genes).

# %%
model_dir = Path(tempfile.mkdtemp()) / "stereomm_151673"
model.save(model_dir)
print(sorted(p.name for p in model_dir.iterdir()))
reloaded = hs.models.StereoMM.load(model_dir, adata=adata)
print("same latent after reloading:", np.allclose(reloaded.get_latent_representation(), adata.obsm["X_stereomm16"]))

# %% [markdown]
# The AnnData now holds everything the chaining tutorial (`scanpy_squidpy_chaining.ipynb`) needs; it reads this
# file when it exists:

# %%
adata.write_h5ad("stereomm_151673.h5ad")

# %% [markdown]
# ## Next
#
# - The scanpy/squidpy chaining tutorial (`scanpy_squidpy_chaining.ipynb`) takes these domains into
#   `squidpy.gr.nhood_enrichment`, PAGA and a diffusion pseudotime across the cortical layers.
# - The mclSTExp tutorial (`mclstexp_her2st.ipynb`) predicts expression from the H&E image alone.
# - `hs.tl.stereomm(adata, preset="reference")` runs the settings of the published StereoMMv1 code; the
#   benchmarks page compares both on 151673 and 151674.
