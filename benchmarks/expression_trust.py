"""Per-gene trust of mclSTExp on her2st C2-C6 (leave-one-slide-out): baselines, held-out FDR, ensemble spread.

Run from the repository root (features cached by `benchmarks/expression.py --cache`, computed when absent):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/expression_trust.py [--data-dir ../shared/data] [--cache /tmp/f.h5ad]

One call of `hs.tl.mclstexp_cross_validate` with the defaults of `hs.models.MclSTExp` (the validated settings:
L2-normalised embeddings with a learned temperature, 30 epochs, a 5-model seed ensemble, softmax weights over 200
neighbours, the reference expression on its first 16 principal axes) on the stage features of the 224-px patch and a
448-px context patch (`stages224+448`, see `expression.py`), with BLEEP-style, ridge, ridge-PCA256 and kNN on the
same folds, genes, targets and features, and `return_predictions=True` (the regressions' predictions are put on the
model's principal axes, as `hs.tl.mclstexp_cross_validate` does). It reports:

- the methods side by side (mean per-gene Pearson over the panel and over the 50 most expressed genes, MSE, MAE, genes
  at FDR < 0.05 per fold, training and prediction time per fold);
- the number of panel genes predictable at FDR < 0.05 over the five held-out sections (the `gene_scores` table:
  one-sided p-values of the five folds combined by Stouffer's method, Benjamini-Hochberg over the genes), and those
  significant in every fold;
- whether the ensemble's per-spot standard deviation flags the errors: Spearman's rho between the sd and the absolute
  error on the held-out sections, (a) over all spot x gene entries of a section, (b) per spot (mean over genes of
  both), (c) per gene across spots (median over genes). (a) mixes genes, whose sd and error both grow with their
  expression, so it is the most flattering; (c) asks whether, for a given gene, the spots with a larger spread are
  the ones predicted worse.

Writes `benchmarks/results/expression_trust.md`, `.json` and `expression_trust_predictability.png`. A quick check at a
small size: `--sections C2 C3 C4 --epochs 2 --n-models 2 --out /tmp/trust_check`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import pandas as pd
import torch
from scipy.stats import false_discovery_control, spearmanr

import histospace as hs

ROOT = Path(__file__).resolve().parent
FEATURES = "stages224+448"
METHODS = ["mclstexp", "bleep", "ridge", "ridge_pca256", "knn"]
NAMES = {
    "mclstexp": "mclSTExp",
    "bleep": "BLEEP-style",
    "ridge": "ridge",
    "ridge_pca256": "ridge-PCA256",
    "knn": "kNN (k=50)",
}


def spread_vs_error(obs: pd.DataFrame, pred: pd.DataFrame, sd: pd.DataFrame) -> dict:
    """Spearman rho between the ensemble sd and |error| of one held-out section (see the module docstring)."""
    err = np.abs(pred.to_numpy(np.float64) - obs.to_numpy(np.float64))
    s = sd.to_numpy(np.float64)
    pooled = spearmanr(s.ravel(), err.ravel()).statistic
    per_spot = spearmanr(s.mean(axis=1), err.mean(axis=1)).statistic
    per_gene = []
    for j in range(s.shape[1]):
        if np.ptp(s[:, j]) > 0 and np.ptp(err[:, j]) > 0:
            per_gene.append(spearmanr(s[:, j], err[:, j]).statistic)
    per_gene = np.asarray(per_gene)
    return {
        "rho_entries": float(pooled),
        "rho_spots": float(per_spot),
        "rho_within_gene_median": float(np.median(per_gene)) if per_gene.size else float("nan"),
        "frac_genes_rho_positive": float((per_gene > 0).mean()) if per_gene.size else float("nan"),
        "n_genes": int(per_gene.size),
    }


def md_table(df: pd.DataFrame, floats: dict[str, str]) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [floats.get(c, "{}").format(row[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    import expression  # benchmarks/expression.py: the data and the feature cache

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache", default=None, help="h5ad caching the features (read when it exists)")
    p.add_argument("--sections", nargs="*", default=expression.SECTIONS, help="sections held out in turn")
    p.add_argument("--epochs", type=int, default=None, help="default: the model's (30)")
    p.add_argument("--n-models", type=int, default=None, help="default: the model's (5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--note", default="", help="text added to the report (e.g. the machine load)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data_dir = expression._data_dir(args.data_dir)
    genes = expression.read_panel(data_dir)
    adata, _ = expression.load(data_dir, Path(args.cache) if args.cache else None)
    adata = adata[adata.obs["library_id"].astype(str).isin(args.sections)].copy()
    genes = [g for g in genes if g in adata.var_names]
    print(f"{adata.n_obs} spots of {args.sections}, {len(genes)} panel genes", flush=True)

    train_kwargs = {"device": "cpu"}
    if args.epochs is not None:
        train_kwargs["max_epochs"] = args.epochs
    if args.n_models is not None:
        train_kwargs["n_models"] = args.n_models
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    res = hs.tl.mclstexp_cross_validate(
        adata,
        groupby="library_id",
        genes=genes,
        n_top=50,
        model_kwargs={"features_key": FEATURES},
        train_kwargs=train_kwargs,
        baselines=METHODS[1:],
        knn_k=50,
        return_predictions=True,
        random_state=0,
        progress_bar=False,
    )
    wall = time.perf_counter() - t0
    load_end = [round(x, 2) for x in os.getloadavg()]

    over = res["overall"].reset_index()
    over["method"] = over["method"].map(NAMES)
    over = over[["method", "pcc_all", "pcc_top", "mse", "mae", "n_genes_fdr05", "train_time_s", "predict_time_s"]]
    over = over.rename(columns={"n_genes_fdr05": "genes_fdr05_per_fold"})
    print(over.to_string(), flush=True)

    # held-out FDR < 0.05 over the sections (Stouffer + BH), and in every section (per-fold BH)
    sig_rows = []
    n_test = res["summary"].drop_duplicates("fold").set_index("fold")["n_test"]
    for m in METHODS:
        gs = res["gene_scores"][m]
        q, r = res["fdr"][m], res["pearson"][m]
        every = ((q < 0.05) & (r > 0)).all(axis=1)
        naive = []  # the same test treating the spots as independent (what the spatial correction changes)
        for fold in r.columns:
            obs, pred = res["observed"][fold], res["predictions"][m][fold]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t = hs.metrics.pearson_per_gene(obs, pred, return_pvalue=True)
            p = t["pvalue"].to_numpy()
            qn = np.full(p.shape, np.nan)
            ok = np.isfinite(p)
            qn[ok] = false_discovery_control(p[ok])
            naive.append(int(((qn < 0.05) & (t["r"].to_numpy() > 0)).sum()))
        sig_rows.append(
            {
                "method": NAMES[m],
                "genes": int(gs["pcc"].notna().sum()),
                "fdr05_combined": int(((gs["fdr"] < 0.05) & (gs["pcc"] > 0)).sum()),
                "fdr05_every_fold": int(every.sum()),
                "fdr05_per_fold": float(((q < 0.05) & (r > 0)).sum(axis=0).mean()),
                "fdr05_per_fold_independent": float(np.mean(naive)),
                "median_n_eff_over_n": float((res["n_eff"][m] / n_test[r.columns].to_numpy()).stack().median()),
                "median_pcc_of_fdr05": float(gs.loc[(gs["fdr"] < 0.05) & (gs["pcc"] > 0), "pcc"].median()),
            }
        )
    sig = pd.DataFrame(sig_rows)
    print(sig.to_string(), flush=True)
    top = res["gene_scores"]["mclstexp"].sort_values("pvalue").head(20)
    top = top[["pcc", "pcc_sd", "frac_folds_fdr05", "fdr", "mean_expression"]].reset_index()

    # ensemble spread vs error on the held-out sections
    spread = []
    for m in ("mclstexp", "bleep"):
        for fold, sd in res.get("prediction_std", {}).get(m, {}).items():
            row = spread_vs_error(res["observed"][fold], res["predictions"][m][fold], sd)
            spread.append({"method": NAMES[m], "fold": fold, **row})
    spread = pd.DataFrame(spread)
    if len(spread):
        means = spread.drop(columns="fold").groupby("method", sort=False).mean().reset_index()
        means.insert(1, "fold", "mean")
        spread = pd.concat([spread, means], ignore_index=True)
        print(spread.to_string(), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(11, 4.2))
    hs.pl.gene_predictability(res, method="mclstexp", ax=axs[0], show=False)
    hs.pl.gene_predictability(res, method="ridge_pca256", ax=axs[1], show=False)
    fig.tight_layout()
    fig.savefig(out / "expression_trust_predictability.png", dpi=90)
    plt.close(fig)

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "histospace": hs.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "wall_s": round(wall, 1),
    }
    f3 = {c: "{:.3f}" for c in ("pcc_all", "pcc_top", "mse", "mae", "median_pcc_of_fdr05", "pcc", "pcc_sd", "fdr")}
    f3 |= {"train_time_s": "{:.1f}", "predict_time_s": "{:.3f}", "genes_fdr05_per_fold": "{:.1f}"}
    f3 |= {"fdr05_per_fold": "{:.1f}", "fdr05_per_fold_independent": "{:.1f}", "median_n_eff_over_n": "{:.2f}"}
    f3 |= {"fdr": "{:.2e}", "mean_expression": "{:.3f}", "frac_folds_fdr05": "{:.1f}"}
    f3 |= {k: "{:.3f}" for k in ("rho_entries", "rho_spots", "rho_within_gene_median", "frac_genes_rho_positive")}
    md = [
        "# Per-gene trust of mclSTExp on her2st (leave-one-slide-out)",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} .venv/bin/python "
        f"benchmarks/expression_trust.py{''.join(' ' + shlex.quote(a) for a in sys.argv[1:])}` (seed 0; "
        f"{args.threads} torch thread(s)).",
        f"Environment: {json.dumps(env)}.",
        *([f"Note: {args.note}"] if args.note else []),
        "",
        f"{adata.n_obs} spots of {', '.join(args.sections)}, {len(genes)} panel genes, features `{FEATURES}`. mclSTExp "
        "and BLEEP-style: the defaults of `hs.models.MclSTExp` (30 epochs, 5-model seed ensemble, softmax weights over "
        "200 neighbours, the reference expression on its first 16 principal axes: `expression_rank=16`) unless the "
        "command says otherwise; ridge, ridge-PCA256 and kNN with their predictions on the same axes (as "
        "`hs.tl.mclstexp_cross_validate` puts them). All methods on the same folds, genes and targets "
        "(`ln(1 + CP10k)` over the panel). Times in seconds per fold (training includes embedding the reference).",
        "",
        "## Methods side by side (mean over the held-out sections)",
        "",
        md_table(over, f3),
        "",
        "## Genes predictable at FDR < 0.05 on the held-out sections",
        "",
        "p-values of the held-out correlations by Dutilleul's modified t-test (`pvalues='spatial'`, the default: an "
        "effective number of spots from the spatial autocorrelation of the observed and the predicted map; "
        "`median_n_eff_over_n` is its median share of the held-out spots). `fdr05_combined`: one-sided p-values "
        "(r > 0) of the sections combined by Stouffer's method on Fisher's z (weights sqrt(n_eff - 3)), "
        "Benjamini-Hochberg over the genes (`gene_scores['fdr']`). `fdr05_every_fold`: positive r at "
        "Benjamini-Hochberg FDR < 0.05 within every held-out section; `fdr05_per_fold`: within one section, mean over "
        "the sections; `fdr05_per_fold_independent`: the same with the plain test that treats the spots as "
        "independent (what the spatial correction removes). All sections come from one patient, so the counts are "
        "optimistic for a new patient.",
        "",
        md_table(sig, f3),
        "",
        "The 20 mclSTExp genes with the smallest combined p-value:",
        "",
        md_table(top, f3),
        "",
        "![held-out PCC against mean expression](expression_trust_predictability.png)",
        "",
        "## Ensemble spread against error on the held-out sections",
        "",
        "Spearman rho between the per-spot standard deviation of the ensemble members' predictions "
        "(`obsm['mclstexp_std']`) and the absolute error: `rho_entries` over all spot x gene entries of a section "
        "(mixes genes: both grow with a gene's expression), `rho_spots` per spot (means over genes), "
        "`rho_within_gene_median` per gene across the spots of a section (median over genes; "
        "`frac_genes_rho_positive` the share of genes above 0).",
        "",
        md_table(spread, f3) if len(spread) else "(no seed ensemble in this run)",
        "",
    ]
    (out / "expression_trust.md").write_text("\n".join(md))
    (out / "expression_trust.json").write_text(
        json.dumps(
            {
                "environment": env,
                "sections": args.sections,
                "genes": len(genes),
                "overall": over.to_dict(orient="records"),
                "per_fold": res["summary"].to_dict(orient="records"),
                "significant_genes": sig.to_dict(orient="records"),
                "spread_vs_error": spread.to_dict(orient="records"),
                "gene_scores": {
                    m: res["gene_scores"][m].round(6).reset_index().to_dict(orient="list") for m in METHODS
                },
            },
            indent=1,
            default=float,
        )
    )
    print(f"written {out / 'expression_trust.md'}", flush=True)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))
    main()
