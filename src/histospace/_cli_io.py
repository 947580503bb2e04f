"""Inputs and outputs of the `histospace` command line: reading every supported input, checking and writing outputs.

Only the standard library is imported here; each reader imports its package when it runs.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from pathlib import Path

GEM_SUFFIXES = (".gem", ".gem.gz", ".txt", ".txt.gz", ".tsv", ".tsv.gz")


class CLIError(Exception):
    """Bad input on the command line: printed as one line, exit code 2."""


# ---- input and output -----------------------------------------------------------------------------------------------
def _is_zarr(p: Path) -> bool:
    return p.is_dir() and (p.suffix == ".zarr" or any((p / f).exists() for f in ("zarr.json", ".zattrs", ".zgroup")))


def input_kind(path: str) -> tuple[Path, str]:
    """`(path, kind)` of an input, from its name alone: kind `'h5ad'` (an AnnData), `'gem'`, `'zarr'` or `'folder'`."""
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"{p} does not exist; pass an .h5ad or SpatialData .zarr file, a Visium HD / SAW / Visium folder, or a GEM file"
        raise CLIError(msg)
    name = p.name.lower()
    if p.is_file() and (name.endswith(".h5ad") or name.endswith(GEM_SUFFIXES)):
        return p, "h5ad" if name.endswith(".h5ad") else "gem"
    if p.is_dir():
        return p, "zarr" if _is_zarr(p) else "folder"
    msg = f"{p}: unknown input; expected .h5ad, a SpatialData .zarr, a Visium HD / SAW / Visium folder or a GEM file"
    raise CLIError(msg)


def read_input(path: str, *, bin_size: int | None = None, image: str | None = None):
    """An AnnData (`.h5ad`) or a SpatialData (SpatialData `.zarr`, Visium HD or SAW output folder, Visium folder,
    Stereo-seq GEM file binned to `bin_size` DNB), with `image` attached to a bins table that has none.
    """  # noqa: D205
    p, kind = input_kind(path)
    if kind == "h5ad":
        import anndata as ad

        try:
            return ad.read_h5ad(p)
        except Exception as e:  # h5py and anndata raise many types for files that are not AnnData HDF5
            msg = f"{p} is not an .h5ad file anndata can read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            raise CLIError(msg) from e
    if kind == "gem":
        import histospace as hs

        sdata = hs.io.read_gem(p, bin_size=bin_size or 50)
        if image is not None:
            hs.io.add_image(sdata, image)
        return sdata
    if kind == "zarr":
        import spatialdata as sd

        try:
            return sd.read_zarr(p)
        except Exception as e:  # zarr and spatialdata raise many types for stores that are not SpatialData
            msg = f"{p} is not a SpatialData .zarr store spatialdata can read ({type(e).__name__}: {e})"
            raise CLIError(msg) from e
    return _read_platform_folder(p, bin_size=bin_size)


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
    """Write an AnnData (`.h5ad` or `.zarr`) or a SpatialData (`.zarr`)."""
    from histospace._utils._sdata import is_spatialdata

    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_spatialdata(data):  # a .zarr: `_check_outputs` refused anything else before the work
        data.write(out, overwrite=True)
        print(f"wrote {out} (SpatialData: {', '.join(f'{k} {t.n_obs} x {t.n_vars}' for k, t in data.tables.items())})")
        return
    if out.suffix == ".zarr":
        data.write_zarr(out)
    else:
        data.write_h5ad(out)
    print(f"wrote {out} ({data.n_obs} obs x {data.n_vars} vars)")


def _check_outputs(args: argparse.Namespace, *, spatialdata: bool) -> None:
    """Refuse, before any work, outputs that could not be written: `-o`'s suffix for the data, `--plot`'s format."""
    out = Path(args.output).expanduser()
    if out.suffix not in (".zarr", ".h5ad") or (spatialdata and out.suffix != ".zarr"):
        what = "a SpatialData, written as .zarr" if spatialdata else "an AnnData, written as .h5ad or .zarr"
        msg = f"-o {args.output}: the result is {what}; pass -o ending in {'.zarr' if spatialdata else '.h5ad'}"
        raise CLIError(msg)
    paths = [out]
    if getattr(args, "plot", None) or getattr(args, "genes", None):
        from matplotlib.backend_bases import FigureCanvasBase

        plot = Path(args.plot or out.with_suffix(".png")).expanduser()
        if plot.suffix.lstrip(".").lower() not in FigureCanvasBase.get_supported_filetypes():
            msg = f"--plot {args.plot}: not an image format matplotlib writes; pass a path ending in .png, .pdf or .svg"
            raise CLIError(msg)
        paths.append(plot)
    for path in paths:
        folder = path.absolute().parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            msg = f"{path}: {folder} is not a folder this user can write to; pass an output path elsewhere"
            raise CLIError(msg)


# ---- option types ---------------------------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (0 < v < math.inf):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from e
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _floats(text: str) -> tuple[float, float, float] | float:
    """`--mean`/`--std`: one number, or three comma-separated numbers (one per RGB channel)."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) not in (1, 3) or not all(math.isfinite(v) for v in vals):
        msg = f"expected one number or three comma-separated numbers (one per RGB channel), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return vals[0] if len(vals) == 1 else vals
