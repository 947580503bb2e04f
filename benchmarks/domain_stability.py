"""Stability of the default domain pipeline over seeds on DLPFC 151673 and 151674 (k = 7).

For each section: the default image features (computed once and cached), the default graph, then for seeds 0..N-1 the default `hs.tl.stereomm(random_state=s)` followed by the default
`hs.tl.domains(random_state=s)` — model and clustering seeds change together, as for a user who reruns with another
seed. Reports ARI mean, sd, min and max against `layer_guess_reordered`. A second set of rows keeps the model of seed
0 and changes only the clustering seed, to tell the clustering's share of the spread from the model's.

Usage: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/domain_stability.py [--seeds 10] [--domains-kwargs JSON]`
(writes benchmarks/results/domain_stability.{md,json}; `--tag` writes a variant as a section of that page; `--save-latents` keeps
each seed's latent, `--latents TAG` clusters the latents of an earlier run instead of training the same models again).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from _results import write_page

N_THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / "cache"
DATA = Path(os.environ.get("HISTOSPACE_DATA", HERE.parent.parent / "shared" / "data"))
SECTIONS = ["151673", "151674"]
GT = "layer_guess_reordered"


def _features(adata, section: str, features_kwargs: dict) -> None:
    """`hs.pp.image_features` with its defaults (the shared MobileNetV2 weights) and `--features-kwargs`, cached in
    results/cache under a name that changes with those arguments and with the function's defaults and version (so a
    change of default never reuses stale features)."""
    import hashlib
    import inspect

    import histospace as hs

    defaults = {k: repr(v.default) for k, v in inspect.signature(hs.pp.image_features).parameters.items()}
    key = json.dumps([defaults, hs.__version__, features_kwargs], sort_keys=True, default=str)
    f = CACHE / f"img_features_{section}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npy"
    if not f.exists():
        weights = DATA / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
        hs.pp.image_features(adata, weights=str(weights), progress_bar=False, **features_kwargs)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(f, adata.obsm["img_features"])
    adata.obsm["img_features"] = np.load(f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--seed-offset", type=int, default=0, help="seeds OFFSET..OFFSET+N-1 (a replicate on other seeds)")
    p.add_argument("--sections", nargs="*", default=SECTIONS)
    p.add_argument("--domains-kwargs", default="{}", help="JSON of extra hs.tl.domains arguments (a variant)")
    p.add_argument("--features-kwargs", default="{}", help="JSON of hs.pp.image_features arguments (a variant)")
    p.add_argument("--tag", default="", help="a variant: its results become the section TAG of the page")
    p.add_argument("--save-latents", action="store_true", help="keep each seed's latent in results/cache")
    p.add_argument(
        "--latents",
        default=None,
        help="cluster the latents that `--save-latents --tag LATENTS` saved instead of training (same models)",
    )
    args = p.parse_args()
    import torch

    torch.set_num_threads(N_THREADS)
    import histospace as hs

    dkw = json.loads(args.domains_kwargs)
    fkw = json.loads(args.features_kwargs)
    rows = []
    for section in args.sections:
        adata = hs.datasets.dlpfc(section, data_dir=DATA)
        _features(adata, section, fkw)
        hs.pp.spatial_graph(adata)
        latent0 = None
        for s in range(args.seed_offset, args.seed_offset + args.seeds):
            t0 = time.perf_counter()
            if args.latents:  # the default 3-model latents of an earlier run, as hs.tl.stereomm writes them
                adata.obsm["X_stereomm"] = np.load(CACHE / f"latent_{args.latents}_{section}_seed{s}.npy")
                n_latent = adata.obsm["X_stereomm"].shape[1] // 3
                adata.uns["stereomm"] = {"params": {"n_models": 3, "n_latent": n_latent}}
            else:
                hs.tl.stereomm(adata, random_state=s, progress_bar=False)
            t_fit = time.perf_counter() - t0
            if s == args.seed_offset:
                latent0 = adata.obsm["X_stereomm"].copy()
            if args.save_latents:  # for comparing clustering variants on the same latents
                CACHE.mkdir(parents=True, exist_ok=True)
                np.save(CACHE / f"latent_{args.tag or 'default'}_{section}_seed{s}.npy", adata.obsm["X_stereomm"])
            t0 = time.perf_counter()
            hs.tl.domains(adata, random_state=s, **dkw)
            t_dom = time.perf_counter() - t0
            ari = hs.metrics.ari(adata.obs[GT], adata.obs["stereomm_domain"])
            rows.append(
                {"section": section, "kind": "model+clustering seed", "seed": s, "ari": ari, "fit_s": t_fit}
                | {"domains_s": t_dom, "load": os.getloadavg()[0]}
            )
            print(f"{section} seed {s}: ARI {ari:.3f} (fit {t_fit:.1f} s, domains {t_dom:.1f} s)", flush=True)
        adata.obsm["X_stereomm"] = latent0
        for s in range(args.seed_offset, args.seed_offset + args.seeds):
            t0 = time.perf_counter()
            hs.tl.domains(adata, random_state=s, **dkw)
            ari = hs.metrics.ari(adata.obs[GT], adata.obs["stereomm_domain"])
            rows.append(
                {"section": section, "kind": f"clustering seed (model seed {args.seed_offset})", "seed": s, "ari": ari}
                | {"domains_s": time.perf_counter() - t0, "load": os.getloadavg()[0]}
            )
    summary = []
    for section in args.sections:
        for kind in ("model+clustering seed", f"clustering seed (model seed {args.seed_offset})"):
            a = np.array([r["ari"] for r in rows if r["section"] == section and r["kind"] == kind])
            summary.append(
                {
                    "section": section,
                    "kind": kind,
                    "n": int(a.size),
                    "mean": float(a.mean()),
                    "sd": float(a.std(ddof=1)),
                }
                | {"min": float(a.min()), "max": float(a.max())}
            )
    meta = {
        "threads": N_THREADS,
        "latents": args.latents,
        "seed_offset": args.seed_offset,
        "domains_kwargs": dkw,
        "features_kwargs": fkw,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    lines = [
        f"# Domain stability over {args.seeds} seeds (DLPFC, k = 7)",
        "",
        "Default pipeline (`hs.pp.image_features` as in the domain benchmark, `hs.pp.spatial_graph`, `hs.tl.stereomm`, "
        f"`hs.tl.domains`{' with ' + json.dumps(dkw) if dkw else ''}"
        f"{'; image features with ' + json.dumps(fkw) if fkw else ''}"
        f"{'; the models of the run tagged ' + repr(args.latents) + ', not retrained' if args.latents else ''}"
        f"); ARI against `{GT}`. 'model+clustering seed': "
        f"`random_state=s` in both (s = {args.seed_offset}..{args.seed_offset + args.seeds - 1}); "
        f"'clustering seed': the model of seed {args.seed_offset}, `hs.tl.domains(random_state=s)`.",
        "",
        "| section | seeds varied | n | mean ARI | sd | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['section']} | {r['kind']} | {r['n']} | {r['mean']:.3f} | {r['sd']:.3f} | {r['min']:.3f} | "
            f"{r['max']:.3f} |"
        )
    lines += [
        "",
        "Per seed (model+clustering): "
        + ", ".join(f"{r['section']}/{r['seed']}: {r['ari']:.3f}" for r in rows if r["kind"].startswith("model")),
        "",
        f"Run of {meta['date_utc']} UTC, {N_THREADS} threads (the ARIs depend on the thread count only through the last "
        "bits of the fits, which can move a seed's ARI; the fit times are in the JSON with the load).",
        "",
    ]
    data = {"meta": meta, "summary": summary, "rows": rows}
    write_page("domain_stability", "\n".join(lines), data, section=args.tag or None)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
