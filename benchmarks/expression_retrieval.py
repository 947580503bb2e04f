"""Cross-slide retrieval and query context as ablations of mclSTExp (issue 26) on her2st C2-C6, leave-one-slide-out.

Run from the repository root (after `benchmarks/expression.py --cache F` has written the features to `F`):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/expression_retrieval.py --cache F --threads 1
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/expression_retrieval.py --dataset mob --cache M --threads 2

(`--dataset mob`: the mouse olfactory bulb MOB1-MOB3 with the features `benchmarks/expression_mob.py --cache M` wrote,
all 1,000 genes, the 300 most expressed as the top set; its fold MOB3 is the cross-animal one, animal 1 -> animal 2.
Written as the section `mob` of the page.)

For each held-out section, one seed ensemble of mclSTExp with the defaults of `hs.models.MclSTExp` (5 models, 30
epochs, features `stages224+448` of `benchmarks/expression.py`) is trained on the other sections, and six
predictions are made from the same trained models, so that the table isolates three components:

- cross-slide retrieval on (the model's prediction: the softmax-weighted mean expression of the 200 reference spots
  whose expression embeddings are nearest to the query spot's image embedding, averaged over the 5 models) or off
  (a regression head instead: `RidgeCV` from the 5 models' image embeddings, side by side, of the training spots to
  their expression; no reference spot is searched at prediction; its predictions are put on the model's principal
  axes of the expression, as the retrieval's are);
- the reference expression on its first 16 principal axes (`expression_rank=16`, the default) or as measured
  (`expression_rank=0`);
- query context off or on (the prediction mixed with its mean over ring 1 of the held-out section's
  `hs.pp.spatial_graph`, weight 0.5: `smooth_predictions=0.5`).

ridge-PCA256 on the image features (the HEST-Benchmark protocol) is scored beside them, as it is and with its
predictions put on the same 16 axes of the training expression (`ReferenceData.on_axes`, what
`hs.tl.mclstexp_cross_validate` does to its baselines), with and without the same smoothing. Scores: mean per-gene
Pearson r over the 785 panel genes (pcc_all) and over the 50 most expressed genes of the held-out section (pcc_top;
MOB: all 1,000 genes and the top 300), targets `ln(1 + CP10k)` over the genes, as in `benchmarks/expression.py`;
per-gene wins of retrieval over the head are counted over the genes of all folds. Spread over spots: retrieval -
ridge-PCA256 and retrieval - ridge-PCA256 on the 16 axes (context off) by the paired spatial block bootstrap of
`_spread.py`, per section and for the mean over sections (positions in µm from the array coordinates: 200 µm per step
on her2st's ST array, 100 µm on MOB's '2k' array).

Writes `benchmarks/results/expression_retrieval.md` and `.json`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _spread
import anndata as ad
import numpy as np
import torch
from _results import write_page
from expression import SECTIONS, _data_dir, read_panel

import histospace as hs
from histospace._utils._data import normalize_expression
from histospace.models._context import ring_operators, smooth_rows
from histospace.models._mclstexp_config import DEFAULT_RANK
from histospace.tl._evaluate import _pearson_columns, _regression_baseline

#: dataset: (sections, feature key, number of top genes, µm per step of the array coordinates: her2st's ST array has
#: spots 200 µm apart, MOB's '2k' array 100 µm per step)
DATASETS = {
    "her2st": (SECTIONS, "stages224+448", 50, 200.0),
    "mob": (["MOB1", "MOB2", "MOB3"], "mclstexp_features", 300, 100.0),
}
SMOOTH = 0.5
ALPHAS = np.logspace(-2, 6, 17)
ROWS = [
    ("retrieval (the default)", "off"),
    ("retrieval (the default)", "on"),
    ("regression head (cross-slide off)", "off"),
    ("regression head (cross-slide off)", "on"),
    ("ridge-PCA256", "off"),
    ("ridge-PCA256", "on"),
    ("retrieval, expression as measured (`expression_rank=0`)", "off"),
    ("retrieval, expression as measured (`expression_rank=0`)", "on"),
    (f"ridge-PCA256 on the same {DEFAULT_RANK} axes", "off"),
    (f"ridge-PCA256 on the same {DEFAULT_RANK} axes", "on"),
]
#: the pairs of the block bootstrap: (label, method a, method b), context off
PAIRS = [
    ("retrieval - ridge-PCA256", ROWS[0][0], ROWS[4][0]),
    (f"retrieval - ridge-PCA256 on the {DEFAULT_RANK} axes", ROWS[0][0], ROWS[8][0]),
]


def fold(adata, genes: list[str], held_out: str, ring1, key: str, n_top: int, step_um: float, seed: int) -> tuple:
    """Scores `{(method, context): (pcc_all, pcc_top)}`, per-gene r, training seconds and the paired block bootstraps
    of `PAIRS` (context off; `{pair: {side: (observed, draws, n_blocks)}}`, see `_spread`) of one held-out section;
    `step_um`: µm per step of the array coordinates.
    """
    lib = adata.obs["library_id"].astype(str).to_numpy()
    tr, te = adata[lib != held_out].copy(), adata[lib == held_out].copy()
    ytr = normalize_expression(tr[:, genes].X, "log1p_cp10k")
    y = normalize_expression(te[:, genes].X, "log1p_cp10k")
    top = np.argsort(-y.mean(0), kind="stable")[:n_top]
    r1 = ring1[lib == held_out][:, lib == held_out]
    t0 = time.perf_counter()
    model = hs.models.MclSTExp(tr, features_key=key, genes=genes)
    model.train(random_state=0, progress_bar=False, device="cpu")
    train_s = time.perf_counter() - t0
    rank = model.expression_rank
    retrieval, measured, emb_tr, emb_te, n = 0.0, 0.0, [], [], model.n_models_
    for i in range(n):
        if n > 1:
            model._use_member(i)
        e = model.get_image_embedding(te)
        emb_te.append(e)
        emb_tr.append(model.get_image_embedding(tr))
        retrieval = retrieval + model.predict_from_embedding(e) / n
        model.expression_rank = 0
        measured = measured + model.predict_from_embedding(e) / n
        model.expression_rank = rank
    if n > 1:
        model._use_member(0)
    from sklearn.linear_model import RidgeCV

    head = RidgeCV(alphas=ALPHAS).fit(np.hstack(emb_tr), ytr).predict(np.hstack(emb_te))
    f, g = tr.obsm[key], te.obsm[key]
    mu, sd = f.mean(0), np.maximum(f.std(0), 1e-6)
    ridge, _, _ = _regression_baseline(
        "ridge_pca256", (f - mu) / sd, ytr, (g - mu) / sd, ridge_alphas=ALPHAS, knn_k=50, random_state=0
    )
    on_axes = model.reference.on_axes  # the model's axes of the training expression (ytr: the same expression)
    preds = {
        ROWS[0][0]: retrieval,
        ROWS[2][0]: on_axes(head, rank),
        ROWS[4][0]: ridge,
        ROWS[6][0]: measured,
        ROWS[8][0]: on_axes(ridge, rank),
    }
    scores, per_gene = {}, {}
    for method, context in ROWS:
        p = np.asarray(preds[method], dtype=np.float32)
        if context == "on":
            p = smooth_rows(p, r1, SMOOTH)
        r, _ = _pearson_columns(y, p)
        scores[(method, context)] = (float(np.nanmean(r)), float(np.nanmean(r[top])))
        per_gene[(method, context)] = r
    xy_um = te.obs[["array_row", "array_col"]].to_numpy(np.float64) * step_um
    boot = {}
    for label, ma, mb in PAIRS:
        pa, pb = (np.asarray(preds[m], dtype=np.float64) for m in (ma, mb))
        boot[label] = {
            side: _spread.block_draws(y, pa, pb, xy_um, top=top, side_um=side, seed=seed) for side in _spread.BLOCKS_UM
        }
    return scores, per_gene, train_s, boot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="the features of benchmarks/expression.py (.h5ad)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dataset", choices=list(DATASETS), default="her2st")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    adata = ad.read_h5ad(args.cache)
    sections, key, n_top, step_um = DATASETS[args.dataset]
    if args.dataset == "her2st":
        genes = [g for g in read_panel(_data_dir(args.data_dir)) if g in adata.var_names]
    else:
        genes = list(adata.var_names)
    hs.pp.spatial_graph(adata, library_key="library_id")
    ring1 = ring_operators(adata.obsp["spatial_connectivities"], 1)[0]
    folds, genes_r, train_s, boots = {}, {}, [], {}
    for i, s in enumerate(sections):
        sc, pg, t, boots[s] = fold(adata, genes, s, ring1, key, n_top, step_um, seed=i)
        folds[s] = sc
        train_s.append(t)
        for k, r in pg.items():
            genes_r.setdefault(k, []).append(r)
        print(s, {f"{m} / context {c}": f"{v[0]:.3f} / {v[1]:.3f}" for (m, c), v in sc.items()}, flush=True)
    mean = {k: tuple(np.mean([folds[s][k] for s in sections], axis=0)) for k in ROWS}
    md = [
        "# Cross-slide retrieval and query context: ablations of mclSTExp on her2st C2-C6"
        if args.dataset == "her2st"
        else "# Mouse olfactory bulb MOB1-MOB3 (leave-one-section-out; MOB3 is the cross-animal fold)",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} .venv/bin/python "
        f"benchmarks/expression_retrieval.py{''.join(' ' + shlex.quote(a) for a in sys.argv[1:])}`; "
        f"{args.threads} torch thread(s), load average {load_start[0]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end; python {platform.python_version()}, torch {torch.__version__}.",
        "",
        f"Leave-one-slide-out over {', '.join(sections)}, {len(genes)} genes, top set the {n_top} most expressed of "
        "the held-out section; one trained seed ensemble per fold (the defaults of `hs.models.MclSTExp`, features "
        f"`{key}`) gives both the retrieval and the regression-head rows. "
        "Context on: predictions mixed with their mean over ring 1 of the held-out section's spatial graph "
        f"(weight {SMOOTH}). See the script's docstring for the definitions.",
        "",
        "| prediction | query context | pcc_all | pcc_top | " + " | ".join(f"{s} pcc_all" for s in sections) + " |",
        "|---|---|---|---|" + "---|" * len(sections),
    ]
    for k in ROWS:
        cells = " | ".join(f"{folds[s][k][0]:.3f}" for s in sections)
        md.append(f"| {k[0]} | {k[1]} | {mean[k][0]:.3f} | {mean[k][1]:.3f} | {cells} |")
    wins = {}
    for c in ("off", "on"):
        a = np.concatenate(genes_r[(ROWS[0][0], c)])
        b = np.concatenate(genes_r[(ROWS[2][0], c)])
        ok = np.isfinite(a) & np.isfinite(b)
        wins[c] = float(np.mean(a[ok] > b[ok]))
    md += [
        "",
        f"Retrieval above the regression head on {100 * wins['off']:.0f} % of the gene x fold pairs (context off), "
        f"{100 * wins['on']:.0f} % (context on). Training per fold (5 models): {np.mean(train_s):.0f} s on average "
        "(shared 2-core machine; not a quiet figure).",
        "",
        f"Spread over spots of retrieval (the default) - ridge-PCA256, as it is and on the same {DEFAULT_RANK} axes, "
        "context off: "
        f"paired spatial block bootstrap (square blocks of the side given, {_spread.N_BOOT} draws of blocks with "
        "replacement per section, both methods' r recomputed on the same drawn spots; the mean over sections "
        "averages one draw of each section); 95 % percentile interval.",
    ]
    spread = {}
    for label, _, _ in PAIRS:
        md += [
            "",
            f"{label}:",
            "",
            "| held-out section | block | blocks | difference all genes [95 % interval] | difference top "
            f"{n_top} [95 % interval] | draws below 0 (all) |",
            "|---|---|---|---|---|---|",
        ]
        spread[label] = {}
        for side in _spread.BLOCKS_UM:
            per = {s: boots[s][label][side] for s in sections}
            mean_obs = np.mean([o for o, _, _ in per.values()], axis=0)
            mean_draws = np.mean([d for _, d, _ in per.values()], axis=0)
            spread[label][str(side)] = {s: _spread.summary(*per[s]) for s in sections}
            spread[label][str(side)]["mean"] = _spread.summary(mean_obs, mean_draws, sum(n for _, _, n in per.values()))
        md += [
            _spread.table_row(s, side, spread[label][side][s]) for s in [*sections, "mean"] for side in spread[label]
        ]
    data = {
        "folds": {s: {f"{m} | {c}": v for (m, c), v in folds[s].items()} for s in sections},
        "mean": {f"{m} | {c}": v for (m, c), v in mean.items()},
        "retrieval_wins_fraction": wins,
        "train_seconds": train_s,
        "spread": spread,
    }
    section = None if args.dataset == "her2st" else args.dataset
    heading = None if section is None else md[0][2:] + " (`--dataset mob`)"
    page = write_page(
        "expression_retrieval", "\n".join(md) + "\n", data, section=section, heading=heading, out=Path(args.out)
    )
    print(page)


if __name__ == "__main__":
    main()
