"""Domain validation protocol: every labelled section we have, several seeds, choices made with a section held out.

Sections (k = the number of reference labels of the section):

- `151673`, `151674`: DLPFC Visium (`hs.datasets.dlpfc`, `layer_guess_reordered`), with the image features the
  domain benchmark computes (`hs.pp.image_features` defaults, the shared MobileNetV2 weights), cached in `--cache`;
- `S01`, `S02`: Stereo-seq bin20 Drosophila embryo (`hs.datasets.stereoseq_embryo`, `annotation`), no image;
- `sim_visium`, `sim_visium_hd`, `sim_stereoseq`: `hs.datasets.simulate_tissue` (7 domains, 300 genes, layers or blobs)
  counted at the platforms' geometry: 55 µm spots on the 100 µm hexagonal Visium grid, 8 µm Visium HD bins,
  10 µm Stereo-seq bin20 bins of a blob layout (sparse: 0.4 molecules per µm²); no image;
- robustness sections (scored, never used for a choice): `151673_500genes` (500 genes drawn at random, fixed
  seed), `151673_crop500` (a window of about 500 spots of 151673), `sim_unbalanced` (domains of 1-45 % of the
  spots).

Settings: `pca_kmeans` (scanpy log-CP10k, Seurat HVG 2000, z-score, 20 PCs, KMeans with 10 restarts);
`banksy_gmm` (the same z-scored HVG concatenated with their mean over the spatial neighbours, BANKSY-style with
lambda = 0.8, PCA 20, `hs.tl.domains` defaults); `default` (`hs.pp.spatial_graph`, `hs.tl.stereomm` defaults with the
image where the section has one, `hs.tl.domains` defaults: what `histospace domains` runs). Ablations that retrain
(`no_image`; `img_patch`: the image features of the 3-diameter patch by the patch method, where the default's
`method='auto'` takes the dense method on Visium; `img_1diam`: a patch of one spot diameter; `hvg1000`, `pcs20`,
`pcs100`, `graph_weight_1`: the usual GCN instead of `graph_weight='auto'`;
`models_10`: a seed ensemble of 10; `epochs_100`: 100 epochs instead of 300; `latent_8`: 8 latent dimensions
instead of 32; `kl_0.1`: KL weight 0.1 instead of 1 / n_spots; `contrastive_0.1`, `contrastive_1`: GraphST's
contrastive term (Deep Graph Infomax) added to the loss with that weight, `StereoMM(contrastive_weight=)`;
`graph_weight_0.5`: neighbours at half weight in the graph convolutions, run where `'auto'` chooses 1)
change one `hs.tl.stereomm` argument; ablations of
the clustering (`one_model`, `vote`, `best_of_10`, `kmeans`, `no_refine`, `refine2`: two refinement passes, `bic`,
`cluster_pcs20`: the mixture on 20 PCs of the latents instead of 10) reuse the latent of `default` at the same seed
(`one_model` clusters its first block: the model trained from seed `s`, which is what `n_models=1` trains).
Seed `s` goes to every random step (PCA, KMeans, `hs.tl.stereomm`, `hs.tl.domains`) together.

Held-out choice: for each family of settings (ordered simplest first) and each section, the family's settings are
ranked by their mean ARI over the *other* sections; every setting whose mean is within one sd (the best setting's
mean seed sd on those sections) of the best is admissible and the simplest admissible one is chosen; the held-out
section is then scored with it.

Resumable: each run is appended to `results/domain_protocol.json` as it ends and runs already there are skipped;
the page is rewritten after every run, so an interrupted run keeps what it did. Several processes (e.g. one per
section) can run at once: each write re-reads the JSON under a file lock and keeps the runs the others added.

Usage: `OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/domain_protocol.py --settings default pca_kmeans
--sections 151673 S01 --seeds 5` (`--report` only rewrites the page).
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

N_THREADS = int(os.environ.get("OMP_NUM_THREADS", "1"))
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = Path(os.environ.get("HISTOSPACE_DATA", HERE.parent.parent / "shared" / "data"))
MAIN = ["151673", "151674", "S01", "S02", "sim_visium", "sim_visium_hd", "sim_stereoseq"]
ROBUST = ["151673_500genes", "151673_crop500", "sim_unbalanced"]
IMAGE = {"151673", "151674", "151673_500genes", "151673_crop500"}
#: image-feature variants (`hs.pp.image_features` arguments beside the default's; spot diameters of the patch side).
#: The default is 3 diameters with `method='auto'`, which takes the dense method on Visium (the patches overlap)
IMAGE_VARIANTS = {"img_1diam": {"diameters": 1, "method": "patch"}, "img_patch": {"diameters": 3, "method": "patch"}}
#: settings that train their own models (`hs.tl.stereomm` arguments)
TRAIN = {
    "default": {},
    "no_image": {"features_key": None},
    "hvg1000": {"model_kwargs": {"n_top_genes": 1000}},
    "pcs20": {"n_pcs": 20},
    "pcs100": {"n_pcs": 100},
    "graph_weight_1": {"model_kwargs": {"graph_weight": 1}},
    "graph_weight_0.5": {"model_kwargs": {"graph_weight": 0.5}},
    "img_1diam": {},
    "img_patch": {},
    "models_10": {"n_models": 10},
    "epochs_100": {"max_epochs": 100},
    "latent_8": {"n_latent": 8},
    "kl_0.1": {"train_kwargs": {"kl_weight": 0.1}},
    "contrastive_0.1": {"model_kwargs": {"contrastive_weight": 0.1}},
    "contrastive_1": {"model_kwargs": {"contrastive_weight": 1.0}},
}
#: clustering variants on the latent of `default` (`hs.tl.domains` arguments)
CLUSTER = {
    "one_model": {"n_models": 1},
    "vote": {"ensemble": "vote"},
    "best_of_10": {"consensus": False, "n_init": 10},
    "kmeans": {"method": "kmeans"},
    "no_refine": {"refine": False},
    "refine2": {"refine": 2},
    "cluster_pcs20": {"n_pcs": 20},
    "bic": {"n_clusters": None},
}
BASELINES = ["pca_kmeans", "banksy_gmm"]
SETTINGS = BASELINES + list(TRAIN) + list(CLUSTER)
#: families of the held-out choice, simplest first
FAMILIES = {
    "method": ["pca_kmeans", "banksy_gmm", "default"],
    "image": ["no_image", "default", "img_patch", "img_1diam"],
    "ensemble": ["one_model", "default", "models_10"],
    "clustering": ["kmeans", "best_of_10", "default", "vote"],
    "refine": ["no_refine", "default", "refine2"],
    "cluster_width": ["default", "cluster_pcs20"],
    "hvg": ["hvg1000", "default"],
    "pca_width": ["pcs20", "default", "pcs100"],
    "graph_weight": ["graph_weight_1", "default"],
    "graph_weight_half": ["default", "graph_weight_0.5"],
    "training": ["epochs_100", "latent_8", "default", "kl_0.1"],
    "objective": ["default", "contrastive_0.1", "contrastive_1"],
}


# ------------------------------------------------------------------------------------------------ sections
def _simulated(name: str, cache: Path):
    """A simulated section at a platform's geometry, cached as .h5ad (labels in `obs['domain']`)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    import histospace as hs

    f = cache / f"{name}.h5ad"
    if f.exists():
        return ad.read_h5ad(f)
    if name == "sim_visium":  # 55 µm spots, 100 µm hex pitch, 3.2 mm square
        t = hs.datasets.simulate_tissue(
            width_um=3200, height_um=3200, n_domains=7, n_genes=300, density=0.6, random_state=1
        )
        pitch = 100.0
        rows = np.arange(int(3200 / (pitch * np.sqrt(3) / 2)))
        rr, cc = np.meshgrid(rows, np.arange(int(3200 / pitch)), indexing="ij")
        cols = 2 * cc + (rr % 2)
        x, y = (cols * pitch / 2 + pitch / 2).ravel(), (rr * pitch * np.sqrt(3) / 2 + pitch / 2).ravel()
        keep = t.in_tissue(x, y)
        x, y, rows_, cols_ = x[keep], y[keep], rr.ravel()[keep], cols.ravel()[keep]
        from scipy.spatial import cKDTree

        mx, my, mg = t.molecules(0.0, 0.0, 3200.0, 3200.0)
        d, i = cKDTree(np.column_stack([x, y])).query(np.column_stack([mx, my]), distance_upper_bound=27.5)
        ok = np.isfinite(d)
        counts = sp.coo_matrix((np.ones(ok.sum(), np.float32), (i[ok], mg[ok])), shape=(x.size, t.n_genes)).tocsr()
        obs = pd.DataFrame({"array_row": rows_, "array_col": cols_})
    else:
        bin_um, side, density, layout, seed = {
            "sim_visium_hd": (8.0, 480.0, 1.5, "layers", 2),
            "sim_stereoseq": (10.0, 600.0, 0.4, "blobs", 3),
        }.get(name, (10.0, 600.0, 0.4, "layers", 4))
        t = hs.datasets.simulate_tissue(
            width_um=side, height_um=side, n_domains=7, n_genes=300, density=density, layout=layout, random_state=seed
        )
        if name == "sim_unbalanced":  # bands of very different widths: about 1 % to 45 % of the spots
            w = np.array([0.02, 0.04, 0.08, 0.12, 0.2, 0.3, 0.7])
            t._band_edges = (0.06 + 0.88 * np.cumsum(w) / w.sum())[:-1]
        counts = sp.vstack([m for _, _, m in t.bin_counts(bin_um)], format="csr").astype(np.float32)
        n = int(np.ceil(side / bin_um))
        rr, cc = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        x, y = (cc + 0.5) * bin_um, (rr + 0.5) * bin_um
        keep = t.in_tissue(x, y) & (np.asarray(counts.sum(1)).ravel() > 0)
        counts, x, y = counts[keep], x[keep], y[keep]
        obs = pd.DataFrame({"array_row": rr[keep], "array_col": cc[keep]})
    obs["domain"] = pd.Categorical(t.domain_at(x, y).astype(str))
    obs.index = [f"s{i}" for i in range(len(obs))]
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=t.gene_names))
    adata.obsm["spatial"] = np.column_stack([x, y])
    adata = adata[adata.obs["domain"] != "-1"].copy()
    adata.obs["domain"] = adata.obs["domain"].cat.remove_unused_categories()
    cache.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(f)
    return adata


def _image_features(adata, section: str, cache: Path, variant: str | None = None) -> None:
    """`hs.pp.image_features` with its defaults (as benchmarks/domains.py) or a variant's, cached per section."""
    import histospace as hs

    f = cache / (f"img_features_{section}.npy" if variant is None else f"img_features_{section}_{variant}.npy")
    if not f.exists():
        weights = DATA / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
        kw: dict = {}
        if variant is not None:
            kw = dict(IMAGE_VARIANTS[variant])
            lib = next(iter(adata.uns["spatial"]))
            kw["patch_size"] = kw.pop("diameters") * adata.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"]
        t0 = time.perf_counter()
        b = hs.pp.image_features(adata, weights=str(weights), device="cpu", progress_bar=False, copy=True, **kw)
        print(f"image features {section} {variant or 'default'}: {time.perf_counter() - t0:.1f} s", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        np.save(f, b.obsm["img_features"])
    adata.obsm["img_features"] = np.load(f)


def load_section(section: str, cache: Path):
    """`(adata with graph (and image features), label key)`."""
    import histospace as hs

    if section.startswith("15"):
        sid = section[:6]
        adata = hs.datasets.dlpfc(sid, data_dir=DATA)
        for v in IMAGE_VARIANTS:  # kept beside the default's, for the image ablations
            _image_features(adata, sid, cache, v)
            adata.obsm[f"img_features_{v}"] = adata.obsm.pop("img_features")
        _image_features(adata, sid, cache)
        gt = "layer_guess_reordered"
        if section.endswith("_500genes"):
            genes = np.sort(np.random.default_rng(0).choice(adata.n_vars, 500, replace=False))
            adata = adata[:, genes].copy()
        elif section.endswith("_crop500"):  # the spots of a window across the layers, about 500
            xy = adata.obsm["spatial"]
            c = np.median(xy, axis=0)
            d = np.max(np.abs(xy - c), axis=1)
            adata = adata[d <= np.sort(d)[499]].copy()
        adata = adata[adata.obs[gt].notna().to_numpy()].copy()
        adata.obs[gt] = adata.obs[gt].cat.remove_unused_categories()
        hs.pp.spatial_graph(adata)
    elif section.startswith("S0"):
        adata = hs.datasets.stereoseq_embryo(section, data_dir=DATA)
        gt = "annotation"
        hs.pp.spatial_graph(adata)
    else:
        adata = _simulated(section, cache)
        gt = "domain"
        if section == "sim_visium":
            hs.pp.spatial_graph(adata, coord_type="grid", n_neighs=6)
        else:
            hs.pp.spatial_graph(adata, bins=True, microns_per_unit=1.0)
    return adata, gt


# ------------------------------------------------------------------------------------------------ methods
def _zhvg(adata, seed: int):
    import scanpy as sc

    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    sc.pp.highly_variable_genes(b, n_top_genes=min(2000, b.n_vars - 1), flavor="seurat")
    b = b[:, b.var["highly_variable"]].copy()
    sc.pp.scale(b)
    return np.asarray(b.X)


def _pca(x, n, seed):
    from sklearn.decomposition import PCA

    return PCA(n_components=min(n, x.shape[1] - 1), random_state=seed).fit_transform(x)


def run_one(setting: str, adata, gt: str, k: int, seed: int, section: str, cache: Path) -> dict:
    """Labels of one setting at one seed; returns the row's extra fields (labels in `adata.obs['_pred']`)."""
    import scipy.sparse as sp
    from sklearn.cluster import KMeans

    import histospace as hs

    info: dict = {}
    if setting == "pca_kmeans":
        x = _pca(_zhvg(adata, seed), 20, seed)
        adata.obs["_pred"] = KMeans(k, n_init=10, random_state=seed).fit_predict(x).astype(str)
        return info
    if setting == "banksy_gmm":
        z = _zhvg(adata, seed)
        a = adata.obsp["spatial_connectivities"]
        a = ((a + a.T) > 0).astype(np.float32)
        deg = np.maximum(np.asarray(a.sum(1)).ravel(), 1)
        nb = sp.diags(1.0 / deg) @ a @ z
        lam = 0.8
        adata.obsm["X_banksy"] = _pca(np.hstack([np.sqrt(1 - lam) * z, np.sqrt(lam) * nb]), 20, seed)
        hs.tl.domains(adata, use_rep="X_banksy", n_clusters=k, random_state=seed, key_added="_pred")
        return info
    lat_file = cache / "latents" / f"{section}_{'default' if setting in CLUSTER else setting}_{seed}.npy"
    dkw: dict = {"n_clusters": k, "random_state": seed, "key_added": "_pred"}
    if setting in CLUSTER:
        if not lat_file.exists():
            raise FileNotFoundError(f"run `default` at seed {seed} on {section} first ({lat_file})")
        lat = np.load(lat_file)
        adata.obsm["X_stereomm"] = lat
        adata.uns["stereomm"] = {"params": {"n_models": 3, "n_latent": lat.shape[1] // 3}}
        dkw |= CLUSTER[setting]
        if setting == "one_model":
            adata.obsm["X_stereomm"] = lat[:, : lat.shape[1] // 3]
        hs.tl.domains(adata, **dkw)
        info["k_found"] = int(adata.uns["_pred"]["params"]["n_clusters"])
        if "n_clusters_chosen" in adata.uns["_pred"]["params"]:
            info["k_chosen"] = int(adata.uns["_pred"]["params"]["n_clusters_chosen"])
        return info
    kw = {"random_state": seed, "progress_bar": False} | TRAIN[setting]
    if setting in IMAGE_VARIANTS:
        adata.obsm["img_features"] = adata.obsm[f"img_features_{setting}"]
    if section not in IMAGE:
        kw["features_key"] = None
    hs.tl.stereomm(adata, **kw)
    lat_file.parent.mkdir(parents=True, exist_ok=True)
    np.save(lat_file, adata.obsm["X_stereomm"])
    hs.tl.domains(adata, **dkw)
    p = adata.uns["stereomm"]["params"]
    info["graph_weight"] = p.get("graph_weight")
    return info


# ------------------------------------------------------------------------------------------------ report
def _stats(rows, section, setting):
    a = np.array([r["ari"] for r in rows if r["section"] == section and r["setting"] == setting])
    if a.size == 0:
        return None
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size)


def _resolve(setting: str, section: str) -> str:
    """On a section without image, `no_image` is the same run as `default`."""
    return "default" if setting == "no_image" and section not in IMAGE else setting


def held_out(rows, min_seeds: int = 2) -> list[dict]:
    """For each family and each main section: the choice made on the other sections and the held-out score."""
    out = []
    for fam, cands in FAMILIES.items():
        cands = [c for c in cands if any(r["setting"] == c for r in rows) or c == "no_image"]  # those run
        if len(cands) < 2:
            continue
        secs = [
            s
            for s in MAIN
            if (fam != "image" or s in IMAGE)  # with or without image: only where there is one
            and all((st := _stats(rows, s, _resolve(c, s))) is not None and st[2] >= min_seeds for c in cands)
        ]
        if len(secs) < 2:
            continue
        for s in secs:
            others = [o for o in secs if o != s]
            means = {c: np.mean([_stats(rows, o, _resolve(c, o))[0] for o in others]) for c in cands}
            best = max(means, key=means.get)
            noise = float(np.mean([_stats(rows, o, _resolve(best, o))[1] for o in others]))
            chosen = next(c for c in cands if means[c] >= means[best] - noise)
            m, sd, n = _stats(rows, s, _resolve(chosen, s))
            out.append(
                {"family": fam, "held_out": s, "chosen": chosen, "best_on_others": best, "noise": noise}
                | {"others_mean_chosen": float(means[chosen]), "held_out_mean": m, "held_out_sd": sd, "n": n}
                | {
                    "held_out_default": _stats(rows, s, "default")[0],
                    "held_out_pca_kmeans": _stats(rows, s, "pca_kmeans")[0],
                }
            )
    return out


def report(rows: list[dict], meta: dict) -> str:
    sections = [s for s in MAIN + ROBUST if any(r["section"] == s for r in rows)]
    settings = [st for st in SETTINGS if any(r["setting"] == st for r in rows)]
    lines = [
        "# Domain validation protocol (held-out sections)",
        "",
        "ARI against each section's labels, k = its number of labels; mean ± sd over seeds (n), model and "
        "clustering seed together. The protocol and the settings are described in `benchmarks/domain_protocol.py` "
        "and in docs/benchmarks.md, 'Domain validation protocol'. Robustness sections are never used for a "
        "choice. `no_image` on a section without image is `default` (the same run). Empty: not run.",
        "",
        "| setting | " + " | ".join(f"{s} (robustness)" if s in ROBUST else s for s in sections) + " |",
        "|---|" + "---|" * len(sections),
    ]
    for st in settings:
        cells = []
        for s in sections:
            v = _stats(rows, s, _resolve(st, s))
            cells.append("" if v is None else f"{v[0]:.3f} ± {v[1]:.3f} ({v[2]})")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    k_true = {r["section"]: r["k"] for r in rows}
    bic = {}
    for r in rows:
        if r["setting"] == "bic":
            bic.setdefault(r["section"], []).append(r.get("k_chosen", r["k_found"]))
    if bic:
        lines += [
            "",
            "`n_clusters=None` (BIC over 2-15 on the default latent), the number it chose per seed "
            "(`uns[key]['params']['n_clusters_chosen']`; true k in brackets): "
            + "; ".join(f"{s}: {v} ({k_true[s]})" for s, v in bic.items()),
        ]
    ho = held_out(rows)
    if ho:
        lines += [
            "",
            "## Held-out choice",
            "",
            "Per family (settings simplest first) and held-out section: the setting chosen on the other sections "
            "(simplest within one sd of the best mean there), and the held-out section's ARI with it.",
            "",
            "| family | held out | best on others | chosen | held-out ARI (chosen) | default | PCA + k-means |",
            "|---|---|---|---|---|---|---|",
        ]
        for h in ho:
            lines.append(
                f"| {h['family']} | {h['held_out']} | {h['best_on_others']} | {h['chosen']} | "
                f"{h['held_out_mean']:.3f} ± {h['held_out_sd']:.3f} ({h['n']}) | {h['held_out_default']:.3f} | "
                f"{h['held_out_pca_kmeans']:.3f} |"
            )
    method = [h for h in ho if h["family"] == "method"]
    if method:
        lines += [
            "",
            "Issue #23's figures on the held-out sections (family `method`, the setting chosen without them):",
        ]
        for h in method:
            gain = h["held_out_mean"] - h["held_out_pca_kmeans"]
            lines.append(
                f"- {h['held_out']}: {h['chosen']} {h['held_out_mean']:.3f} (sd {h['held_out_sd']:.3f}; "
                f"PCA + k-means {h['held_out_pca_kmeans']:.3f}, gain {gain:+.3f})"
            )
    secs = [r for r in rows if r["setting"] == "default"]
    if secs:
        lines += ["", "Mean time per run (s; 1-min load average at the end of the run, shared 2-core machine):"]
        for st in settings:
            t = [(r["seconds"], r["load"]) for r in rows if r["setting"] == st]
            if t:
                lines[-1] += f" {st} {np.mean([a for a, _ in t]):.1f} (load {np.mean([b for _, b in t]):.1f});"
    lines += ["", f"Runs: {len(rows)} (per run in domain_protocol.json). Machine: {meta}", ""]
    return "\n".join(lines)


def _stored_rows() -> list[dict]:
    """The runs in `results/domain_protocol.json` (none when it does not exist)."""
    f = RESULTS / "domain_protocol.json"
    return json.loads(f.read_text())["rows"] if f.exists() else []


def _merged(rows) -> list[dict]:
    """`rows` and the runs another process appended to the JSON meanwhile (keyed by section, setting, seed)."""
    seen = {(r["section"], r["setting"], r["seed"]) for r in rows}
    return [r for r in _stored_rows() if (r["section"], r["setting"], r["seed"]) not in seen] + rows


def _write(rows, meta) -> str:
    import fcntl

    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "domain_protocol.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows[:] = _merged(rows)
        return _write_locked(rows, meta)


def _write_locked(rows, meta) -> str:
    md = report(rows, meta)
    tmp = RESULTS / "domain_protocol.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "held_out": held_out(rows), "rows": rows}, indent=1))
    tmp.replace(RESULTS / "domain_protocol.json")
    (RESULTS / "domain_protocol.md").write_text(md)
    return md


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", nargs="*", default=MAIN)
    p.add_argument("--settings", nargs="*", default=["default", "pca_kmeans", "banksy_gmm"])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--cache", default="/tmp/dom")
    p.add_argument("--report", action="store_true", help="only rewrite the page from the JSON")
    args = p.parse_args()
    for st in args.settings:
        if st not in SETTINGS:
            p.error(f"unknown setting {st!r}; one of {SETTINGS}")
    rows = _stored_rows()
    import torch

    torch.set_num_threads(N_THREADS)
    meta = {
        "threads": N_THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "updated_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if args.report:
        print(_write(rows, meta))
        return
    import histospace as hs

    warnings.filterwarnings("ignore", category=FutureWarning)
    cache = Path(args.cache)
    done = {(r["section"], r["setting"], r["seed"]) for r in rows}
    for section in args.sections:
        todo = [
            (st, s)
            for s in range(args.seeds)
            for st in args.settings
            if (section, st, s) not in done and _resolve(st, section) == st
        ]
        if not todo:
            continue
        base, gt = load_section(section, cache)
        k = int(base.obs[gt].nunique())
        for st, seed in sorted(todo, key=lambda t: (t[0] in CLUSTER, t[1])):  # latents first
            adata = base.copy()
            t0 = time.perf_counter()
            info = run_one(st, adata, gt, k, seed, section, cache)
            row = {"section": section, "setting": st, "seed": seed, "k": k, "n_obs": int(adata.n_obs)}
            row |= {"ari": hs.metrics.ari(adata.obs[gt], adata.obs["_pred"])}
            row |= {"nmi": hs.metrics.nmi(adata.obs[gt], adata.obs["_pred"])}
            row |= {"seconds": time.perf_counter() - t0, "load": os.getloadavg()[0], **info}
            rows.append(row)
            meta["updated_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
            _write(rows, meta)
            print(
                f"{section} {st:12s} seed {seed}: ARI {row['ari']:.3f} ({row['seconds']:.1f} s, load {row['load']:.2f})"
                + (f" k={info['k_found']}" if "k_found" in info else ""),
                flush=True,
            )
    print(_write(rows, meta))


if __name__ == "__main__":
    main()
