"""Nested check of the neighbour weighting (1/d^2 vs softmax) without looking at the held-out sections.

Run from the repository root (2 CPU threads), with the feature cache of `expression.py` (or without: it computes the
features, ~6 min):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/expression_weighting.py [--cache /tmp/f.h5ad]

For each outer held-out section g of C2-C6, only its four training sections are used: each of them is held out in
turn, a model (tuned settings of `expression.py`, one seed, 30 epochs) is trained on the other three and predicts it
with both weightings from the same trained model. The weighting with the higher mean PCC over these four inner folds
is the one a user could have chosen for fold g. Every pair of sections is one training run (the three others),
which serves the inner fold of both outer folds it belongs to; 10 runs per method.

Writes `benchmarks/results/expression_weighting.md` and `.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expression import ROOT, SECTIONS, TUNED, _data_dir, load, md_table, read_panel

import histospace as hs
from histospace._utils._data import as_dense as _dense
from histospace._utils._data import normalize_expression
from histospace.metrics import pearson_per_gene

KEY = "stages224+448"
METHODS = {"mclSTExp": {}, "BLEEP-style": {"spot_encoder": "none", "use_positions": False}}
WEIGHTINGS = ("inverse_square", "softmax")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache", default=None, help="h5ad caching the features (read when it exists)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = _data_dir(args.data_dir)
    genes = read_panel(data_dir)
    adata, _ = load(data_dir, Path(args.cache) if args.cache else None)
    genes = [g for g in genes if g in adata.var_names]
    lib = adata.obs["library_id"].astype(str).to_numpy()
    y = normalize_expression(_dense(adata[:, genes].X), "log1p_cp10k")

    rows = []
    for method, extra in METHODS.items():
        for pair in itertools.combinations(SECTIONS, 2):
            train = ~np.isin(lib, pair)
            model = hs.tl.mclstexp_train(
                adata[train],
                genes=genes,
                features_key=KEY,
                max_epochs=30,
                device="cpu",
                random_state=0,
                progress_bar=False,
                **TUNED,
                **extra,
            )
            for val in pair:
                outer = pair[1] if val == pair[0] else pair[0]  # the outer fold this inner fold belongs to
                m = lib == val
                yt = y[m]
                top = np.argsort(-yt.mean(axis=0), kind="stable")[:50]
                emb = model.get_image_embedding(adata[m])  # one embedding, both weightings
                for w in WEIGHTINGS:
                    pred = model.predict_from_embedding(emb, n_neighbors=200, weighting=w)
                    r = np.asarray(pearson_per_gene(yt, pred), dtype=float)
                    rows.append(
                        {
                            "method": method,
                            "outer_fold": outer,
                            "inner_fold": val,
                            "weighting": w,
                            "pcc_all": float(np.nanmean(r)),
                            "pcc_top": float(np.nanmean(r[top])),
                        }
                    )
            print(method, pair, flush=True)
    d = pd.DataFrame(rows)
    inner = d.groupby(["method", "outer_fold", "weighting"], as_index=False)[["pcc_all", "pcc_top"]].mean()
    chosen = []
    for (method, outer), g in inner.groupby(["method", "outer_fold"]):
        g = g.set_index("weighting")
        chosen.append(
            {
                "method": method,
                "outer_fold": outer,
                "chosen_by_pcc_all": g["pcc_all"].idxmax(),
                "chosen_by_pcc_top": g["pcc_top"].idxmax(),
            }
        )
    chosen = pd.DataFrame(chosen)
    print(inner.round(3).to_string())
    print(chosen.to_string())
    md = [
        "# Neighbour weighting chosen by nested validation (her2st C2-C6)",
        "",
        "Command: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/expression_weighting.py` (seed 0, "
        f"{torch.get_num_threads()} threads). Tuned settings of `expression.py` (features `{KEY}`, "
        f"{TUNED}, 30 epochs, one model, 200 neighbours). For each outer held-out section, the mean over its four "
        "inner folds (train on three of its training sections, predict the fourth); the held-out section itself is "
        "never used.",
        "",
        "## Inner-fold means",
        "",
        md_table(inner, ["method", "outer_fold", "weighting", "pcc_all", "pcc_top"]),
        "",
        "## Weighting a user would pick per outer fold",
        "",
        md_table(chosen, ["method", "outer_fold", "chosen_by_pcc_all", "chosen_by_pcc_top"]),
        "",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "expression_weighting.md").write_text("\n".join(md))
    data = {"inner": inner.to_dict(orient="records"), "chosen": chosen.to_dict(orient="records")}
    (out / "expression_weighting.json").write_text(json.dumps(data, indent=1, default=str))
    print(f"written {out / 'expression_weighting.md'} and .json")


if __name__ == "__main__":
    main()
