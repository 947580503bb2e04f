"""Outputs and option types of the `histospace` command line (inputs are read by :func:`histospace.io.read`).

Only the standard library is imported here, so that `histospace --help` answers at once.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path


class CLIError(Exception):
    """Bad input on the command line: printed as one line, exit code 2."""


# ---- output ---------------------------------------------------------------------------------------------------------
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


@contextmanager
def _timed(step: str):
    """Print the wall time of a step (`step: 12.3 s`) when it ends."""
    t = time.perf_counter()
    yield
    print(f"{step}: {time.perf_counter() - t:.1f} s", flush=True)


def _save_figure(fig, path) -> None:
    """Write a figure (or the figure of an `Axes`) at 150 dpi and close it."""
    import matplotlib.pyplot as plt

    fig = getattr(fig, "figure", fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


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
