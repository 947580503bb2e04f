"""Spatial-domain benchmark on DLPFC 151673 and 151674 (k = 7, ARI/NMI against `layer_guess_reordered`).

Every method runs in its own Python process (this script with `--worker`), so the peak resident memory reported
(`resource.getrusage(RUSAGE_SELF).ru_maxrss` of that process at its end) belongs to that method alone; it includes the
interpreter, the imports and the loaded section (the baseline row "load only" shows that floor). The time is the
wall-clock time of the method itself (data loading and imports excluded); the image features, shared by the
image-using methods, are computed once per section by their own worker, timed and reported as a separate row.

Methods (one default for both sections; nothing tuned per section):

- `stereomm_default`: `hs.pp.image_features` with its defaults (MobileNetV2, the shared ImageNet weights, lowres
  image, patch of 3 spot diameters, `method='auto'`, which is dense here), `hs.pp.spatial_graph` (Visium hex grid,
  6 neighbours), `hs.tl.stereomm` (defaults: a seed ensemble of 3 models), `hs.tl.domains` (defaults: mixtures on
  the 3 models' latents together, the vote of 50 starts) — what `histospace domains` runs; `stereomm_1_model`: the
  same with `n_models=1`;
- `stereomm_reference`: `hs.tl.stereomm(preset='reference', n_pcs=200)` (the StereoMMv1 README settings with both
  modalities PCA'd to 200 as in the reference run quoted in the issue) and the reference's Leiden search;
- ablations: `expr_only` (the default expression features, PCA 50, Gaussian mixture; no graph, no image),
  `expr_graph` (StereoMM without image: `features_key=None`), `expr_graph_image` = `stereomm_default`, and
  `stereomm_image_weight_1` (the default with the image block at full weight, as in the reference);
- baselines: `pca_kmeans` (log-normalised 3000 HVG, z-score, PCA 50, KMeans) and `pca_smooth_kmeans` (the same PCs
  averaged over each spot and its 6 neighbours, twice, then KMeans).

Usage: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/domains.py` (writes benchmarks/results/domains.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

N_THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))
SECTIONS = ["151673", "151674"]
K = 7
GT = "layer_guess_reordered"
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / "cache"
DATA = Path(os.environ.get("HISTOSPACE_DATA", HERE.parent.parent / "shared" / "data"))
WEIGHTS = DATA / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
METHODS = [
    "load_only",
    "image_features",
    "stereomm_default",
    "stereomm_1_model",
    "stereomm_reference",
    "expr_only",
    "expr_graph",
    "stereomm_image_weight_1",
    "pca_kmeans",
    "pca_smooth_kmeans",
]


def _load(section: str):
    import anndata as ad

    import histospace as hs

    try:
        return hs.datasets.dlpfc(section, data_dir=DATA)
    except Exception:  # noqa: BLE001 - fall back to the file while the loader is being written
        return ad.read_h5ad(DATA / "dlpfc" / section / f"{section}_5000genes.h5ad")


def _graph(adata):
    import histospace as hs

    try:
        hs.pp.spatial_graph(adata)
    except Exception:  # noqa: BLE001
        import squidpy as sq

        sq.gr.spatial_neighbors_grid(adata, n_neighs=6)


def _image_features(adata):
    import histospace as hs

    # the defaults: MobileNetV2, patches of three spot diameters, the weights' own normalisation (x / 127.5 - 1)
    hs.pp.image_features(adata, weights=str(WEIGHTS), device="cpu", progress_bar=False)


def _expr_pcs(adata, n_pcs=50):
    import numpy as np
    import scanpy as sc

    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    sc.pp.highly_variable_genes(b, n_top_genes=3000, flavor="seurat")
    b = b[:, b.var["highly_variable"]].copy()
    sc.pp.scale(b)
    sc.pp.pca(b, n_comps=n_pcs, random_state=0)
    return np.asarray(b.obsm["X_pca"])


def _worker(method: str, section: str) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(N_THREADS)
    import histospace as hs

    adata = _load(section)
    feat_file = CACHE / f"img_features_{section}.npy"
    t0 = time.perf_counter()
    out: dict = {}
    if method == "load_only":
        pass
    elif method == "image_features":
        _image_features(adata)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(feat_file, adata.obsm["img_features"])
        out["params"] = {
            k: v for k, v in adata.uns["img_features"]["params"].items() if isinstance(v, str | int | float)
        }
    elif method in (
        "stereomm_default",
        "stereomm_1_model",
        "stereomm_reference",
        "expr_graph",
        "stereomm_image_weight_1",
    ):
        t_feat = time.perf_counter()
        if method != "expr_graph":
            adata.obsm["img_features"] = np.load(feat_file)
        t0 -= 0  # image features are timed in their own row
        _graph(adata)
        t_fit = time.perf_counter()
        if method == "stereomm_default":
            hs.tl.stereomm(adata, progress_bar=False)
            t_fit = time.perf_counter() - t_fit
            hs.tl.domains(adata, n_clusters=K)
        elif method == "stereomm_1_model":
            hs.tl.stereomm(adata, n_models=1, progress_bar=False)
            t_fit = time.perf_counter() - t_fit
            hs.tl.domains(adata, n_clusters=K)
        elif method == "stereomm_image_weight_1":
            hs.tl.stereomm(adata, model_kwargs={"image_weight": 1.0}, progress_bar=False)
            t_fit = time.perf_counter() - t_fit
            hs.tl.domains(adata, n_clusters=K)
        elif method == "expr_graph":
            hs.tl.stereomm(adata, features_key=None, progress_bar=False)
            t_fit = time.perf_counter() - t_fit
            hs.tl.domains(adata, n_clusters=K)
        else:
            hs.tl.stereomm(adata, preset="reference", n_pcs=200, progress_bar=False)
            t_fit = time.perf_counter() - t_fit
            hs.tl.domains(adata, n_clusters=K, method="leiden", refine=False)
        out["fit_seconds"] = t_fit
        out["params"] = {
            k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in adata.uns["stereomm"]["params"].items()
        }
        out["domain_params"] = dict(adata.uns["stereomm_domain"]["params"])
        del t_feat
        labels = adata.obs["stereomm_domain"]
    elif method == "expr_only":
        adata.obsm["X_expr"] = _expr_pcs(adata)
        hs.tl.domains(adata, use_rep="X_expr", n_clusters=K, refine=False)
        labels = adata.obs["expr_domain"]
    elif method in ("pca_kmeans", "pca_smooth_kmeans"):
        import scipy.sparse as sp
        from sklearn.cluster import KMeans

        x = _expr_pcs(adata)
        if method == "pca_smooth_kmeans":
            _graph(adata)
            a = adata.obsp["spatial_connectivities"]
            a = ((a + a.T) > 0).astype(np.float32) + sp.eye(adata.n_obs, dtype=np.float32)
            a = sp.diags(1.0 / np.asarray(a.sum(1)).ravel()) @ a
            for _ in range(2):
                x = a @ x
        labels = KMeans(K, n_init=10, random_state=0).fit_predict(x).astype(str)
    else:
        raise ValueError(method)
    out["seconds"] = time.perf_counter() - t0
    if method not in ("load_only", "image_features"):
        gt = adata.obs[GT]
        try:
            out["ari"] = float(hs.metrics.ari(gt, np.asarray(labels)))
            out["nmi"] = float(hs.metrics.nmi(gt, np.asarray(labels)))
        except NotImplementedError:
            from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

            ok = gt.notna().to_numpy()
            out["ari"] = float(adjusted_rand_score(gt[ok], np.asarray(labels)[ok]))
            out["nmi"] = float(normalized_mutual_info_score(gt[ok], np.asarray(labels)[ok]))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_avg_1min"] = os.getloadavg()[0]  # machine load at the end of the run (times are wall-clock)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "SECTION"))
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--sections", nargs="*", default=SECTIONS)
    args = p.parse_args()
    if args.worker:
        res = _worker(*args.worker)
        print("RESULT " + json.dumps(res, default=str))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(N_THREADS), "MKL_NUM_THREADS": str(N_THREADS)}
    rows = []
    if (RESULTS / "domains.json").exists():  # keep rows of methods not re-run (e.g. cached image features)
        rows = json.loads((RESULTS / "domains.json").read_text()).get("rows", [])
    for section in args.sections:
        for method in args.methods:
            t = time.perf_counter()
            r = subprocess.run(
                [sys.executable, __file__, "--worker", method, section], capture_output=True, text=True, env=env
            )
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode or not line:
                res = {"error": r.stderr[-2000:]}
            else:
                res = json.loads(line[-1][7:])
            res.update(section=section, method=method, process_seconds=time.perf_counter() - t)
            rows = [x for x in rows if (x["section"], x["method"]) != (section, method)] + [res]
            print(
                f"{section} {method:20s} ARI={res.get('ari', float('nan')):.3f} NMI={res.get('nmi', float('nan')):.3f} "
                f"t={res.get('seconds', float('nan')):.1f}s fit={res.get('fit_seconds', float('nan')):.1f}s "
                f"RSS={res.get('peak_rss_mb', float('nan')):.0f}MB {'ERROR' if 'error' in res else ''}",
                flush=True,
            )
    import torch

    meta = {
        "threads": N_THREADS,
        "torch_threads": N_THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda x: (x["section"], order.get(x["method"], 99)))
    (RESULTS / "domains.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    lines = [
        "# Spatial domains on DLPFC (k = 7)",
        "",
        f"ARI/NMI against `{GT}` (unlabelled spots excluded). {N_THREADS} CPU threads (OMP_NUM_THREADS and "
        "torch.set_num_threads), seed 0, one process per method. Time: the method itself (image features in their "
        "own row); fit: `hs.tl.stereomm` alone; peak RSS: the whole process (`ru_maxrss`, includes imports and data, "
        "see 'load_only'); load: the machine's 1-min load average at the end of the run (on 2 cores, a load above 2 "
        "means other jobs shared the CPU and the times are inflated).",
        "",
        "| section | method | ARI | NMI | time (s) | fit (s) | peak RSS (MB) | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def f(k, fmt, r=r):
            return format(r[k], fmt) if k in r else "—"

        lines.append(
            f"| {r['section']} | {r['method']}{' (error)' if 'error' in r else ''} | {f('ari', '.3f')} | "
            f"{f('nmi', '.3f')} | {f('seconds', '.1f')} | {f('fit_seconds', '.1f')} | {f('peak_rss_mb', '.0f')} | "
            f"{f('load_avg_1min', '.1f')} |"
        )
    lines += ["", f"Machine: {meta}", ""]
    (RESULTS / "domains.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
