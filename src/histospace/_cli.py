"""The `histospace` command line: spatial domains, expression prediction and the demo on real data.

Only the standard library is imported until a command runs, so `histospace --help` and `--version` answer at once.
Every expected failure (unreadable input, missing or undownloadable weights, bad option values) ends with one line
on stderr and exit code 2; `-v` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from histospace import _cli_demo_cache as demo_cache
from histospace._cli_domains import domains_cohort, run_domains, save_domains_plot
from histospace._cli_io import CLIError, _check_outputs, _positive_int, _save_figure, _table, write_output
from histospace._cli_steps import (
    _add_encoder_args,
    _feature_kwargs,
    _features_needed,
    _image_features,
)
from histospace._constants import DOMAIN_KEY, LIBRARY_KEY, MCLSTEXP_KEY
from histospace._image.features._recipes import MCLSTEXP_FEATURES
from histospace._image.features._recipes import mclstexp_features as _mclstexp_features
from histospace.io._read import input_kind


# ---- commands -------------------------------------------------------------------------------------------------------
def cmd_domains(args: argparse.Namespace) -> int:
    """Spatial domains with StereoMM: image features (if there is an image), spatial graph, StereoMM, domains.

    Several inputs (or --scheduler): one output per input in the folder -o, each input a task (dask when --scheduler
    is given), written whole or not at all; a rerun skips the inputs done, a failed input is named (exit code 1).
    """
    if len(args.input) > 1 or args.scheduler:
        return domains_cohort(args)
    args.input = args.input[0]
    _check_outputs(args, spatialdata=input_kind(args.input)[1] != "h5ad")
    t0 = time.perf_counter()
    run_domains(args, args.input, args.output)
    print(f"finished in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Train mclSTExp on reference slides and predict the query's expression from its H&E (validated settings)."""
    import anndata as ad

    import histospace as hs

    cohort = args.image is not None and (len(args.image) > 1 or args.scheduler is not None)  # -o: a folder
    if (args.query is None) == (args.image is None) or (args.scheduler and not cohort):
        msg = "pass exactly one of --query FILE or --image HE_IMAGE [...] (--scheduler goes with --image)"
        raise CLIError(msg)
    if cohort and (args.genes or args.plot):
        msg = "--genes/--plot draw one query; with several --image slides, plot each output zarr afterwards"
        raise CLIError(msg)
    query_kind = input_kind(args.query)[1] if args.query else "h5ad"  # --image: tiles in an AnnData
    for path in args.reference:
        input_kind(path)  # a missing or unknown input is named before any work
    if not cohort:
        _check_outputs(args, spatialdata=query_kind != "h5ad")
    refs = [hs.io.read(path) for path in args.reference]
    for path, r in zip(args.reference, refs, strict=True):
        if LIBRARY_KEY not in _table(r, args.table_key).obs:
            _table(r, args.table_key).obs[LIBRARY_KEY] = Path(path).stem
    if args.query is not None:
        query = hs.io.read(args.query)
    elif not cohort:
        query = hs.pp.tile_image(args.image[0], tile_size=args.tile_size)
        print(f"tiled {args.image[0]}: {query.n_obs} tiles over the tissue")
    extra = (
        _mclstexp_features(_feature_kwargs(args)["weights"]) if args.encoder == "mobilenet_v2" else MCLSTEXP_FEATURES
    )
    inputs = [
        (r, path, extra | ({} if hasattr(r, "tables") else {"library_key": LIBRARY_KEY}))
        for path, r in zip(args.reference, refs, strict=True)
    ]
    inputs += [] if cohort else [(query, args.query or args.image[0], extra)]
    # every input checked before any is computed; a SpatialData keeps its H&E: features from its image element
    for data, kw in [(d, kw) for d, label, kw in inputs if _features_needed(d, args, label=label, extra=kw)]:
        _image_features(data, args, extra=kw)
    tables = [_table(r, args.table_key) for r in refs]
    ref = refs[0] if len(refs) == 1 else ad.concat(tables, uns_merge="unique", join="inner")
    tk = {"table_key": args.table_key} if args.table_key else {}
    fit = {"max_epochs": args.max_epochs, "n_models": args.n_models, "progress_bar": not args.quiet}
    model = hs.tl.mclstexp_train(ref, **fit, **(tk if hasattr(ref, "tables") else {}))
    if cohort:  # one SpatialData zarr per slide in -o, resumable (hs.tl.predict_cohort)
        out = hs.tl.predict_cohort(args.image, model=model, outdir=args.output, scheduler=args.scheduler,
                                   tile_size=args.tile_size, n_neighbors=args.n_neighbors, on_error="warn")  # fmt: skip
        return 1 if (out["status"] == "failed").any() else 0
    hs.tl.mclstexp_predict(query, model=model, n_neighbors=args.n_neighbors, **(tk if hasattr(query, "tables") else {}))
    if args.genes:
        fig = hs.pl.predicted_vs_observed(_table(query, args.table_key), genes=args.genes, show=False)
        _save_figure(fig, args.plot or Path(args.output).with_suffix(".png"))
    write_output(query, args.output)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """StereoMM domains on DLPFC 151673 and mclSTExp on her2st (train C3-C6, predict C2), on real data.

    Image features are cached in `hs.pp.feature_cache_dir()` ($HISTOSPACE_CACHE/features, else
    ~/.cache/histospace/features), so a second run reuses them; `hs.pp.clear_feature_cache()` empties it. The trained
    models are cached beside it (`demo_models`, keyed by the data, the options and histospace's code); `--no-cache`
    computes everything and stores nothing.
    """
    import anndata as ad
    import numpy as np
    import torch

    import histospace as hs

    data_dir = args.data_dir  # None: $HISTOSPACE_DATA, as every dataset loader
    weights = hs.datasets.mobilenet_v2_weights(data_dir=data_dir)  # the shared data folder's ImageNet MobileNetV2
    genes = hs.datasets.her2st_genes(data_dir=data_dir) if "predict" in args.parts else []
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    # mean/std: known from the file; features cached (`hs.pp.feature_cache_dir()`), so a second run reuses them
    feat_kw = {"encoder": "mobilenet_v2", "weights": str(weights), "cache": not args.no_cache}
    use_cache, reused = not args.no_cache, []
    t0 = time.perf_counter()

    if "domains" in args.parts:
        t = time.perf_counter()
        adata = hs.datasets.dlpfc("151673", data_dir=data_dir)
        hs.pp.image_features(adata, progress_bar=not args.quiet, **feat_kw)
        hs.pp.spatial_graph(adata)
        reused += ["StereoMM"] * demo_cache.stereomm(adata, use_cache=use_cache, progress_bar=not args.quiet)
        hs.tl.domains(adata)
        ari = hs.metrics.ari(adata.obs["layer_guess_reordered"], adata.obs[DOMAIN_KEY])
        print(f"[domains] DLPFC 151673: {adata.n_obs} spots, ARI = {ari:.3f} ({time.perf_counter() - t:.0f} s)")
        save_domains_plot(adata, str(out / "dlpfc_151673_domains.png"), ground_truth="layer_guess_reordered")

    if "predict" in args.parts:
        t = time.perf_counter()
        slides = {}
        for s in ["C2", "C3", "C4", "C5", "C6"]:
            a = hs.datasets.her2st(s, data_dir=data_dir)
            hs.pp.image_features(a, preset="mclstexp", patch_size=224, progress_bar=not args.quiet, **feat_kw)
            slides[s] = a
        ref = ad.concat([slides[s] for s in ["C3", "C4", "C5", "C6"]], uns_merge="unique", join="inner")
        genes = [g for g in genes if g in ref.var_names and g in slides["C2"].var_names]
        model, again = demo_cache.mclstexp_train(ref, use_cache=use_cache, genes=genes, progress_bar=not args.quiet)
        reused += ["mclSTExp"] * again
        query = slides["C2"][:, genes].copy()
        hs.tl.mclstexp_predict(query, model=model)
        observed = np.log1p(1e4 * query.X.toarray() / np.maximum(query.X.toarray().sum(1, keepdims=True), 1))
        pcc = hs.metrics.pearson_per_gene(observed, query.layers[MCLSTEXP_KEY], var_names=query.var_names)
        print(
            f"[predict] her2st C2 from C3-C6: mean per-gene PCC = {np.nanmean(pcc):.3f} over {len(genes)} genes "
            f"({time.perf_counter() - t:.0f} s)"
        )
        show_genes = [g for g in ("GNAS", "FASN") if g in query.var_names]
        show_genes += [g for g in pcc.sort_values(ascending=False).index if g not in show_genes][: 2 - len(show_genes)]
        _save_figure(hs.pl.predicted_vs_observed(query, genes=show_genes, show=False), out / "her2st_C2_predicted.png")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; figures in {out}/")
    if use_cache:
        print(f"image features cached in {hs.pp.feature_cache_dir()} (clear: hs.pp.clear_feature_cache())")
        print(f"trained models {'reused from' if reused else 'cached in'} {demo_cache.demo_cache_dir()} (--no-cache)")
    return 0


# ---- parser and main ------------------------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("histospace")
    except PackageNotFoundError:  # pragma: no cover - source tree without install
        return "0.0.0"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit code 2), as every expected failure of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `histospace` command."""
    parser = _Parser(
        prog="histospace",
        description="Spatial transcriptomics with H&E histology: StereoMM spatial domains and mclSTExp prediction.",
    )
    parser.add_argument("--version", action="version", version=f"histospace {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="more output, warnings and tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("--table-key", help="SpatialData: the table to use (default: the only one)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "domains", help="spatial domains with StereoMM", parents=[common], description=cmd_domains.__doc__
    )
    p.add_argument(
        "input",
        nargs="+",
        help=".h5ad, SpatialData .zarr, Visium HD / SAW (Stereo-seq) / Visium output folder(s) or GEM file(s)",
    )
    p.add_argument(
        "-o", "--output", required=True, help="output .h5ad (AnnData input) or .zarr; with several inputs, a folder"
    )
    p.add_argument("--scheduler", help="dask scheduler address or local:N: one task per input (-o a folder)")
    p.add_argument("--n-clusters", type=_positive_int, required=True, help="number of domains")
    p.add_argument(
        "--method", default="gmm", choices=["gmm", "leiden", "kmeans"], help="clustering (default: %(default)s)"
    )
    p.add_argument("--bin-size", type=_positive_int, help="Visium HD: bin in µm (default 8); GEM: bin in DNB (50)")
    p.add_argument("--image", help="full-resolution H&E image file (an .h5ad without one, or a GEM file)")
    p.add_argument("--max-epochs", type=_positive_int, help="StereoMM epochs (default: the library default)")
    p.add_argument(
        "--n-models",
        type=_positive_int,
        help="StereoMM seed ensemble size (default: the library default, 3; 1 is 3 times faster, less stable)",
    )
    p.add_argument("--ground-truth", help="obs column with labels: print the ARI")
    p.add_argument("--plot", help="write a PNG of the domains over the H&E image")
    _add_encoder_args(p)
    p.set_defaults(func=cmd_domains)

    p = sub.add_parser(
        "predict", help="predict expression from H&E with mclSTExp", parents=[common], description=cmd_predict.__doc__
    )
    p.add_argument(
        "--reference", nargs="+", required=True, help="reference .h5ad/.zarr file(s) with counts and an image"
    )
    p.add_argument("--query", help="query .h5ad/.zarr (spots with an image)")
    p.add_argument("--image", nargs="+", help="bare H&E image file(s) (JPEG, TIFF, WSI): predict over tissue tiles")
    p.add_argument("--scheduler", help="dask scheduler address or local:N: one task per --image slide (-o a folder)")
    p.add_argument(
        "--tile-size", type=_positive_int, default=224, help="tile side in pixels for --image (default: %(default)s)"
    )
    p.add_argument("-o", "--output", required=True, help="output .h5ad/.zarr; with several --image, a folder")
    p.add_argument("--genes", nargs="+", help="write maps of these genes")
    p.add_argument("--plot", help="PNG path for the gene maps (default: next to the output)")
    p.add_argument(
        "--n-neighbors", type=_positive_int, default=200, help="reference spots averaged (default: %(default)s)"
    )
    p.add_argument("--max-epochs", type=_positive_int, help="training epochs (default: the library default, 30)")
    p.add_argument("--n-models", type=_positive_int, help="seed ensemble size (default: the library default, 5)")
    _add_encoder_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "demo", help="the main job on the shared real data", parents=[common], description=cmd_demo.__doc__
    )
    p.add_argument("--data-dir", help="data folder (default: $HISTOSPACE_DATA)")
    p.add_argument("--out-dir", default="demo_output", help="where figures go (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="compute features and train models anew; store nothing")
    p.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument(
        "--parts", nargs="+", default=["domains", "predict"], choices=["domains", "predict"], help="what to run"
    )
    p.set_defaults(func=cmd_demo)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"histospace: warning: {message}", file=sys.stderr if file is None else file)


#: failures that are the input's or the environment's, not the program's: one line and exit code 2
EXPECTED = (CLIError, KeyError, ValueError, TypeError, OSError, ImportError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (2 for bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad option (one line on stderr, exit code 2)
        return int(e.code or 0)
    import scanpy as sc

    sc.settings.verbosity = "info" if args.verbose else "warning"
    with warnings.catch_warnings():
        if not args.verbose:  # dependencies' own deprecation notices are not the user's business
            for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning, SyntaxWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _one_line_warnings
        try:
            return args.func(args)
        except EXPECTED as e:
            if args.verbose:
                raise
            text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            text = " ".join(str(text).split())  # one line
            print(f"histospace {args.command}: error: {text}", file=sys.stderr)
            return 2
