"""Benchmark lazy whole-slide reading: tifffile/zarr vs OpenSlide vs tiffslide through `histospace`'s readers.

Writes a synthetic Aperio-like SVS (JPEG tiles of 256 px, levels with downsample 1, 4 and 16; the baseline and
reduced levels are generated tile by tile, so the full image never sits in memory), then, in one fresh process per
reader (`open_slide(path, reader=...)`), reads `--n` random 224-px regions at level 0 and at level 1 and reports
regions/s, the time to open the slide, and peak RSS (the process's maximum, and its increase over the RSS after
imports). The three readers must return the same pixels at level 0 (checked on a few regions).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/wsi.py [--size 20000] [--n 500] [--out benchmarks/results]

Defaults are the full size (20,000 px square, ~1.2 GB of pixels, written in ~1-2 min). The file is written to a
temporary folder (or `--path`) and, as it was just written, is read from the page cache: the figures are decode and
reader overheads, not disk speed. The load average is reported with the figures.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

READERS = ("tifffile", "openslide", "tiffslide")
TILE = 256
PATCH = 224
DOWNSAMPLES = (1, 4, 16)


def rss_mb() -> float:
    """Current resident set size (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**2


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def texture(y0: int, x0: int, h: int, w: int, ds: int, seed: int = 0) -> np.ndarray:
    """H&E-like colours at level pixels `[y0, y0 + h) x [x0, x0 + w)` of the level with downsample `ds`.

    A smooth function of the full-resolution position (so the levels show the same tissue) plus per-tile noise.
    """
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32) * ds
    tissue = 0.5 + 0.25 * np.sin(xx / 900.0) * np.cos(yy / 700.0) + 0.25 * np.sin((xx + yy) / 150.0)
    nuclei = (np.sin(xx / 9.0) * np.sin(yy / 11.0) > 0.7).astype(np.float32)
    rng = np.random.default_rng((seed, y0, x0, ds))
    noise = rng.normal(0, 8, size=(h, w, 1)).astype(np.float32)
    pink = np.array([230, 150, 200], np.float32)
    purple = np.array([110, 60, 160], np.float32)
    white = np.array([245, 245, 245], np.float32)
    t = tissue[..., None]
    rgb = white * (1 - t) + pink * t
    rgb = rgb * (1 - 0.8 * nuclei[..., None] * t) + purple * 0.8 * nuclei[..., None] * t + noise
    return np.clip(rgb, 0, 255).astype(np.uint8)


def tiles(height: int, width: int, ds: int):
    for y0 in range(0, height, TILE):
        for x0 in range(0, width, TILE):
            t = texture(y0, x0, min(TILE, height - y0), min(TILE, width - x0), ds)
            out = np.full((TILE, TILE, 3), 255, np.uint8)
            out[: t.shape[0], : t.shape[1]] = t
            yield out


def write_svs(path: Path, size: int, quality: int = 85) -> None:
    """Aperio-like SVS: tiled JPEG baseline, stripped thumbnail, tiled reduced levels (downsample 4, 16)."""
    import tifffile

    head = "Aperio Image Library v12.0.15 \r\n"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, ds in enumerate(DOWNSAMPLES):
            h = w = size // ds
            desc = f"{head}{size}x{size} [0,0 {size}x{size}] ({TILE}x{TILE}) JPEG/RGB Q={quality}|AppMag = 20|MPP = 0.5"
            if i > 0:
                desc = f"{head}{size}x{size} -> {w}x{h} - ({TILE}x{TILE}) JPEG/RGB Q={quality}|AppMag = 20|MPP = 0.5"
            tw.write(
                tiles(h, w, ds),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                description=desc,
                metadata=None,
            )
            if i == 0:  # thumbnail: a stripped page after the baseline, as Aperio writes it
                tn = texture(0, 0, size // 64, size // 64, 64)
                tw.write(tn, photometric="rgb", description=f"{head}thumbnail", metadata=None)


def worker(args) -> dict:
    """Run in a fresh process: open with one reader, read random regions at levels 0 and 1."""
    import torch

    torch.set_num_threads(1)
    from histospace._image import open_slide

    base_rss = rss_mb()
    t0 = time.perf_counter()
    ms = open_slide(args.path, reader=args.worker)
    t_open = time.perf_counter() - t0
    out = {"reader": args.worker, "open_s": t_open, "rss_after_imports_mb": base_rss, "levels": ms.level_shapes}
    rng = np.random.default_rng(args.seed)
    checks = {}
    for level in (0, 1):
        src = ms.source(level)
        h, w = src.shape
        ys = rng.integers(0, max(1, h - PATCH), args.n)
        xs = rng.integers(0, max(1, w - PATCH), args.n)
        t0 = time.perf_counter()
        total = 0
        for y, x in zip(ys, xs, strict=True):
            total += int(src.read(int(y), int(y) + PATCH, int(x), int(x) + PATCH)[PATCH // 2, PATCH // 2, 0])
        dt = time.perf_counter() - t0
        out[f"level{level}_regions_per_s"] = args.n / dt
        out[f"level{level}_checksum"] = total
        checks[level] = [
            src.read(int(y), int(y) + 32, int(x), int(x) + 32).tolist() for y, x in zip(ys[:3], xs[:3], strict=True)
        ]
    out["peak_rss_mb"] = peak_rss_mb()
    out["check"] = checks
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=20000, help="side of level 0 in pixels")
    p.add_argument("--n", type=int, default=500, help="random regions per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path", type=Path, default=None, help="where to write the slide (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder of wsi.md and .json")
    p.add_argument("--worker", choices=READERS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    tmp = None
    if args.path is None:
        tmp = tempfile.TemporaryDirectory()
        args.path = Path(tmp.name) / "bench.svs"
    t0 = time.perf_counter()
    write_svs(args.path, args.size)
    t_write = time.perf_counter() - t0
    print(f"wrote {args.path} ({args.size} px, {args.path.stat().st_size / 1e6:.0f} MB) in {t_write:.1f} s")

    results = []
    for reader in READERS:
        cmd = [sys.executable, __file__, "--worker", reader, "--path", str(args.path), "--n", str(args.n)]
        cmd += ["--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            print(f"{reader}: failed\n{proc.stderr[-2000:]}")
            results.append({"reader": reader, "error": proc.stderr[-500:]})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        print(
            f"{reader:10s} open {res['open_s'] * 1e3:7.1f} ms | level 0: {res['level0_regions_per_s']:7.1f} regions/s"
            f" | level 1: {res['level1_regions_per_s']:7.1f} regions/s | peak RSS {res['peak_rss_mb']:.0f} MB "
            f"(+{res['peak_rss_mb'] - res['rss_after_imports_mb']:.0f} MB over imports)"
        )
    ok = [r for r in results if "check" in r]
    same = {
        lvl: all(r["check"][str(lvl)] == ok[0]["check"][str(lvl)] for r in ok[1:]) if ok else None for lvl in (0, 1)
    }
    print(f"same pixels as {ok[0]['reader'] if ok else '-'}: level 0 {same[0]}, level 1 {same[1]}")
    load = os.getloadavg()
    meta = {
        "size": args.size,
        "n": args.n,
        "patch": PATCH,
        "downsamples": list(DOWNSAMPLES),
        "write_s": t_write,
        "file_mb": args.path.stat().st_size / 1e6,
        "same_pixels": {f"level{k}": v for k, v in same.items()},
        "loadavg": load,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    for r in results:
        r.pop("check", None)
    page = args.out / "wsi"  # the folder's wsi.md and wsi.json
    page.parent.mkdir(parents=True, exist_ok=True)
    page.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        "# Whole-slide reading",
        "",
        f"Synthetic Aperio-like SVS, {args.size} x {args.size} px, JPEG tiles {TILE} px, levels 1/4/16; "
        f"{args.n} random {PATCH}-px regions per level; one process per reader, 1 thread; load average "
        f"{load[0]:.1f}. Levels 0 and 1 read the same pixels with every reader: {same[0]} / {same[1]}.",
        "",
        "| reader | open (ms) | level 0 (regions/s) | level 1 (regions/s) | peak RSS (MB) | over imports (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['reader']} | failed | | | | |")
            continue
        lines.append(
            f"| {r['reader']} | {r['open_s'] * 1e3:.1f} | {r['level0_regions_per_s']:.1f} | "
            f"{r['level1_regions_per_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f} |"
        )
    page.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {page.with_suffix('.md')} and .json")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
