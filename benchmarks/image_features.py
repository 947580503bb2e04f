"""Benchmark `hs.pp.image_features` and `hs.pp.tile_image` on 2 CPU threads.

Measures
- throughput (patches/s, end to end: crop, resize, normalise, encoder) of MobileNetV2 and DenseNet-121 (ResNet-50
  with `--resnet50`) at 224 px with random initialisation; targets >= 25 and >= 8 patches/s;
- her2st C2 (187 spots, 224-px full-resolution patches) with the shared ImageNet MobileNetV2 weights: shape, finite,
  time, peak RSS (target < 3 GB) and a real-signal check (neighbouring spots have more similar features);
- `tile_image` on the C2 full-resolution JPEG with ~10k tiles.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/image_features.py [--data-dir ../shared/data] [--resnet50]

Writes `benchmarks/results/image_features.{md,json}`. The machine may be shared: the load average is reported with
the figures, and timings taken under load are pessimistic.
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
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

import histospace as hs

N_THREADS = 2
TARGETS = {"mobilenet_v2": 25.0, "densenet121": 8.0}
RSS_TARGET_GB = 3.0


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def synthetic_adata(n_spots: int, seed: int = 0) -> tuple[ad.AnnData, np.ndarray]:
    """Spots on a grid over a random H&E-coloured full-resolution image (patches do not overlap)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_spots)))
    size = (side + 1) * 230
    img = (rng.normal([200, 120, 170], 30, size=(size, size, 3))).clip(0, 255).astype(np.uint8)
    rows, cols = np.divmod(np.arange(n_spots), side)
    a = ad.AnnData(X=np.zeros((n_spots, 0), np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(n_spots)]))
    a.obsm["spatial"] = np.column_stack([(cols + 1) * 230.0, (rows + 1) * 230.0])
    return a, img


def throughput(encoder: str, n_spots: int, batch_size: int, repeats: int = 2) -> dict:
    """Best of `repeats` end-to-end runs (a warm-up run first)."""
    a, img = synthetic_adata(n_spots)
    kw = {"encoder": encoder, "weights": None, "patch_size": 224, "input_size": 224, "device": "cpu"}
    hs.pp.image_features(a[: batch_size // 2].copy(), img=img, batch_size=batch_size, progress_bar=False, **kw)
    times, cpus = [], []
    for _ in range(repeats):
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        hs.pp.image_features(a, img=img, batch_size=batch_size, progress_bar=False, **kw)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        times.append(time.perf_counter() - t)
        cpus.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    best = min(times)
    d = a.obsm["img_features"].shape[1]
    return {
        "encoder": encoder,
        "n_patches": n_spots,
        "batch_size": batch_size,
        "dim": int(d),
        "seconds": [round(t, 2) for t in times],
        "patches_per_s": round(n_spots / best, 2),
        "cpu_seconds": [round(c, 2) for c in cpus],
        # what 2 uncontended cores would give if all CPU time was useful: n * threads / CPU seconds (conservative, as
        # OpenMP threads spin while they wait for a descheduled peer on a busy machine)
        "patches_per_s_cpu_estimate": round(n_spots * N_THREADS / min(cpus), 2),
        "target_patches_per_s": TARGETS.get(encoder),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def real_signal(x: np.ndarray, xy: np.ndarray) -> dict:
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    cos = z @ z.T
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    nn6 = np.argsort(d, axis=1)[:, 1:7]
    iu = np.triu_indices(len(x), 1)
    fd = np.linalg.norm(z[:, None] - z[None], axis=-1)
    return {
        "cosine_6_nearest": round(float(np.mean([cos[i, nn6[i]].mean() for i in range(len(x))])), 4),
        "cosine_all_pairs": round(float(cos[iu].mean()), 4),
        "mantel_r_feature_vs_spatial_distance": round(float(np.corrcoef(fd[iu], d[iu])[0, 1]), 4),
    }


def her2st_c2(data_dir: Path, tf_padding: bool = False) -> dict:
    weights = data_dir / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
    rss0 = peak_rss_gb()
    adata = hs.datasets.her2st("C2", data_dir=data_dir)
    t = time.perf_counter()
    hs.pp.image_features(
        adata,
        encoder="mobilenet_v2",
        weights=weights,
        mean=0.5,
        std=0.5,
        tf_padding=tf_padding,
        patch_size=224,
        progress_bar=False,
    )
    dt = time.perf_counter() - t
    x = adata.obsm["img_features"]
    p = adata.uns["img_features"]["params"]
    return {
        "tf_padding": tf_padding,
        "shape": list(x.shape),
        "dtype": str(x.dtype),
        "finite": bool(np.isfinite(x).all()),
        "seconds": round(dt, 2),
        "patches_per_s": round(x.shape[0] / dt, 2),
        "image": p["image"],
        "patch_size_px": float(p["patch_size_px"]),
        "patch_size_um": float(p.get("patch_size_um", float("nan"))),
        "peak_rss_gb_before": round(rss0, 3),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "rss_target_gb": RSS_TARGET_GB,
        **real_signal(x, adata.obsm["spatial"]),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }


def tiles_c2(data_dir: Path) -> dict:
    img = sorted((data_dir / "her2st" / "images").glob("C2_*.jpg"))[0]
    out = {}
    for tile_size in (224, 40):
        t = time.perf_counter()
        tiles = hs.pp.tile_image(img, tile_size=tile_size)
        out[f"tile_{tile_size}px"] = {"n_tiles": int(tiles.n_obs), "seconds": round(time.perf_counter() - t, 2)}
    return out


def to_markdown(res: dict) -> str:
    env = res["environment"]
    lines = [
        "# `hs.pp.image_features` / `hs.pp.tile_image` benchmark",
        "",
        f"torch {env['torch']}, {env['threads']} threads (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}), "
        f"{env['cpu_count']} CPUs, load average at start {env['load_avg_start']}, at end {env['load_avg_end']}. "
        "The machine was shared with other jobs: timings are pessimistic.",
        "",
        "## Throughput (224-px patches, random init, end to end)",
        "",
        "| encoder | d | batch | patches | best s | patches/s (wall) | patches/s (CPU-time estimate) | target | "
        "load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["throughput"]:
        tgt = f">= {r['target_patches_per_s']:g}" if r["target_patches_per_s"] else "-"
        lines.append(
            f"| {r['encoder']} | {r['dim']} | {r['batch_size']} | {r['n_patches']} | {min(r['seconds']):.2f} | "
            f"{r['patches_per_s']:.1f} | {r['patches_per_s_cpu_estimate']:.1f} | {tgt} | {r['load_avg'][0]:.1f} |"
        )
    lines += [
        "",
        "Wall: measured on the shared machine. CPU-time estimate: patches x 2 threads / CPU seconds used, i.e. the rate "
        "of 2 uncontended cores if all CPU time was useful work (conservative: OpenMP threads spin while a peer is "
        "descheduled).",
    ]
    if "her2st_c2" in res:
        lines += [
            "",
            "## her2st C2, 224-px full-resolution patches, shared ImageNet MobileNetV2 (mean = std = 0.5)",
            "",
            "| tf_padding | shape | finite | s | patches/s | peak RSS GB (before) | target | cos 6-NN | cos all | "
            "Mantel r |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for h in [res["her2st_c2"], res.get("her2st_c2_tf_padding")]:
            if h is None:
                continue
            lines.append(
                f"| {h['tf_padding']} | {tuple(h['shape'])} | {h['finite']} | {h['seconds']:.1f} | "
                f"{h['patches_per_s']:.1f} | {h['peak_rss_gb']:.2f} ({h['peak_rss_gb_before']:.2f}) | "
                f"< {h['rss_target_gb']:g} | {h['cosine_6_nearest']:.3f} | {h['cosine_all_pairs']:.3f} | "
                f"{h['mantel_r_feature_vs_spatial_distance']:.3f} |"
            )
        lines += [
            "",
            "Peak RSS is the whole process (Python, torch, scanpy: the 'before' figure is the peak before the run).",
            "cos 6-NN: mean cosine similarity of standardised features to the 6 nearest spots; cos all: over all pairs;",
            "Mantel r: correlation of feature distances with spatial distances (> 0: neighbours look alike).",
        ]
    if "tiles_c2" in res:
        lines += ["", "## `tile_image` on the C2 full-resolution JPEG (9274 x 9911 px)", "", "| tiles | n | s |"]
        lines.append("|---|---|---|")
        for k, v in res["tiles_c2"].items():
            lines.append(f"| {k} | {v['n_tiles']} | {v['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("HISTOSPACE_DATA"))
    parser.add_argument("--resnet50", action="store_true", help="also time ResNet-50")
    parser.add_argument("--n-mobilenet", type=int, default=128)
    parser.add_argument("--n-densenet", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(N_THREADS)
    warnings.filterwarnings("ignore", category=FutureWarning)

    res = {
        "environment": {
            "torch": torch.__version__,
            "histospace": hs.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpu_count": os.cpu_count(),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
            "peak_rss_gb_after_import": round(peak_rss_gb(), 3),
        }
    }
    if args.data_dir:  # first, so that its peak RSS is not inflated by the larger throughput runs
        data_dir = Path(args.data_dir)
        res["her2st_c2"] = her2st_c2(data_dir)
        print("her2st C2:", res["her2st_c2"], flush=True)
        res["her2st_c2_tf_padding"] = her2st_c2(data_dir, tf_padding=True)
        print("her2st C2 (tf_padding):", res["her2st_c2_tf_padding"], flush=True)
        res["tiles_c2"] = tiles_c2(data_dir)
        print("tiles C2:", res["tiles_c2"], flush=True)
    else:
        print("no --data-dir / HISTOSPACE_DATA: skipping her2st C2")
    res["throughput"] = []
    runs = [("mobilenet_v2", args.n_mobilenet), ("densenet121", args.n_densenet)]
    if args.resnet50:
        runs.append(("resnet50", args.n_densenet))
    for enc, n in runs:
        r = throughput(enc, n, args.batch_size)
        res["throughput"].append(r)
        print("throughput:", r, flush=True)
    res["environment"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "image_features.json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    (out / "image_features.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
