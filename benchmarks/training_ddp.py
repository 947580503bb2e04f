"""Training on several processes (`devices=N`, torch.distributed DDP, gloo on the CPU) against one process.

Three measurements, each in its own Python process (this script with `--worker`), so that the peak memory reported
belongs to that run alone:

- `dlpfc`: DLPFC 151673, the default pipeline of `benchmarks/domains.py` / `histospace domains` (`hs.pp.image_features`
  defaults with the shared MobileNetV2 weights, cached in `results/cache/img_features_151673.npy` as by
  `domains.py`; `hs.pp.spatial_graph`; `hs.tl.stereomm` defaults, 3-model seed ensemble, seed 0; `hs.tl.domains`
  with 7 clusters), `devices=1` and `devices=2`; ARI against `layer_guess_reordered`, the fit's wall time.
  With `devices=2` the full batch (3,639 spots) is split into one spatial tile (plus halo) per process; each step
  averages the two tiles' gradients, so both runs take 300 optimiser steps per model.
- `her2st`: mclSTExp on her2st C2-C6, leave-one-section-out (`hs.tl.mclstexp_cross_validate`), the 224-px
  MobileNetV2 features (`f224` of `benchmarks/expression.py`), defaults (30 epochs) but one model instead of five;
  mean per-gene PCC over the panel (mean over the held-out sections) for `devices=1` and `devices=2`.
- `memory`: a simulated tissue (`benchmarks/_simulate.py`: counts, image features, hex graph) of `--n-bins` bins,
  StereoMM defaults with one model and `--epochs` epochs, `devices=2`: peak RSS of the parent process (which holds
  the data; `ru_maxrss`) and of the largest rank (its `VmHWM`, sampled every 0.2 s). The ranks receive the input
  tensors through torch's shared memory, so the parent's and the ranks' figures share those pages (their sum
  over-counts).

Each process is given `max(1, cores // devices)` torch threads (`devices=1`: `--threads`). The machine has 2 cores
shared with other jobs: two processes are not faster here than one with two threads; the load average is recorded
with every row.

Usage (from the repository root):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/training_ddp.py [--parts dlpfc,her2st,memory]
        [--n-bins 1000000] [--epochs 1] [--threads 1]

Writes `benchmarks/results/training_ddp.md` and `.json` (rows of parts not run are kept from the previous run).
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / "cache"
DATA = Path(os.environ.get("HISTOSPACE_DATA", HERE.parent.parent / "shared" / "data"))
WEIGHTS = DATA / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
HER2ST = ["C2", "C3", "C4", "C5", "C6"]
PANEL = DATA / "her2st" / "gene_lists" / "her2st_785genes_hist2st.txt"


class _RankMemory:
    """Peak RSS of this process's child processes (the DDP ranks), sampled from their `VmHWM` every 0.2 s.

    `RUSAGE_CHILDREN` cannot be used: Linux keeps a child's peak from before its `exec`, so a spawned rank would
    report at least the parent's size at the time of the fork.
    """

    def __init__(self):
        import threading

        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.2):
            for child in me.children(recursive=True):
                try:
                    status = Path(f"/proc/{child.pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return round(self.peak_kb / 1024, 1) or None


def _rss(rank_mb: float | None) -> dict:
    """Peak RSS of this process (`ru_maxrss`) and of its largest rank."""
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_parent_mb": round(self_mb, 1), "peak_rss_rank_hwm_mb": rank_mb}


def _dlpfc(devices: int, threads: int) -> dict:
    import numpy as np

    import histospace as hs

    adata = hs.datasets.dlpfc("151673", data_dir=DATA)
    feat_file = CACHE / "img_features_151673.npy"
    if feat_file.exists():
        adata.obsm["img_features"] = np.load(feat_file)
    else:  # as benchmarks/domains.py computes (and caches) them
        hs.pp.image_features(adata, weights=str(WEIGHTS), device="cpu", progress_bar=False)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(feat_file, adata.obsm["img_features"])
    hs.pp.spatial_graph(adata)
    t0 = time.perf_counter()
    hs.tl.stereomm(adata, devices=devices, device="cpu", random_state=0, progress_bar=False)
    fit = time.perf_counter() - t0
    hs.tl.domains(adata, n_clusters=7)
    labels = np.asarray(adata.obs["stereomm_domain"])
    p = adata.uns["stereomm"]["params"]
    return {
        "ari": float(hs.metrics.ari(adata.obs["layer_guess_reordered"], labels)),
        "nmi": float(hs.metrics.nmi(adata.obs["layer_guess_reordered"], labels)),
        "fit_s": round(fit, 1),
        "n_obs": int(adata.n_obs),
        "batch_size": str(p["batch_size"]),
        "max_epochs": int(p["max_epochs"]),
        "backend": str(p["backend"]),
        "threads_per_process": int(p["threads_per_process"]),
    }


def _her2st(devices: int, threads: int) -> dict:
    import anndata as ad
    import pandas as pd

    import histospace as hs

    cache = CACHE / "her2st_f224.h5ad"
    if cache.exists():
        adata = ad.read_h5ad(cache)
    else:  # the f224 features of benchmarks/expression.py
        kw = {"encoder": "mobilenet_v2", "weights": WEIGHTS, "mean": 0.5, "std": 0.5, "progress_bar": False}
        parts = []
        for s in HER2ST:
            a = hs.datasets.her2st(s, data_dir=DATA, image=False)
            hs.pp.image_features(a, patch_size=224, key_added="f224", device="cpu", batch_size=32, **kw)
            a.obs["library_id"] = s
            del a.uns["f224"]
            parts.append(a)
        adata = ad.concat(parts, join="outer", fill_value=0, uns_merge="first")
        adata.obs["library_id"] = pd.Categorical(adata.obs["library_id"])
        CACHE.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(cache)
    genes = [g.strip() for g in open(PANEL) if g.strip()]
    genes = [g for g in genes if g in adata.var_names]
    t0 = time.perf_counter()
    res = hs.tl.mclstexp_cross_validate(
        adata,
        groupby="library_id",
        genes=genes,
        model_kwargs={"features_key": "f224"},
        train_kwargs={"n_models": 1, "device": "cpu", "devices": devices},
        baselines=(),
        random_state=0,
        progress_bar=False,
    )
    s = res["summary"]
    s = s[s["method"] == "mclstexp"]
    return {
        "pcc_mean": float(s["pcc_all"].mean()),
        "pcc_per_section": {str(k): float(v) for k, v in zip(s["fold"], s["pcc_all"], strict=True)},
        "train_s": round(float(s["train_time_s"].sum()), 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "n_obs": int(adata.n_obs),
        "n_genes": len(genes),
    }


def _memory(devices: int, threads: int, n_bins: int, epochs: int) -> dict:
    sys.path.insert(0, str(HERE))
    from _simulate import simulate_tissue

    import histospace as hs

    t0 = time.perf_counter()
    adata = simulate_tissue(n_bins)
    t_sim = time.perf_counter() - t0
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    model = hs.tl.stereomm(
        adata, n_models=1, max_epochs=epochs, devices=devices, device="cpu", progress_bar=False, return_model=True
    )
    p = adata.uns["stereomm"]["params"]
    return {
        "n_bins": int(adata.n_obs),
        "epochs": epochs,
        "batch_size": str(p["batch_size"]),
        "n_tiles": len(model._tiles or []),
        "attention": str(p["attention"]),
        "simulate_s": round(t_sim, 1),
        "stereomm_s": round(time.perf_counter() - t0, 1),
        "rss_after_data_mb": round(rss_data, 1),
    }


def _worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    ranks = _RankMemory()
    if args.worker == "dlpfc":
        out = _dlpfc(args.devices, args.threads)
    elif args.worker == "her2st":
        out = _her2st(args.devices, args.threads)
    else:
        out = _memory(args.devices, args.threads, args.n_bins, args.epochs)
    out |= {
        "part": args.worker,
        "devices": args.devices,
        **_rss(ranks.stop() if args.devices > 1 else None),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    print("RESULT " + json.dumps(out), flush=True)


def _run(part: str, devices: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", part, "--devices", str(devices), "--threads", str(args.threads)]
    cmd += ["--n-bins", str(args.n_bins), "--epochs", str(args.epochs)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
        return {"part": part, "devices": devices, "error": proc.stderr.strip().splitlines()[-1:]}
    out = json.loads(lines[-1][7:])
    out["process_s"] = round(time.perf_counter() - t0, 1)
    print(out, flush=True)
    return out


def _md(rows: list[dict], machine: dict) -> str:
    def get(r, k, fmt="{}"):
        return fmt.format(r[k]) if r.get(k) is not None else "—"

    lines = [
        "# Training on several processes (DDP)",
        "",
        "`devices=N`: torch.distributed DistributedDataParallel, gloo on the CPU, processes spawned by histospace "
        "(`torch.multiprocessing.spawn`), `max(1, cores // N)` torch threads each. Written by "
        "`benchmarks/training_ddp.py` (method and caveats in its docstring). The machine has 2 cores shared with "
        "other jobs (see the load averages, 1/5/15 min at the end of each run): two processes are not faster than "
        "one here; the figures show that the results agree, not a speed-up.",
        "",
        "## DLPFC 151673, StereoMM defaults (3-model ensemble, seed 0), `hs.tl.domains` k = 7",
        "",
        "| devices | ARI | NMI | fit (s) | batch | epochs | backend | threads / process | peak RSS parent / rank (MB) "
        "| load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["part"] == "dlpfc"):
        lines.append(
            f"| {r['devices']} | {get(r, 'ari', '{:.3f}')} | {get(r, 'nmi', '{:.3f}')} | {get(r, 'fit_s')} | "
            f"{get(r, 'batch_size')} | {get(r, 'max_epochs')} | {get(r, 'backend')} | {get(r, 'threads_per_process')} "
            f"| {get(r, 'peak_rss_parent_mb')} / {get(r, 'peak_rss_rank_hwm_mb')} | {get(r, 'load_avg')} |"
        )
    lines += [
        "",
        "## her2st C2-C6, mclSTExp leave-one-section-out (f224 features, 1 model, 30 epochs, seed 0)",
        "",
        "| devices | mean PCC | PCC per held-out section | train (s, 5 folds) | peak RSS parent / rank (MB) | load |",
        "|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["part"] == "her2st"):
        per = ", ".join(f"{k} {v:.3f}" for k, v in (r.get("pcc_per_section") or {}).items()) or "—"
        lines.append(
            f"| {r['devices']} | {get(r, 'pcc_mean', '{:.4f}')} | {per} | {get(r, 'train_s')} | "
            f"{get(r, 'peak_rss_parent_mb')} / {get(r, 'peak_rss_rank_hwm_mb')} | {get(r, 'load_avg')} |"
        )
    lines += [
        "",
        "## Memory per process, simulated tissue, StereoMM (1 model), `devices=2`",
        "",
        "| bins | epochs | tiles | attention | peak RSS after simulating (MB) | peak RSS parent (MB) | peak RSS "
        "largest rank (MB) | StereoMM (s) | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["part"] == "memory"):
        lines.append(
            f"| {get(r, 'n_bins')} | {get(r, 'epochs')} | {get(r, 'n_tiles')} | {get(r, 'attention')} | "
            f"{get(r, 'rss_after_data_mb')} | {get(r, 'peak_rss_parent_mb')} | {get(r, 'peak_rss_rank_hwm_mb')} | "
            f"{get(r, 'stereomm_s')} | {get(r, 'load_avg')} |"
        )
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "Failed runs: " + "; ".join(f"{r['part']} devices={r['devices']}: {r['error']}" for r in errors)]
    lines += ["", f"Machine: {machine}", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="dlpfc,her2st,memory")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--n-bins", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    sys.path.insert(0, str(HERE))
    from _results import load, write_page

    parts = [p for p in args.parts.split(",") if p]  # --parts "": rewrite the page from the stored rows
    old = (load("training_ddp") or {}).get("rows", [])
    rows = [r for r in old if r["part"] not in parts]
    for part in parts:
        for devices in (1, 2) if part != "memory" else (2,):
            rows.append(_run(part, devices, args))
            md = _md(rows, _machine(args))
            write_page("training_ddp", md, {"rows": rows, "machine": _machine(args)})
    write_page("training_ddp", _md(rows, _machine(args)), {"rows": rows, "machine": _machine(args)})


def _machine(args) -> dict:
    import torch

    return {
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


if __name__ == "__main__":
    main()
