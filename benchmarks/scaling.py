"""StereoMM scaling: fit time and peak RSS from ~3.6k to 1M spots (simulated Visium-like tissue).

Each size runs in its own process (`--worker`), so the peak RSS (`ru_maxrss`) is that run's own (it includes the
interpreter, imports and the simulated data; the data's size is reported too). The tissue comes from
`benchmarks/_simulate.py` (hex grid, 7 layer domains, 200 genes, 32 image features, 6-neighbour graph).

Per size we report the attention mode and batching that `hs.models.StereoMM` chooses (`attention='auto'`:
exact global attention up to 100,000 spots, local beyond; `batch_size='auto'`: full batch while it fits in about
20,000 spots, spatial tiles of 16,384 spots + halo beyond; `max_epochs=None`: 300 full-batch epochs, or about
300 optimiser steps over the tiles), or the mode forced with `--attention`. Times: preprocessing
(`StereoMM(...)`: normalisation, PCA, graph), the one-off attention cache, the training (the model's default number
of epochs, or `--epochs`; seconds per epoch and per optimiser step show the growth) and the latent. The simulated
domains are recovered with `hs.tl.domains` (on a random 100,000-spot subsample beyond 200,000 spots) as a check that
the fit means something.

Usage: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/scaling.py --sizes 3639 30000 100000 1000000`
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

N_THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _worker(n: int, epochs: int, attention: str, batch_size: str) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(N_THREADS)
    sys.path.insert(0, str(HERE))
    from _simulate import simulate_tissue

    import histospace as hs

    t = time.perf_counter()
    adata = simulate_tissue(n)
    out = {"simulate_seconds": time.perf_counter() - t, "n_edges": int(adata.obsp["spatial_connectivities"].nnz)}
    out["data_mb"] = (adata.X.data.nbytes + adata.X.indices.nbytes + adata.obsm["img_features"].nbytes) / 2**20
    t = time.perf_counter()
    model = hs.models.StereoMM(adata, attention=attention)
    out["preprocess_seconds"] = time.perf_counter() - t
    bs = batch_size if batch_size in ("auto", "full") else int(batch_size)
    t = time.perf_counter()
    model.train(max_epochs=None if epochs <= 0 else epochs, batch_size=bs, device="cpu", progress_bar=False)
    # the one-off global attention cache is built inside train (after the seeded re-initialisation)
    out["attention_cache_seconds"] = model.train_params["attention_cache_seconds"]
    out["train_seconds"] = time.perf_counter() - t - out["attention_cache_seconds"]
    t = time.perf_counter()
    z = model.get_latent_representation()
    out["latent_seconds"] = time.perf_counter() - t
    out["finite"] = bool(np.isfinite(z).all())
    out["attention"] = model.config["attention"]
    out["batching"] = model.train_params["batch_size"]
    out["n_tiles"] = len(model._batches) if getattr(model, "_batches", None) else 1
    out["width"] = model.dim
    out["epochs"] = model.train_params["max_epochs"]
    out["steps"] = out["epochs"] * out["n_tiles"]
    out["final_loss"] = model.history["loss"][-1]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_avg_1min"] = os.getloadavg()[0]
    # domain recovery on the simulated truth (sanity check that the fit is meaningful)
    from sklearn.metrics import adjusted_rand_score

    adata.obsm["X_stereomm"] = z
    if n > 200_000:
        keep = np.sort(np.random.default_rng(0).choice(n, 100_000, replace=False))
        adata = adata[keep].copy()
    hs.tl.domains(adata, n_clusters=7, refine=False)
    out["ari_sim"] = float(adjusted_rand_score(adata.obs["domain"], adata.obs["stereomm_domain"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs=4, metavar=("N", "EPOCHS", "ATTENTION", "BATCH"))
    p.add_argument("--sizes", nargs="*", type=int, default=[3639, 30000, 100000, 1000000])
    p.add_argument("--epochs", type=int, default=0, help="0: the model's default (max_epochs=None)")
    p.add_argument("--attention", nargs="*", default=None, help="one per size; default 'auto'")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--out", default=str(RESULTS), help="folder of scaling.md and scaling.json")
    args = p.parse_args()
    if args.worker:
        n, ep, att, bs = args.worker
        print("RESULT " + json.dumps(_worker(int(n), int(ep), att, bs), default=str))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(N_THREADS), "MKL_NUM_THREADS": str(N_THREADS)}
    atts = args.attention or ["auto"] * len(args.sizes)
    rows = []
    out_json = out / "scaling.json"
    if out_json.exists():
        rows = json.loads(out_json.read_text()).get("rows", [])
    for n, att in zip(args.sizes, atts, strict=True):
        t = time.perf_counter()
        r = subprocess.run(
            [sys.executable, __file__, "--worker", str(n), str(args.epochs), att, args.batch_size],
            capture_output=True,
            text=True,
            env=env,
        )
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        res = json.loads(line[-1][7:]) if (not r.returncode and line) else {"error": r.stderr[-2000:]}
        res.update(n_obs=n, requested_attention=att, process_seconds=time.perf_counter() - t)
        rows = [x for x in rows if not (x["n_obs"] == n and x.get("requested_attention") == att)] + [res]
        print(json.dumps(res, default=str)[:600], flush=True)
        meta = {"threads": N_THREADS, "python": platform.python_version(), "cpu_count": os.cpu_count()}
        out_json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    rows.sort(key=lambda x: (x["n_obs"], str(x.get("requested_attention"))))
    lines = [
        "# StereoMM scaling (simulated tissue)",
        "",
        f"{N_THREADS} CPU threads, seed 0, one process per size; the model's default epochs (300 full-batch steps, or "
        "about 300 optimiser steps over the tiles). Peak RSS is the whole process (imports and simulated data "
        "included). load: 1-min load average at the end of the run (above 2 on this 2-core machine means other jobs "
        "shared the CPU). sim. ARI: domains recovered from the latent (100k-spot subsample beyond 200k spots).",
        "",
        "| spots | attention | batching | epochs | steps | preprocess (s) | attention cache (s) | train (s) | s/step | s/epoch | "
        "latent (s) | total fit (s) | peak RSS (MB) | sim. ARI | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n_obs']} | {r['requested_attention']} | error | | | | | | | | | | | | |")
            continue
        total = r["preprocess_seconds"] + r["attention_cache_seconds"] + r["train_seconds"] + r["latent_seconds"]
        batching = "full" if r["batching"] == "full" else f"tiles of {r['batching']} (+halo), {r['n_tiles']} tiles"
        steps = r.get("steps", r["epochs"] * r["n_tiles"])
        lines.append(
            f"| {r['n_obs']:,} | {r['attention']} | {batching} | {r['epochs']} | {steps} | "
            f"{r['preprocess_seconds']:.1f} | {r['attention_cache_seconds']:.1f} | {r['train_seconds']:.1f} | "
            f"{r['train_seconds'] / steps:.3f} | {r['train_seconds'] / r['epochs']:.2f} | {r['latent_seconds']:.1f} | {total:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r.get('ari_sim', float('nan')):.2f} | {r.get('load_avg_1min', float('nan')):.1f} |"
        )
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
