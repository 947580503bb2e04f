"""Spatial-domain benchmark on real Stereo-seq bins: Drosophila embryo E14-16h sections S01 and S02 (bin20, no image).

ARI/NMI against `obs['annotation']` (Flysta3D tissue labels) with k = the number of labels of the section (6 and 9),
several seeds per section (mean +- sd). The sections come from `hs.datasets.stereoseq_embryo`: raw counts, bin centres
in DNB, 0.5 µm per DNB. Methods (one setting for both sections, nothing tuned per section):

- `stereomm_default`: `hs.pp.spatial_graph` (8-neighbour grid of the bins), `hs.tl.stereomm(features_key=None)`
  (defaults: seed ensemble of 3 models, `graph_weight='auto'`), `hs.tl.domains(n_clusters=k)` — what
  `histospace domains` runs on an .h5ad without image;
- `stereomm_graph_weight_1`: the same with `model_kwargs={'graph_weight': 1}` (the usual GCN, the default before
  `graph_weight='auto'`);
- `stereomm_1_model`: the default with `n_models=1`;
- `stereomm_reference`: `preset='reference'` with the expression PCA'd to 200 and the reference's Leiden search
  (as `benchmarks/domains.py`);
- `expr_only`: expression features as `benchmarks/domains.py` (log-normalised, 3000 HVG, z-score, PCA 50)
  clustered by `hs.tl.domains(refine=False)`: no graph at all;
- `pca_kmeans`: the protocol of the issue: scanpy log-CP10k, 2000 HVG (Seurat), z-score, 20 PCs, KMeans (10
  restarts) with k = number of labels; `pca_smooth_kmeans`: the same PCs averaged over each bin and its graph
  neighbours twice, then KMeans.

Seed `s` is given to every random step of a method (PCA, KMeans, `hs.tl.stereomm`, `hs.tl.domains`).

It also checks the generalisation rule on DLPFC 151673/151674 (`--dlpfc`): the neighbour dissimilarity that
`graph_weight='auto'` reads, the weight it picks there, and that the latent is the same as with `graph_weight=1`
(expression only, one model, 20 epochs: the dissimilarity is computed on the expression PCs, which image features
do not change, and a weight of 1 takes the code path of the usual GCN).

Usage: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/domains_stereoseq.py [--seeds 5] [--dlpfc]`
(writes benchmarks/results/domains_stereoseq.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

N_THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = Path(os.environ.get("HISTOSPACE_DATA", HERE.parent.parent / "shared" / "data"))
SECTIONS = ["S01", "S02"]
GT = "annotation"
METHODS = [
    "stereomm_default",
    "stereomm_graph_weight_1",
    "stereomm_1_model",
    "stereomm_reference",
    "expr_only",
    "pca_kmeans",
    "pca_smooth_kmeans",
]


def _pcs(adata, *, n_hvg: int, n_pcs: int, seed: int) -> np.ndarray:
    import scanpy as sc

    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    sc.pp.highly_variable_genes(b, n_top_genes=n_hvg, flavor="seurat")
    b = b[:, b.var["highly_variable"]].copy()
    sc.pp.scale(b)
    sc.pp.pca(b, n_comps=n_pcs, random_state=seed)
    return np.asarray(b.obsm["X_pca"])


def _run(method: str, adata, k: int, seed: int) -> tuple[np.ndarray, dict]:
    import scipy.sparse as sp
    from sklearn.cluster import KMeans

    import histospace as hs

    info: dict = {}
    if method.startswith("stereomm"):
        kw: dict = {"features_key": None, "random_state": seed, "progress_bar": False}
        dkw: dict = {"n_clusters": k, "random_state": seed}
        if method == "stereomm_graph_weight_1":
            kw["model_kwargs"] = {"graph_weight": 1}
        elif method == "stereomm_1_model":
            kw["n_models"] = 1
        elif method == "stereomm_reference":
            kw.update(preset="reference", n_pcs=200)
            dkw.update(method="leiden", refine=False)
        hs.tl.stereomm(adata, **kw)
        hs.tl.domains(adata, **dkw)
        p = adata.uns["stereomm"]["params"]
        info = {"graph_weight": p["graph_weight"], "neighbour_dissimilarity": p.get("neighbour_dissimilarity")}
        return adata.obs["stereomm_domain"].to_numpy(), info
    if method == "expr_only":
        adata.obsm["X_expr"] = _pcs(adata, n_hvg=3000, n_pcs=50, seed=seed)  # as benchmarks/domains.py
        hs.tl.domains(adata, use_rep="X_expr", n_clusters=k, refine=False, random_state=seed)
        return adata.obs["expr_domain"].to_numpy(), info
    x = _pcs(adata, n_hvg=2000, n_pcs=20, seed=seed)
    if method == "pca_smooth_kmeans":
        a = adata.obsp["spatial_connectivities"]
        a = ((a + a.T) > 0).astype(np.float32) + sp.eye(adata.n_obs, dtype=np.float32)
        a = sp.diags(1.0 / np.asarray(a.sum(1)).ravel()) @ a
        for _ in range(2):
            x = a @ x
    return KMeans(k, n_init=10, random_state=seed).fit_predict(x).astype(str), info


def _dlpfc_check() -> list[dict]:
    """On DLPFC: the dissimilarity `graph_weight='auto'` reads, the weight it picks, and the latent vs weight 1."""
    import histospace as hs

    rows = []
    for section in ("151673", "151674"):
        adata = hs.datasets.dlpfc(section, data_dir=DATA, image=False)
        hs.pp.spatial_graph(adata)
        kw = {"features_key": None, "n_models": 1, "max_epochs": 20, "progress_bar": False}
        auto = hs.tl.stereomm(adata, copy=True, **kw)
        one = hs.tl.stereomm(adata, copy=True, model_kwargs={"graph_weight": 1}, **kw)
        p = auto.uns["stereomm"]["params"]
        rows.append(
            {
                "section": section,
                "neighbour_dissimilarity": p["neighbour_dissimilarity"],
                "graph_weight": p["graph_weight"],
                "latent_equal_to_graph_weight_1": bool(np.array_equal(auto.obsm["X_stereomm"], one.obsm["X_stereomm"])),
            }
        )
        print(f"DLPFC {section}: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--sections", nargs="*", default=SECTIONS)
    p.add_argument("--dlpfc", action="store_true", help="also check the rule on DLPFC 151673/151674")
    args = p.parse_args()
    import torch

    torch.set_num_threads(N_THREADS)
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    import histospace as hs

    warnings.filterwarnings("ignore", category=FutureWarning)
    rows = []
    for section in args.sections:
        base = hs.datasets.stereoseq_embryo(section, data_dir=DATA)
        hs.pp.spatial_graph(base)
        gt = base.obs[GT].astype(str).to_numpy()
        k = int(base.obs[GT].nunique())
        for method in args.methods:
            for seed in range(args.seeds):
                adata = base.copy()
                t = time.perf_counter()
                labels, info = _run(method, adata, k, seed)
                row = {"section": section, "method": method, "seed": seed, "k": k}
                row |= {
                    "ari": float(adjusted_rand_score(gt, labels)),
                    "nmi": float(normalized_mutual_info_score(gt, labels)),
                }
                row |= {"seconds": time.perf_counter() - t, "load_avg_1min": os.getloadavg()[0], **info}
                rows.append(row)
                print(
                    f"{section} {method:24s} seed {seed}: ARI {row['ari']:.3f} NMI {row['nmi']:.3f} "
                    f"({row['seconds']:.1f} s, load {row['load_avg_1min']:.1f})",
                    flush=True,
                )
    summary = []
    for section in args.sections:
        for method in args.methods:
            r = [x for x in rows if x["section"] == section and x["method"] == method]
            a, n = np.array([x["ari"] for x in r]), np.array([x["nmi"] for x in r])
            summary.append(
                {"section": section, "method": method, "n": len(r), "ari_mean": float(a.mean())}
                | {"ari_sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "nmi_mean": float(n.mean())}
                | {"seconds_mean": float(np.mean([x["seconds"] for x in r]))}
            )
    dlpfc = _dlpfc_check() if args.dlpfc else []
    meta = {
        "threads": N_THREADS,
        "seeds": args.seeds,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"meta": meta, "summary": summary, "rows": rows, "dlpfc_rule": dlpfc}
    (RESULTS / "domains_stereoseq.json").write_text(json.dumps(out, indent=1))
    lines = [
        "# Spatial domains on Stereo-seq bins (Drosophila embryo E14-16h, bin20, no image)",
        "",
        f"ARI/NMI against `obs['{GT}']`, k = number of labels (S01: 6, S02: 9); seeds 0..{args.seeds - 1} per "
        f"section (mean +- sd over seeds). {N_THREADS} CPU threads; times are wall-clock per run on a shared machine "
        "(the 1-min load average of each run is in the JSON), so they are indicative only.",
        "",
        "| section | method | n | ARI mean | ARI sd | NMI mean | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['section']} | {r['method']} | {r['n']} | {r['ari_mean']:.3f} | {r['ari_sd']:.3f} | "
            f"{r['nmi_mean']:.3f} | {r['seconds_mean']:.1f} |"
        )
    gw = sorted({(x["section"], x.get("neighbour_dissimilarity")) for x in rows if x.get("neighbour_dissimilarity")})
    lines += [
        "",
        "Neighbour dissimilarity read by `graph_weight='auto'` (first 10 expression PCs over the default graph): "
        + ", ".join(f"{s} {v:.3f}" for s, v in gw),
    ]
    if dlpfc:
        lines += [
            "",
            "DLPFC (the rule's other sections): "
            + "; ".join(
                f"{r['section']}: dissimilarity {r['neighbour_dissimilarity']:.3f} -> graph_weight "
                f"{r['graph_weight']:g}, latent identical to graph_weight=1: {r['latent_equal_to_graph_weight_1']}"
                for r in dlpfc
            ),
        ]
    lines += ["", f"Per run: {RESULTS.name}/domains_stereoseq.json. Machine: {meta}", ""]
    (RESULTS / "domains_stereoseq.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
