"""The `histospace` command line: spatial domains, expression prediction and the demo on real data."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

MOBILENET_FILE = Path("weights") / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"


class CLIError(Exception):
    """Bad input on the command line: printed as one line, exit code 2."""


def _parse_floats(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    vals = tuple(float(v) for v in text.split(","))
    if len(vals) != 3:
        msg = f"expected three comma-separated numbers (one per RGB channel), got {text!r}"
        raise CLIError(msg)
    return vals  # type: ignore[return-value]


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image features")
    g.add_argument(
        "--encoder", default="densenet121", help="densenet121, resnet50 or mobilenet_v2 (default: %(default)s)"
    )
    g.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (torchvision download), a local state_dict file, or 'none' for random init "
        "(default: %(default)s)",
    )
    g.add_argument("--mean", help="input normalisation mean per channel, e.g. 0.5,0.5,0.5 (for a local weights file)")
    g.add_argument("--std", help="input normalisation std per channel, e.g. 0.5,0.5,0.5 (for a local weights file)")
    g.add_argument(
        "--patch-size", type=int, help="patch side in full-resolution pixels (default: tied to the spot size)"
    )


def _feature_kwargs(args: argparse.Namespace) -> dict:
    weights = None if str(args.weights).lower() in {"none", "random"} else args.weights
    kw = {"encoder": args.encoder, "weights": weights, "mean": _parse_floats(args.mean), "std": _parse_floats(args.std)}
    if args.patch_size is not None:
        kw["patch_size"] = args.patch_size
    return {k: v for k, v in kw.items() if v is not None or k == "weights"}


def _read_h5ad(path: str):
    import anndata as ad

    p = Path(path)
    if not p.is_file():
        msg = f"{p} does not exist; pass an existing .h5ad file"
        raise CLIError(msg)
    return ad.read_h5ad(p)


def _write_h5ad(adata, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    print(f"wrote {out} ({adata.n_obs} obs x {adata.n_vars} vars)")


def _has_image(adata) -> bool:
    for lib in adata.uns.get("spatial", {}).values():
        if lib.get("images") or lib.get("metadata", {}).get("source_image_path"):
            return True
    return False


def cmd_domains(args: argparse.Namespace) -> int:
    """Image features (if an image is there), spatial graph, StereoMM, domains."""
    import histospace as hs

    adata = _read_h5ad(args.input)
    if args.image is not None or _has_image(adata):
        hs.pp.image_features(adata, img=args.image, progress_bar=not args.quiet, **_feature_kwargs(args))
        image_key = "img_features"
    elif "img_features" in adata.obsm:
        image_key = "img_features"
    else:
        print("no H&E image found: StereoMM runs on expression and the spatial graph only", file=sys.stderr)
        image_key = None
    if "spatial_connectivities" not in adata.obsp:
        hs.pp.spatial_graph(adata)
    hs.tl.stereomm(adata, features_key=image_key, max_epochs=args.max_epochs, progress_bar=not args.quiet)
    hs.tl.domains(adata, use_rep="X_stereomm", n_clusters=args.n_clusters, method=args.method)
    counts = adata.obs["stereomm_domain"].value_counts().sort_index()
    print("domains: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    if args.ground_truth:
        if args.ground_truth not in adata.obs:
            msg = f"--ground-truth {args.ground_truth!r} is not a column of adata.obs; available: {list(adata.obs)}"
            raise CLIError(msg)
        ari = hs.metrics.ari(adata.obs[args.ground_truth], adata.obs["stereomm_domain"])
        print(f"ARI vs {args.ground_truth}: {ari:.3f}")
    if args.plot:
        _save_domains_plot(adata, args.plot, ground_truth=args.ground_truth)
    _write_h5ad(adata, args.output)
    return 0


def _save_domains_plot(adata, path: str, *, ground_truth: str | None = None) -> None:
    import matplotlib.pyplot as plt

    import histospace as hs

    ax = hs.pl.domains(adata, key="stereomm_domain", groundtruth_key=ground_truth, show=False)
    fig = ax.figure
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def cmd_predict(args: argparse.Namespace) -> int:
    """Train mclSTExp on reference slides and predict the query's expression from its H&E."""
    import anndata as ad

    import histospace as hs

    if (args.query is None) == (args.image is None):
        msg = "pass exactly one of --query Q.h5ad or --image HE.jpg"
        raise CLIError(msg)
    refs = [_read_h5ad(p) for p in args.reference]
    for i, r in enumerate(refs):
        if "library_id" not in r.obs:
            r.obs["library_id"] = Path(args.reference[i]).stem
        if "img_features" not in r.obsm:
            hs.pp.image_features(r, library_key="library_id", progress_bar=not args.quiet, **_feature_kwargs(args))
    ref = refs[0] if len(refs) == 1 else ad.concat(refs, uns_merge="unique", join="inner")
    if args.query is not None:
        query = _read_h5ad(args.query)
    else:
        query = hs.pp.tile_image(args.image, tile_size=args.tile_size)
        print(f"tiled {args.image}: {query.n_obs} tiles over the tissue")
    if "img_features" not in query.obsm:
        hs.pp.image_features(query, progress_bar=not args.quiet, **_feature_kwargs(args))
    model = hs.tl.mclstexp_train(ref, max_epochs=args.max_epochs, n_models=args.n_models, progress_bar=not args.quiet)
    out = hs.tl.mclstexp_predict(query, model=model, n_neighbors=args.n_neighbors, copy=True)
    if args.genes:
        _save_gene_maps(out, args.genes, args.plot or str(Path(args.output).with_suffix(".png")))
    _write_h5ad(out, args.output)
    return 0


def _save_gene_maps(adata, genes: list[str], path: str) -> None:
    import matplotlib.pyplot as plt

    import histospace as hs

    fig = hs.pl.predicted_vs_observed(adata, genes=genes, show=False)
    fig = getattr(fig, "figure", fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def _data_dir(arg: str | None) -> Path:
    d = arg or os.environ.get("HISTOSPACE_DATA")
    if d is None:
        msg = "no data directory: pass --data-dir DIR or set HISTOSPACE_DATA"
        raise CLIError(msg)
    p = Path(d)
    if not p.is_dir():
        msg = f"--data-dir {p} is not a directory"
        raise CLIError(msg)
    return p


def cmd_demo(args: argparse.Namespace) -> int:
    """StereoMM domains on DLPFC 151673 and mclSTExp on her2st (train C3-C6, predict C2), on real data."""
    import anndata as ad
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    import histospace as hs

    data_dir = _data_dir(args.data_dir)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    weights = data_dir / MOBILENET_FILE
    feat_kw = {"encoder": "mobilenet_v2", "weights": str(weights), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    if not weights.is_file():
        msg = f"{weights} not found; the demo uses the ImageNet MobileNetV2 weights in the shared data folder"
        raise CLIError(msg)
    t0 = time.perf_counter()

    if "domains" in args.parts:
        t = time.perf_counter()
        adata = hs.datasets.dlpfc("151673", data_dir=data_dir)
        hs.pp.image_features(adata, progress_bar=not args.quiet, **feat_kw)
        hs.pp.spatial_graph(adata)
        hs.tl.stereomm(adata, progress_bar=not args.quiet)
        hs.tl.domains(adata, n_clusters=7)
        ari = hs.metrics.ari(adata.obs["layer_guess_reordered"], adata.obs["stereomm_domain"])
        print(f"[domains] DLPFC 151673: {adata.n_obs} spots, ARI = {ari:.3f} ({time.perf_counter() - t:.0f} s)")
        _save_domains_plot(adata, str(out / "dlpfc_151673_domains.png"), ground_truth="layer_guess_reordered")

    if "predict" in args.parts:
        t = time.perf_counter()
        panel_file = data_dir / "her2st" / "gene_lists" / "her2st_785genes_hist2st.txt"
        genes = [g.strip() for g in panel_file.read_text().split() if g.strip()]
        slides = {}
        for s in ["C2", "C3", "C4", "C5", "C6"]:
            a = hs.datasets.her2st(s, data_dir=data_dir)
            hs.pp.image_features(a, patch_size=224, progress_bar=not args.quiet, **feat_kw)
            slides[s] = a
        ref = ad.concat([slides[s] for s in ["C3", "C4", "C5", "C6"]], uns_merge="unique", join="inner")
        genes = [g for g in genes if g in ref.var_names and g in slides["C2"].var_names]
        model = hs.tl.mclstexp_train(ref, genes=genes, progress_bar=not args.quiet)
        query = slides["C2"][:, genes].copy()
        hs.tl.mclstexp_predict(query, model=model)
        observed = np.log1p(1e4 * query.X.toarray() / np.maximum(query.X.toarray().sum(1, keepdims=True), 1))
        pcc = hs.metrics.pearson_per_gene(observed, query.layers["mclstexp"], var_names=query.var_names)
        print(
            f"[predict] her2st C2 from C3-C6: mean per-gene PCC = {np.nanmean(pcc):.3f} over {len(genes)} genes "
            f"({time.perf_counter() - t:.0f} s)"
        )
        show_genes = [g for g in ("ERBB2", "GNAS") if g in query.var_names]
        show_genes += [g for g in pcc.sort_values(ascending=False).index if g not in show_genes][: 2 - len(show_genes)]
        fig = hs.pl.predicted_vs_observed(query, genes=show_genes, show=False)
        fig = getattr(fig, "figure", fig)
        fig.savefig(out / "her2st_C2_predicted.png", dpi=150, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {out / 'her2st_C2_predicted.png'}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; figures in {out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `histospace` command."""
    from histospace import __version__

    parser = argparse.ArgumentParser(
        prog="histospace",
        description="Spatial transcriptomics with H&E histology: StereoMM spatial domains and mclSTExp prediction.",
    )
    parser.add_argument("--version", action="version", version=f"histospace {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="more output, and tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "domains", help="spatial domains with StereoMM", parents=[common], description=cmd_domains.__doc__
    )
    p.add_argument("input", help="input .h5ad (counts, obsm['spatial'], optionally uns['spatial'] with an image)")
    p.add_argument("-o", "--output", required=True, help="output .h5ad")
    p.add_argument("--n-clusters", type=int, required=True, help="number of domains")
    p.add_argument(
        "--method", default="gmm", choices=["gmm", "leiden", "kmeans"], help="clustering (default: %(default)s)"
    )
    p.add_argument("--image", help="full-resolution H&E image file (else the image in uns['spatial'])")
    p.add_argument("--max-epochs", type=int, default=None, help="StereoMM epochs (default: the library default)")
    p.add_argument("--ground-truth", help="obs column with labels: print the ARI")
    p.add_argument("--plot", help="write a PNG of the domains over the H&E image")
    _add_encoder_args(p)
    p.set_defaults(func=cmd_domains)

    p = sub.add_parser(
        "predict", help="predict expression from H&E with mclSTExp", parents=[common], description=cmd_predict.__doc__
    )
    p.add_argument("--reference", nargs="+", required=True, help="reference .h5ad file(s) with counts and an image")
    p.add_argument("--query", help="query .h5ad (spots with an image)")
    p.add_argument("--image", help="a bare H&E image file: predict over tiles of the tissue")
    p.add_argument("--tile-size", type=int, default=224, help="tile side in pixels for --image (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="output .h5ad with the predictions")
    p.add_argument("--genes", nargs="+", help="write maps of these genes")
    p.add_argument("--plot", help="PNG path for the gene maps (default: next to the output)")
    p.add_argument("--n-neighbors", type=int, default=200, help="reference spots averaged (default: %(default)s)")
    p.add_argument("--max-epochs", type=int, default=90, help="training epochs (default: %(default)s)")
    p.add_argument(
        "--n-models", type=int, default=1, help="seed ensemble: models trained and averaged (default: %(default)s)"
    )
    _add_encoder_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "demo", help="the main job on the shared real data", parents=[common], description=cmd_demo.__doc__
    )
    p.add_argument("--data-dir", help="data folder (default: $HISTOSPACE_DATA)")
    p.add_argument("--out-dir", default="demo_output", help="where figures go (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument(
        "--parts", nargs="+", default=["domains", "predict"], choices=["domains", "predict"], help="what to run"
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (2 for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import scanpy as sc

    sc.settings.verbosity = "info" if args.verbose else "warning"
    try:
        return args.func(args)
    except (CLIError, KeyError, ValueError, TypeError, FileNotFoundError) as e:
        if args.verbose:
            raise
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"histospace {args.command}: error: {text}", file=sys.stderr)
        return 2
