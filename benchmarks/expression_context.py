"""Nested validation of the spatial context of H&E -> expression (issue 26) on her2st C2-C6.

Run from the repository root (after `benchmarks/expression.py --cache F` has written the features to `F`):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/expression_context.py --cache F --threads 1 [--methods ridge_pca256 bleep]

The default of `hs.models.MclSTExp(spatial_context=...)` must be chosen without the test folds. For each outer held-out
section `o`, the four other sections are split leave-one-out (inner folds); each setting (rings of context 0..3;
smoothing of the predictions over ring 1 of the query graph with weight 0, 0.25 or 0.5) is scored by its mean
inner pcc_all, and the winner is what the outer fold would use. The outer score of every setting is also reported,
so the cost of choosing is visible, but only the chosen setting's outer score counts.

Methods (cheap enough to refit 5 x (4 + 1) x settings times on 2 CPU cores): ridge-PCA256 on the context features
(the features of the spot beside their means over rings 1..k of the slide's `hs.pp.spatial_graph`), BLEEP-style and
mclSTExp with the model's tuned settings (`spatial_context=k`, one model, seed 0, 30 epochs, softmax weights over 200
neighbours). Features: `stages224+448` of `benchmarks/expression.py`.

Writes `benchmarks/results/expression_context.md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import anndata as ad
import numpy as np
import torch
from _results import write_page
from expression import SECTIONS, _data_dir, read_panel

import histospace as hs
from histospace._utils._data import normalize_expression
from histospace.models._context import context_ops, context_rows
from histospace.tl._evaluate import _pearson_columns, _regression_baseline

FEATURES = "stages224+448"
SMOOTH = (0.0, 0.25, 0.5)
NAMES = {"ridge_pca256": "ridge-PCA256", "bleep": "BLEEP-style", "mclstexp": "mclSTExp"}


def score(y: np.ndarray, p: np.ndarray, n_top: int = 50) -> tuple[float, float]:
    """Mean per-gene Pearson r over all genes and over the `n_top` most expressed (of `y`)."""
    r, _ = _pearson_columns(y, p)
    order = np.argsort(-y.mean(0), kind="stable")[:n_top]
    return float(np.nanmean(r)), float(np.nanmean(r[order]))


class Bench:
    """The data of one run: features, targets, section labels and the ring operators of the spatial graph."""

    def __init__(self, adata: ad.AnnData, genes: list[str], max_rings: int):
        hs.pp.spatial_graph(adata, library_key="library_id")
        self.adata = adata
        self.genes = genes
        self.ops = context_ops(adata, max(max_rings, 1), "spatial_connectivities", "spatial", "library_id")
        self.x = np.asarray(adata.obsm[FEATURES], dtype=np.float32)
        self.y = normalize_expression(adata[:, genes].X, "log1p_cp10k")
        self.lib = adata.obs["library_id"].astype(str).to_numpy()

    def smooth(self, p: np.ndarray, test: np.ndarray, alpha: float) -> np.ndarray:
        """`(1 - alpha) p + alpha * mean of p over ring 1` within the test section."""
        if alpha == 0:
            return p
        op = self.ops[0][test][:, test]
        return (1 - alpha) * p + alpha * np.asarray(op @ p)

    def fit_predict(self, method: str, rings: int, train: list[str], test: str) -> tuple[np.ndarray, np.ndarray]:
        tr, te = np.isin(self.lib, train), self.lib == test
        if method == "ridge_pca256":
            f = context_rows(self.x, self.ops[:rings]) if rings else self.x
            xtr, xte = f[tr], f[te]
            mu, sd = xtr.mean(0), np.maximum(xtr.std(0), 1e-6)
            p, _, _ = _regression_baseline(
                method,
                (xtr - mu) / sd,
                self.y[tr],
                (xte - mu) / sd,
                ridge_alphas=np.logspace(-2, 6, 9),
                knn_k=50,
                random_state=0,
            )
            return p, te
        kw = {"features_key": FEATURES, "l2_normalize": True, "learn_temperature": True, "temperature": 0.1}
        kw |= {"spatial_context": rings, "smooth_predictions": 0.0}  # the smoothing is this script's (alpha)
        if method == "bleep":
            kw |= {"spot_encoder": "none", "use_positions": False}
        model = hs.models.MclSTExp(self.adata[tr], genes=self.genes, **kw)
        model.train(max_epochs=30, n_models=1, device="cpu", progress_bar=False, random_state=0)
        return model.predict(self.adata[te], n_neighbors=200, weighting="softmax"), te


def nested(bench: Bench, method: str, rings: list[int]) -> dict:
    """Per outer fold: the inner means of every setting, the chosen one, the outer scores of every setting."""
    out = {}
    for o in SECTIONS:
        t0 = time.perf_counter()
        train = [s for s in SECTIONS if s != o]
        inner: dict[tuple[int, float], list] = {}
        for k in rings:
            for i in train:
                p, te = bench.fit_predict(method, k, [s for s in train if s != i], i)
                for a in SMOOTH:
                    inner.setdefault((k, a), []).append(score(bench.y[te], bench.smooth(p, te, a)))
        means = {key: np.mean(v, axis=0).tolist() for key, v in inner.items()}
        best = max(means, key=lambda key: means[key][0])
        outer = {}
        for k in rings:
            p, te = bench.fit_predict(method, k, train, o)
            for a in SMOOTH:
                outer[(k, a)] = score(bench.y[te], bench.smooth(p, te, a))
        out[o] = {"inner": means, "best": best, "outer": outer, "seconds": time.perf_counter() - t0}
        print(
            f"{method} {o}: chosen rings={best[0]} smooth={best[1]}; outer chosen {outer[best][0]:.3f}/"
            f"{outer[best][1]:.3f}, no context {outer[(0, 0.0)][0]:.3f}/{outer[(0, 0.0)][1]:.3f} "
            f"({out[o]['seconds']:.0f} s)",
            flush=True,
        )
    return out


def write(results: dict, rings: list[int], args, env: dict) -> None:
    md = [
        "# Spatial context for H&E -> expression: nested validation on her2st C2-C6",
        "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/expression_context.py{_argv()}`.",
        f"Environment: {json.dumps(env)}.",
        "",
        "Settings: rings of context k (a spot's features beside their means over rings 1..k of its section's "
        "`hs.pp.spatial_graph`, the legacy-ST 4-neighbour grid; k = 0: no context) and smoothing of the predictions "
        "over ring 1 of the held-out section with weight alpha (0: none). For each outer held-out section, the "
        "setting with the best mean pcc_all over the 4 inner leave-one-section-out folds of its training sections "
        "is chosen; its outer score is what counts. pcc_all / pcc_top: mean per-gene Pearson r over the 785 genes / "
        "the 50 most expressed in the held-out section.",
        "",
    ]
    for method, per in results.items():
        name = NAMES[method]
        chosen = np.array([per[o]["outer"][tuple(per[o]["best"])] for o in SECTIONS])
        base = np.array([per[o]["outer"][(0, 0.0)] for o in SECTIONS])
        md += [
            f"## {name}",
            "",
            f"Nested choice, outer mean over the 5 sections: pcc_all {chosen[:, 0].mean():.3f} (sd over folds "
            f"{chosen[:, 0].std(ddof=1):.3f}), pcc_top {chosen[:, 1].mean():.3f}; without context (k = 0, alpha = 0): "
            f"{base[:, 0].mean():.3f} / {base[:, 1].mean():.3f}.",
            "",
            "| outer fold | chosen k | chosen alpha | inner pcc_all of the choice | outer pcc_all | outer pcc_top | "
            "outer pcc_all, no context | outer pcc_top, no context | seconds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for o in SECTIONS:
            d = per[o]
            b = tuple(d["best"])
            md.append(
                f"| {o} | {b[0]} | {b[1]} | {d['inner'][b][0]:.3f} | {d['outer'][b][0]:.3f} | {d['outer'][b][1]:.3f} "
                f"| {d['outer'][(0, 0.0)][0]:.3f} | {d['outer'][(0, 0.0)][1]:.3f} | {d['seconds']:.0f} |"
            )
        md += ["", "Every setting's outer mean (for reference only; not a choice):", ""]
        md += ["| k | alpha | pcc_all | pcc_top |", "|---|---|---|---|"]
        for key in per[SECTIONS[0]]["outer"]:
            m = np.mean([per[o]["outer"][key] for o in SECTIONS], axis=0)
            md.append(f"| {key[0]} | {key[1]} | {m[0]:.3f} | {m[1]:.3f} |")
        md.append("")
    data = {
        "environment": env,
        "rings": rings,
        "smooth": list(SMOOTH),
        "results": {
            m: {
                o: {
                    "best": list(d["best"]),
                    "seconds": d["seconds"],
                    "inner": {f"{k[0]},{k[1]}": v for k, v in d["inner"].items()},
                    "outer": {f"{k[0]},{k[1]}": v for k, v in d["outer"].items()},
                }
                for o, d in per.items()
            }
            for m, per in results.items()
        },
    }
    write_page("expression_context", "\n".join(md), data, section=args.tag or None, out=Path(args.out))


def _argv() -> str:
    import shlex
    import sys

    return "".join(" " + shlex.quote(a) for a in sys.argv[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache", required=True, help="h5ad with the features of benchmarks/expression.py")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="*", default=["ridge_pca256", "bleep"])
    p.add_argument("--rings", nargs="*", type=int, default=[0, 1, 2, 3])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    adata = ad.read_h5ad(args.cache)
    genes = [g for g in read_panel(_data_dir(args.data_dir)) if g in adata.var_names]
    bench = Bench(adata, genes, max(args.rings))
    env = {"threads": args.threads, "torch": torch.__version__, "load_average_at_start": list(os.getloadavg())}
    results = {}
    for method in args.methods:
        results[method] = nested(bench, method, args.rings)
        env["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write(results, args.rings, args, env)


if __name__ == "__main__":
    main()
