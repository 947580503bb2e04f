"""Dense image features (`histospace._image.features._dense.dense_features`) against the patch method (`hs.pp.image_features`).

Run from the repository root (2 CPU threads on a quiet machine):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dense_features.py [--data-dir ../shared/data] [--quick]

Data: her2st section C2 (187 spots, full-resolution JPEG of about 9300 x 9900 px), MobileNetV2 from the shared
ImageNet file (`weights/mobilenet_v2_imagenet_coral`, input `x / 127.5 - 1`, i.e. `mean = std = 0.5`) or random
initialisation, 224-px patches resized to 224 (scale 1). Both methods get the same encoder with BatchNorm folded and
channels-last weights (what `image_features` does on a CPU).

Parts:
1. `agreement`: per-spot Pearson correlation between the dense and the patch features of the 187 spots (median and
   10th percentile), for ImageNet and random weights, `layers='last'` and `'stages'`, torchvision padding (and the
   TF 'SAME' padding the ImageNet file was trained with).
2. `halo`: the dense features with a smaller halo than the exact receptive-field one (faster tiles) against the exact
   ones: per-spot correlation and the largest relative difference.
3. `bins`: time against the number of bins (square grid over the tissue's bounding box, 10^3 .. 10^5 bins) for the
   dense engine, and for the patch method up to `--max-patch-bins` (beyond that its time is extrapolated from its
   measured time per patch: the patch method's cost is linear in the number of patches).
4. `area`: time against the area covered by bins (fixed pitch, squares of 1/16, 1/4 and all of the bounding box).
5. `breakeven`: both methods timed on one 1500-px square of the tissue at bin pitches from 448 to 64 px, with the
   pixel ratio that `choose_method` uses (`dense_cost_ratio`): where the measured time ratio crosses 1 gives the
   break-even of `method='auto'` (`AUTO_BREAK_EVEN`).
6. `expression`: does the difference matter downstream? Ridge regression (`RidgeCV`, features standardised on the
   training sections) from patch or dense features to `ln(1 + 1e4 x / s)` of the 785-gene her2st panel, leave one
   of C2-C6 out; mean per-gene Pearson r over the panel (`pcc_all`) and over the 50 genes with the highest mean
   expression in the held-out section (`pcc_top`), as the ridge baseline of `benchmarks/expression.py`.

Writes `benchmarks/results/dense_features.{md,json}`. Timings on a shared machine are pessimistic; the load average
is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import platform
import resource
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

import histospace as hs
from histospace._image import build_encoder, fuse_conv_bn, open_image
from histospace._image.features import _dense
from histospace._image.features._dense import dense_cost_ratio, dense_features

ROOT = Path(__file__).resolve().parent
WEIGHTS = Path("weights") / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
PATCH = 224


def _data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("HISTOSPACE_DATA"):
        return Path(os.environ["HISTOSPACE_DATA"])
    return ROOT.parent.parent / "shared" / "data"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def encoder(weights, *, layers="last", tf_padding=False, device="cpu"):
    enc, _, _ = build_encoder("mobilenet_v2", weights, 0.5, 0.5, layers=layers, tf_padding=tf_padding)
    fuse_conv_bn(enc.backbone)
    enc = enc.to(device)
    if device == "cpu":
        enc = enc.to(memory_format=torch.channels_last)
    return enc


def patch_features(img, centres, weights, *, layers="last", tf_padding=False, device="cpu", batch_size=32):
    a = ad.AnnData(obs=pd.DataFrame(index=[f"b{i}" for i in range(len(centres))]))
    a.obsm["spatial"] = np.asarray(centres, dtype=np.float64)
    t0 = time.perf_counter()
    hs.pp.image_features(
        a,
        img=img,
        encoder="mobilenet_v2",
        weights=weights,
        mean=0.5,
        std=0.5,
        layers=layers,
        tf_padding=tf_padding,
        patch_size=PATCH,
        method="patch",  # never 'auto': it switches to the dense engine on dense bins
        batch_size=batch_size,
        device=device,
        progress_bar=False,
    )
    return a.obsm["img_features"], time.perf_counter() - t0


def timed_dense(src, centres, enc, **kw):
    t0 = time.perf_counter()
    f = dense_features(src, centres, PATCH, enc, progress_bar=False, **kw)
    return f, time.perf_counter() - t0, dict(_dense._STATS)


def per_spot_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def grid_in(box, n: int) -> np.ndarray:
    """About `n` bin centres on a square grid filling `box = (x0, y0, x1, y1)`."""
    x0, y0, x1, y1 = box
    pitch = np.sqrt((x1 - x0) * (y1 - y0) / n)
    xs = np.arange(x0 + pitch / 2, x1, pitch)
    ys = np.arange(y0 + pitch / 2, y1, pitch)
    gx, gy = np.meshgrid(xs, ys)
    return np.column_stack([gx.ravel(), gy.ravel()])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-patch-bins", type=int, default=None, help="largest bin count timed for the patch method")
    ap.add_argument("--parts", default="agreement,halo,bins,area,breakeven,expression")
    ap.add_argument("--out", default=str(ROOT / "results"), help="folder of dense_features.md and .json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    parts = set(args.parts.split(","))
    data_dir = _data_dir(args.data_dir)
    weights = data_dir / WEIGHTS
    dev = args.device

    adata = hs.datasets.her2st("C2", data_dir=data_dir, image=False)
    lib = next(iter(adata.uns["spatial"]))
    path = adata.uns["spatial"][lib]["metadata"]["source_image_path"]
    t0 = time.perf_counter()
    src = open_image(path).load()
    t_decode = time.perf_counter() - t0
    img = src.arr if src.axes == "YXS" else np.ascontiguousarray(np.moveaxis(np.asarray(src.arr), 0, -1))
    src = open_image(img)
    spots = adata.obsm["spatial"].astype(np.float64)
    lo, hi = spots.min(axis=0), spots.max(axis=0)
    box = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
    res = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_avg_start": list(os.getloadavg()),
            "device": dev,
            "parts": sorted(parts),
        },
        "image": {"path": str(path), "shape": list(src.shape), "decode_s": t_decode, "spot_box": list(box)},
    }
    print(f"C2: {src.shape[1]} x {src.shape[0]} px, {len(spots)} spots, decoded in {t_decode:.1f} s")

    # ---- 1. agreement --------------------------------------------------------------------------------------------
    if "agreement" in parts:
        rows = []
        configs = [
            ("imagenet", "last", False),
            ("imagenet", "stages", False),
            ("random", "last", False),
            ("random", "stages", False),
            ("imagenet", "last", True),
            ("imagenet", "stages", True),
        ]
        if args.quick:
            configs = configs[:1] + configs[2:3]
        for wname, layers, tf in configs:
            w = weights if wname == "imagenet" else None
            patch, t_patch = patch_features(img, spots, w, layers=layers, tf_padding=tf, device=dev)
            dense, t_dense, st = timed_dense(
                src, spots, encoder(w, layers=layers, tf_padding=tf, device=dev), device=dev
            )
            r = per_spot_r(dense.astype(np.float64), patch.astype(np.float64))
            row = {
                "weights": wname,
                "layers": layers,
                "tf_padding": tf,
                "d": int(dense.shape[1]),
                "median_r": float(np.median(r)),
                "p10_r": float(np.percentile(r, 10)),
                "min_r": float(r.min()),
                "patch_s": t_patch,
                "dense_s": t_dense,
                "dense_tiles": int(st["n_tiles"][0]),
                "halo": int(st["halo"]),
            }
            rows.append(row)
            print("agreement", row)
        res["agreement"] = rows

    # ---- 2. halo ---------------------------------------------------------------------------------------------------
    if "halo" in parts:
        rows = []
        enc = encoder(weights, layers="stages", device=dev)
        exact, t_exact, st = timed_dense(src, spots, enc, device=dev)
        halos = [0, 64, 128] if not args.quick else [64]
        for h in halos:
            f, t, _ = timed_dense(src, spots, enc, device=dev, halo=h)
            r = per_spot_r(f.astype(np.float64), exact.astype(np.float64))
            rows.append(
                {
                    "halo": h,
                    "exact_halo": int(st["halo"]),
                    "median_r_vs_exact": float(np.median(r)),
                    "min_r_vs_exact": float(r.min()),
                    "max_rel_diff": float(np.abs(f - exact).max() / np.abs(exact).max()),
                    "time_s": t,
                    "exact_time_s": t_exact,
                }
            )
            print("halo", rows[-1])
        res["halo"] = rows

    # ---- 3. time vs number of bins -----------------------------------------------------------------------------------
    if "bins" in parts or "area" in parts:
        enc = encoder(weights, device=dev)
        max_patch = args.max_patch_bins or (1000 if args.quick else 10_000)
        # the patch method's time per patch, measured once on bins of the tissue box (used beyond max_patch)
        calib = grid_in(box, 2000 if not args.quick else 300)
        _, t_cal = patch_features(img, calib, weights, device=dev)
        per_patch = t_cal / len(calib)
        res["patch_s_per_patch"] = per_patch
        print(f"patch method: {per_patch * 1e3:.1f} ms per patch ({len(calib)} patches in {t_cal:.1f} s)")
    if "bins" in parts:
        rows = []
        for n in [1_000, 10_000] if args.quick else [1_000, 3_000, 10_000, 30_000, 100_000]:
            c = grid_in(box, n)
            f, t_dense, st = timed_dense(src, c, enc, device=dev)
            if len(c) <= max_patch:
                _, t_patch = patch_features(img, c, weights, device=dev)
                measured = True
            else:
                t_patch, measured = per_patch * len(c), False
            row = {
                "n_bins": len(c),
                "pitch_px": float(np.sqrt((box[2] - box[0]) * (box[3] - box[1]) / n)),
                "dense_s": t_dense,
                "patch_s": t_patch,
                "patch_measured": measured,
                "speedup": t_patch / t_dense,
                "dense_tiles": int(st["n_tiles"][0]),
                "predicted_pixel_ratio": dense_cost_ratio(c, PATCH, halo=int(st["halo"])),
                "max_map_cells": int(st["max_map_cells"]),
                "peak_rss_gb": peak_rss_gb(),
            }
            rows.append(row)
            print("bins", row)
        res["bins"] = rows

    # ---- 4. time vs tissue area ----------------------------------------------------------------------------------------
    if "area" in parts:
        rows = []
        pitch = 32.0
        x0, y0, x1, y1 = box
        for frac in [1 / 16, 1 / 4] if args.quick else [1 / 16, 1 / 4, 1.0]:
            side = np.sqrt(frac)
            sub = (x0, y0, x0 + (x1 - x0) * side, y0 + (y1 - y0) * side)
            area = (sub[2] - sub[0]) * (sub[3] - sub[1])
            c = grid_in(sub, int(round(area / pitch**2)))
            f, t_dense, st = timed_dense(src, c, enc, device=dev)
            row = {
                "area_fraction": frac,
                "area_mpx": area / 1e6,
                "n_bins": len(c),
                "dense_s": t_dense,
                "patch_s_extrapolated": per_patch * len(c),
                "dense_tiles": int(st["n_tiles"][0]),
            }
            rows.append(row)
            print("area", row)
        res["area"] = rows

    # ---- 5. break-even of method='auto' ------------------------------------------------------------------------------
    if "breakeven" in parts:
        rows = []
        enc = encoder(weights, device=dev)
        x0, y0 = box[0] + 500, box[1] + 500
        sub = (x0, y0, x0 + 1500, y0 + 1500)
        for pitch in [448, 224, 160, 112, 80, 64] if not args.quick else [224, 112]:
            c = grid_in(sub, int(round(1500**2 / pitch**2)))
            _, t_patch = patch_features(img, c, weights, device=dev)
            _, t_dense, st = timed_dense(src, c, enc, device=dev)
            rows.append(
                {
                    "pitch_px": pitch,
                    "n_bins": len(c),
                    "patch_s": t_patch,
                    "dense_s": t_dense,
                    "time_ratio": t_patch / t_dense,
                    "pixel_ratio": dense_cost_ratio(c, PATCH, halo=int(st["halo"])),
                    "dense_tiles": int(st["n_tiles"][0]),
                }
            )
            print("breakeven", rows[-1])
        res["breakeven"] = rows

    # ---- 6. downstream: ridge from features to expression, leave one section out -------------------------------------
    if "expression" in parts:
        res["expression"] = expression_check(data_dir, weights, dev, quick=args.quick)

    res["machine"]["load_avg_end"] = list(os.getloadavg())
    res["peak_rss_gb"] = peak_rss_gb()
    out = Path(args.out) / "dense_features"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.parts != ap.get_default("parts") and out.with_suffix(".json").exists():
        # a partial run updates its parts of the existing results and keeps the others (with their machine state)
        old = json.loads(out.with_suffix(".json").read_text())
        res["machine_earlier_parts"] = old.get("machine_earlier_parts", old["machine"])
        res = old | res
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(to_markdown(res))
    print(f"wrote {out.with_suffix('.md')} and .json")


SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
#: (name, layers, tf_padding) of the feature sets compared downstream
EXPR_CONFIGS = [("last", "last", False), ("stages tf", "stages", True)]


def expression_check(data_dir: Path, weights: Path, dev: str, *, quick: bool) -> list[dict]:
    from scipy.stats import pearsonr
    from sklearn.linear_model import RidgeCV

    panel = [g.strip() for g in open(data_dir / "her2st" / "gene_lists" / "her2st_785genes_hist2st.txt") if g.strip()]
    configs = EXPR_CONFIGS[:1] if quick else EXPR_CONFIGS
    feats = {(c[0], m): [] for c in configs for m in ("patch", "dense")}
    ys, secs = [], []
    for sec in SECTIONS:
        a = hs.datasets.her2st(sec, data_dir=data_dir, image=False)
        lib = next(iter(a.uns["spatial"]))
        s_src = open_image(a.uns["spatial"][lib]["metadata"]["source_image_path"]).load()
        s_img = s_src.arr if s_src.axes == "YXS" else np.ascontiguousarray(np.moveaxis(np.asarray(s_src.arr), 0, -1))
        c = a.obsm["spatial"].astype(np.float64)
        for name, layers, tf in configs:
            feats[(name, "patch")].append(
                patch_features(s_img, c, weights, layers=layers, tf_padding=tf, device=dev)[0]
            )
            enc = encoder(weights, layers=layers, tf_padding=tf, device=dev)
            feats[(name, "dense")].append(timed_dense(open_image(s_img), c, enc, device=dev)[0])
        genes = [g for g in panel if g in a.var_names]
        x = a[:, genes].X
        x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
        full = np.zeros((a.n_obs, len(panel)))
        full[:, [panel.index(g) for g in genes]] = x
        ys.append(np.log1p(1e4 * full / np.maximum(full.sum(axis=1, keepdims=True), 1)))
        secs.append(np.full(a.n_obs, sec))
        print(f"expression: features of {sec} ({a.n_obs} spots)")
    y, sec_of = np.vstack(ys), np.concatenate(secs)
    rows = []
    for (name, meth), parts in feats.items():
        x = np.vstack(parts).astype(np.float64)
        pcc_all, pcc_top = [], []
        for sec in SECTIONS:
            te = sec_of == sec
            mu, sd = x[~te].mean(axis=0), np.maximum(x[~te].std(axis=0), 1e-6)
            reg = RidgeCV(alphas=np.logspace(-2, 6, 17)).fit((x[~te] - mu) / sd, y[~te])
            p = reg.predict((x[te] - mu) / sd)
            r = np.array(
                [
                    pearsonr(y[te, j], p[:, j])[0] if y[te, j].std() > 0 and p[:, j].std() > 0 else np.nan
                    for j in range(y.shape[1])
                ]
            )
            top = np.argsort(-y[te].mean(axis=0))[:50]
            pcc_all.append(np.nanmean(r))
            pcc_top.append(np.nanmean(r[top]))
        rows.append(
            {
                "features": name,
                "method": meth,
                "pcc_all": float(np.mean(pcc_all)),
                "pcc_top": float(np.mean(pcc_top)),
                "pcc_all_per_fold": [float(v) for v in pcc_all],
            }
        )
        print("expression", rows[-1])
    return rows


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(res: dict) -> str:
    m = res["machine"]
    out = [
        "# Dense image features vs the patch method (her2st C2, MobileNetV2, 224-px patches)",
        "",
        f"{m['platform']}, torch {m['torch']}, {m['threads']} threads, device {m['device']}; load average "
        f"{m['load_avg_start'][0]:.1f} at the start, {m.get('load_avg_end', [0])[0]:.1f} at the end. "
        f"Peak RSS {res.get('peak_rss_gb', 0):.2f} GB. Parts run then: {', '.join(m.get('parts', ['all']))}.",
        "",
    ]
    if "machine_earlier_parts" in res:
        e = res["machine_earlier_parts"]
        out += [
            f"The other parts come from an earlier run (load average {e['load_avg_start'][0]:.1f} at its start, "
            f"{e.get('load_avg_end', [0])[0]:.1f} at its end, {e['threads']} threads).",
            "",
        ]
    if "agreement" in res:
        out += [
            "## Agreement (per-spot Pearson r between dense and patch features, 187 spots)",
            "",
            _table(
                res["agreement"],
                ["weights", "layers", "tf_padding", "d", "median_r", "p10_r", "min_r", "patch_s", "dense_s", "halo"],
            ),
            "",
        ]
    if "halo" in res:
        out += ["## Smaller halos against the exact one (`layers='stages'`, ImageNet)", ""]
        out += [
            _table(
                res["halo"], ["halo", "exact_halo", "median_r_vs_exact", "min_r_vs_exact", "max_rel_diff", "time_s"]
            ),
            "",
        ]
    if "bins" in res:
        out += [
            "## Time against the number of bins (same tissue box)",
            "",
            f"Patch method: {res['patch_s_per_patch'] * 1e3:.1f} ms per patch; `patch_measured = False` rows are that "
            "time the number of bins.",
            "",
            _table(
                res["bins"],
                [
                    "n_bins",
                    "pitch_px",
                    "dense_s",
                    "patch_s",
                    "patch_measured",
                    "speedup",
                    "dense_tiles",
                    "predicted_pixel_ratio",
                    "peak_rss_gb",
                ],
            ),
            "",
        ]
    if "area" in res:
        out += [
            "## Time against the area covered (bins 32 px apart)",
            "",
            _table(
                res["area"], ["area_fraction", "area_mpx", "n_bins", "dense_s", "patch_s_extrapolated", "dense_tiles"]
            ),
            "",
        ]
    if "breakeven" in res:
        out += [
            "## Break-even (1500-px square of tissue; `pixel_ratio` is the rule of `method='auto'`)",
            "",
            _table(res["breakeven"], ["pitch_px", "n_bins", "patch_s", "dense_s", "time_ratio", "pixel_ratio"]),
            "",
        ]
    if "expression" in res:
        out += [
            "## Downstream: ridge from features to expression (her2st C2-C6, leave one section out)",
            "",
            _table(res["expression"], ["features", "method", "pcc_all", "pcc_top"]),
            "",
        ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
