"""H&E -> expression on the mouse olfactory bulb (legacy ST '2k' array, MOB1-MOB3): mclSTExp defaults vs baselines.

Run from the repository root (2 CPU threads):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/expression_mob.py [--data-dir ../shared/data] [--cache /tmp/m.h5ad]

Data: `hs.datasets.mob` sections MOB1, MOB2 (animal 1) and MOB3 (animal 2), all 1,000 genes of the count tables.
Features: the validated mclSTExp recipe of the command line (`MCLSTEXP_FEATURES` of `histospace._image`, which the CLI runs: MobileNetV2
stages 2-7 pooled, a patch and a 2x context patch, mean over the 8 flips/rotations, TF 'SAME' padding for the shared
weights `weights/mobilenet_v2_imagenet_coral`, input `x / 127.5 - 1`), with a patch of the same physical size as
her2st's 224-px patch: 224 px / (pixels per µm of her2st C2) = about 154 µm, about 35 px of the MOB JPEG (4.4 µm per
pixel); the patches are resized to 224 px, as on her2st.

Evaluations (`hs.tl.mclstexp_cross_validate`, same folds, genes, targets and features for every method):
- leave-one-section-out over MOB1-MOB3 (`groupby='library_id'`);
- across animals: train on animal 1 (MOB1 + MOB2), predict MOB3 (animal 2). This is the fold MOB3 of the
  leave-one-section-out (the same training spots, genes and seeds), so it is reported from that fold rather than
  trained a second time.
- with smoothed predictions (`--evaluations smoothed`, issue 26): leave-one-section-out with
  `smooth_predictions=0.5` (the weight the her2st nested validation chose), the baselines smoothed the same way;
- the cross-animal fold again at seeds 1 and 2 (`--evaluations animal_seed1 animal_seed2`), for its seed spread.
`--merge` keeps the evaluations already on the page, so they can be computed by separate runs.
Methods: mclSTExp with the defaults of `hs.models.MclSTExp` / `hs.tl.mclstexp_train` (30 epochs, 5 seeds, softmax
weights over 200 neighbours, the reference expression on its first 16 principal axes), ridge-PCA256 (the
HEST-Benchmark protocol) and kNN (k = 50) on the same standardised features, their predictions put on the same 16
axes by `hs.tl.mclstexp_cross_validate` (as it smooths them when the model smooths); the baselines without that step
are rows of `benchmarks/expression_retrieval.py --dataset mob`. Targets: `ln(1 + 1e4 x / s)` per spot over the genes.
Scores: mean per-gene Pearson r over the held-out spots, over all genes (constant genes left out) and over the 300
genes with the highest mean expression in the held-out section; MSE/MAE; genes with a positive r at FDR < 0.05
(Dutilleul's spatial test).
Spread over spots: for every held-out section, a paired spatial block bootstrap of the difference mclSTExp -
ridge-PCA256 (`block_bootstrap`: square blocks of 300 / 500 / 800 µm drawn with replacement, 1,000 draws, both
methods' r recomputed on the same drawn spots), stored with the evaluation's run in the JSON.

Writes `benchmarks/results/expression_mob.md` and `benchmarks/results/expression_mob.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import anndata as ad
import numpy as np
import pandas as pd
import torch

import histospace as hs
from histospace._image import mclstexp_features as _mclstexp_features
from histospace.models._mclstexp_config import DEFAULT_RANK

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _spread
from expression import _data_dir, md_table  # the her2st benchmark's data root and table format

SECTIONS = ["MOB1", "MOB2", "MOB3"]
ROOT = Path(__file__).resolve().parent
KEY = "mclstexp_features"
N_TOP = 300
HER2ST_PATCH_PX = 224  # the patch of mclSTExp on her2st (full-resolution pixels of patient C's H&E)
METHOD_NAMES = {"mclstexp": "mclSTExp (defaults)", "ridge_pca256": "ridge-PCA256", "knn": "kNN (k=50)"}
CROSS_ANIMAL_FOLD = "MOB3"  # held out with MOB1 + MOB2 (animal 1) as the training sections: animal 1 -> animal 2
#: smoothing weight of the `smoothed` evaluation (the value the her2st nested validation chose for mclSTExp)
SMOOTH = 0.5
#: µm per step of MOB's '2k' array coordinates (the blocks of the paired bootstrap are in µm)
ARRAY_STEP_UM = 100.0
#: the evaluations (`--evaluations`): name on the page, held-out groups, model options, seed
EVALUATIONS = {
    "loso": {"name": "leave-one-section-out", "groups": None, "model_kwargs": {}, "random_state": 0},
    "smoothed": {
        "name": f"leave-one-section-out, predictions smoothed (w = {SMOOTH})",
        "groups": None,
        "model_kwargs": {"smooth_predictions": SMOOTH},
        "random_state": 0,
    },
    **{
        f"animal_seed{s}": {
            "name": f"animal 1 -> animal 2, seed {s}",
            "groups": [CROSS_ANIMAL_FOLD],
            "model_kwargs": {},
            "random_state": s,
        }
        for s in (1, 2)
    },
}


def her2st_patch_um(data_dir: Path) -> float:
    """Physical side of her2st's 224-px patch: 224 px / pixels per µm of her2st C2 (the first benchmark section)."""
    c2 = hs.datasets.her2st("C2", data_dir=data_dir, image=False)
    return HER2ST_PATCH_PX / float(c2.uns["spatial"]["C2"]["metadata"]["pixels_per_um"])


def load(data_dir: Path, cache: Path | None, patch_um: float, args) -> tuple[ad.AnnData, dict]:
    """MOB1-MOB3 with the mclSTExp features in `obsm[KEY]`; cached in `cache` when given.

    `args.spots_per_section` (a seeded random subset of each section) and `args.no_dihedral` reduce the cost for a
    machine too slow for the full recipe; both are recorded and printed in the report.
    """
    if cache is not None and cache.exists():
        a = ad.read_h5ad(cache)
        return a, json.loads(a.uns["bench_features"])
    weights = data_dir / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
    recipe = _mclstexp_features(weights)
    if args.no_dihedral:
        recipe = recipe | {"dihedral": False}
    kw = {"encoder": "mobilenet_v2", "weights": weights, "mean": 0.5, "std": 0.5, "progress_bar": False}
    kw |= {"device": "cpu", "batch_size": 32, "patch_size_um": patch_um, "method": "patch", "key_added": KEY} | recipe
    parts, info = [], {"recipe": dict(recipe), "patch_size_um": patch_um, "seconds": {}}
    info["spots_per_section"] = args.spots_per_section
    rng = np.random.default_rng(0)
    for s in SECTIONS:
        a = hs.datasets.mob(s, data_dir=data_dir, image=False)
        if args.spots_per_section is not None and args.spots_per_section < a.n_obs:
            a = a[np.sort(rng.choice(a.n_obs, args.spots_per_section, replace=False))].copy()
        t0 = time.perf_counter()
        hs.pp.image_features(a, **kw)
        info["seconds"][s] = round(time.perf_counter() - t0, 1)
        info.setdefault("patch_size_px", {})[s] = float(a.uns[KEY]["params"]["patch_size_px"])
        info["width"] = int(a.obsm[KEY].shape[1])
        info["threads"] = args.threads
        del a.uns[KEY]
        parts.append(a)
    adata = ad.concat(parts, join="inner", uns_merge="first")
    adata.obs["library_id"] = pd.Categorical(adata.obs["library_id"])
    adata.obs["animal"] = pd.Categorical(adata.obs["animal"])
    adata.uns["bench_features"] = json.dumps(info)
    if cache is not None:
        adata.write_h5ad(cache)
    return adata, info


def verdict(over: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """Whether mclSTExp >= ridge-PCA256 on all genes and on the top 300, for each leave-one-section-out evaluation:
    mean over the held-out sections, and its cross-animal fold (MOB1 + MOB2 -> MOB3).
    """
    out = []
    loso = [ev for ev in over["evaluation"].unique() if ev.startswith("leave-one-section-out")]
    for ev in loso:
        fold = summary[(summary["evaluation"] == ev) & (summary["fold"] == CROSS_ANIMAL_FOLD)]
        for label, df in (
            (ev, over[over["evaluation"] == ev]),
            (f"{ev}: animal 1 -> animal 2 (MOB1+MOB2 -> MOB3)", fold),
        ):
            m = df.set_index("method")
            a, b = m.loc[METHOD_NAMES["mclstexp"]], m.loc[METHOD_NAMES["ridge_pca256"]]
            res = []
            for col, name in (("pcc_all", "all genes"), ("pcc_top", f"top {N_TOP}")):
                holds = a[col] >= b[col]
                res.append(f"{name}: {a[col]:.3f} vs {b[col]:.3f} ({'holds' if holds else 'does not hold'})")
            out.append(f"- {label}: " + "; ".join(res) + ".")
    return out


def block_bootstrap(res: dict, adata: ad.AnnData) -> dict:
    """Paired spatial block bootstrap (`_spread`) of mclSTExp - ridge-PCA256 on each held-out section.

    Positions in µm from the array coordinates (one step of MOB's '2k' array = 100 µm); the top genes are those of the
    whole held-out section. `{fold: {block side in µm: {...}}}` with the observed difference, its 95 % percentile
    interval and the share of draws below 0.
    """
    out = {}
    for fold, obs in res["observed"].items():
        t = obs.to_numpy(np.float64)
        pa, pb = (res["predictions"][m][fold].loc[obs.index, obs.columns].to_numpy(np.float64)
                  for m in ("mclstexp", "ridge_pca256"))  # fmt: skip
        top = np.argsort(-t.mean(axis=0), kind="stable")[:N_TOP]
        xy_um = adata.obs.loc[obs.index, ["array_row", "array_col"]].to_numpy(np.float64) * ARRAY_STEP_UM
        out[fold] = {
            str(side): _spread.summary(*_spread.block_draws(t, pa, pb, xy_um, top=top, side_um=side))
            for side in _spread.BLOCKS_UM
        }
    return out


def bootstrap_lines(runs: dict) -> list[str]:
    """The page's lines for the paired block bootstrap of each evaluation that has one."""
    out = []
    for ev, r in runs.items():
        boot = r.get("block_bootstrap")
        if not boot:
            continue
        if not out:
            out += [
                f"Spread over spots: paired spatial block bootstrap of mclSTExp - ridge-PCA256 (mean per-gene r) on "
                f"each held-out section; square blocks of the side given, {_spread.N_BOOT} draws of blocks with replacement "
                "(seed 0), both methods' r recomputed on the same drawn spots; 95 % percentile interval.",
                "",
                "| evaluation | held-out section | block | blocks | difference all genes [95 % interval] | "
                f"difference top {N_TOP} [95 % interval] | draws below 0 (all) |",
                "|---|---|---|---|---|---|---|",
            ]
        for fold, sides in boot.items():
            out += [_spread.table_row(f"{ev} | {fold}", side, b) for side, b in sides.items()]
    return out + [""] if out else []


def previous(out: Path, recomputed: list[str]) -> tuple[list, list, dict, dict]:
    """The page's evaluations (from its JSON) except `recomputed`: `(summaries, overall, pearson, runs)`."""
    f = out / "expression_mob.json"
    if not f.exists():
        return [], [], {}, {}
    old = json.loads(f.read_text())
    summary, over = (
        pd.DataFrame([r for r in old[k] if r["evaluation"] not in recomputed]) for k in ("per_fold", "overall")
    )
    pearson = {k: v for k, v in old["per_gene_pearson_mean_over_folds"].items() if k not in recomputed}
    runs = {k: v for k, v in old.get("runs", {}).items() if k not in recomputed}
    return ([summary] if len(summary) else []), ([over] if len(over) else []), pearson, runs


def seed_spread(summary: pd.DataFrame) -> list[str]:
    """The cross-animal fold over the seeds run (seed 0: the MOB3 fold of leave-one-section-out): mean ± sd of each
    method and of mclSTExp's difference to ridge-PCA256.
    """
    fold = summary[(summary["fold"] == CROSS_ANIMAL_FOLD) & ~summary["evaluation"].str.contains("smoothed")]
    if fold["evaluation"].nunique() < 2:
        return []
    out = [f"Cross-animal fold (MOB1 + MOB2 -> MOB3) over {fold['evaluation'].nunique()} seeds (models and baselines):"]
    wide = fold.pivot_table(index="evaluation", columns="method", values=["pcc_all", "pcc_top"])
    for col, name in (("pcc_all", "all genes"), ("pcc_top", f"top {N_TOP}")):
        parts = [f"{m} {wide[col][m].mean():.3f} ± {wide[col][m].std(ddof=1):.3f}" for m in wide[col].columns]
        diff = wide[col][METHOD_NAMES["mclstexp"]] - wide[col][METHOD_NAMES["ridge_pca256"]]
        parts.append(f"mclSTExp - ridge-PCA256 {diff.mean():+.3f} ± {diff.std(ddof=1):.3f} (per seed: "
                     + ", ".join(f"{d:+.3f}" for d in diff) + ")")  # fmt: skip
        out.append(f"- {name}: " + "; ".join(parts) + ".")
    return out


def write(args, adata, genes, feat, summaries, overall, pearson, runs) -> None:
    summary = pd.concat(summaries, ignore_index=True)
    over = pd.concat(overall, ignore_index=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "histospace": hs.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_start": args.load_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    ocols = ["evaluation", "method", "pcc_all", "pcc_top", "mse", "mae", "n_genes_fdr05"]
    ocols += ["train_time_s", "predict_time_s"]
    cols = ["evaluation", "method", "fold", "n_train", "n_test", "pcc_all", "pcc_top", "mse", "mae"]
    cols += ["n_genes_fdr05", "train_time_s", "predict_time_s"]
    n_spots = adata.obs["library_id"].value_counts().reindex(SECTIONS).to_dict()
    md = [
        "# Expression prediction on the mouse olfactory bulb (legacy ST '2k', MOB1-MOB3)",
        "",
        "Commands (each evaluation: the command that computed it, torch threads, load averages at its start and "
        "end; `--merge` keeps the evaluations of earlier runs): "
        + "; ".join(
            f"{ev}: `{r['command']}` ({r['threads']} threads, load {r['load_average_at_start'][0]} -> "
            f"{r['load_average_at_end'][0]}, {r['utc']} UTC)"
            for ev, r in runs.items()
        )  # fmt: skip
        + ". Timings are from a shared 2-core machine under load, not quiet figures.",
        f"Environment of the last run: {json.dumps(env)}.",
        *([f"Note: {args.note}"] if args.note else []),
        "",
        f"Data: `hs.datasets.mob` {', '.join(f'{s} ({n} spots)' for s, n in n_spots.items())}; animal 1 = MOB1, MOB2; "
        f"animal 2 = MOB3. {len(genes)} genes (all genes of the count tables). pcc_all: mean per-gene Pearson r over "
        f"the genes (constant genes left out); pcc_top: over the {N_TOP} genes with the highest mean expression in the "
        "held-out section; MSE/MAE over held-out spots x genes of `ln(1 + CP10k)`; n_genes_fdr05: genes with a "
        "positive r at Benjamini-Hochberg FDR < 0.05 (Dutilleul's spatial test). Times in seconds per fold.",
        f"Features: `{json.dumps(feat['recipe'])}` (`MCLSTEXP_FEATURES` of `histospace._image`), MobileNetV2 "
        f"`mobilenet_v2_imagenet_coral`, input `x / 127.5 - 1`, {feat['width']} features per spot; patch "
        f"{feat['patch_size_um']:.1f} µm (her2st's 224 px at the pixel size of her2st C2) = "
        f"{', '.join(f'{s}: {v:.1f} px' for s, v in feat['patch_size_px'].items())} of the MOB JPEGs (and a 2x "
        f"context patch), cropped per spot (`method='patch'`, as on her2st) and resized to 224 px. Extraction time ({feat['threads']} torch threads): "
        f"{json.dumps(feat['seconds'])} s.",
        "",
        *(
            [
                "**Reduced run** (the machine was too slow for the full recipe): "
                + ", ".join(
                    x
                    for x in (
                        f"a seeded random subset of {feat['spots_per_section']} spots per section"
                        if feat.get("spots_per_section")
                        else "",
                        "no dihedral mean (`dihedral=False`)" if not feat["recipe"].get("dihedral") else "",
                        f"max_epochs={args.max_epochs}" if args.max_epochs is not None else "",
                        f"n_models={args.n_models}" if args.n_models is not None else "",
                    )
                    if x
                )
                + ". The full run is the command without these options.",
                "",
            ]
            if feat.get("spots_per_section") or not feat["recipe"].get("dihedral") or args.max_epochs or args.n_models
            else []
        ),
        "Methods: mclSTExp with the defaults of `hs.models.MclSTExp` / `hs.tl.mclstexp_train` (L2-normalised "
        "embeddings with a learned temperature, 30 epochs, 5 seeds averaged, softmax weights over 200 neighbours, "
        f"the reference expression on its first {DEFAULT_RANK} principal axes: `expression_rank={DEFAULT_RANK}`); "
        "ridge-PCA256 (RidgeCV on the first 256 principal components of the standardised training features, the "
        "HEST-Benchmark protocol) and kNN (k = 50) on the same features, their predictions put on the same "
        f"{DEFAULT_RANK} axes of the training expression by `hs.tl.mclstexp_cross_validate`, so that the step is "
        "not credited to mclSTExp (the baselines without it: `expression_retrieval.md`, section `mob`). In the "
        "evaluation with smoothed "
        f"predictions, mclSTExp is trained with `smooth_predictions={SMOOTH}` and every method's predictions (the "
        "baselines' too, by `hs.tl.mclstexp_cross_validate`) are mixed with their mean over ring 1 of the held-out "
        f"section's spatial graph: `(1 - {SMOOTH}) p + {SMOOTH} mean(p over ring 1)`.",
        "",
        "## Target: mclSTExp defaults >= ridge-PCA256 (all genes and top 300)",
        "",
        *verdict(over, summary),
        "",
        *seed_spread(summary),
        "",
        *bootstrap_lines(runs),
        "## Overall (mean over the held-out sections of each evaluation)",
        "",
        md_table(over, ocols),
        "",
        "## Per fold",
        "",
        md_table(summary, cols),
        "",
    ]
    (out / "expression_mob.md").write_text("\n".join(md))
    (out / "expression_mob.json").write_text(
        json.dumps(
            {
                "environment": env,
                "genes": len(genes),
                "n_top": N_TOP,
                "features": feat,
                "evaluations": {v["name"]: v for v in EVALUATIONS.values() if v["name"] in runs},
                "runs": runs,
                "overall": over.to_dict(orient="records"),
                "per_fold": summary.to_dict(orient="records"),
                "per_gene_pearson_mean_over_folds": pearson,
            },
            indent=1,
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache", default=None, help="h5ad caching the features (read when it exists)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=None, help="override the default epochs (quick checks only)")
    p.add_argument("--n-models", type=int, default=None, help="override the default seeds (quick checks only)")
    p.add_argument(
        "--spots-per-section", type=int, default=None, help="a seeded random subset of each section (slow machines)"
    )
    p.add_argument("--no-dihedral", action="store_true", help="no mean over the 8 flips/rotations (8x cheaper)")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--note", default="", help="text added to the report")
    p.add_argument(
        "--evaluations",
        nargs="+",
        default=["loso"],
        choices=list(EVALUATIONS),
        help="loso: leave-one-section-out (its MOB3 fold is animal 1 -> animal 2); smoothed: the same with "
        f"smooth_predictions={SMOOTH} (baselines smoothed the same way); animal_seed1/2: the cross-animal fold again "
        "at seeds 1 and 2 (models and baselines)",
    )
    p.add_argument(
        "--merge", action="store_true", help="keep the evaluations already on the page that this run does not compute"
    )
    args = p.parse_args()
    args.load_start = [round(x, 2) for x in os.getloadavg()]
    torch.set_num_threads(args.threads)
    data_dir = _data_dir(args.data_dir)

    t0 = time.perf_counter()
    patch_um = her2st_patch_um(data_dir)
    adata, feat = load(data_dir, Path(args.cache) if args.cache else None, patch_um, args)
    genes = list(adata.var_names)
    print(f"{adata.n_obs} spots, {len(genes)} genes; load + features {time.perf_counter() - t0:.0f} s", flush=True)

    train_kwargs = {"device": "cpu"}
    if args.max_epochs is not None:
        train_kwargs["max_epochs"] = args.max_epochs
    if args.n_models is not None:
        train_kwargs["n_models"] = args.n_models
    summaries, overall, pearson, runs = [], [], {}, {}  # this run's evaluations
    mine = [EVALUATIONS[e]["name"] for e in args.evaluations]
    for key in args.evaluations:
        spec = EVALUATIONS[key]
        ev = spec["name"]
        print(f"== {ev}", flush=True)
        load_start = [round(x, 2) for x in os.getloadavg()]
        res = hs.tl.mclstexp_cross_validate(
            adata,
            groupby="library_id",
            groups=spec["groups"],
            genes=genes,
            n_top=N_TOP,
            model_kwargs={"features_key": KEY} | spec["model_kwargs"],
            train_kwargs=train_kwargs,
            baselines=("ridge_pca256", "knn"),
            knn_k=50,
            random_state=spec["random_state"],
            return_predictions=True,
        )
        s = res["summary"].copy()
        s["method"] = s["method"].replace(METHOD_NAMES)
        s.insert(0, "evaluation", ev)
        summaries.append(s)
        o = res["overall"].reset_index()
        o["method"] = o["method"].replace(METHOD_NAMES)
        o.insert(0, "evaluation", ev)
        overall.append(o)
        pearson[ev] = {METHOD_NAMES.get(m, m): df.mean(axis=1).round(4).to_dict() for m, df in res["pearson"].items()}
        runs[ev] = {
            "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python "
            f"benchmarks/expression_mob.py{''.join(' ' + shlex.quote(a) for a in sys.argv[1:])}",
            "threads": torch.get_num_threads(),
            "load_average_at_start": load_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "block_bootstrap": block_bootstrap(res, adata),
        }
        print(o[["method", "pcc_all", "pcc_top", "mse", "train_time_s"]].to_string(), flush=True)
        if args.merge:  # the page's other evaluations (read again: another run may have added some meanwhile)
            s0, o0, p0, r0 = previous(Path(args.out), mine)
            write(args, adata, genes, feat, s0 + summaries, o0 + overall, p0 | pearson, r0 | runs)
        else:
            write(args, adata, genes, feat, summaries, overall, pearson, runs)
    print(f"written {Path(args.out) / 'expression_mob'}.md and .json")


if __name__ == "__main__":
    main()
