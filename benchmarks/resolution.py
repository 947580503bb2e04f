"""Resolution invariance of mclSTExp: a her2st model (C3-C6) predicting C2 at its own resolution and downsampled 2x.

Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/resolution.py [--data-dir ../shared/data] [--cache /tmp/ref.h5ad]
        [--max-epochs 30] [--n-models 5]

The model is trained on her2st C3-C6 with the validated image features (`histospace._image.MCLSTEXP_FEATURES`, the recipe the CLI runs: the shared
MobileNetV2 with TF padding, `layers='stages'`, `dihedral=True`, `context=2`; 224-px patches, i.e. 175 µm at her2st's
1.28 px/µm) over the 785-gene panel, with the default training (30 epochs, 5 models unless told otherwise). The same
model predicts three queries of C2, none of which holds features, so that `hs.tl.mclstexp_predict` makes them:

- `C2 (own resolution)`: the section as loaded (full-resolution JPEG);
- `C2 downsampled 2x`: the image averaged over 2 x 2 pixel blocks, the coordinates and `spot_diameter_fullres` halved
  (`spot_diameter_um` unchanged): the features are made at the model's µm (112-px patches resampled to 224);
- `C2 downsampled 2x, pixel patches (before)`: the same downsampled section with the features that the pixel-based
  settings gave before physical scale was recorded (224-px patches: twice the tissue); predicted from those features
  with their parameters removed, as the model could not tell them apart then.

`--no-dihedral` drops the 8 flips/rotations of the features (8 times less compute) for a shared machine; the
committed results were made with it (see `docs/benchmarks.md`).

Reported: mean per-gene Pearson r over the panel (genes constant in C2 left out), over the 50 genes with the highest
mean C2 expression, and the mean per-feature Pearson r between each query's features and the own-resolution ones.
Writes `benchmarks/results/resolution.md` and `benchmarks/results/resolution.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import anndata as ad
import numpy as np
import pandas as pd
import torch

import histospace as hs

ROOT = Path(__file__).resolve().parent
REFERENCE, QUERY = ["C3", "C4", "C5", "C6"], "C2"
GENE_LIST = "her2st_785genes_hist2st.txt"
WEIGHTS = Path("weights") / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"


def _data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("HISTOSPACE_DATA"):
        return Path(os.environ["HISTOSPACE_DATA"])
    return ROOT.parent.parent / "shared" / "data"


def feature_kwargs(data_dir: Path, dihedral: bool = True) -> dict:
    """The validated mclSTExp features (`histospace._image.mclstexp_features` with the shared MobileNetV2)."""
    from histospace._image import mclstexp_features as _mclstexp_features

    weights = data_dir / WEIGHTS
    kw = {"encoder": "mobilenet_v2", "weights": weights, "patch_size": 224, "method": "patch"}
    return kw | _mclstexp_features(weights) | {"dihedral": dihedral, "device": "cpu", "progress_bar": False}


def reference(data_dir: Path, cache: Path | None, dihedral: bool) -> tuple[ad.AnnData, float]:
    """C3-C6 with their features (seconds spent on them); read from `cache` when it exists."""
    if cache is not None and cache.exists():
        a = ad.read_h5ad(cache)
        return a, float(a.uns["bench_feature_seconds"])
    parts, t0 = [], time.perf_counter()
    for s in REFERENCE:
        a = hs.datasets.her2st(s, data_dir=data_dir, image=False)
        hs.pp.image_features(a, **feature_kwargs(data_dir, dihedral))
        a.obs["library_id"] = s
        parts.append(a)
    seconds = time.perf_counter() - t0
    ref = ad.concat(parts, join="outer", fill_value=0)
    ref.obs["library_id"] = pd.Categorical(ref.obs["library_id"])
    ref.uns["img_features"] = parts[0].uns["img_features"]  # the same settings for every section
    ref.uns["bench_feature_seconds"] = seconds
    if cache is not None:
        ref.write_h5ad(cache)
    return ref, seconds


def downsampled(a: ad.AnnData) -> ad.AnnData:
    """The section at half resolution: image averaged over 2 x 2 blocks, coordinates and spot size halved."""
    from PIL import Image

    lib = next(iter(a.uns["spatial"]))
    entry = a.uns["spatial"][lib]
    Image.MAX_IMAGE_PIXELS = None
    img = np.asarray(Image.open(entry["metadata"]["source_image_path"]).convert("RGB"))
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    small = img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3), dtype=np.float32)
    out = a.copy()
    out.obsm["spatial"] = a.obsm["spatial"] / 2.0
    meta = {k: v for k, v in entry["metadata"].items() if k not in ("source_image_path", "pixels_per_um")}
    sf = entry["scalefactors"]
    out.uns["spatial"] = {
        lib: {
            "images": {"hires": np.rint(small).astype(np.uint8)},
            "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": sf["spot_diameter_fullres"] / 2.0},
            "metadata": meta,
        }
    }
    return out


def observed(a: ad.AnnData, genes: list[str]) -> np.ndarray:
    """`ln(1 + 1e4 x / s)` over the panel, `s` the spot's panel total (the model's `normalize='log1p_cp10k'`)."""
    x = a[:, genes].X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    return np.log1p(1e4 * x / np.maximum(x.sum(1, keepdims=True), 1e-12))


def mean_pcc(y: np.ndarray, p: np.ndarray, top: np.ndarray | None = None) -> float:
    r = np.asarray(hs.metrics.pearson_per_gene(y, p), dtype=np.float64)
    if top is not None:
        r = r[top]
    return float(np.nanmean(r))


def feature_r(a: np.ndarray, b: np.ndarray) -> float:
    keep = (a.std(0) > 0) & (b.std(0) > 0)
    a, b = a[:, keep] - a[:, keep].mean(0), b[:, keep] - b[:, keep].mean(0)
    return float(np.mean((a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache", default=None, help="h5ad caching the reference with its features (read when it exists)")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--n-models", type=int, default=5)
    p.add_argument("--no-dihedral", action="store_true", help="without the 8 flips/rotations (8 times less compute)")
    p.add_argument("--out", default=str(ROOT / "results"), help="folder of resolution.md and .json")
    args = p.parse_args()
    data_dir = _data_dir(args.data_dir)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    dihedral = not args.no_dihedral
    ref, ref_seconds = reference(data_dir, Path(args.cache) if args.cache else None, dihedral)
    panel = [g.strip() for g in open(data_dir / "her2st" / "gene_lists" / GENE_LIST) if g.strip()]
    c2 = hs.datasets.her2st(QUERY, data_dir=data_dir, image=False)
    genes = [g for g in panel if g in ref.var_names and g in c2.var_names]
    t0 = time.perf_counter()
    model = hs.tl.mclstexp_train(
        ref, genes=genes, library_key="library_id", max_epochs=args.max_epochs, n_models=args.n_models,
        device="cpu", progress_bar=False,
    )  # fmt: skip
    train_seconds = time.perf_counter() - t0
    y = observed(c2, model.genes)
    top = np.argsort(-y.mean(0))[:50]

    half = downsampled(c2)
    before = half.copy()
    hs.pp.image_features(before, **feature_kwargs(data_dir, dihedral))  # 224 px at half resolution: 350 µm of tissue
    del before.uns["img_features"]  # as before physical scale was recorded: nothing told the model apart
    queries = {
        "C2 (own resolution)": c2,
        "C2 downsampled 2x": half,
        "C2 downsampled 2x, pixel patches (before)": before,
    }
    rows, feats = [], {}
    for name, q in queries.items():
        t0 = time.perf_counter()
        hs.tl.mclstexp_predict(q, model=model, progress_bar=False)
        seconds = time.perf_counter() - t0
        feats[name] = q.obsm["img_features"]
        params = q.uns.get("img_features", {}).get("params", {})
        entry = next(iter(q.uns["spatial"].values()))
        um_per_px = float(entry["metadata"]["spot_diameter_um"]) / float(entry["scalefactors"]["spot_diameter_fullres"])
        patch_px = float(params.get("patch_size_px", 224.0))  # `before`: the pixel setting, its params removed
        rows.append({
            "query": name,
            "um_per_px": um_per_px,
            "patch_px": patch_px,
            "patch_um": patch_px * um_per_px,
            "pcc_all": mean_pcc(y, q.obsm["mclstexp"].to_numpy()),
            "pcc_top50": mean_pcc(y, q.obsm["mclstexp"].to_numpy(), top),
            "features_r_vs_own": None,
            "predict_seconds": seconds,
        })  # fmt: skip
    own = feats["C2 (own resolution)"]
    for r in rows:
        r["features_r_vs_own"] = feature_r(own, feats[r["query"]])
    base = rows[0]["pcc_all"]
    for r in rows:
        r["delta_pcc_all"] = r["pcc_all"] - base

    load = os.getloadavg()
    meta = {
        "reference": REFERENCE, "query": QUERY, "genes": len(model.genes), "n_reference_spots": int(ref.n_obs),
        "n_query_spots": int(c2.n_obs), "max_epochs": args.max_epochs, "n_models": args.n_models,
        "feature_settings": model.feature_settings, "reference_feature_seconds": ref_seconds,
        "train_seconds": train_seconds, "threads": int(os.environ["OMP_NUM_THREADS"]), "load_avg": load,
        "machine": platform.platform(), "torch": torch.__version__, "histospace": hs.__version__,
    }  # fmt: skip
    table = pd.DataFrame(rows)
    fmt = table.to_string(index=False, float_format=lambda v: f"{v:.3f}")
    print(fmt)
    out = Path(args.out) / "resolution"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    lines = [
        "# Resolution invariance of mclSTExp (her2st C3-C6 -> C2)",
        "",
        f"Model: {len(model.genes)} panel genes, {ref.n_obs} reference spots (C3-C6), {args.max_epochs} epochs, "
        f"{args.n_models} model(s); features: {json.dumps({k: v for k, v in model.feature_settings.items() if k not in ('mean', 'std')})}.",
        f"CPU, {meta['threads']} torch thread(s), shared machine (load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} "
        f"at the end); reference features {ref_seconds:.0f} s, training {train_seconds:.0f} s.",
        "",
        "| query | µm/px | patch px | patch µm | mean PCC (all genes) | Δ vs own | mean PCC (top 50) | features r vs own | predict s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['query']} | {r['um_per_px']:.3f} | {r['patch_px']:.0f} | {r['patch_um']:.0f} | {r['pcc_all']:.3f} | "
            f"{r['delta_pcc_all']:+.4f} | {r['pcc_top50']:.3f} | {r['features_r_vs_own']:.3f} | {r['predict_seconds']:.0f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
