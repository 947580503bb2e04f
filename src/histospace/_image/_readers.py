"""Whole-slide and TIFF files opened as a :class:`~histospace._image._multiscale.MultiscaleImage`.

The reader is picked per file (OpenSlide, tiffslide or tifffile; see :func:`open_slide`); µm per pixel comes from
:mod:`histospace._image._mpp`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from scanpy import logging as logg

from histospace._image._levels import (
    INSTALL,
    _Handle,
    _has,
    _import_openslide,
    _import_tiffslide,
    _OpenSlideLevel,
    _TiffLevel,
    _TiffSlideLevel,
)
from histospace._image._mpp import properties_mpp
from histospace._image._multiscale import MultiscaleImage, _check_mpp
from histospace._image._sources import ImageSource, _PILFileSource, _tiff_axes
from histospace._image._tiff import _TIFF_VENDORS, TruncatedTiffError, read_tiff_header

__all__ = ["is_slide_path", "open_slide"]

WSI_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf2", ".tf8", ".qptiff"})
_OPENSLIDE_ONLY = frozenset({".mrxs", ".vms", ".vmu", ".svslide", ".dcm"})
READERS = ("auto", "openslide", "tiffslide", "tifffile")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# tifffile's format flags -> OpenSlide's vendor names (`MultiscaleImage.vendor` is the same whichever reader)
_VENDOR_NAMES = {"svs": "aperio", "ndpi": "hamamatsu", "scn": "leica", "bif": "ventana", "ventana": "ventana"}


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) > 1 and suffixes[-2] == ".ome":
        return suffixes[-2] + suffixes[-1]
    return path.suffix.lower()


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def is_slide_path(path) -> bool:
    """Whether `path` is opened by :func:`open_slide`: a whole-slide suffix, a TIFF suffix or a TIFF header."""
    path = Path(path)
    suffix = _suffix(path)
    return suffix in WSI_SUFFIXES or suffix in TIFF_SUFFIXES or (path.is_file() and _is_tiff(path))


def _tiff_vendor(path: Path) -> str | None:
    """`'ome'`, a vendor (`'svs'`, `'ndpi'`, ...) or `None` (generic TIFF), as tifffile detects it."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        for v in _TIFF_VENDORS:
            if getattr(tf, f"is_{v}", False):
                return v
        if tf.is_ome:
            return "ome"
    return None


def _auto_reader(path: Path) -> str:
    """The reader `'auto'` picks (see :func:`open_slide`)."""
    suffix = _suffix(path)
    if suffix in _OPENSLIDE_ONLY:
        return "openslide"
    if not _is_tiff(path):
        return "openslide" if suffix in WSI_SUFFIXES else "pil"
    try:
        vendor = _tiff_vendor(path)
    except Exception as e:  # noqa: BLE001 - an unreadable header: let the openslide/tifffile readers report it
        logg.debug(f"tifffile could not parse {path}: {e}")
        vendor = "unknown"
    if vendor is None or vendor == "ome":
        return "tifffile"
    if _has("openslide"):
        openslide = _import_openslide()
        fmt = openslide.OpenSlide.detect_format(str(path))
        if fmt not in (None, "generic-tiff"):
            return "openslide"
    if vendor != "unknown" and _has("tiffslide"):
        return "tiffslide"
    return "tifffile"


def open_slide(
    path,
    *,
    mpp: float | Sequence[float] | None = None,
    reader: Literal["auto", "openslide", "tiffslide", "tifffile"] = "auto",
) -> MultiscaleImage:
    """Open a whole-slide image or a (pyramidal) TIFF lazily as a :class:`MultiscaleImage`.

    Parameters
    ----------
    path
        The slide: `.svs`, `.ndpi`, `.mrxs`, `.scn`, `.vms`, `.bif`, OME-TIFF, pyramidal or plain TIFF, ... (JPEG/PNG
        open as one level).
    mpp
        µm per level-0 pixel, one value or `(x, y)`. Wins over the file's metadata (with a warning when they differ
        by more than 1%); `None` uses the metadata, and leaves it unknown without any.
    reader
        `'auto'` picks, in this order: OpenSlide for the formats only it reads (`.mrxs`, `.vms`, `.vmu`, `.svslide`,
        DICOM); tifffile for OME-TIFF and generic TIFF (pyramidal or not); for vendor TIFFs (SVS, NDPI, SCN, BIF,
        Philips) OpenSlide when installed and it recognises the vendor, else tiffslide when installed, else tifffile.
        `'openslide'`, `'tiffslide'` or `'tifffile'` force a reader.

    Returns
    -------
    The slide's levels, downsamples and µm per pixel; no pixel is decoded except one probe pixel (tifffile reader).
    A TIFF that is damaged, or cut short (pixel data, metadata or IFDs beyond the end of the file), raises
    `ValueError` naming the file, whichever the reader.
    """
    path = Path(path).expanduser()
    if reader not in READERS:
        msg = f"`reader` must be one of {READERS}, got {reader!r}."
        raise ValueError(msg)
    if not path.exists():
        msg = f"Slide file {str(path)!r} not found."
        raise FileNotFoundError(msg)
    user_mpp = _check_mpp(mpp, str(path))
    chosen = _auto_reader(path) if reader == "auto" else reader
    if chosen == "pil":
        try:
            src = _PILFileSource(path, kind="img", scale=1.0)
        except OSError as e:
            msg = (
                f"No reader opens {str(path)!r} ({e}). histospace reads OpenSlide formats (`{INSTALL['openslide']}`), "
                "TIFF/OME-TIFF, JPEG and PNG; convert other formats to a pyramidal OME-TIFF, e.g. with Bio-Formats "
                "`bfconvert -pyramid-resolutions 4 -pyramid-scale 2 -tilex 512 -tiley 512 slide.czi slide.ome.tif`."
            )
            raise ValueError(msg) from e
        return MultiscaleImage([src], mpp=user_mpp, name=str(path), path=path, reader="pil")
    if chosen == "tiffslide" or (chosen == "openslide" and _is_tiff(path)):
        _check_tiff(path, strict=chosen == "tiffslide")
    if chosen == "openslide":
        levels, meta_mpp, vendor, ds = _read_openslide(path)
    elif chosen == "tiffslide":
        levels, meta_mpp, vendor, ds = _read_tiffslide(path)
    else:
        levels, meta_mpp, vendor, ds = _read_tifffile(path)
    final = meta_mpp
    if user_mpp is not None:
        if meta_mpp is not None and not np.allclose(user_mpp, meta_mpp, rtol=0.01):
            warnings.warn(
                f"{str(path)!r}: `mpp={mpp}` differs from the file's metadata ({meta_mpp[0]:g}, {meta_mpp[1]:g} µm "
                "per pixel); using the given value.",
                UserWarning,
                stacklevel=2,
            )
        final = user_mpp
    ms = MultiscaleImage(
        levels, mpp=final, name=str(path), path=path, reader=chosen, vendor=vendor, level_downsamples=ds
    )
    logg.debug(f"opened {ms!r}")
    return ms


def _read_openslide(path: Path):
    openslide = _import_openslide(path)
    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as e:  # OpenSlideUnsupportedFormatError is a subclass
        msg = (
            f"OpenSlide cannot read {str(path)!r} ({type(e).__name__}: {e}); for OME-TIFF or plain TIFF use "
            "`reader='tifffile'`."
        )
        raise ValueError(msg) from e
    props = dict(slide.properties)
    mpp = properties_mpp(props, "openslide")
    bg = props.get("openslide.background-color", "FFFFFF")
    try:
        background = [int(bg[i : i + 2], 16) for i in (0, 2, 4)]
    except (ValueError, TypeError):
        background = [255, 255, 255]
    handle = _Handle("openslide", str(path), slide)
    ds = list(slide.level_downsamples)
    levels = [
        ImageSource(_OpenSlideLevel(handle, i, h, w, ds[i], background), "YXS", name=str(path), path=path)
        for i, (w, h) in enumerate(slide.level_dimensions)
    ]
    return levels, mpp, props.get("openslide.vendor"), ds


def _read_tiffslide(path: Path):
    tiffslide = _import_tiffslide(path)
    try:
        slide = tiffslide.TiffSlide(str(path))
    except Exception as e:
        msg = f"tiffslide cannot read {str(path)!r} ({type(e).__name__}: {e}); try `reader='openslide'` or 'tifffile'."
        raise ValueError(msg) from e
    props = dict(slide.properties)
    mpp = properties_mpp(props, "tiffslide")
    handle = _Handle("tiffslide", str(path), slide)
    ds = list(slide.level_downsamples)
    probe = np.asarray(slide.read_region((0, 0), 0, (1, 1), as_array=True, padding=False))
    n_ch = probe.shape[-1] if probe.ndim == 3 else 1
    levels = [
        ImageSource(_TiffSlideLevel(handle, i, h, w, n_ch, probe.dtype, ds[i]), "YXS", name=str(path), path=path)
        for i, (w, h) in enumerate(slide.level_dimensions)
    ]
    return levels, mpp, props.get("tiffslide.vendor"), ds


def _read_tifffile(path: Path):
    import tifffile

    header = read_tiff_header(path)  # raises naming the file when it is damaged or truncated
    si = header.series
    vendor = _VENDOR_NAMES.get(header.vendor, header.vendor) or "generic-tiff"
    levels = []
    for li, (shape, dtype, axes, contiguous) in enumerate(header.levels):
        memmap = False
        if contiguous:
            try:
                m = tifffile.memmap(path, series=si, level=li, mode="r")
                memmap = tuple(m.shape) == tuple(shape)
                del m
            except (ValueError, OSError):
                memmap = False
        arr = _TiffLevel(str(path), si, li, shape, dtype, memmap)
        levels.append(ImageSource(arr, _tiff_axes(axes, shape), name=str(path), path=path))
    _probe(levels[0], path)
    return levels, header.mpp, vendor, None


def _check_tiff(path: Path, *, strict: bool) -> None:
    """Before OpenSlide or tiffslide read a TIFF: raise when it is cut short, or damaged for tiffslide.

    tiffslide parses the file with tifffile; OpenSlide reports the files it cannot parse itself.
    """
    try:
        read_tiff_header(path)
    except TruncatedTiffError:
        raise
    except ValueError as e:
        if strict:
            raise
        logg.debug(f"tifffile could not check {path}: {e}")


def _probe(src: ImageSource, path: Path) -> None:
    """Decode one pixel so that a missing codec is reported when the slide is opened, not mid-way."""
    try:
        src._raw(0, 1, 0, 1)
    except Exception as e:
        text = str(e)
        if "imagecodecs" in text:
            msg = f"Decoding {str(path)!r} needs imagecodecs: `pip install imagecodecs` ({text})."
            raise ImportError(msg) from e
        msg = f"Could not read the TIFF file {str(path)!r}: {type(e).__name__}: {text}."
        raise ValueError(msg) from e
