"""Expression prediction benchmark: mclSTExp vs BLEEP-style, ridge, ridge-PCA256 and kNN on her2st C2-C6 (LOSO).

Run from the repository root (2 CPU threads):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/expression.py [--data-dir ../shared/data] [--cache /tmp/f.h5ad]

Data: her2st sections C2-C6 (all five from patient C; the only sections with a full-resolution H&E here), the
785-gene panel of Hist2ST/mclSTExp (`her2st/gene_lists/her2st_785genes_hist2st.txt`), 224-px full-resolution patches
around each spot, ImageNet MobileNetV2 features from `hs.pp.image_features` (`weights/mobilenet_v2_imagenet_coral`,
input `x / 127.5 - 1`). Targets: `ln(1 + 1e4 x / s)` per spot over the panel. For each held-out section every method
is trained on the other four in the same run (`hs.tl.mclstexp_cross_validate`, same folds, genes and targets); we
report the per-gene Pearson r over the held-out spots (mean over all panel genes, and over the 50 genes with the
highest mean expression in the held-out section), MSE, MAE, training and prediction time per fold.

Baselines (same folds, genes, targets and features, standardised with the training mean and sd): `ridge` (RidgeCV
over 1e-2..1e6), `ridge-PCA256` (the HEST-Benchmark protocol: the same ridge on the first min(256, n_train - 1, d)
principal components of the training features) and `kNN (k=50)`. The per-gene trust figures (held-out FDR, ensemble
spread against error) are in `benchmarks/expression_trust.py`.

Feature sets (all from `hs.pp.image_features` with the shared MobileNetV2; baselines get the same features, standardised):
- `f224`: the 224-px patch, final 1280 features (the issue's setting, torchvision padding);
- `stages224+448`: `tf_padding=True` (the padding the weights were trained with), `layers='stages'` (bottleneck
  stages 2-7 pooled, 696 features), `dihedral=True` (mean over the 8 flips/rotations), for the 224-px patch and
  for a 448-px context patch around the spot (resized to 224), concatenated (1392 features).

Writes `benchmarks/results/expression.md` and `benchmarks/results/expression.json`; with `--tag`, e.g. for a subset
of the runs (`--runs "ViT h0-mini (random weights), 5 models, softmax weights" --tag vit`), the run is the section
`vit` of that page.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import anndata as ad
import numpy as np
import pandas as pd
import torch
from _results import write_page

import histospace as hs
from histospace.models._context import context_rows

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
ROOT = Path(__file__).resolve().parent
GENE_LIST = "her2st_785genes_hist2st.txt"


def _data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("HISTOSPACE_DATA"):
        return Path(os.environ["HISTOSPACE_DATA"])
    return ROOT.parent.parent / "shared" / "data"


def read_panel(data_dir: Path) -> list[str]:
    """The 785-gene her2st panel of Hist2ST/mclSTExp, in file order."""
    return [g.strip() for g in open(data_dir / "her2st" / "gene_lists" / GENE_LIST) if g.strip()]


def load(data_dir: Path, cache: Path | None) -> tuple[ad.AnnData, dict]:
    """her2st C2-C6 with the feature sets above; cached in `cache` when given."""
    if cache is not None and cache.exists():
        a = ad.read_h5ad(cache)
        return a, json.loads(a.uns["bench_feature_times"])
    weights = data_dir / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
    kw = {"encoder": "mobilenet_v2", "weights": weights, "mean": 0.5, "std": 0.5, "progress_bar": False}
    kw |= {"device": "cpu", "batch_size": 32}
    stages = {"tf_padding": True, "layers": "stages", "dihedral": True}
    parts, times = [], {"f224": 0.0, "stages224 d8": 0.0, "stages448 d8": 0.0}
    for s in SECTIONS:
        a = hs.datasets.her2st(s, data_dir=data_dir, image=False)
        t0 = time.perf_counter()
        hs.pp.image_features(a, patch_size=224, key_added="f224", **kw)
        times["f224"] += time.perf_counter() - t0
        for size in (224, 448):
            t0 = time.perf_counter()
            hs.pp.image_features(a, patch_size=size, key_added=f"stages{size}", **kw, **stages)
            times[f"stages{size} d8"] += time.perf_counter() - t0
        a.obs["library_id"] = s
        a.obs["patient"] = s[0]
        for k in ("f224", "stages224", "stages448"):
            del a.uns[k]
        parts.append(a)
    adata = ad.concat(parts, join="outer", fill_value=0, uns_merge="first")
    adata.obs["library_id"] = pd.Categorical(adata.obs["library_id"])
    adata.obs["patient"] = pd.Categorical(adata.obs["patient"])
    adata.obsm["stages224+448"] = np.hstack([adata.obsm["stages224"], adata.obsm["stages448"]]).astype(np.float32)
    adata.uns["bench_feature_times"] = json.dumps(times)
    if cache is not None:
        adata.write_h5ad(cache)
    return adata, times


def add_vit_features(adata: ad.AnnData, data_dir: Path, feat_times: dict, cache: Path | None) -> None:
    """`obsm['h0mini_random']`: h0-mini (random weights) features of the 224-px patch of every spot, per section."""
    if "h0mini_random" in adata.obsm:
        return
    out = np.zeros((adata.n_obs, 0), dtype=np.float32)
    t0 = time.perf_counter()
    lib = adata.obs["library_id"].astype(str).to_numpy()
    for s in SECTIONS:
        a = hs.datasets.her2st(s, data_dir=data_dir, image=False)
        hs.pp.image_features(
            a, encoder="h0-mini", weights=None, patch_size=224, device="cpu", batch_size=8, progress_bar=False
        )
        f = a.obsm["img_features"]
        if out.shape[1] == 0:
            out = np.zeros((adata.n_obs, f.shape[1]), dtype=np.float32)
        rows = adata.obs_names[lib == s]
        out[lib == s] = f[a.obs_names.get_indexer(rows)]
    adata.obsm["h0mini_random"] = out
    feat_times["h0mini_random"] = time.perf_counter() - t0
    adata.uns["bench_feature_times"] = json.dumps(feat_times)
    if cache is not None:
        adata.write_h5ad(cache)


def add_context_features(adata: ad.AnnData) -> None:
    """`obsm[CONTEXT_KEY]`: the tuned features beside their means over rings 1-2 of each section's spatial graph.

    The graph is `hs.pp.spatial_graph` per section (legacy ST: the 4-neighbour grid), the operators those of
    `hs.models.MclSTExp(spatial_context=2)`, so the regressions see exactly the input the model sees.
    """
    from histospace.models._context import context_ops

    hs.pp.spatial_graph(adata, library_key="library_id")
    ops = context_ops(adata, 2, "spatial_connectivities", "spatial", "library_id")
    adata.obsm[CONTEXT_KEY] = context_rows(adata.obsm["stages224+448"], ops)


#: what each run is, printed with the results
RUN_NOTES = {
    "tuned": "stage features of the 224-px patch and a 448-px context patch (tf_padding, dihedral mean); L2-normalised "
    "embeddings with a learned temperature (init 0.1); 30 epochs (chosen by nested validation in an earlier round); "
    "prediction: 200 neighbours weighted 1/d^2 as the reference; one model (seed 0).",
    "tuned, softmax weights": "as 'tuned', but the 200 neighbours are weighted by softmax(cos / T). This weighting was "
    "first chosen after looking at these test folds; the nested check since (`expression_weighting.py`: each outer "
    "fold's four training sections, leave-one-out among them) prefers it on the top 50 in 5 of 5 folds for both "
    "models, on all genes for BLEEP-style in 5 of 5 and for mclSTExp in 0 of 5.",
    "tuned, 5 models": "as 'tuned', with a seed ensemble (`n_models=5`: seeds 0-4, mean of the 5 predictions); "
    "BLEEP-style gets the same ensemble. Training time is that of the 5 models.",
    "tuned, 5 models, softmax weights": "as 'tuned, 5 models' with softmax weights (see 'tuned, softmax weights'): "
    "the defaults of `hs.models.MclSTExp`, with every baseline on the same folds.",
    "ViT h0-mini (random weights), 5 models, softmax weights": "the defaults of `hs.models.MclSTExp` on features of "
    "the pathology ViT h0-mini (`encoder='h0-mini'`, `weights=None`: random initialisation, as no checkpoint can be "
    "downloaded here) of the 224-px patch, its class token and mean patch token (1536 values). It checks that a ViT "
    "encoder runs through features, training and the baselines; random weights say nothing about the accuracy of "
    "the trained h0-mini.",
    "smoothed predictions (w = 0.5), 5 models": "issue 26's opt-in smoothing: "
    "as 'tuned, 5 models, softmax weights' (the defaults) plus `smooth_predictions=0.5` (each held-out spot's prediction mixed "
    "with the mean prediction of its ring-1 neighbours on the section's `hs.pp.spatial_graph`, weight 0.5; chosen "
    "by nested validation, `expression_context.py`) and `spatial_context=0`. Every baseline's predictions get the "
    "same smoothing (`hs.tl.mclstexp_cross_validate` applies the model's), so the gain is not credited to mclSTExp.",
    "spatial context (2 rings) and smoothing, 1 model": "as 'smoothed predictions' with `spatial_context=2` (each spot's "
    "image features beside their means over rings 1 and 2 of its section's spatial graph, in training and in the "
    "query), one model (seed 0); BLEEP-style gets the same. Nested validation rejected it (`expression_context.py`).",
    "context features, ridge and kNN": "the regressions on the context features themselves (`obsm['stages224+448 "
    "ctx2']`: the 1392 features of a spot and their means over rings 1 and 2 of the spatial graph, 4176 values, "
    "exactly the input of `spatial_context=2`) with the smoothing (w = 0.5); the mclSTExp row is one model "
    "(seed 0) on those features with `spatial_context=0` (the same input as `spatial_context=2`).",
    "reference settings": "the issue's features (final MobileNetV2 features of the 224-px patch) and the published "
    "model settings: T = 1 on unnormalised embeddings, 90 epochs, 1/d^2 weights, one model.",
}
TUNED = {
    "l2_normalize": True,
    "learn_temperature": True,
    "temperature": 0.1,
    "spatial_context": 0,
    "smooth_predictions": 0.0,
}
#: the features of a spot beside the means over rings 1-2 of its slide's spatial graph (what `spatial_context=2` feeds the
#: model), precomputed for the regressions: ridge and kNN get the same context as mclSTExp
CONTEXT_KEY = "stages224+448 ctx2"
INVSQ = {"n_neighbors": 200, "weighting": "inverse_square"}
SOFTMAX = {"n_neighbors": 200, "weighting": "softmax"}
# 30 epochs for the tuned runs: the epoch count chosen by nested validation in an earlier round (per outer fold, one
# training slide held out as validation, checkpoints 3-40 epochs; 30 won in 4 of 5 folds); BLEEP-style gets the same.
# name: (feature key, model kwargs, predict kwargs, baselines run with it, train kwargs; max_epochs None = --epochs)
RUNS = {
    "tuned": (
        "stages224+448",
        TUNED,
        INVSQ,
        ("bleep", "ridge", "ridge_pca256", "knn"),
        {"max_epochs": 30, "n_models": 1},
    ),
    "tuned, softmax weights": ("stages224+448", TUNED, SOFTMAX, ("bleep",), {"max_epochs": 30, "n_models": 1}),
    "tuned, 5 models": ("stages224+448", TUNED, INVSQ, ("bleep",), {"max_epochs": 30, "n_models": 5}),
    # the defaults of hs.models.MclSTExp (the validated settings): all baselines beside it
    "tuned, 5 models, softmax weights": (
        "stages224+448",
        TUNED,
        SOFTMAX,
        ("bleep", "ridge", "ridge_pca256", "knn"),
        {"max_epochs": 30, "n_models": 5},
    ),
    # issue 26: the query slide's spatial graph (opt-in smoothing of the predictions), the spatial context, and the
    # regressions on the same context features
    "smoothed predictions (w = 0.5), 5 models": (
        "stages224+448",
        {**TUNED, "smooth_predictions": 0.5},
        SOFTMAX,
        ("bleep", "ridge_pca256", "knn"),
        {"max_epochs": 30, "n_models": 5},
    ),
    "spatial context (2 rings) and smoothing, 1 model": (
        "stages224+448",
        {**TUNED, "spatial_context": 2, "smooth_predictions": 0.5},
        SOFTMAX,
        ("bleep",),
        {"max_epochs": 30, "n_models": 1},
    ),
    "context features, ridge and kNN": (
        CONTEXT_KEY,
        {**TUNED, "smooth_predictions": 0.5},
        SOFTMAX,
        ("ridge_pca256", "knn"),
        {"max_epochs": 30, "n_models": 1},
    ),
    # plumbing check of a pathology ViT: h0-mini with random weights (nothing can be downloaded here)
    "ViT h0-mini (random weights), 5 models, softmax weights": (
        "h0mini_random",
        TUNED,
        SOFTMAX,
        ("bleep", "ridge_pca256", "knn"),
        {"max_epochs": 30, "n_models": 5},
    ),
    # the reference: raw dot product of LayerNorm outputs, T = 1, Transformer + positions, one view
    # (n_models from the preset: 1)
    "reference settings": (
        "f224",
        {"preset": "reference"},
        INVSQ,
        ("ridge", "ridge_pca256", "knn"),
        {"max_epochs": None},
    ),
}


METHOD_NAMES = {"mclstexp": "mclSTExp", "bleep": "BLEEP-style", "ridge_pca256": "ridge-PCA256", "knn": "kNN (k=50)"}


def md_table(df: pd.DataFrame, cols: list[str]) -> str:
    fmt = {"pcc_all": "{:.3f}", "pcc_top": "{:.3f}", "mse": "{:.3f}", "mae": "{:.3f}"}
    fmt |= {"train_time_s": "{:.1f}", "predict_time_s": "{:.3f}", "n_genes_fdr05": "{:.0f}"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fmt.get(c, "{}").format(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def predict_timing(adata: ad.AnnData, genes: list[str], n_models: int = 1, run: str = "tuned") -> dict:
    """Prediction time (features excluded): one held-out section (C2) and a 10,000-tile H&E-only AnnData.

    The model (tuned settings, `n_models` seeds, trained on C3-C6 for 1 epoch: prediction time does not depend on the
    epochs) embeds the query features and searches its ~720 reference spots (once per model); the tiles get random
    features of the right width on a 100 x 100 grid of 224-px tiles (with a context, the time includes building
    their spatial graph with `hs.pp.spatial_graph`, as a user's call without a graph does).
    """
    key, mk, pk, _, _ = RUNS[run]
    lib = adata.obs["library_id"].astype(str).to_numpy()
    model = hs.tl.mclstexp_train(
        adata[lib != "C2"],
        genes=genes,
        features_key=key,
        max_epochs=1,
        n_models=n_models,
        device="cpu",
        progress_bar=False,
        model_kwargs=mk,
    )
    test = adata[lib == "C2", genes].copy()
    t0 = time.perf_counter()
    hs.tl.mclstexp_predict(test, model=model, **pk)
    t_slide = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    tiles = ad.AnnData(obs=pd.DataFrame(index=[f"tile{i}" for i in range(10_000)]))
    tiles.obsm[key] = rng.standard_normal((10_000, model.img_dim), dtype=np.float32)
    gx, gy = np.meshgrid(np.arange(100), np.arange(100))
    tiles.obsm["spatial"] = 224.0 * np.column_stack([gx.ravel(), gy.ravel()]).astype(np.float64)
    t0 = time.perf_counter()
    hs.tl.mclstexp_predict(tiles, model=model, **pk)
    t_tiles = time.perf_counter() - t0
    return {
        "run": run,
        "n_models": n_models,
        "one_section_C2_s": round(t_slide, 3),
        "n_spots_C2": int(test.n_obs),
        "tiles_10k_s": round(t_tiles, 3),
        "tiles_output_shape": list(tiles.obsm["mclstexp"].shape),
        "n_reference_spots": int(model.reference_expression.shape[0]),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _argv() -> str:
    """The command-line arguments of this run, quoted for a shell ('' when none)."""
    import shlex
    import sys

    return "".join(" " + shlex.quote(a) for a in sys.argv[1:])


def write(summaries, overall, pearson, args, adata, genes, feat_times, timing) -> None:
    summary = pd.concat(summaries, ignore_index=True)
    over = pd.concat(overall, ignore_index=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["run", "features", "epochs", "method", "fold", "n_train", "n_test", "pcc_all", "pcc_top", "mse", "mae"]
    cols += ["n_genes_fdr05", "train_time_s", "predict_time_s"]
    ocols = [
        "run",
        "features",
        "epochs",
        "method",
        "pcc_all",
        "pcc_top",
        "mse",
        "mae",
        "n_genes_fdr05",
        "train_time_s",
        "predict_time_s",
    ]
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "histospace": hs.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "epochs": args.epochs,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    lopo = (
        "Leave-one-patient-out is not possible on these data: all five sections with H&E (C2-C6) come from patient C "
        "(`hs.tl.mclstexp_cross_validate(adata, groupby='patient')` raises: a single group). The leave-one-slide-out "
        "figures below therefore share the patient between training and test sections (as in the mclSTExp paper) "
        "and are optimistic for a new patient."
    )
    md = [
        "# Expression prediction on her2st C2-C6 (leave-one-slide-out)",
        "",
        f"Command: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/expression.py{_argv()}` (seed 0; `--epochs {args.epochs}` for "
        "the reference-settings run, 30 for the tuned runs).",
        f"Environment: {json.dumps(env)}.",
        *([f"Note: {args.note}"] if args.note else []),
        f"{adata.n_obs} spots, {len(genes)} genes of `{GENE_LIST}`. pcc_all: mean per-gene Pearson over the panel; "
        "pcc_top: over the 50 genes with the highest mean expression in the held-out section; MSE/MAE over all "
        "held-out spots x genes of `ln(1 + CP10k)` (per spot over the panel); n_genes_fdr05: genes with a positive "
        "r at Benjamini-Hochberg FDR < 0.05 in the held-out section (p-values of the modified t-test with "
        "Dutilleul's effective number of spots, `pvalues='spatial'`, the default). Times in seconds per fold "
        "(training includes embedding the reference; prediction covers the held-out section).",
        f"Feature extraction (MobileNetV2, {args.threads} torch thread(s), all 910 spots): {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in feat_times.items()})} s.",
        "",
        f"**Leave-one-patient-out**: {lopo}",
        "",
        "Runs:",
        "",
        *[f"- **{r}**: {RUN_NOTES[r]}" for r in pearson],
        "",
        f"## Overall (mean over the {summary['fold'].nunique()} held-out sections)",
        "",
        md_table(over, ocols),
        "",
        "## Per fold",
        "",
        md_table(summary, cols),
        "",
        "## Prediction time (features excluded)",
        "",
        *(
            [
                f"- {t.get('run', 'tuned')}, {t['n_models']} model(s): one held-out section (C2, {t['n_spots_C2']} spots): "
                f"{t['one_section_C2_s']} s; 10,000 H&E-only tiles: {t['tiles_10k_s']} s (reference of "
                f"{t['n_reference_spots']} spots; load average {t['load_average']})."
                for t in timing
            ]
            or ["(not measured yet)"]
        ),
        "",
    ]
    write_page(
        "expression",
        "\n".join(md),
        {
            "environment": env,
            "genes": len(genes),
            "leave_one_patient_out": lopo,
            "feature_times_s": feat_times,
            "prediction_time": timing,
            "runs": {
                r: {"features": RUNS[r][0], "model": RUNS[r][1], "predict": RUNS[r][2], "train": RUNS[r][4]}
                for r in pearson
            },
            "overall": over.to_dict(orient="records"),
            "per_fold": summary.to_dict(orient="records"),
            "per_gene_pearson_mean_over_folds": pearson,
        },
        section=args.tag or None,
        out=out,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache", default=None, help="h5ad caching the features (read when it exists)")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", nargs="*", default=list(RUNS))
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--note", default="", help="text added to the report (e.g. where cached features came from)")
    p.add_argument("--tag", default="", help="a variant (a subset of the runs): the section TAG of the page")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data_dir = _data_dir(args.data_dir)
    genes = read_panel(data_dir)
    t0 = time.perf_counter()
    adata, feat_times = load(data_dir, Path(args.cache) if args.cache else None)
    t_load = time.perf_counter() - t0
    missing = [g for g in genes if g not in adata.var_names]
    genes = [g for g in genes if g in adata.var_names]
    print(f"{adata.n_obs} spots, {len(genes)} panel genes ({len(missing)} missing); load+features {t_load:.0f} s")
    if any(RUNS[r][0] == CONTEXT_KEY for r in args.runs):
        add_context_features(adata)
    if any(RUNS[r][0] == "h0mini_random" for r in args.runs):
        add_vit_features(adata, data_dir, feat_times, Path(args.cache) if args.cache else None)

    summaries, overall, pearson = [], [], {}
    for run in args.runs:
        key, mk, pk, baselines, tk = RUNS[run]
        epochs = args.epochs if tk["max_epochs"] is None else tk["max_epochs"]
        tk = {**tk, "max_epochs": epochs}
        print(f"== {run}: features {key!r}, model {mk}, predict {pk}, baselines {baselines}, train {tk}", flush=True)
        res = hs.tl.mclstexp_cross_validate(
            adata,
            groupby="library_id",
            genes=genes,
            n_top=50,
            model_kwargs={"features_key": key, **mk},
            train_kwargs={**tk, "device": "cpu"},
            predict_kwargs=pk,
            baselines=baselines,
            knn_k=50,
            random_state=0,
            progress_bar=False,
        )
        s = res["summary"].copy()
        s.insert(0, "run", run)
        s.insert(1, "features", key)
        s.insert(2, "epochs", epochs)
        s["method"] = s["method"].replace(METHOD_NAMES)
        summaries.append(s)
        o = res["overall"].reset_index()
        o["method"] = o["method"].replace(METHOD_NAMES)
        o.insert(0, "run", run)
        o.insert(1, "features", key)
        o.insert(2, "epochs", epochs)
        overall.append(o)
        pearson[run] = {m: df.mean(axis=1).round(4).to_dict() for m, df in res["pearson"].items()}
        print(
            o[["method", "pcc_all", "pcc_top", "mse", "mae", "train_time_s", "predict_time_s"]].to_string(), flush=True
        )

        write(summaries, overall, pearson, args, adata, genes, feat_times, [])
    timing = [predict_timing(adata, genes, n) for n in (1, 5)]
    if "smoothed predictions (w = 0.5), 5 models" in args.runs:  # smoothing over the query graph, same machine and run
        timing += [predict_timing(adata, genes, n, run="smoothed predictions (w = 0.5), 5 models") for n in (1, 5)]
    print(json.dumps(timing), flush=True)
    write(summaries, overall, pearson, args, adata, genes, feat_times, timing)
    print(f"written {Path(args.out) / 'expression'}.md and .json" + (f" (section {args.tag!r})" if args.tag else ""))


if __name__ == "__main__":
    main()
