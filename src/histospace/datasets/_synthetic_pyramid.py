"""Tiled image pyramids rendered strip by strip from a simulated tissue: :func:`write_wsi` and the writers' images."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from scanpy import logging as logg

from histospace._utils._deprecate import renamed_argument

from ._synthetic import SimulatedTissue, simulate_tissue

__all__ = ["write_wsi"]


def _halve(a: np.ndarray, rows: int = 2048) -> np.ndarray:
    """2 x 2 mean of an `(h, w, c)` uint8 array (odd edges repeat the last pixel), `rows` input rows at a time."""
    h, w, c = a.shape
    out = np.empty(((h + 1) // 2, (w + 1) // 2, c), dtype=np.uint8)
    for r in range(0, h, rows):
        blk = np.asarray(a[r : r + rows])
        if blk.shape[0] % 2 or w % 2:
            blk = np.pad(blk, ((0, blk.shape[0] % 2), (0, w % 2), (0, 0)), mode="edge")
        acc = blk[0::2, 0::2].astype(np.uint16)
        acc += blk[1::2, 0::2]
        acc += blk[0::2, 1::2]
        acc += blk[1::2, 1::2]
        acc += 2
        out[r // 2 : r // 2 + acc.shape[0]] = acc >> 2
    return out


def _n_levels(width: int, height: int, tile: int) -> int:
    n, size = 1, max(width, height)
    while size > max(tile, 1024):
        size = math.ceil(size / 2)
        n += 1
    return n


def _tiles_of(arr: np.ndarray, tile: int, fill: int) -> Iterator[np.ndarray]:
    h, w, c = arr.shape
    for r in range(0, h, tile):
        for q in range(0, w, tile):
            t = arr[r : r + tile, q : q + tile]
            if t.shape[:2] != (tile, tile):
                pad = np.full((tile, tile, c), fill, dtype=arr.dtype)
                pad[: t.shape[0], : t.shape[1]] = t
                t = pad
            yield t


def _write_pyramid(
    path: Path,
    tissue: SimulatedTissue,
    *,
    um_per_px: float,
    origin_um: tuple[float, float],
    width: int,
    height: int,
    kind: Literal["ome", "svs", "tiff"],
    tile: int = 512,
    n_levels: int | None = None,
    quality: int = 90,
    stain: Literal["he", "ssdna", "cells"] = "he",
    keep_level: int = 1,
) -> np.ndarray | None:
    """Write a tiled pyramid rendered strip by strip; levels >= 1 are 2 x 2 means kept in temporary memmaps.

    `kind='ome'`: OME-TIFF with the reduced levels as SubIFDs (PhysicalSizeX/Y in µm); `'tiff'`: the same without
    OME-XML (resolution tags only); `'svs'`: Aperio layout (level 0, a stripped thumbnail, then the reduced levels as
    tiled pages; `MPP` in the ImageDescription). Returns level `keep_level` as an array (for thumbnails) or None.
    """
    import tifffile

    ch = 3 if stain == "he" else 1
    fill = 255 if stain == "he" else 0
    n_levels = _n_levels(width, height, tile) if n_levels is None else int(n_levels)
    compression = ("jpeg", {"level": quality}) if ch == 3 else ("zlib", {"level": 6})
    photometric = "rgb" if ch == 3 else "minisblack"
    res = {"resolution": (1e4 / um_per_px, 1e4 / um_per_px), "resolutionunit": "CENTIMETER"}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".pyramid_", ignore_cleanup_errors=True) as tmp:
        shapes = [(height, width)]
        for _ in range(1, n_levels):
            shapes.append((math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)))
        lvl1 = None
        if n_levels > 1:
            lvl1 = np.lib.format.open_memmap(Path(tmp) / "l1.npy", mode="w+", dtype=np.uint8, shape=(*shapes[1], ch))

        def level0_tiles():
            for r in range(0, height, tile):
                h = min(tile, height - r)
                strip = tissue.render(
                    origin_um[0], origin_um[1] + r * um_per_px, um_per_px, width, h, stain=stain
                ).reshape(h, width, ch)
                if lvl1 is not None:
                    lvl1[r // 2 : r // 2 + math.ceil(h / 2)] = _halve(strip)
                yield from _tiles_of(strip, tile, fill)

        common = {"tile": (tile, tile), "photometric": photometric, "compression": compression[0]}
        common["compressionargs"] = compression[1]
        kept = None
        with tifffile.TiffWriter(path, bigtiff=True, ome=(kind == "ome")) as tw:
            if kind == "svs":
                desc = (
                    f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
                    f"JPEG/RGB Q={quality}|AppMag = {10.0 / um_per_px:g}|MPP = {um_per_px:g}|"
                    "Filename = histospace-simulated"
                )
                tw.write(
                    level0_tiles(), shape=(height, width, ch), dtype=np.uint8, description=desc, metadata=None, **common
                )
            else:
                meta = {"axes": "YXS" if ch == 3 else "YX"}
                if kind == "ome":
                    meta.update(
                        PhysicalSizeX=um_per_px, PhysicalSizeY=um_per_px, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm"
                    )
                tw.write(
                    level0_tiles(),
                    shape=(height, width, ch) if ch == 3 else (height, width),
                    dtype=np.uint8,
                    subifds=n_levels - 1,
                    metadata=meta if kind == "ome" else None,
                    **res,
                    **common,
                )
            cur = lvl1
            for i in range(1, n_levels):
                if i > 1:
                    cur = _halve(cur)
                if i == keep_level:
                    kept = np.array(cur)
                if kind == "svs":
                    if i == 1:  # Aperio: a stripped thumbnail comes second
                        thumb = cur
                        while max(thumb.shape[:2]) > 1024:
                            thumb = _halve(thumb)
                        tw.write(
                            thumb, photometric=photometric, compression="jpeg", metadata=None,
                            description=f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> "
                            f"{thumb.shape[1]}x{thumb.shape[0]} - |MPP = {um_per_px:g}",
                        )  # fmt: skip
                    desc = (
                        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
                        f"-> {cur.shape[1]}x{cur.shape[0]} JPEG/RGB Q={quality}|MPP = {um_per_px * 2**i:g}"
                    )
                    # Aperio's reduced levels are plain tiled pages (not flagged as reduced, unlike label and macro)
                    tw.write(
                        _tiles_of(cur, tile, fill), shape=cur.shape, dtype=np.uint8, description=desc,
                        metadata=None, **common,
                    )  # fmt: skip
                else:
                    tw.write(cur if ch == 3 else cur[:, :, 0], subfiletype=1, metadata=None, **common)
        cur = None  # drop the views of the memmap before the folder goes
    return kept


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))


def write_wsi(
    path: str | os.PathLike,
    tissue: SimulatedTissue | None = None,
    *,
    mpp: float | None = None,
    format: Literal["ome", "svs"] | None = None,
    tile: int = 512,
    quality: int = 90,
    levels: int | None = None,
    microns_per_pixel: float | None = None,
) -> Path:
    """Write the simulated H&E of `tissue` as a tiled whole-slide pyramid, tile by tile.

    Parameters
    ----------
    path
        Output file. `format` defaults to `'svs'` for a `.svs` suffix, else `'ome'`.
    tissue
        The section (default: :func:`simulate_tissue` with its defaults). The image covers its whole rectangle.
    mpp
        Resolution of level 0 in µm per pixel (default 0.25 µm/px: a 40x scan; a 1 cm section is 40,000 px wide).
    format
        `'ome'`: OME-TIFF (BigTIFF) with the reduced levels as SubIFDs and `PhysicalSizeX/Y` in µm (read by tifffile,
        bioformats, QuPath). `'svs'`: an Aperio-like tiled TIFF (ImageDescription starting with
        'Aperio Image Library' and `MPP = ...`, reduced levels as further tiled pages, a stripped thumbnail second),
        read by OpenSlide (`openslide.mpp-x`).
    tile
        Tile side in pixels (a multiple of 16).
    quality
        JPEG quality of the tiles.
    levels
        Number of pyramid levels (each half the previous). Default: until the smallest is at most 1024 px.
    microns_per_pixel
        Deprecated alias of `mpp`.

    Returns
    -------
    The path written. Level 0 is rendered in strips of
    `tile` rows, the reduced levels are 2 x 2 means kept in temporary memory-mapped files next to `path`.
    """
    mpp = renamed_argument(
        mpp, microns_per_pixel, new_name="mpp", old_name="microns_per_pixel", func="hs.datasets.write_wsi"
    )
    um_per_px = 0.25 if mpp is None else float(mpp)
    path = Path(path)
    tissue = simulate_tissue() if tissue is None else tissue
    if format is None:
        format = "svs" if path.suffix.lower() == ".svs" else "ome"
    if format not in ("ome", "svs"):
        msg = f"`format` must be 'ome' or 'svs', got {format!r}."
        raise ValueError(msg)
    if tile % 16 or tile < 16:
        msg = f"`tile` must be a positive multiple of 16, got {tile}."
        raise ValueError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = int(round(tissue.width_um / um_per_px))
    height = int(round(tissue.height_um / um_per_px))
    start = logg.info(f"writing a {width} x {height} px {format} whole-slide image to {str(path)!r}")
    _write_pyramid(
        path, tissue, um_per_px=um_per_px, origin_um=(0.0, 0.0), width=width, height=height, kind=format,
        tile=tile, quality=quality, keep_level=0, n_levels=levels,
    )  # fmt: skip
    logg.info("    finished", time=start)
    return path
