"""The whole pipeline at 10^5-10^6 bins, from the platforms' raw files to domains (or predictions), on simulated data.

Cases (issue #15; sizes as the issue gives them, smaller with `--scale`):

- **(a) Visium HD**: a 6.5 mm x 6.5 mm section, 8 µm bins (~6.6 x 10^5), with a pyramidal H&E of ~13,000 x 13,000 px
  at 0.5 µm/px, written as a Space Ranger output folder. Steps: read (`spatialdata_io.visium_hd`, 8 µm bins),
  image features (`hs.pp.image_features` defaults: dense for bins), spatial graph (8-neighbour grid), StereoMM
  (defaults: local attention and spatial tiles), domains (defaults); ARI against the simulated domains.
- **(b) Stereo-seq**: a 1 cm x 1 cm chip at bin50 (25 µm, ~1.6 x 10^5 bins) from a GEM file, with a registered
  ~20,000 x 20,000 px H&E (0.5 µm/px). Steps: read and bin (`hs.io.read_gem`), attach the H&E (`hs.io.add_image`),
  then as (a).
- **(c) H&E-only prediction**: a ~40,000 x 40,000 px pyramidal whole-slide image (0.25 µm/px, SVS-like) tiled at
  55 µm (~10^5 tiles over the tissue). Steps: `hs.pp.tile_image` on the SpatialData of the image, image features
  (`method='auto'`, which picks the patch method for tiles that do not overlap; `--features-method dense` for the
  dense engine), `hs.tl.mclstexp_predict` with a model trained beforehand (untimed) on a simulated Visium-like
  reference.

The simulated expression has known domains and the simulated H&E has textures that follow them; data generation is
not timed (cached in `--work-dir`). Each case runs in its own process: the table gives each step's wall time and the
process's peak RSS after it (`ru_maxrss`, imports and data included). Threads: `OMP_NUM_THREADS` (2 by default).

Usage: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/pipeline_scale.py [--cases a b c] [--scale 1.0]
[--work-dir /tmp/hs_scale] [--device cpu] [--features-method auto] [--tag TAG]` (writes
benchmarks/results/pipeline_scale.{md,json}, a `--tag` run as the section TAG of that page; cases not run keep their
earlier results there).
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
import warnings
from pathlib import Path

import numpy as np
from _results import load, write_page

N_THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = {"a": "<= 30 min, <= 16 GB, ARI >= 0.9", "b": "<= 15 min", "c": "<= 10 min for 10^5 tiles"}


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class Steps:
    """Times steps and records the peak RSS after each."""

    def __init__(self):
        self.rows, self.t0 = [], time.perf_counter()

    def __call__(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.rows.append({"step": name, "seconds": time.perf_counter() - t, "peak_rss_gb": _rss_gb()})
        print(f"  {name}: {self.rows[-1]['seconds']:.1f} s, peak RSS {self.rows[-1]['peak_rss_gb']:.2f} GB", flush=True)
        return out


# ---- data (untimed) ------------------------------------------------------------------------------------------------
def _tissue(side_um: float, n_genes: int, seed: int):
    import histospace as hs

    return hs.datasets.simulate_tissue(
        width_um=side_um, height_um=side_um, n_domains=7, n_genes=n_genes, layout="layers", random_state=seed
    )


def _data_a(work: Path, scale: float):
    import histospace as hs

    path = work / f"visium_hd_{scale:g}"
    tissue = _tissue(6500 * scale, 500, 0)
    if not (path / "binned_outputs").exists():
        t = time.perf_counter()
        hs.datasets.write_visium_hd(path, tissue, bin_sizes=(8,), dataset_id="hd", mpp=0.5)
        print(f"  (wrote {path} in {time.perf_counter() - t:.0f} s)", flush=True)
    return path, tissue


def _data_b(work: Path, scale: float):
    import histospace as hs

    side = 10000 * scale
    gem, img = work / f"chip_{scale:g}.gem.gz", work / f"chip_{scale:g}_he.ome.tif"
    tissue = _tissue(side, 500, 1)
    if not gem.exists():
        t = time.perf_counter()
        hs.datasets.write_gem(gem, tissue, gzip=True)
        hs.datasets.write_wsi(img, tissue, mpp=0.5, format="ome")
        print(f"  (wrote {gem} and {img} in {time.perf_counter() - t:.0f} s)", flush=True)
    return gem, img, tissue


def _data_c(work: Path, scale: float):
    import histospace as hs

    side = 10000 * scale  # 40,000 px at 0.25 µm/px
    wsi = work / f"wsi_{scale:g}.svs"
    tissue = _tissue(side, 200, 2)
    if not wsi.exists():
        t = time.perf_counter()
        hs.datasets.write_wsi(wsi, tissue, mpp=0.25, format="svs")
        print(f"  (wrote {wsi} in {time.perf_counter() - t:.0f} s)", flush=True)
    return wsi, tissue


# ---- cases ---------------------------------------------------------------------------------------------------------
def _domains_steps(steps: Steps, sdata, table_key: str, image_key: str, device: str):
    import histospace as hs

    tk = {"table_key": table_key}
    kw = {"device": device, "progress_bar": False, **tk, **_weights()}
    steps("image features", hs.pp.image_features, sdata, image_key=image_key, **kw)
    steps("spatial graph", hs.pp.spatial_graph, sdata, **tk)
    steps("StereoMM", hs.tl.stereomm, sdata, device=device, progress_bar=False, **tk)
    steps("domains", hs.tl.domains, sdata, n_clusters=7, **tk)


def _ari(sdata, table_key: str, tissue, um_per_unit: float, offset_um: float) -> float:
    import histospace as hs

    t = sdata.tables[table_key]
    xy = np.asarray(t.obsm["spatial"], dtype=np.float64) * um_per_unit - offset_um
    truth = tissue.domain_at(xy[:, 0], xy[:, 1])
    return hs.metrics.ari(truth.astype(str), t.obs["stereomm_domain"].astype(str).to_numpy())


def case_a(work: Path, scale: float, device: str) -> dict:
    import spatialdata_io

    path, tissue = _data_a(work, scale)
    steps = Steps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = steps("read (spatialdata_io.visium_hd)", spatialdata_io.visium_hd, path, bin_size=8,
                      load_segmentations_only=False)  # fmt: skip
    table_key = "square_008um"
    _domains_steps(steps, sdata, table_key, "hd_full_image", device)
    margin = 0.04 * tissue.width_um  # the writer's default margin around the capture area
    ari = _ari(sdata, table_key, tissue, 0.5, margin)
    return {"n_bins": int(sdata.tables[table_key].n_obs), "ari": ari, "steps": steps.rows}


def case_b(work: Path, scale: float, device: str) -> dict:
    import histospace as hs

    gem, img, tissue = _data_b(work, scale)
    steps = Steps()
    sdata = steps("read + bin50 (hs.io.read_gem)", hs.io.read_gem, gem, bin_size=50)
    steps("attach H&E (hs.io.add_image)", hs.io.add_image, sdata, str(img), image_key="he")
    table_key = next(iter(sdata.tables))
    _domains_steps(steps, sdata, table_key, "he", device)
    ari = _ari(sdata, table_key, tissue, 0.5, 0.0)
    return {"n_bins": int(sdata.tables[table_key].n_obs), "ari": ari, "steps": steps.rows}


def case_c(work: Path, scale: float, device: str, features_method: str = "auto") -> dict:
    import spatialdata as sd

    import histospace as hs

    wsi, tissue = _data_c(work, scale)
    model = _reference_model(work, device)
    steps = Steps()
    sdata = sd.SpatialData()
    steps("open WSI (hs.io.add_image)", hs.io.add_image, sdata, str(wsi), image_key="he")
    steps("tile_image (55 µm)", hs.pp.tile_image, sdata, image_key="he", tile_size=int(round(55 / 0.25)))
    kw = {"table_key": "tiles", "device": device, "progress_bar": False}
    print(f"  {sdata.tables['tiles'].n_obs} tiles", flush=True)
    # `--features-method auto` (the default) picks the patch method for tiles that do not overlap
    steps("image features", hs.pp.image_features, sdata, image_key="he", method=features_method, **kw, **_weights())
    chosen = sdata.tables["tiles"].uns["img_features"]["params"]["method"]
    steps.rows[-1]["step"] = f"image features ({chosen}{', default' if features_method == 'auto' else ''})"
    steps("mclstexp_predict", hs.tl.mclstexp_predict, sdata, model=model, table_key="tiles")
    return {"n_tiles": int(sdata.tables["tiles"].n_obs), "steps": steps.rows}


def _weights() -> dict:
    """The shared ImageNet MobileNetV2 when the data folder is there, else random weights (timings are the same)."""
    data = Path(os.environ.get("HISTOSPACE_DATA", HERE.parent.parent / "shared" / "data"))
    f = data / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
    return {"weights": str(f) if f.is_file() else None}


def _reference_model(work: Path, device: str):
    """An mclSTExp model trained on another simulated section (1.2 mm square, 16 µm bins, 55 µm patches at 0.25 µm/px;
    untimed: its size does not change the timed steps beyond the neighbour search)."""
    import spatialdata_io

    import histospace as hs

    path = work / "reference_model"
    if (path / "params.json").exists():
        return hs.models.MclSTExp.load(path, device=device)
    t = time.perf_counter()
    folder = work / "reference_hd"
    if not (folder / "binned_outputs").exists():
        hs.datasets.write_visium_hd(folder, _tissue(1200, 200, 3), bin_sizes=(16,), dataset_id="ref",
                                    mpp=0.25)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = spatialdata_io.visium_hd(folder, bin_size=16, load_segmentations_only=False)
    tk = {"table_key": "square_016um"}
    hs.pp.image_features(ref, image_key="ref_full_image", patch_size_um=55, progress_bar=False, **tk, **_weights())
    model = hs.tl.mclstexp_train(ref.tables["square_016um"], device=device, progress_bar=False)
    model.save(path)
    print(f"  (trained the reference model in {time.perf_counter() - t:.0f} s)", flush=True)
    return model


CASES = {"a": case_a, "b": case_b, "c": case_c}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="*", default=["a", "b", "c"])
    p.add_argument("--scale", type=float, default=1.0, help="side of the simulated tissue relative to the issue's")
    p.add_argument("--work-dir", default="/tmp/hs_scale")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="", help="a variant (e.g. another --scale): the section TAG of the page")
    p.add_argument("--features-method", default="auto", help="case (c): `method` of hs.pp.image_features")
    p.add_argument("--tables-only", action="store_true", help="rewrite the markdown from the JSON, run nothing")
    p.add_argument("--worker")
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        import torch

        torch.set_num_threads(N_THREADS)
        extra = {"features_method": args.features_method} if args.worker == "c" else {}
        res = CASES[args.worker](work, args.scale, args.device, **extra)
        res["load_avg_1min_end"] = os.getloadavg()[0]
        res["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        print("RESULT " + json.dumps(res, default=float))
        return
    section = args.tag or None
    old = load("pipeline_scale", section=section)
    if args.tables_only:
        if old is None:
            raise SystemExit(
                f"no results in {RESULTS / 'pipeline_scale.json'} for tag {args.tag!r}: run the cases first"
            )
        write_tables(section, old["meta"], old["results"])
        return
    results = {}
    if old is not None and old["meta"]["scale"] == args.scale and old["meta"]["device"] == args.device:
        # cases not run now keep their earlier results (each with its date and load)
        results = {k: v for k, v in old["results"].items() if k not in args.cases}
    for case in args.cases:
        print(f"case ({case})", flush=True)
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--worker", case, "--scale", str(args.scale), "--work-dir", str(work)]
        cmd += ["--device", args.device, "--features-method", args.features_method]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        print(r.stdout[-3000:], flush=True)
        results[case] = json.loads(line[-1][7:]) if line else {"error": r.stderr[-3000:]}
        results[case]["process_seconds"] = time.perf_counter() - t
    meta = {
        "threads": N_THREADS,
        "scale": args.scale,
        "device": args.device,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    write_tables(section, meta, results)


def write_tables(section: str | None, meta: dict, results: dict) -> None:
    """Write the page (or its section `section`) with the stored `meta` and `results`."""
    lines = [
        "# The pipeline at scale (simulated Visium HD, Stereo-seq and whole-slide H&E)",
        "",
        f"{meta['threads']} CPU threads, device {meta['device']}, scale {meta['scale']:g} of the issue's sizes. "
        "Time per step (wall) and the process's peak RSS after it (imports and data included); data generation not "
        "timed.",
        "",
        "| case | size | step | time (s) | peak RSS (GB) |",
        "|---|---|---|---|---|",
    ]
    for case, res in sorted(results.items()):
        n = res.get("n_bins", res.get("n_tiles"))
        size = "?" if n is None else f"{n:,} {'tiles' if 'n_tiles' in res else 'bins'}"
        for row in res.get("steps", []):
            lines.append(f"| ({case}) | {size} | {row['step']} | {row['seconds']:.1f} | {row['peak_rss_gb']:.2f} |")
        total = sum(r["seconds"] for r in res.get("steps", []))
        extra = f", ARI {res['ari']:.3f}" if "ari" in res else ""
        lines.append(f"| ({case}) | {size} | **total** (target {TARGETS[case]}){extra} | {total:.1f} | "
                     f"{max((r['peak_rss_gb'] for r in res.get('steps', [])), default=float('nan')):.2f} |")  # fmt: skip
        if "error" in res:
            lines.append(f"| ({case}) | error | {res['error'][-300:]!r} | | |")
    lines += [""]
    for case, res in sorted(results.items()):
        if "date_utc" in res:
            lines.append(
                f"- ({case}) run {res['date_utc']} UTC, 1-min load average {res['load_avg_1min_end']:.2f} at its end."
            )
    lines += ["", f"Machine: {meta}", ""]
    write_page("pipeline_scale", "\n".join(lines), {"meta": meta, "results": results}, section=section)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
