"""Benchmark histospace on dask.distributed: image features on a LocalCluster vs locally, and a simulated cohort.

1. her2st C2-C5 as one AnnData (`library_key='library_id'`): `hs.pp.image_features` (MobileNetV2, the shared ImageNet
   weights, `patch_size=224`, `context=2`) run locally with 2 torch threads, then on a `LocalCluster` of 2 worker
   processes with 1 thread each (the same 2 cores): max abs difference of the features and wall times. The cluster is
   started and its workers have imported histospace before the timed call; that start-up is reported apart.
2. `--n-slides` simulated slides (`hs.datasets.write_wsi`, `--slide-um` µm square at 1 µm/px) through
   `hs.tl.predict_cohort` with a model trained on her2st C3-C5 (from the features of 1): locally (this process, 2
   threads) and on the 2-worker LocalCluster: slides/min. Then a run on a fresh output folder during which one
   worker process is killed (`os._exit`) once `--kill-after` slides are done: dask reschedules its slide and the
   run completes; a rerun over the same folder skips every slide (resumed).

Usage::

    HISTOSPACE_DATA=/work/shared/data nice -n 10 .venv/bin/python benchmarks/distributed.py [--n-slides 20]

Writes `benchmarks/results/distributed.md` and `.json`. The load average (`os.getloadavg`) is recorded with every
timing: on a shared machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# this file's name is the package's: its folder leaves the import path, `_results` is loaded from its file
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("_results", HERE / "_results.py")
_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_results)
write_page = _results.write_page

SLIDES = ("C2", "C3", "C4", "C5")


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def timed(fn, *args, **kw):
    before = load()
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t, f"{before} -> {load()}"


def her2st_features(args, client_kw) -> tuple:
    import anndata as ad

    import histospace as hs

    parts = []
    for s in SLIDES:
        a = hs.datasets.her2st(s)
        a.obs["library_id"] = s
        parts.append(a)
    adata = ad.concat(parts, uns_merge="unique", join="inner")
    weights = hs.datasets.mobilenet_v2_weights()
    kw = {"encoder": "mobilenet_v2", "weights": str(weights), "patch_size": 224, "context": 2.0,
          "library_key": "library_id", "progress_bar": False, "copy": True}  # fmt: skip
    return adata, kw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-slides", type=int, default=20)
    p.add_argument("--slide-um", type=int, default=1024, help="side of each simulated slide in µm (1 µm/px)")
    p.add_argument("--tile-size", type=int, default=150, help="tile side in px (150 µm, the her2st patch)")
    p.add_argument("--kill-after", type=int, default=5, help="slides done before a worker is killed")
    p.add_argument("--workdir", help="where slides and outputs go (default: a temporary folder)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--features-only", help="run part 1 only and write it as this section of the page")
    args = p.parse_args()

    import torch
    from distributed import Client, LocalCluster

    import histospace as hs

    torch.set_num_threads(2)
    res: dict = {
        "cores": 2,
        "machine_note": "shared machine (2 cores, several engineers): loaded",
        "load_start": load(),
    }
    adata, kw = her2st_features(args, None)
    res["her2st_spots"] = int(adata.n_obs)

    # ---- 1. features: local (2 threads) vs LocalCluster (2 processes x 1 thread) ---------------------------------
    local, t_local, l_local = timed(hs.pp.image_features, adata, client=False, **kw)
    print(f"features local (2 threads): {t_local:.1f} s  load {l_local}", flush=True)
    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    client.run(lambda: __import__("histospace._image.features._patch") and None)  # imports on the workers
    t_start = time.perf_counter() - t0
    print(f"cluster start + worker imports: {t_start:.1f} s", flush=True)
    dist, t_dist, l_dist = timed(hs.pp.image_features, adata, client=client, **kw)
    diff = float(np.abs(dist.obsm["img_features"] - local.obsm["img_features"]).max())
    rec = dist.uns["img_features"]["params"]["distributed"]
    print(f"features cluster: {t_dist:.1f} s  load {l_dist}; max abs diff {diff:.2e}; {rec}", flush=True)
    res["features"] = {"local_s": t_local, "local_load": l_local, "cluster_s": t_dist, "cluster_load": l_dist,
                       "cluster_start_s": t_start, "max_abs_diff": diff, "ratio": t_dist / t_local,
                       "distributed": {k: (str(v) if k == "scheduler" else v) for k, v in rec.items()},
                       "width": int(local.obsm["img_features"].shape[1])}  # fmt: skip

    if args.features_only:
        client.close()
        cluster.close()
        md = [
            f"# Image features only (`--features-only {args.features_only}`)",
            "",
            f"her2st C2-C5 ({res['her2st_spots']} spots), settings of the main table. Load at start {res['load_start']}.",
            "",
            "| run | wall time (s) | load before -> after |",
            "|---|---|---|",
            f"| local, 2 threads | {t_local:.1f} | {l_local} |",
            f"| LocalCluster 2 x 1 thread | {t_dist:.1f} | {l_dist} |",
            "",
            f"Cluster / local: **{t_dist / t_local:.2f}x**; max abs difference **{diff:.1e}**; tasks {rec}.",
        ]
        write_page("distributed", "\n".join(md) + "\n", res, section=args.features_only, out=Path(args.out))
        return
    # ---- 2. cohort ------------------------------------------------------------------------------------------------
    ref = local[local.obs["library_id"] != "C2"].copy()
    model, t_train, _ = timed(hs.tl.mclstexp_train, ref, n_top_genes=200, max_epochs=10, n_models=1, progress_bar=False)
    print(f"model trained on C3-C5 in {t_train:.1f} s", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hs_cohort_"))
    work.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(args.n_slides):
        path = work / "slides" / f"slide{i:02d}.tif"
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            tissue = hs.datasets.simulate_tissue(width_um=args.slide_um, height_um=args.slide_um, random_state=i)
            hs.datasets.write_wsi(path, tissue, mpp=1.0, tile=256)
        slides.append(str(path))
    opts = {"tile_size": args.tile_size, "progress": True}
    cohort = {"n_slides": args.n_slides, "slide_px": args.slide_um, "tile_size": args.tile_size}

    print("cohort, local (2 threads):", flush=True)
    tab, t, ld = timed(hs.tl.predict_cohort, slides, model=model, outdir=work / "local", client=False, **opts)
    cohort["local"] = {"s": t, "load": ld, "slides_per_min": 60 * args.n_slides / t,
                       "n_tiles": int(tab["n_tiles"].sum()), "done": int((tab["status"] == "done").sum())}  # fmt: skip
    print("cohort, 2-worker LocalCluster:", flush=True)
    tab, t, ld = timed(hs.tl.predict_cohort, slides, model=model, outdir=work / "cluster", client=client, **opts)
    cohort["cluster"] = {"s": t, "load": ld, "slides_per_min": 60 * args.n_slides / t,
                         "n_tiles": int(tab["n_tiles"].sum()), "done": int((tab["status"] == "done").sum())}  # fmt: skip

    print(f"cohort with a worker killed after {args.kill_after} slides:", flush=True)
    out = work / "killed"
    killed: dict = {}

    def killer():
        while len(list(out.glob("*.zarr/histospace_cohort.json"))) < args.kill_after:
            time.sleep(0.05)
        victim = sorted(client.scheduler_info()["workers"])[0]
        killed["worker"], killed["at_done"] = victim, len(list(out.glob("*.zarr/histospace_cohort.json")))
        killed["tmp_present"] = [p.name for p in out.glob("*.zarr.tmp")]
        try:
            client.run(os._exit, 1, workers=[victim])
        except Exception as e:  # noqa: BLE001 - the worker dies before it answers
            killed["run_error"] = type(e).__name__
        print(f"  killed worker {victim} with {killed['at_done']} slides done", flush=True)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    tab, t, ld = timed(hs.tl.predict_cohort, slides, model=model, outdir=out, client=client, on_error="warn", **opts)
    th.join(timeout=5)
    done = int((tab["status"] == "done").sum())
    again, t2, ld2 = timed(
        hs.tl.predict_cohort, slides, model=model, outdir=out, client=client, on_error="warn", **opts
    )
    equal = all(
        np.allclose(_pred(out / f"{n}.zarr"), _pred(work / "local" / f"{n}.zarr"), atol=1e-5) for n in tab.index
    )
    cohort["killed"] = {"s": t, "load": ld, "done": done, "failed": int((tab["status"] == "failed").sum()),
                        "killed": killed, "tmp_left": [p.name for p in out.glob("*.tmp")],
                        "rerun_s": t2, "rerun_load": ld2, "rerun_skipped": int((again["status"] == "skipped").sum()),
                        "rerun_done": int((again["status"] == "done").sum()), "equal_to_local": bool(equal)}  # fmt: skip
    res["cohort"] = cohort
    client.close()
    cluster.close()
    res["load_end"] = load()
    report(res, args)


def _pred(path):
    import spatialdata as sd

    return np.asarray(sd.read_zarr(path).tables["tiles"].obsm["mclstexp"], dtype=np.float64)


def report(res: dict, args) -> None:
    f, c = res["features"], res["cohort"]
    k = c["killed"]
    md = [
        "# dask.distributed: image features on a LocalCluster, and a simulated cohort",
        "",
        f"Machine: {res['machine_note']}; load averages (1/5/15 min) at start {res['load_start']}, end "
        f"{res['load_end']}. Local runs use 2 torch threads in one process; the cluster is a `LocalCluster` of 2 "
        "worker processes with 1 thread each (the same 2 cores). Script: `benchmarks/distributed.py`.",
        "",
        f"## Image features, her2st C2-C5 ({res['her2st_spots']} spots, one AnnData, `library_key`)",
        "",
        f"MobileNetV2 (shared ImageNet weights), `patch_size=224`, `context=2` ({f['width']} features).",
        "",
        "| run | wall time (s) | load before -> after |",
        "|---|---|---|",
        f"| local, 2 threads | {f['local_s']:.1f} | {f['local_load']} |",
        f"| LocalCluster 2 x 1 thread | {f['cluster_s']:.1f} | {f['cluster_load']} |",
        "",
        f"Cluster / local wall time: **{f['ratio']:.2f}x**; max abs difference of the features: "
        f"**{f['max_abs_diff']:.1e}**. Cluster start and worker imports (not in the timed call): "
        f"{f['cluster_start_s']:.1f} s. Tasks: {f['distributed']}.",
        "",
        f"## Cohort: {c['n_slides']} simulated slides through `hs.tl.predict_cohort`",
        "",
        f"Each slide {c['slide_px']} x {c['slide_px']} px at 1 µm/px (`hs.datasets.write_wsi`), tiles of "
        f"{c['tile_size']} px over the tissue, mclSTExp trained on her2st C3-C5 (the features above).",
        "",
        "| run | slides | tiles | wall time (s) | slides/min | load before -> after |",
        "|---|---|---|---|---|---|",
        f"| local, 2 threads | {c['local']['done']} | {c['local']['n_tiles']} | {c['local']['s']:.1f} | "
        f"{c['local']['slides_per_min']:.1f} | {c['local']['load']} |",
        f"| LocalCluster 2 x 1 thread | {c['cluster']['done']} | {c['cluster']['n_tiles']} | "
        f"{c['cluster']['s']:.1f} | {c['cluster']['slides_per_min']:.1f} | {c['cluster']['load']} |",
        f"| LocalCluster, a worker killed after {k['killed'].get('at_done')} slides | {k['done']} done, "
        f"{k['failed']} failed | | {k['s']:.1f} | {60 * c['n_slides'] / k['s']:.1f} | {k['load']} |",
        f"| rerun of the killed run's folder | {k['rerun_skipped']} skipped, {k['rerun_done']} done | | "
        f"{k['rerun_s']:.1f} | | {k['rerun_load']} |",
        "",
        f"Killed run: worker `{k['killed'].get('worker')}` ended by `os._exit` with "
        f"{k['killed'].get('at_done')} slides done (half-written `.tmp` folders at that moment: "
        f"{k['killed'].get('tmp_present')}); dask rescheduled its slide; `.tmp` left after the run: {k['tmp_left']}; "
        f"every prediction equal to the local run's (atol 1e-5): {k['equal_to_local']}.",
    ]
    text = "\n".join(md) + "\n"
    print(text)
    write_page("distributed", text, res, out=Path(args.out))


if __name__ == "__main__":
    main()
