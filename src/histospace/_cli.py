"""The `histospace` command line: spatial domains, expression prediction and the demo on real data.

Only the standard library is imported until a command runs, so `histospace --help` and `--version` answer at once.
Every expected failure (unreadable input, missing or undownloadable weights, bad option values) ends with one line
on stderr and exit code 2; `-v` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

MOBILENET_FILE = Path("weights") / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
#: image features of the mclSTExp pipeline (validated by the expression benchmark): `hs.pp.image_features`'s
#: `preset='mclstexp'` (stage features of the patch and of a patch twice as wide, averaged over the 8
#: flips/rotations; the TF padding of weights trained with it). The options are spelled out too, so that
#: `_features_match` can compare them with stored features; they equal the preset's (a test checks it).
MCLSTEXP_FEATURES = {"preset": "mclstexp", "layers": "stages", "context": 2.0, "dihedral": True}


def _mclstexp_features(weights) -> dict:
    """The mclSTExp image-feature options for `weights` (`preset='mclstexp'` and what it fills for these weights)."""
    from histospace.pp._image_features import preset_options

    opts = preset_options("mclstexp", weights=weights)
    opts.pop("encoder")  # the command's --encoder decides
    return {"preset": "mclstexp"} | opts


GEM_SUFFIXES = (".gem", ".gem.gz", ".txt", ".txt.gz", ".tsv", ".tsv.gz")


class CLIError(Exception):
    """Bad input on the command line: printed as one line, exit code 2."""


# ---- input and output -----------------------------------------------------------------------------------------------
def _is_zarr(p: Path) -> bool:
    return p.is_dir() and (p.suffix == ".zarr" or any((p / f).exists() for f in ("zarr.json", ".zattrs", ".zgroup")))


def read_input(path: str, *, bin_size: int | None = None, image: str | None = None):
    """An AnnData (`.h5ad`) or a SpatialData (SpatialData `.zarr`, Visium HD or SAW output folder, Visium folder,
    Stereo-seq GEM file binned to `bin_size` DNB), with `image` attached to a bins table that has none.
    """  # noqa: D205
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"{p} does not exist; pass an .h5ad or SpatialData .zarr file, a Visium HD / SAW / Visium folder, or a GEM file"
        raise CLIError(msg)
    name = p.name.lower()
    if p.is_file() and name.endswith(".h5ad"):
        import anndata as ad

        try:
            return ad.read_h5ad(p)
        except Exception as e:  # h5py and anndata raise many types for files that are not AnnData HDF5
            msg = f"{p} is not an .h5ad file anndata can read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            raise CLIError(msg) from e
    if p.is_file() and name.endswith(GEM_SUFFIXES):
        import histospace as hs

        sdata = hs.io.read_gem(p, bin_size=bin_size or 50)
        if image is not None:
            hs.io.add_image(sdata, image)
        return sdata
    if _is_zarr(p):
        import spatialdata as sd

        try:
            return sd.read_zarr(p)
        except Exception as e:  # zarr and spatialdata raise many types for stores that are not SpatialData
            msg = f"{p} is not a SpatialData .zarr store spatialdata can read ({type(e).__name__}: {e})"
            raise CLIError(msg) from e
    if p.is_dir():
        return _read_platform_folder(p, bin_size=bin_size)
    msg = f"{p}: unknown input; expected .h5ad, a SpatialData .zarr, a Visium HD / SAW / Visium folder or a GEM file"
    raise CLIError(msg)


def _read_platform_folder(p: Path, *, bin_size: int | None):
    """A Space Ranger (Visium HD or Visium) or SAW output folder, read with spatialdata-io."""
    from histospace._utils._deps import quiet_import

    sio = quiet_import("spatialdata_io")
    files = [f.name for f in p.rglob("*") if f.is_file()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if (p / "binned_outputs").is_dir() or any(f.endswith("feature_slice.h5") for f in files):
            return sio.visium_hd(p, bin_size=bin_size or 8, load_segmentations_only=False)
        if any(f.endswith(".gef") for f in files):
            return sio.stereoseq(p)
        if any(f.endswith("filtered_feature_bc_matrix.h5") for f in files) and (p / "spatial").is_dir():
            return sio.visium(p)
    msg = f"{p} is not a Visium HD, SAW (Stereo-seq) or Visium output folder (no binned_outputs/, .gef or spatial/)"
    raise CLIError(msg)


def _table(data, table_key: str | None):
    """The table of a SpatialData (or the AnnData itself)."""
    from histospace._utils._sdata import as_table

    return as_table(data, table_key)[0]


def write_output(data, path: str) -> None:
    """Write an AnnData (`.h5ad`, or `.zarr`) or a SpatialData (`.zarr`; or its table as `.h5ad`)."""
    from histospace._utils._sdata import is_spatialdata

    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_spatialdata(data):
        if out.suffix == ".h5ad":
            msg = f"{out}: a SpatialData is written as .zarr; pass -o ending in .zarr"
            raise CLIError(msg)
        data.write(out, overwrite=True)
        print(f"wrote {out} (SpatialData: {', '.join(f'{k} {t.n_obs} x {t.n_vars}' for k, t in data.tables.items())})")
        return
    if out.suffix == ".zarr":
        data.write_zarr(out)
    else:
        data.write_h5ad(out)
    print(f"wrote {out} ({data.n_obs} obs x {data.n_vars} vars)")


# ---- image features and graph ---------------------------------------------------------------------------------------
def _parse_floats(text: str | None) -> tuple[float, float, float] | float | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError as e:
        msg = f"expected numbers separated by commas, got {text!r}"
        raise CLIError(msg) from e
    if len(vals) not in (1, 3):
        msg = f"expected one number or three comma-separated numbers (one per RGB channel), got {text!r}"
        raise CLIError(msg)
    return vals[0] if len(vals) == 1 else vals


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image features")
    g.add_argument("--encoder", default="mobilenet_v2", help="image encoder (default: %(default)s)")
    g.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (torchvision download), a local weights file, 'hub' (pathology encoders) or 'none' for "
        "random init (default: %(default)s)",
    )
    g.add_argument("--mean", help="input normalisation mean, e.g. 0.5 or 0.5,0.5,0.5 (default: as the weights)")
    g.add_argument("--std", help="input normalisation std (default: as the weights)")
    g.add_argument("--patch-size", type=float, help="patch side in full-resolution pixels (default: 3 spot diameters)")
    g.add_argument("--patch-size-um", type=float, help="patch side in µm")
    g.add_argument("--input-size", type=_positive_int, help="side of the encoder's input in pixels (default: 224)")
    g.add_argument("--image-key", help="SpatialData: the H&E image element (default: the only one)")
    g.add_argument("--recompute-features", action="store_true", help="compute image features even if present")


def _feature_kwargs(args: argparse.Namespace) -> dict:
    weights = None if str(args.weights).lower() in {"none", "random"} else args.weights
    kw = {
        "encoder": args.encoder,
        "weights": weights,
        "mean": _parse_floats(args.mean),
        "std": _parse_floats(args.std),
        "patch_size": args.patch_size,
        "patch_size_um": args.patch_size_um,
        "input_size": args.input_size,
    }
    return {k: v for k, v in kw.items() if v is not None or k == "weights"}


def _weights_label(weights) -> str:
    if weights is None:
        return "random"
    if str(weights) in ("imagenet", "hub"):
        return str(weights)
    return str(Path(weights).expanduser().resolve())


def _features_match(table, kw: dict, extra: dict) -> str | None:
    """Why the features in `obsm['img_features']` do not match the requested ones (`None` when they do)."""
    if "img_features" not in table.obsm:
        return "no obsm['img_features']"
    params = (table.uns.get("img_features") or {}).get("params", {})
    want = {"encoder": kw["encoder"], "weights": _weights_label(kw["weights"])} | {
        k: v for k, v in extra.items() if k in ("layers", "context", "dihedral", "tf_padding")
    }
    for k in ("patch_size_px", "patch_size_um"):
        arg = kw.get("patch_size" if k == "patch_size_px" else "patch_size_um")
        if arg is not None:
            want[k] = float(arg)
    for k, v in want.items():
        have = params.get(k, {"layers": "last", "dihedral": False, "tf_padding": False}.get(k))
        if str(have) != str(v):
            return f"uns['img_features']['params'][{k!r}] is {have!r}, not {v!r}"
    return None


def _image_features(data, args, *, extra: dict | None = None, image: str | None = None) -> None:
    """Compute image features unless the table holds matching ones (then say so)."""
    import histospace as hs
    from histospace._utils._sdata import is_spatialdata

    kw = _feature_kwargs(args)
    extra = extra or {}
    table = _table(data, args.table_key)
    why = None if args.recompute_features else _features_match(table, kw, extra)
    if why is None and not args.recompute_features:
        print("reusing obsm['img_features']: computed with the requested encoder and weights", file=sys.stderr)
        return
    if is_spatialdata(data):
        hs.pp.image_features(
            data, table_key=args.table_key, image_key=args.image_key, progress_bar=not args.quiet, **kw, **extra
        )
    else:
        hs.pp.image_features(data, img=image, progress_bar=not args.quiet, **kw, **extra)


def _has_image(data) -> bool:
    from histospace._utils._sdata import is_spatialdata

    if is_spatialdata(data):
        return len(data.images) > 0
    for lib in (data.uns.get("spatial") or {}).values():
        if lib.get("images") or (lib.get("metadata") or {}).get("source_image_path"):
            return True
    return False


def _spatial_graph(data, args) -> None:
    """Build the spatial graph unless the table holds one that matches its spots (then say so)."""
    import histospace as hs

    table = _table(data, args.table_key)
    g = table.obsp.get("spatial_connectivities")
    if g is not None and g.shape == (table.n_obs, table.n_obs) and "spatial_neighbors" in table.uns:
        print("reusing obsp['spatial_connectivities']", file=sys.stderr)
        return
    if g is not None:
        print("obsp['spatial_connectivities'] does not match the spots: rebuilding it", file=sys.stderr)
    hs.pp.spatial_graph(data, **({"table_key": args.table_key} if args.table_key else {}))


# ---- commands -------------------------------------------------------------------------------------------------------
def cmd_domains(args: argparse.Namespace) -> int:
    """Spatial domains with StereoMM: image features (if there is an image), spatial graph, StereoMM, domains."""
    import histospace as hs

    t0 = time.perf_counter()
    data = read_input(args.input, bin_size=args.bin_size, image=args.image)
    table = _table(data, args.table_key)
    print(f"read {args.input}: {table.n_obs} spots/bins x {table.n_vars} genes ({time.perf_counter() - t0:.0f} s)")
    tk = {"table_key": args.table_key} if args.table_key else {}
    if args.image is not None or _has_image(data) or "img_features" in table.obsm:
        with _timed("image features"):
            _image_features(data, args, image=args.image if not hasattr(data, "tables") else None)
        features_key = "img_features"
    else:
        print("no H&E image found: StereoMM runs on expression and the spatial graph only", file=sys.stderr)
        features_key = None
    with _timed("spatial graph"):
        _spatial_graph(data, args)
    with _timed("StereoMM"):
        hs.tl.stereomm(
            data,
            features_key=features_key,
            max_epochs=args.max_epochs,
            n_models=args.n_models,
            progress_bar=not args.quiet,
            **tk,
        )
    with _timed("domains"):
        hs.tl.domains(data, n_clusters=args.n_clusters, method=args.method, **tk)
    table = _table(data, args.table_key)
    counts = table.obs["stereomm_domain"].value_counts().sort_index()
    print("domains: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    if args.ground_truth:
        if args.ground_truth not in table.obs:
            msg = f"--ground-truth {args.ground_truth!r} is not a column of obs; available: {list(table.obs)}"
            raise CLIError(msg)
        ari = hs.metrics.ari(table.obs[args.ground_truth], table.obs["stereomm_domain"])
        print(f"ARI vs {args.ground_truth}: {ari:.3f}")
    if args.plot:
        _save_domains_plot(data, args.plot, ground_truth=args.ground_truth, table_key=args.table_key)
    with _timed("write"):
        write_output(data, args.output)
    print(f"finished in {time.perf_counter() - t0:.0f} s")
    return 0


@contextmanager
def _timed(step: str):
    """Print the wall time of a step (`step: 12.3 s`) when it ends."""
    t = time.perf_counter()
    yield
    print(f"{step}: {time.perf_counter() - t:.1f} s", flush=True)


def _save_domains_plot(data, path: str, *, ground_truth: str | None = None, table_key: str | None = None) -> None:
    import matplotlib.pyplot as plt

    import histospace as hs

    kw = {"table_key": table_key} if table_key else {}
    ax = hs.pl.domains(data, key="stereomm_domain", groundtruth_key=ground_truth, show=False, **kw)
    fig = ax.figure
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def cmd_predict(args: argparse.Namespace) -> int:
    """Train mclSTExp on reference slides and predict the query's expression from its H&E (validated settings)."""
    import anndata as ad

    import histospace as hs

    if (args.query is None) == (args.image is None):
        msg = "pass exactly one of --query FILE or --image HE_IMAGE"
        raise CLIError(msg)
    refs = []  # read every input before any work, so a bad path fails at once
    for path in args.reference:
        r = read_input(path)
        if hasattr(r, "tables"):
            r = _table(r, args.table_key)
        if "library_id" not in r.obs:
            r.obs["library_id"] = Path(path).stem
        refs.append(r)
    if args.query is not None:
        query = read_input(args.query)
    else:
        query = hs.pp.tile_image(args.image, tile_size=args.tile_size)
        print(f"tiled {args.image}: {query.n_obs} tiles over the tissue")
    extra = (
        _mclstexp_features(_feature_kwargs(args)["weights"]) if args.encoder == "mobilenet_v2" else MCLSTEXP_FEATURES
    )
    for r in refs:
        _image_features(r, args, extra=extra | {"library_key": "library_id"})
    ref = refs[0] if len(refs) == 1 else ad.concat(refs, uns_merge="unique", join="inner")
    _image_features(query, args, extra=extra)
    model = hs.tl.mclstexp_train(ref, max_epochs=args.max_epochs, n_models=args.n_models, progress_bar=not args.quiet)
    tk = {"table_key": args.table_key} if args.table_key and hasattr(query, "tables") else {}
    hs.tl.mclstexp_predict(query, model=model, n_neighbors=args.n_neighbors, **tk)
    if args.genes:
        _save_gene_maps(
            _table(query, args.table_key), args.genes, args.plot or str(Path(args.output).with_suffix(".png"))
        )
    write_output(query, args.output)
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
    """StereoMM domains on DLPFC 151673 and mclSTExp on her2st (train C3-C6, predict C2), on real data.

    Image features are cached in `hs.pp.feature_cache_dir()` ($HISTOSPACE_CACHE/features, else
    ~/.cache/histospace/features), so a second run reuses them; `hs.pp.clear_feature_cache()` empties it.
    """
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
    if not weights.is_file():
        msg = f"{weights} not found; the demo uses the ImageNet MobileNetV2 weights in the shared data folder"
        raise CLIError(msg)
    # mean/std: known from the file; features cached (`hs.pp.feature_cache_dir()`), so a second run reuses them
    feat_kw = {"encoder": "mobilenet_v2", "weights": str(weights), "cache": True}
    t0 = time.perf_counter()

    if "domains" in args.parts:
        t = time.perf_counter()
        adata = hs.datasets.dlpfc("151673", data_dir=data_dir)
        hs.pp.image_features(adata, progress_bar=not args.quiet, **feat_kw)
        hs.pp.spatial_graph(adata)
        hs.tl.stereomm(adata, progress_bar=not args.quiet)
        hs.tl.domains(adata)
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
            hs.pp.image_features(a, preset="mclstexp", patch_size=224, progress_bar=not args.quiet, **feat_kw)
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
        show_genes = [g for g in ("GNAS", "FASN") if g in query.var_names]
        show_genes += [g for g in pcc.sort_values(ascending=False).index if g not in show_genes][: 2 - len(show_genes)]
        fig = hs.pl.predicted_vs_observed(query, genes=show_genes, show=False)
        fig = getattr(fig, "figure", fig)
        fig.savefig(out / "her2st_C2_predicted.png", dpi=150, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {out / 'her2st_C2_predicted.png'}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; figures in {out}/")
    print(f"image features cached in {hs.pp.feature_cache_dir()} (clear: hs.pp.clear_feature_cache())")
    return 0


# ---- parser and main ------------------------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("histospace")
    except PackageNotFoundError:  # pragma: no cover - source tree without install
        return "0.0.0"


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from e
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `histospace` command."""
    parser = argparse.ArgumentParser(
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
        help="an .h5ad, a SpatialData .zarr, a Visium HD / SAW (Stereo-seq) / Visium output folder, or a GEM file",
    )
    p.add_argument("-o", "--output", required=True, help="output .h5ad (AnnData input) or .zarr (SpatialData)")
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
    p.add_argument("--image", help="a bare H&E image file (JPEG, TIFF, whole-slide): predict over tiles of the tissue")
    p.add_argument(
        "--tile-size", type=_positive_int, default=224, help="tile side in pixels for --image (default: %(default)s)"
    )
    p.add_argument("-o", "--output", required=True, help="output .h5ad (or .zarr) with the predictions")
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
    parser = build_parser()
    args = parser.parse_args(argv)
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
