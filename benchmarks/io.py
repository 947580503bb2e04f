"""I/O scaling: GEM -> bin50 (`hs.io.read_gem`), Visium HD 2 -> 16 µm re-binning (`hs.io.rebin`), and the rates of
the simulated-platform writers (`hs.datasets.write_gem / write_visium_hd / write_stereoseq / write_wsi`).

Every measured step runs in its own process (`--worker`), so its peak RSS (`ru_maxrss`) is its own; it includes the
interpreter and `import histospace` (torch and all: reported as `base_rss_mb`, the RSS before the step starts).

- GEM: a simulated section whose side is chosen to give about `--lines` lines (0.5 µm DNB, ~0.8 lines per µm²:
  10^8 lines is a ~1.1 cm square; `--genes` genes, 2000 by default, so that a bin50 holds several hundred distinct
  genes as real ones do) is written with `write_gem` (timed: the generator's rate), then read into bin50 by
  `read_gem` in a fresh process. Targets: 10^8 lines <= 5 min and <= 4 GB peak RSS.
- Re-binning: a Visium HD-like SpatialData of `--bins` 2 µm bins (counts of the simulated section, the table and
  circles as spatialdata-io makes them) is built in memory, then `rebin(factor=8)` (2 -> 16 µm) is timed.
  Target: 10^7 bins <= 2 min.
- Generators (`--generators`): Visium HD (2/8/16 µm + 0.5 µm/px H&E), Stereo-seq SAW (bin50 + cells + 0.5 µm/px
  H&E) and an Aperio SVS WSI (0.25 µm/px) at `--gen-side` µm; the time per mm² is extrapolated (linearly in area) to
  the scaling sizes: a 6.5 mm Visium HD section (13,000 px H&E), a 1 cm Stereo-seq chip (20,000 px H&E) and a 1 cm
  WSI (40,000 px).

Usage: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/io.py --lines 1e6 1e7 1e8 --bins 1e7 --generators`
"""

from __future__ import annotations

import argparse
import json
import math
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
LINES_PER_UM2 = None  # measured on a probe section


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _side_for_lines(n: float) -> float:
    import histospace.datasets as hsd

    probe = hsd.simulate_tissue(width_um=600.0, height_um=600.0)
    x, _, _ = probe.molecules(0, 0, 600.0, 600.0)
    return math.sqrt(n / (x.size / 600.0**2))


def _worker_write_gem(n: float, path: str, gz: bool, genes: int) -> dict:
    import histospace.datasets as hsd

    side = _side_for_lines(n)
    tissue = hsd.simulate_tissue(width_um=side, height_um=side, n_genes=genes)
    base = _rss_mb()
    t = time.perf_counter()
    hsd.write_gem(path, tissue, gzip=gz)
    sec = time.perf_counter() - t
    opener = __import__("gzip").open if gz else open
    with opener(path, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b"")) - 7
    return {"side_um": side, "lines": lines, "write_seconds": sec, "bytes": os.path.getsize(path), "base_rss_mb": base}


def _worker_read_gem(path: str, bin_size: int) -> dict:
    import histospace.io as hsio

    base = _rss_mb()
    t = time.perf_counter()
    sdata = hsio.read_gem(path, bin_size=bin_size)
    sec = time.perf_counter() - t
    table = next(iter(sdata.tables.values()))
    return {
        "read_seconds": sec,
        "bins": table.n_obs,
        "genes": table.n_vars,
        "nnz": int(table.X.nnz),
        "base_rss_mb": base,
        "peak_rss_mb": _peak_mb(),
    }


def _visium_hd_like(n_bins: float):
    """A SpatialData as spatialdata_io.visium_hd makes it (2 µm table, circles), from the simulated section."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    import histospace.datasets as hsd

    n_side = int(round(math.sqrt(n_bins)))
    tissue = hsd.simulate_tissue(width_um=2.0 * n_side, height_um=2.0 * n_side, n_genes=500)
    X = sp.vstack([m for _, _, m in tissue.bin_counts(2.0)], format="csr").astype(np.float32)
    rows, cols = np.divmod(np.arange(X.shape[0]), n_side)
    s = 0.5  # µm per full-resolution pixel
    spatial = np.column_stack([(cols + 0.5) * 2 / s, (rows + 0.5) * 2 / s])
    obs = pd.DataFrame({"in_tissue": np.ones(rows.size, np.int32), "array_row": rows, "array_col": cols})
    obs["location_id"] = np.arange(rows.size)
    obs["region"] = pd.Categorical(["hd_square_002um"] * rows.size)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=tissue.gene_names))
    adata.obsm["spatial"] = spatial
    circles = ShapesModel.parse(spatial, geometry=0, radius=1 / s, transformations={"hd": Identity()})
    table = TableModel.parse(adata, region="hd_square_002um", region_key="region", instance_key="location_id")
    return SpatialData(shapes={"hd_square_002um": circles}, tables={"square_002um": table})


def _worker_rebin(n_bins: float) -> dict:
    import histospace.io as hsio

    t = time.perf_counter()
    sdata = _visium_hd_like(n_bins)
    build = time.perf_counter() - t
    X = sdata.tables["square_002um"].X
    base = _rss_mb()
    t = time.perf_counter()
    hsio.rebin(sdata, factor=8)
    sec = time.perf_counter() - t
    return {
        "bins": int(X.shape[0]),
        "nnz": int(X.nnz),
        "build_seconds": build,
        "rebin_seconds": sec,
        "new_bins": int(sdata.tables["square_016um"].n_obs),
        "base_rss_mb": base,
        "peak_rss_mb": _peak_mb(),
    }


def _worker_generator(kind: str, side: float, tmp: str) -> dict:
    import histospace.datasets as hsd

    tissue = hsd.simulate_tissue(width_um=side, height_um=side)
    base = _rss_mb()
    t = time.perf_counter()
    out = Path(tmp) / kind
    if kind == "visium_hd":
        hsd.write_visium_hd(out, tissue, mpp=0.5)
    elif kind == "stereoseq":
        hsd.write_stereoseq(out, tissue, bin_sizes=(50,))
    elif kind == "wsi":
        hsd.write_wsi(out.with_suffix(".svs"), tissue, mpp=0.25)
    sec = time.perf_counter() - t
    size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    return {"side_um": side, "seconds": sec, "bytes": size, "base_rss_mb": base, "peak_rss_mb": _peak_mb()}


def _run(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs="+")
    p.add_argument("--lines", nargs="*", type=float, default=[1e6, 1e7])
    p.add_argument("--bins", nargs="*", type=float, default=[1e7])
    p.add_argument("--bin-size", type=int, default=50)
    p.add_argument("--gzip", action="store_true", help="write and read .gem.gz")
    p.add_argument("--genes", type=int, default=2000, help="genes of the simulated GEM (sets the non-zeros per bin)")
    p.add_argument("--generators", action="store_true")
    p.add_argument("--gen-side", type=float, default=1300.0, help="side (µm) of the generator runs")
    p.add_argument("--tmp", default=None, help="folder for the files (default: a temporary one)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=str(RESULTS), help="folder of io.md and io.json ('' to skip)")
    a = p.parse_args()
    if a.worker:
        kind, *rest = a.worker
        if kind == "write_gem":
            res = _worker_write_gem(float(rest[0]), rest[1], rest[2] == "1", int(rest[3]))
        elif kind == "read_gem":
            res = _worker_read_gem(rest[0], int(rest[1]))
        elif kind == "rebin":
            res = _worker_rebin(float(rest[0]))
        else:
            res = _worker_generator(kind, float(rest[0]), rest[1])
        print(json.dumps(res))
        return

    load = os.getloadavg()[0]
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "load_1min": load}
    info["threads"] = os.environ.get("OMP_NUM_THREADS", "unset")
    results = {"info": info, "gem": [], "rebin": [], "generators": []}
    lines_md = [f"# I/O benchmark\n\n{info}\n"]
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        if a.lines:
            lines_md += [
                f"## GEM -> bin{a.bin_size} (`hs.io.read_gem`, {'gzip' if a.gzip else 'plain text'}, {a.genes} genes)\n",
                "| lines | file MB | write s | read s | lines/s | bins | nnz | base RSS MB | peak RSS MB |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for n in a.lines:
                path = str(Path(tmp) / ("chip.gem.gz" if a.gzip else "chip.gem"))
                w = _run(["write_gem", str(n), path, "1" if a.gzip else "0", str(a.genes)], a.timeout)
                r = _run(["read_gem", path, str(a.bin_size)], a.timeout) if "error" not in w else w
                row = {"target_lines": n, **w, **r}
                results["gem"].append(row)
                if "error" in row:
                    lines_md.append(f"| {n:.0e} | error: {row['error']} |")
                else:
                    lines_md.append(
                        f"| {row['lines']:,} | {row['bytes'] / 2**20:.0f} | {row['write_seconds']:.1f} | "
                        f"{row['read_seconds']:.1f} | {row['lines'] / row['read_seconds']:,.0f} | {row['bins']:,} | "
                        f"{row['nnz']:,} | {row['base_rss_mb']:.0f} | {row['peak_rss_mb']:.0f} |"
                    )
                print(lines_md[-1], flush=True)
                Path(path).unlink(missing_ok=True)
        if a.bins:
            lines_md += [
                "\n## Visium HD 2 -> 16 µm (`hs.io.rebin(factor=8)`)\n",
                "| 2 µm bins | nnz | build s | rebin s | 16 µm bins | base RSS MB | peak RSS MB |",
                "|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for n in a.bins:
                r = _run(["rebin", str(n)], a.timeout)
                results["rebin"].append({"target_bins": n, **r})
                if "error" in r:
                    lines_md.append(f"| {n:.0e} | error: {r['error']} |")
                else:
                    lines_md.append(
                        f"| {r['bins']:,} | {r['nnz']:,} | {r['build_seconds']:.1f} | {r['rebin_seconds']:.1f} | "
                        f"{r['new_bins']:,} | {r['base_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
                    )
                print(lines_md[-1], flush=True)
        if a.generators:
            targets = {"visium_hd": 6500.0, "stereoseq": 10000.0, "wsi": 10000.0}
            lines_md += [
                f"\n## Generators at {a.gen_side:g} µm, extrapolated linearly in area\n",
                "| writer | side µm | s | MB | peak RSS MB | s per mm² | target side µm | extrapolated s |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for kind, target in targets.items():
                with tempfile.TemporaryDirectory(dir=tmp) as sub:
                    r = _run([kind, str(a.gen_side), sub], a.timeout)
                results["generators"].append({"kind": kind, **r})
                if "error" in r:
                    lines_md.append(f"| {kind} | error: {r['error']} |")
                else:
                    per_mm2 = r["seconds"] / (a.gen_side / 1000) ** 2
                    lines_md.append(
                        f"| {kind} | {a.gen_side:g} | {r['seconds']:.1f} | {r['bytes'] / 2**20:.0f} | "
                        f"{r['peak_rss_mb']:.0f} | {per_mm2:.1f} | {target:g} | {per_mm2 * (target / 1000) ** 2:.0f} |"
                    )
                print(lines_md[-1], flush=True)
    text = "\n".join(lines_md) + "\n"
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "io.md").write_text(text)
        (out / "io.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
