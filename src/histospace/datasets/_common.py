"""Pieces shared by the dataset loaders.

The `uns['spatial']` entry of one slide, the closing log line, and the readers of legacy Spatial Transcriptomics
files (count table, spot grid scale, H&E JPEG) that her2st and MOB share.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scanpy import logging as logg

LOWRES_MAX_SIZE = 600  # longest side of the 'lowres' image of the legacy-ST loaders


def spatial_uns(
    library_id: str,
    *,
    images: Mapping[str, np.ndarray],
    scalefactors: Mapping[str, float],
    metadata: Mapping[str, object] | None = None,
) -> dict:
    """`uns['spatial']` of one slide in the scanpy/squidpy Visium layout (arrays and floats, plain dicts)."""
    return {
        library_id: {
            "images": {k: np.asarray(v) for k, v in images.items()},
            "scalefactors": {k: float(v) for k, v in scalefactors.items()},
            "metadata": dict(metadata or {}),
        }
    }


def log_loaded(adata: ad.AnnData, start) -> None:
    """Log the end of a dataset load (sizes and the slots every loader writes) with the time since `start`."""
    logg.info(
        f"    finished: {adata.n_obs} spots x {adata.n_vars} genes",
        time=start,
        deep="added\n    'spatial', spot centres (adata.obsm)\n    'spatial', images and scale factors (adata.uns)",
    )


def read_st_counts(path: Path, *, dataset: str, fix: str) -> tuple[list[str], list[str], sp.csr_matrix]:
    """Read a legacy-ST spots x genes count table (tab-separated, gzipped or not; first column: spot id '<x>x<y>').

    Uses numpy's C parser (fast). Errors name the file, the `dataset` and the `fix`.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
        lines = raw.split(b"\n", 1)
        header = lines[0].rstrip(b"\r").decode().split("\t")
        genes = header[1:]
        body = lines[1] if len(lines) > 1 else b""
        spot_ids = [ln.split(b"\t", 1)[0].decode() for ln in body.split(b"\n") if ln.strip()]
        x = np.loadtxt(
            io.BytesIO(body), delimiter="\t", usecols=range(1, len(header)), dtype=np.int64, ndmin=2, comments=None
        )
    except (OSError, EOFError, ValueError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        kind = "a gzipped tab-separated table" if path.suffix == ".gz" else "a tab-separated table"
        msg = (
            f"Could not read the {dataset} count table {path}: {e}. Expected {kind}, spots x genes, with spot ids "
            f"'<x>x<y>' in the first column. {fix}"
        )
        raise ValueError(msg) from e
    if x.shape != (len(spot_ids), len(genes)) or not spot_ids:
        msg = f"The {dataset} count table {path} has {x.shape} values for {len(spot_ids)} spots x {len(genes)} genes."
        raise ValueError(msg)
    if (x < 0).any():
        msg = f"The {dataset} count table {path} holds negative values; expected raw UMI counts."
        raise ValueError(msg)
    return spot_ids, genes, sp.csr_matrix(x.astype(np.int32))


def st_pixels_per_step(coords: pd.DataFrame) -> float | None:
    """Pixels per array step: the mean over both axes of the fitted slope of `pixel_x` on `x` and `pixel_y` on `y`.

    `None` when neither axis has two distinct integer array positions.
    """
    slopes = []
    for arr, px in (("x", "pixel_x"), ("y", "pixel_y")):
        a = coords[arr].to_numpy(dtype=float)
        p = coords[px].to_numpy(dtype=float)
        if np.unique(np.round(a)).size >= 2:
            slopes.append(abs(np.polyfit(a, p, 1)[0]))
    return float(np.mean(slopes)) if slopes else None


def read_downscaled(path: Path, max_size: int, *, fix: str) -> tuple[np.ndarray, float]:
    """Read a (large) JPEG downscaled so that its longest side is `max_size`; returns uint8 RGB and the scale."""
    from PIL import Image

    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # whole-slide H&E are legitimately larger than PIL's bomb limit
    try:
        with Image.open(path) as im:
            w, h = im.size
            scalef = min(1.0, max_size / max(w, h))
            size = (max(1, round(w * scalef)), max(1, round(h * scalef)))
            im.draft("RGB", size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale directly (fast)
            im = im.convert("RGB")
            if im.size != size:
                im = im.resize(size, Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as e:
        msg = f"Could not read the H&E image {path}: {e}. {fix}"
        raise ValueError(msg) from e
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    return arr, float(scalef)


def downscale_array(img: np.ndarray, scalef: float, max_size: int) -> tuple[np.ndarray, float]:
    """Downscale an in-memory image further; returns the image and its scale relative to full resolution."""
    from PIL import Image

    h, w = img.shape[:2]
    f = min(1.0, max_size / max(h, w))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    out = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
    return out, float(scalef * f)


def st_spatial_uns(
    library_id: str,
    *,
    pixels_per_um: float,
    spot_um: float,
    img_path: Path | None,
    image: bool,
    hires_max_size: int,
    fix: str,
    metadata: Mapping[str, object] | None = None,
) -> dict:
    """`uns['spatial']` of one legacy-ST section: the spot diameter in full-resolution pixels, and the H&E JPEG.

    `img_path` (when not `None`) is recorded as `metadata['source_image_path']`; with `image=True` it is read into
    `'hires'` (longest side `hires_max_size`) and `'lowres'` (`LOWRES_MAX_SIZE`) copies with their scale factors.
    """
    spot_px = float(spot_um * pixels_per_um)
    scalefactors: dict[str, float] = {"spot_diameter_fullres": spot_px, "fiducial_diameter_fullres": spot_px}
    meta: dict[str, object] = {"technology": "st", "spot_diameter_um": float(spot_um), **(metadata or {})}
    meta["pixels_per_um"] = float(pixels_per_um)
    images: dict[str, np.ndarray] = {}
    if img_path is not None:
        meta["source_image_path"] = str(img_path.resolve())
        if image:
            hires, scalef = read_downscaled(img_path, hires_max_size, fix=fix)
            lowres, lowres_scalef = downscale_array(hires, scalef, LOWRES_MAX_SIZE)
            images = {"hires": hires, "lowres": lowres}
            scalefactors["tissue_hires_scalef"] = scalef
            scalefactors["tissue_lowres_scalef"] = lowres_scalef
    return spatial_uns(library_id, images=images, scalefactors=scalefactors, metadata=meta)


def check_max_size(value, name: str) -> None:
    """Raise ValueError unless `value` is a positive int (an image side in pixels)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        msg = f"`{name}` must be a positive int (pixels), got {value!r}."
        raise ValueError(msg)
