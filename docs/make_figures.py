"""Make the overview figure of the README and the documentation from the real data, with the public histospace API.

Run from the repository root. On a busy 2-core machine it took about 25 minutes (StereoMM 10-16, mclSTExp with its
image features 13), plus about 10 for the DLPFC image features when they are not cached:

    HISTOSPACE_DATA=../shared/data OMP_NUM_THREADS=2 .venv/bin/python docs/make_figures.py [--cache DIR]

Writes `docs/_static/overview.png` (2 x 2 panels):

- top: DLPFC 151673 (Visium) over its H&E image, the manual cortical layers next to the StereoMM spatial domains
  (`hs.pp.image_features` with the ImageNet MobileNetV2 of the shared data folder, `hs.pp.spatial_graph`,
  `hs.tl.stereomm` and `hs.tl.domains` with their defaults, k = 7; the settings of `benchmarks/domains.py`). Each
  domain is drawn in the colour of the layer it overlaps most, so the two panels can be compared by eye;
  the ARI is in the title.
- bottom: her2st section C2 (ST), GNAS observed and predicted from the H&E alone by mclSTExp trained on sections
  C3-C6 (the 785-gene panel, `hs.tl.mclstexp_train` and `hs.tl.mclstexp_predict` with their defaults); the
  Pearson r over the spots is in the title. GNAS is chosen beforehand (it is an example gene in the docs), not as
  the best-predicted gene.

The DLPFC image features are read from `benchmarks/results/cache/img_features_151673.npy` when that file exists (it
is written by `benchmarks/domains.py`) and computed otherwise. `--cache DIR` keeps the fitted AnnData objects in
`DIR`, so that a second run only redraws the figure.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

import histospace as hs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "_static" / "overview.png"
FEATURE_CACHE = ROOT / "benchmarks" / "results" / "cache" / "img_features_151673.npy"
WEIGHTS = Path("weights") / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
PANEL = Path("her2st") / "gene_lists" / "her2st_785genes_hist2st.txt"
GENE = "GNAS"
LAYERS = "layer_guess_reordered"
#: one colour per cortical layer (Layer1-Layer6, white matter)
LAYER_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f"]


def _features(adata: ad.AnnData, weights: Path, **kwargs) -> None:
    hs.pp.image_features(
        adata, encoder="mobilenet_v2", weights=str(weights), mean=0.5, std=0.5, progress_bar=False, **kwargs
    )


def dlpfc_domains(data_dir: Path, cache: Path | None) -> ad.AnnData:
    """DLPFC 151673 with `obs['stereomm_domain']` (StereoMM defaults, k = 7)."""
    path = None if cache is None else cache / "dlpfc_151673_stereomm.h5ad"
    if path is not None and path.exists():
        return ad.read_h5ad(path)
    adata = hs.datasets.dlpfc("151673", data_dir=data_dir)
    t = time.perf_counter()
    if FEATURE_CACHE.exists() and np.load(FEATURE_CACHE, mmap_mode="r").shape[0] == adata.n_obs:
        adata.obsm["img_features"] = np.load(FEATURE_CACHE)
        print(f"image features read from {FEATURE_CACHE.relative_to(ROOT)}")
    else:  # as benchmarks/domains.py: patches of 3 spot diameters
        diam = float(adata.uns["spatial"]["151673"]["scalefactors"]["spot_diameter_fullres"])
        _features(adata, data_dir / WEIGHTS, patch_size=3 * diam)
        print(f"image features computed in {time.perf_counter() - t:.0f} s")
    hs.pp.spatial_graph(adata)
    t = time.perf_counter()
    hs.tl.stereomm(adata, progress_bar=False)
    hs.tl.domains(adata, n_clusters=7)
    print(f"StereoMM and domains in {time.perf_counter() - t:.0f} s")
    if path is not None:
        adata.write_h5ad(path)
    return adata


def her2st_prediction(data_dir: Path, cache: Path | None) -> ad.AnnData:
    """her2st C2 (panel genes) with `layers['mclstexp']` predicted by a model trained on C3-C6."""
    path = None if cache is None else cache / "her2st_C2_mclstexp.h5ad"
    if path is not None and path.exists():
        return ad.read_h5ad(path)
    t = time.perf_counter()
    slides = {}
    for s in ["C2", "C3", "C4", "C5", "C6"]:
        slides[s] = hs.datasets.her2st(s, data_dir=data_dir)
        _features(slides[s], data_dir / WEIGHTS, patch_size=224)
    ref = ad.concat([slides[s] for s in ["C3", "C4", "C5", "C6"]], uns_merge="unique", join="inner")
    genes = [g for g in (data_dir / PANEL).read_text().split() if g in ref.var_names and g in slides["C2"].var_names]
    model = hs.tl.mclstexp_train(ref, genes=genes, progress_bar=False)
    query = slides["C2"][:, genes].copy()
    hs.tl.mclstexp_predict(query, model=model)
    print(f"mclSTExp features, training and prediction in {time.perf_counter() - t:.0f} s")
    if path is not None:
        query.write_h5ad(path)
    return query


def match_colours(adata: ad.AnnData) -> float:
    """Colour the layers, give each domain the colour of the layer it overlaps most (Hungarian); return the ARI."""
    layers = adata.obs[LAYERS].cat.categories
    adata.uns[f"{LAYERS}_colors"] = LAYER_COLOURS[: len(layers)]
    ok = adata.obs[LAYERS].notna().to_numpy()
    domains = adata.obs["stereomm_domain"].cat.categories
    table = np.zeros((len(domains), len(layers)))
    for i, d in enumerate(domains):
        sel = ok & (adata.obs["stereomm_domain"] == d).to_numpy()
        table[i] = adata.obs.loc[sel, LAYERS].value_counts().reindex(layers, fill_value=0).to_numpy()
    rows, cols = linear_sum_assignment(-table)
    colours = ["#cccccc"] * len(domains)
    for r, c in zip(rows, cols, strict=True):
        colours[r] = LAYER_COLOURS[c]
    adata.uns["stereomm_domain_colors"] = colours
    return hs.metrics.ari(adata.obs[LAYERS], adata.obs["stereomm_domain"])


def main() -> None:
    """Compute (or read from the cache) both analyses and draw `docs/_static/overview.png`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("HISTOSPACE_DATA"), help="the real data folder")
    parser.add_argument("--cache", default=None, help="folder keeping the fitted AnnData objects between runs")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    if args.data_dir is None:
        parser.error("pass --data-dir or set HISTOSPACE_DATA")
    data_dir = Path(args.data_dir)
    cache = None if args.cache is None else Path(args.cache)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    dlpfc = dlpfc_domains(data_dir, cache)
    query = her2st_prediction(data_dir, cache)
    ari = match_colours(dlpfc)
    print(f"DLPFC 151673: ARI {ari:.3f}")

    fig, axes = plt.subplots(2, 2, figsize=(12, 11), gridspec_kw={"hspace": 0.25, "wspace": 0.45})
    hs.pl.domains(dlpfc, key=LAYERS, title="DLPFC 151673: manual layers", ax=axes[0, 0], show=False)
    hs.pl.domains(dlpfc, key="stereomm_domain", title=f"StereoMM domains (ARI {ari:.2f})", ax=axes[0, 1], show=False)
    hs.pl.predicted_vs_observed(query, genes=[GENE], ax=axes[1], show=False)
    axes[1, 0].set_title(f"her2st C2: {GENE} observed", fontsize=12)
    axes[1, 1].set_title(f"mclSTExp: {axes[1, 1].get_title()}")  # "GNAS predicted (r = ...)"
    for ax in axes.ravel():
        ax.title.set_fontsize(12)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
