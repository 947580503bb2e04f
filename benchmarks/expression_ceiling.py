"""How much of the query slide's own expression do these image features carry? (issues 22 and 26)

Run from the repository root (after `benchmarks/expression.py --cache F` / `benchmarks/expression_mob.py --cache M`
have written the features):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/expression_ceiling.py --cache F
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/expression_ceiling.py --dataset mob --cache M

Cross-slide transfer (issue 26) can only close the part of the gap between slides that a model trained with the
query slide's own spots would close. This script measures that part with the baseline of the benchmarks,
ridge-PCA256 on the same image features (`histospace.tl._evaluate._regression_baseline`, the code of
`hs.tl.mclstexp_cross_validate`): every section is cut into spatial halves (below / above the median x, then the
median y: four test halves per section), and each test half is predicted by ridge-PCA256 trained on

- the other sections (what leave-one-section-out sees),
- the other sections and the other half of the query section (the most any cross-slide transfer or adaptation to
  the query could hope to learn from that slide: its own spots and expression),
- the other half of the query section alone.

The halves share a border, and spots on both sides of it are alike, so the last two rows are optimistic. Scores as in
`benchmarks/expression.py`: mean per-gene Pearson r over the test half, all genes (constant genes left out) and the
most expressed of the test half (her2st: 785 panel genes, top 50; MOB: 1,000 genes, top 300), targets
`ln(1 + CP10k)` over the genes. The halves hold about 90 spots (her2st) or 970 (MOB), so the figures are lower than a
whole section's; compare rows, not with other pages.

Writes `benchmarks/results/expression_ceiling.md` and `.json` (MOB: section `mob`).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import anndata as ad
import numpy as np
from _results import write_page
from expression import SECTIONS, _data_dir, read_panel

from histospace._utils._data import normalize_expression
from histospace.tl._evaluate import _pearson_columns, _regression_baseline

#: dataset: (sections, feature key, number of top genes)
DATASETS = {"her2st": (SECTIONS, "stages224+448", 50), "mob": (["MOB1", "MOB2", "MOB3"], "mclstexp_features", 300)}
ALPHAS = np.logspace(-2, 6, 17)
#: training sets, as named on the page
TRAIN = {
    "other": "other sections",
    "other+half": "other sections + other half of the query section",
    "half": "other half of the query section only",
}


def halves(xy: np.ndarray) -> list[np.ndarray]:
    """The four test halves of one section (boolean masks over its spots): below / above the median x, then y."""
    out = []
    for axis in (0, 1):
        low = xy[:, axis] < np.median(xy[:, axis])
        out += [low, ~low]
    return out


def ridge_pca256(feats: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """ridge-PCA256 fitted on `train` (features standardised with its mean and sd), predicting `test`."""
    mu, sd = feats[train].mean(axis=0), np.maximum(feats[train].std(axis=0), 1e-6)
    xtr, xte = (feats[train] - mu) / sd, (feats[test] - mu) / sd
    return _regression_baseline("ridge_pca256", xtr, y[train], xte, ridge_alphas=ALPHAS, knn_k=1, random_state=0)[0]


def section_scores(feats, y, lib, xy, section: str, n_top: int) -> dict[str, list[tuple[float, float]]]:
    """`{training set: [(pcc_all, pcc_top) per test half]}` of one section."""
    own = lib == section
    idx = np.flatnonzero(own)
    other = ridge_pca256(feats, y, ~own, own)  # the same fit for every half: made once, its rows taken per half
    out = {k: [] for k in TRAIN}
    for half in halves(xy[own]):
        test = np.zeros(len(lib), bool)
        test[idx[half]] = True
        rest = own & ~test
        top = np.argsort(-y[test].mean(axis=0), kind="stable")[:n_top]
        preds = {
            "other": other[half],
            "other+half": ridge_pca256(feats, y, ~own | rest, test),
            "half": ridge_pca256(feats, y, rest, test),
        }
        for k, pred in preds.items():
            r, _ = _pearson_columns(y[test], pred)
            out[k].append((float(np.nanmean(r)), float(np.nanmean(r[top]))))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="the features of benchmarks/expression.py or expression_mob.py")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", choices=list(DATASETS), default="her2st")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    load_start = os.getloadavg()
    adata = ad.read_h5ad(args.cache)
    sections, key, n_top = DATASETS[args.dataset]
    if args.dataset == "her2st":
        genes = [g for g in read_panel(_data_dir(args.data_dir)) if g in adata.var_names]
    else:
        genes = list(adata.var_names)
    y = normalize_expression(adata[:, genes].X, "log1p_cp10k")
    feats = np.asarray(adata.obsm[key], dtype=np.float64)
    lib = adata.obs["library_id"].astype(str).to_numpy()
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    scores = {}
    for s in sections:
        scores[s] = section_scores(feats, y, lib, xy, s, n_top)
        print(s, {k: np.round(np.mean(v, axis=0), 3).tolist() for k, v in scores[s].items()}, flush=True)
    mean = {k: np.mean([np.mean(scores[s][k], axis=0) for s in sections], axis=0).tolist() for k in TRAIN}
    title = (
        "# What the image features carry of the query slide: ridge-PCA256 on spatial halves (her2st C2-C6)"
        if args.dataset == "her2st"
        else "# Mouse olfactory bulb MOB1-MOB3 (MOB3: animal 2)"
    )
    md = [
        title,
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} .venv/bin/python "
        f"benchmarks/expression_ceiling.py{''.join(' ' + shlex.quote(a) for a in sys.argv[1:])}`; load average "
        f"{load_start[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; python {platform.python_version()}.",
        "",
        f"Each section cut into spatial halves (4 test halves per section: below / above the median x, then y); "
        f"features `{key}`, {len(genes)} genes, top set the {n_top} most expressed of the test half; mean over the "
        "halves, then over the sections. See the script's docstring for the definitions.",
        "",
        "| ridge-PCA256 trained on | pcc_all | pcc_top | " + " | ".join(f"{s} pcc_all" for s in sections) + " |",
        "|---|---|---|" + "---|" * len(sections),
    ]
    for k, name in TRAIN.items():
        cells = " | ".join(f"{np.mean(scores[s][k], axis=0)[0]:.3f}" for s in sections)
        md.append(f"| {name} | {mean[k][0]:.3f} | {mean[k][1]:.3f} | {cells} |")
    data = {
        "sections": scores,
        "mean": mean,
        "genes": len(genes),
        "n_top": n_top,
        "features": key,
    }
    section = None if args.dataset == "her2st" else args.dataset
    heading = None if section is None else title[2:] + " (`--dataset mob`)"
    page = write_page(
        "expression_ceiling", "\n".join(md) + "\n", data, section=section, heading=heading, out=Path(args.out)
    )
    print(page)


if __name__ == "__main__":
    main()
