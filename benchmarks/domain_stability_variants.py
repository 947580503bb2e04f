"""Where the spread of the domains over seeds comes from, and what aggregation of the seed ensemble reduces it.

Reads the latents that `benchmarks/domain_stability.py --save-latents --tag TAG` saved (one per seed `s`: the three
models of seeds `s, s+1, s+2` side by side, the default `hs.tl.stereomm`), splits them into the single models of
consecutive seeds, and clusters ensembles of them with the public `hs.tl.domains` (k = 7; `random_state` = the first
model's seed). No model is trained here, so every row sees the same models and the rows differ only in how the models
are combined and clustered.

Rows (every setting explicit, so that the rows do not move with the defaults):

- `1 model`: each model alone, the mixture of best likelihood of 10 restarts (`n_init=10, consensus=False`, the
  default before 2026-12-06) or the vote of 50 single-start mixtures (`n_init=50, consensus=True`, the default now);
- `3 models voted`: models `s..s+2`, each clustered alone and the labellings voted (`ensemble='vote'`; with the best
  of 10 restarts this was the default before 2026-12-06), with 10 or 50 restarts, or with each model's latent first
  averaged with its spatial neighbours' (`x <- 0.7 x + 0.3 mean(neighbours)`, twice);
- `3 models joint`: 10 PCs of the three latents side by side clustered once (`ensemble='joint'`), the best of 10 or
  the vote of 50 (the default);
- `5 models`: models `s..s+4` (fewer windows: the seeds saved limit them).

For each row: mean, sd and min of the ARI against `layer_guess_reordered` over the windows, and the mean pairwise ARI
between the windows' labels (how much two runs of a user agree with each other). Consecutive windows share models,
so the windows are not independent and the sd of a row is a rough figure (with 8-10 windows its sampling error is
about a quarter of its value).

Usage: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/domain_stability_variants.py --tag lat`
(writes benchmarks/results/domain_stability_variants.{md,json}; a tag other than `lat` is a section of that page).
"""

from __future__ import annotations

import argparse
import time
import warnings
from itertools import combinations

import numpy as np
from _results import write_page
from domain_stability import CACHE, DATA, GT, N_THREADS, SECTIONS  # the latents that script saves

#: (row name, models per ensemble, hs.tl.domains keyword arguments, spatial smoothing of the latent)
BEST_OF_10 = {"n_init": 10, "consensus": False}  # the mixture of best likelihood of 10 restarts (the old default)
VOTE_OF_50 = {"n_init": 50, "consensus": True}  # the vote of 50 single-start mixtures (the default)
VARIANTS = [
    ("1 model, best of 10", 1, BEST_OF_10, False),
    ("1 model, vote of 50", 1, VOTE_OF_50, False),
    ("3 models voted, best of 10 (old default)", 3, {"ensemble": "vote", **BEST_OF_10}, False),
    ("3 models voted, best of 50", 3, {"ensemble": "vote", "n_init": 50, "consensus": False}, False),
    ("3 models voted, best of 10, smoothed latent", 3, {"ensemble": "vote", **BEST_OF_10}, True),
    ("3 models joint, best of 10", 3, {"ensemble": "joint", **BEST_OF_10}, False),
    ("3 models joint, vote of 50 (default)", 3, {"ensemble": "joint", **VOTE_OF_50}, False),
    ("5 models voted, best of 10", 5, {"ensemble": "vote", **BEST_OF_10}, False),
    ("5 models joint, vote of 50", 5, {"ensemble": "joint", **VOTE_OF_50}, False),
]


def _models(section: str, tag: str) -> list[np.ndarray]:
    """The single-model latents of consecutive seeds recovered from the saved 3-model latents, and the first seed."""
    seeds = sorted(int(f.stem.rsplit("seed", 1)[1]) for f in CACHE.glob(f"latent_{tag}_{section}_seed*.npy"))
    if not seeds:
        msg = f"no latents in {CACHE} for tag {tag!r}: run benchmarks/domain_stability.py --save-latents --tag {tag}"
        raise SystemExit(msg)
    models: dict[int, np.ndarray] = {}
    s = seeds[0]
    while (f := CACHE / f"latent_{tag}_{section}_seed{s}.npy").exists():
        for i, block in enumerate(np.split(np.load(f), 3, axis=1)):
            models.setdefault(s + i, block)
        s += 1
    return [models[i] for i in sorted(models)], seeds[0]


def _smooth(x: np.ndarray, adj, lam: float = 0.3, n_iter: int = 2) -> np.ndarray:
    deg = np.maximum(np.asarray(adj.sum(axis=1)).ravel(), 1)
    for _ in range(n_iter):
        x = (1 - lam) * x + lam * (adj @ x) / deg[:, None]
    return x


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", default="lat", help="tag of the latents saved by domain_stability.py --save-latents")
    p.add_argument("--sections", nargs="*", default=SECTIONS)
    args = p.parse_args()
    import histospace as hs

    rows = []
    for section in args.sections:
        adata = hs.datasets.dlpfc(section, data_dir=DATA)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the three isolated spots of 151674
            hs.pp.spatial_graph(adata)
        adj = adata.obsp["spatial_connectivities"].tocsr().astype(np.float64)
        models, first = _models(section, args.tag)
        smoothed = [_smooth(m.astype(np.float64), adj).astype(np.float32) for m in models]
        for name, size, dkw, smooth in VARIANTS:
            t0 = time.perf_counter()
            aris, labels = [], []
            for s in range(len(models) - size + 1):
                source = smoothed if smooth else models
                adata.obsm["X_variant"] = np.hstack(source[s : s + size])
                hs.tl.domains(adata, use_rep="X_variant", n_models=size, n_clusters=7, random_state=first + s, **dkw)
                labels.append(adata.obs["variant_domain"].to_numpy())
                aris.append(hs.metrics.ari(adata.obs[GT], adata.obs["variant_domain"]))
            a = np.array(aris)
            pairwise = [hs.metrics.ari(x, y) for x, y in combinations(labels, 2)]
            rows.append(
                {"section": section, "variant": name, "n_models": size, "n": int(a.size), "mean": float(a.mean())}
                | {"sd": float(a.std(ddof=1)), "min": float(a.min()), "max": float(a.max())}
                | {"pairwise_ari": float(np.mean(pairwise)), "aris": [float(v) for v in a]}
                | {"seconds": time.perf_counter() - t0}
            )
            r = rows[-1]
            print(
                f"{section} {name}: mean {r['mean']:.3f} sd {r['sd']:.3f} pairwise {r['pairwise_ari']:.3f}", flush=True
            )
    meta = {"threads": N_THREADS, "tag": args.tag, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    lines = [
        "# Domain stability: aggregation variants on the same models (DLPFC, k = 7)",
        "",
        f"Single models of seeds {first}-{first + len(models) - 1} from `domain_stability.py --save-latents --tag "
        f"{args.tag}`; "
        "windows of consecutive models clustered with `hs.tl.domains`. ARI against the layers over the windows, and "
        "the mean pairwise ARI between the windows' labels.",
        "",
        "| section | variant | windows | mean ARI | sd | min | max | pairwise ARI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['section']} | {r['variant']} | {r['n']} | {r['mean']:.3f} | {r['sd']:.3f} | {r['min']:.3f} | "
            f"{r['max']:.3f} | {r['pairwise_ari']:.3f} |"
        )
    lines += ["", f"Run of {meta['date_utc']} UTC, {N_THREADS} threads.", ""]
    section = None if args.tag == "lat" else args.tag
    write_page("domain_stability_variants", "\n".join(lines), {"meta": meta, "rows": rows}, section=section)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
