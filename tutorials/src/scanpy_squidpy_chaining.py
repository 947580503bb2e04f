# ruff: noqa: B018 - a bare name at the end of a cell shows it in the notebook
# %% [markdown]
# # Chaining StereoMM with scanpy and squidpy
#
# histospace writes the slots scanpy and squidpy read: the latent in `obsm['X_stereomm']`, the domains in
# `obs['stereomm_domain']`, the spatial graph in squidpy's `obsp['spatial_connectivities']`, the image in
# `uns['spatial']`. So everything downstream is plain scanpy and squidpy. On the StereoMM result for DLPFC 151673
# (from the StereoMM tutorial, `stereomm_dlpfc.ipynb`) we
#
# 1. test which domains neighbour each other more than chance (`squidpy.gr.nhood_enrichment`);
# 2. connect the domains with PAGA and order the spots by diffusion pseudotime on `X_stereomm`, rooted in the white
#    matter, and check that the order follows the cortical layers;
# 3. draw the results over the H&E image with `squidpy.pl.spatial_scatter`, and the diffusion map with
#    `scanpy.pl.embedding`.
#
# - **Runtime**: {{ runtime }}, reading the result that the StereoMM tutorial saved as `stereomm_151673.h5ad`.
#   Without that file the first cells compute it (the one-call path of that tutorial, about 6 min of CPU time more).
# - **GPU**: not needed.
# - **Data**: the DLPFC section 151673 and the MobileNetV2 weights, from the folder named by `HISTOSPACE_DATA`.

# %%
import os
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
import pandas as pd
import scanpy as sc
import squidpy as sq
from scipy.stats import spearmanr

import histospace as hs

DATA = Path(os.environ.get("HISTOSPACE_DATA", "../../shared/data"))
WEIGHTS = DATA / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
FAST = os.environ.get("HISTOSPACE_TUTORIAL_FAST") == "1"  # CI: a slice of the section, few epochs

sc.settings.verbosity = 1
sc.set_figure_params(dpi=80, dpi_save=150, facecolor="white", frameon=False)
plt.rcParams["axes.grid"] = False  # no grid lines over the H&E images
print(", ".join(f"{p} {version(p)}" for p in ["histospace", "scanpy", "squidpy", "anndata", "torch"]))

# %% [markdown]
# ## The StereoMM result
#
# Read the AnnData saved at the end of the StereoMM tutorial, or compute it with the same four calls.

# %%
library_id = "151673"
saved = Path("stereomm_151673.h5ad")
if saved.exists() and not FAST:
    adata = ad.read_h5ad(saved)
else:
    adata = hs.datasets.dlpfc(library_id)
    if FAST:
        adata = adata[adata.obs["array_col"].between(40, 52)].copy()
    hs.pp.image_features(adata, weights=WEIGHTS, progress_bar=False)
    hs.pp.spatial_graph(adata)
    hs.tl.stereomm(adata, max_epochs=30 if FAST else None, progress_bar=False)
    hs.tl.domains(adata, n_clusters=7)
adata

# %% [markdown]
# The domains are numbered `0`-`6`. For reading the plots, name each after the manual layer most of its spots carry
# (domains that share a majority layer get a suffix):

# %%
layers = adata.obs["layer_guess_reordered"]
majority = pd.crosstab(adata.obs["stereomm_domain"], layers).idxmax(axis=1)
names, seen = {}, {}
for dom, layer in majority.items():
    seen[layer] = seen.get(layer, 0) + 1
    names[dom] = f"{dom}: {layer}" + ("" if seen[layer] == 1 else f" ({seen[layer]})")
order = sorted(names, key=lambda d: (list(layers.cat.categories).index(majority[d]), d))
adata.obs["domain"] = pd.Categorical(adata.obs["stereomm_domain"].map(names), categories=[names[d] for d in order])
print(f"ARI = {hs.metrics.ari(layers, adata.obs['domain']):.3f}")
adata.obs["domain"].value_counts(sort=False)

# %% [markdown]
# ## Neighbourhood enrichment of the domains
#
# `sq.gr.nhood_enrichment` counts the spatial-graph edges between each pair of domains and compares them with random
# permutations of the labels (z-scores). It uses the graph `hs.pp.spatial_graph` wrote in squidpy's layout. In a
# layered cortex every domain is strongly enriched next to itself; between domains all counts are below chance,
# since layers touch only along their borders, and least so for domains of adjacent layers (rows and columns follow
# the layers, superficial to deep).

# %%
sq.gr.nhood_enrichment(adata, cluster_key="domain", n_perms=200 if FAST else 1000, seed=0, show_progress_bar=False)
sq.pl.nhood_enrichment(
    adata,
    cluster_key="domain",
    cmap="RdBu_r",
    vmin=-50,
    vmax=50,
    cbar_kwargs={"label": "z-score (colours capped at ±50)"},
    figsize=(7, 6),
    title="neighbourhood enrichment of the StereoMM domains",
)
categories = adata.obs["domain"].cat.categories
pd.DataFrame(adata.uns["domain_nhood_enrichment"]["zscore"], index=categories, columns=categories).round(0)

# %% [markdown]
# ## PAGA and diffusion pseudotime on `X_stereomm`
#
# A k-nearest-neighbour graph of the latent (not of the spatial positions) feeds PAGA, which draws how strongly the
# domains connect in expression-and-image space, and the diffusion map behind diffusion pseudotime (DPT).

# %%
sc.pp.neighbors(adata, use_rep="X_stereomm", n_neighbors=15, random_state=0)
sc.tl.paga(adata, groups="domain")
sc.pl.paga(adata, threshold=0.1, fontsize=9, node_size_scale=1.5, frameon=False, title="PAGA on X_stereomm")

# %% [markdown]
# The root of the pseudotime is the white-matter spot at the white-matter end of the first non-trivial diffusion
# component (`X_diffmap[:, 1]`, which `sc.pl.embedding` labels DC2; `X_diffmap[:, 0]` is the near-constant first
# eigenvector), the component that separates white matter from layer 1.

# %%
sc.tl.diffmap(adata, random_state=0)
dc = adata.obsm["X_diffmap"][:, 1]
is_wm = (layers == "WM").to_numpy()
is_l1 = (layers == "Layer1").to_numpy()
sign = 1.0 if np.median(dc[is_wm]) > np.median(dc[is_l1]) else -1.0
adata.uns["iroot"] = int(np.flatnonzero(is_wm)[np.argmax(sign * dc[is_wm])])
sc.tl.dpt(adata)
print("root:", adata.obs_names[adata.uns["iroot"]], layers.iloc[adata.uns["iroot"]])

# %% [markdown]
# If the latent keeps the laminar structure, the pseudotime grows from the white matter through layers 6, 5, ... to
# layer 1. The Spearman correlation with the layer order (WM = 0, Layer6 = 1, ..., Layer1 = 6) measures it:

# %%
layer_order = ["WM", "Layer6", "Layer5", "Layer4", "Layer3", "Layer2", "Layer1"]
df = pd.DataFrame({"layer": layers.astype(str), "dpt": adata.obs["dpt_pseudotime"]}).query("layer in @layer_order")
df = df[np.isfinite(df["dpt"])]
rho = spearmanr(df["layer"].map(layer_order.index), df["dpt"]).statistic
print(f"Spearman rho between the layer order and the pseudotime: {rho:.3f} ({len(df)} annotated spots)")

fig, ax = plt.subplots(figsize=(7, 3.8))
ax.boxplot([df.loc[df["layer"] == lay, "dpt"] for lay in layer_order], showfliers=False)
ax.set_xticks(range(1, len(layer_order) + 1), layer_order)
ax.set_xlabel("manual annotation (deep to superficial)")
ax.set_ylabel("diffusion pseudotime")
ax.set_title(f"DPT on X_stereomm rooted in white matter (Spearman rho = {rho:.2f})")
plt.show()

# %% [markdown]
# ## Over the H&E image
#
# `sq.pl.spatial_scatter` reads `obsm['spatial']` and the image in `uns['spatial']`:

# %%
sq.pl.spatial_scatter(
    adata,
    color=["domain", "dpt_pseudotime"],
    library_id=library_id,
    img_res_key="lowres",
    alpha=0.7,  # the H&E shows through the spots
    cmap="viridis",
    wspace=0.4,
    figsize=(5, 5),
)

# %% [markdown]
# (`sc.pl.spatial` draws the same view, but scanpy 1.11 deprecates it in favour of `squidpy.pl.spatial_scatter`.)
#
# The diffusion map itself is an ordinary embedding for `sc.pl.embedding`: its first non-trivial components spread
# the spots from white matter to layer 1.

# %%
sc.pl.embedding(
    adata,
    basis="diffmap",
    dimensions=(1, 2),
    color=["layer_guess_reordered", "dpt_pseudotime"],
    frameon=True,
    wspace=0.35,
)
