"""Spatial graph of square bins (`hs.pp.spatial_graph`) at 10^5 and 10^6 bins, and a domains plot of them.

Bins sit on a square grid (16 coordinate units apart, 0.5 µm per unit: 8 µm bins as Visium HD's) inside an
elliptic tissue mask with 5 % of the bins dropped at random (holes), in random order. Each case runs in its own
process (`--worker`), so the peak RSS (`ru_maxrss`) is that case's own; it includes the interpreter, the imports and
the simulated table (reported as `base_rss_mb`, the RSS just before the call). Cases:

- `grid4`, `grid8`: the 4- and 8-neighbour grid from `obs['array_row']`/`obs['array_col']`;
- `radius`: every bin within 12 µm (`radius_um=12, microns_per_unit=0.5`: the 8 neighbours), k-d tree;
- `squidpy_radius` (`--squidpy`, reference only): `squidpy.gr.spatial_neighbors_radius` on the same bins;
- `plot` (`--plot`): `hs.pl.domains` of 8 banded domains over an H&E-like image, drawn into a PNG at 150 dpi
  (`--png` keeps it).

Targets (issue #14): spatial graph of 10^6 bins <= 30 s and <= 2 GB on 2 CPU threads.

Usage: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/spatial_graph.py --sizes 1e5 1e6 --plot`
(`--threads 1` on a busy machine; the load average at the end of each case is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PITCH = 16.0  # coordinate units between bin centres
MICRONS_PER_UNIT = 0.5
CASES = ("grid4", "grid8", "radius")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def simulate_bins(n_bins: float, seed: int = 0):
    """About `n_bins` square bins in an elliptic tissue with 5 % holes, shuffled; 8 domains in bands."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_bins / (np.pi / 4 * 0.95))))
    r, c = np.meshgrid(np.arange(side, dtype=np.int32), np.arange(side, dtype=np.int32), indexing="ij")
    r, c = r.ravel(), c.ravel()
    u, v = (c - side / 2 + 0.5) / (side / 2), (r - side / 2 + 0.5) / (side / 2)
    keep = (u**2 + v**2 <= 1.0) & (rng.random(r.size) >= 0.05)
    r, c = r[keep], c[keep]
    perm = rng.permutation(r.size)
    r, c = r[perm], c[perm]
    dom = np.clip(((c + 0.3 * side * np.sin(r / side * 3.0)) / (1.3 * side) * 8).astype(int), 0, 7)
    obs = pd.DataFrame(
        {"array_row": r, "array_col": c, "domain": pd.Categorical([f"D{d}" for d in dom])},
        index=pd.RangeIndex(r.size).astype(str),
    )
    a = ad.AnnData(obs=obs)
    a.obsm["spatial"] = np.column_stack([(c + 0.5) * PITCH, (r + 0.5) * PITCH])
    # H&E-like image at 1/8 of the coordinate resolution (2 px per bin): pink tissue, domain-tinted
    s = 8.0
    h = w = int(np.ceil(side * PITCH / s))
    img = np.full((h, w, 3), 245, dtype=np.uint8)
    colours = rng.integers(120, 230, size=(8, 3)).astype(np.uint8)
    px = (a.obsm["spatial"] / s).astype(int)
    img[np.clip(px[:, 1], 0, h - 1), np.clip(px[:, 0], 0, w - 1)] = colours[dom]
    a.uns["spatial"] = {
        "bins": {
            "images": {"hires": img},
            "scalefactors": {"tissue_hires_scalef": 1.0 / s, "spot_diameter_fullres": PITCH},
            "metadata": {"technology": "visium_hd"},
        }
    }
    return a


def _worker(case: str, n_bins: float, png: str) -> dict:
    import warnings

    import numpy as np

    import histospace as hs

    a = simulate_bins(n_bins)
    out = {"case": case, "n_bins": int(a.n_obs)}
    warnings.simplefilter("ignore", UserWarning)  # isolated bins at the holes' edges
    if case == "plot":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hs.pl.domains(a.copy(), key="domain", show=False)  # warm-up: imports, fonts
        plt.close("all")
        base = _rss_mb()
        t = time.perf_counter()
        ax = hs.pl.domains(a, key="domain", show=False)
        out["draw_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        path = png or os.path.join(tempfile.mkdtemp(), "domains.png")
        ax.figure.savefig(path, dpi=150)
        out["savefig_seconds"] = time.perf_counter() - t
        out["seconds"] = out["draw_seconds"] + out["savefig_seconds"]
        out["png_bytes"] = os.path.getsize(path)
        out["n_images"] = len(ax.get_images())
        out["n_collections"] = len(ax.collections)
    else:
        if case == "squidpy_radius":
            import squidpy as sq

            sq.gr.spatial_neighbors_radius(a[:100].copy(), radius=1.5 * PITCH)  # imports
        else:
            hs.pp.spatial_graph(a[:1000].copy(), n_neighs=4)  # imports
        base = _rss_mb()
        t = time.perf_counter()
        if case == "grid4":
            hs.pp.spatial_graph(a, n_neighs=4)
        elif case == "grid8":
            hs.pp.spatial_graph(a, n_neighs=8)
        elif case == "radius":
            hs.pp.spatial_graph(a, radius_um=12.0, microns_per_unit=MICRONS_PER_UNIT)
        elif case == "squidpy_radius":
            sq.gr.spatial_neighbors_radius(a, radius=12.0 / MICRONS_PER_UNIT)
        else:
            msg = f"unknown case {case!r}"
            raise ValueError(msg)
        out["seconds"] = time.perf_counter() - t
        conn = a.obsp["spatial_connectivities"]
        out["edges"] = int(conn.nnz)
        out["mean_degree"] = float(np.diff(conn.indptr).mean())
    out["base_rss_mb"] = base
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_avg_1min"] = os.getloadavg()[0]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs=3, metavar=("CASE", "N", "PNG"))
    p.add_argument("--sizes", nargs="*", type=float, default=[1e5, 1e6])
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--squidpy", action="store_true", help="also squidpy's radius graph (10^5 only unless --sizes)")
    p.add_argument("--plot", action="store_true", help="also hs.pl.domains of the bins, saved as a PNG")
    p.add_argument("--png", default="", help="keep the PNG of the largest plot here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS), help="folder of spatial_graph.md and .json ('' to skip)")
    args = p.parse_args()
    if args.worker:
        case, n, png = args.worker
        print("RESULT " + json.dumps(_worker(case, float(n), png if png != "-" else "")))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    jobs = [(case, n) for n in args.sizes for case in args.cases]
    if args.squidpy:
        jobs += [("squidpy_radius", n) for n in args.sizes]
    if args.plot:
        jobs += [("plot", n) for n in args.sizes]
    rows = []
    for case, n in jobs:
        png = args.png if (case == "plot" and args.png and n == max(args.sizes)) else "-"
        r = subprocess.run(
            [sys.executable, __file__, "--worker", case, str(n), png],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        res = json.loads(line[-1][7:]) if (not r.returncode and line) else {"case": case, "error": r.stderr[-2000:]}
        res.setdefault("n_requested", n)
        rows.append(res)
        print(json.dumps(res)[:400], flush=True)
    meta = {"threads": args.threads, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    lines = [
        "# Spatial graph and domains plot of square bins",
        "",
        f"{args.threads} CPU thread(s), simulated 8 µm bins (elliptic tissue, 5 % holes), one process per case. "
        "Peak RSS is the whole process (interpreter, imports and the simulated table included; `base` is the RSS "
        "just before the call). Targets at 10^6 bins: graph <= 30 s and <= 2 GB. load: 1-min load average at the "
        "end of the case (above the number of cores means other jobs shared the CPU).",
        "",
        "| case | bins | seconds | mean degree | base RSS (MB) | peak RSS (MB) | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['n_requested']:.0f} | error | | | | |")
            continue
        deg = f"{r['mean_degree']:.2f}" if "mean_degree" in r else ""
        secs = f"{r['seconds']:.2f}"
        if r["case"] == "plot":
            secs += f" (draw {r['draw_seconds']:.2f} + savefig {r['savefig_seconds']:.2f})"
        lines.append(
            f"| {r['case']} | {r['n_bins']:,} | {secs} | {deg} | {r['base_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['load_avg_1min']:.1f} |"
        )
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "spatial_graph.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "spatial_graph.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
