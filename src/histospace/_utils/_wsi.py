"""Multiscale images read lazily: whole-slide files, OME-TIFF / pyramidal TIFF and SpatialData image elements.

Every image histospace reads can be seen as a :class:`MultiscaleImage`: a list of levels, each an
:class:`~histospace._utils._image.ImageSource` read region by region (RGB `uint8`, white outside the image), with the
level's downsample from level 0 and, when known, the µm per pixel. A single-level image is a `MultiscaleImage` with
one level.

Readers (:func:`open_slide`), none of which decodes a whole level:

- `openslide` (`openslide-python` + the `openslide-bin` wheel): Aperio `.svs`, Hamamatsu `.ndpi`/`.vms`/`.vmu`,
  MIRAX `.mrxs`, Leica `.scn`, Ventana `.bif`, Sakura `.svslide`, DICOM, generic tiled TIFF. Each read is one
  `read_region` at the level; OpenSlide's RGBA output (transparent outside the scanned area) is composited onto the
  slide's background colour (white unless the slide says otherwise). `read_region` places regions in level-0
  pixels, so at a level whose downsample is not an integer (level sizes that do not divide the full size) OpenSlide
  resamples the region at a sub-pixel offset (under half a level pixel); tiffslide and tifffile return the stored
  pixels exactly.
- `tiffslide`: the TIFF-based formats above through tifffile, with the OpenSlide API; used where openslide is not
  installed.
- `tifffile` (+ zarr): OME-TIFF (SubIFD pyramids), pyramidal and plain TIFF, and the vendor TIFFs tifffile parses
  (SVS, NDPI, SCN, BIF); levels are zarr views of the tiles (`aszarr=True`), or a memory map when the pixels are
  stored contiguously.

Each level reader reopens its file in a new process, so sources can be sent to DataLoader workers or dask workers.

µm per pixel comes from the file's metadata (`openslide.mpp-x/y`, `aperio.MPP`, OME `PhysicalSizeX/Y` with their
units, tiffslide's `tiffslide.mpp-x/y`, TIFF `XResolution`/`ResolutionUnit`), or from `mpp=` given by the user (which
wins, with a warning when it disagrees with the metadata), else it is `None`. Resolution tags in inches at 1200 dpi
or less are screen/print defaults written by image software, not a microscope's pixel size, and are ignored.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from scanpy import logging as logg

from histospace._utils._image import ImageSource, _PILFileSource, _tiff_axes

__all__ = [
    "MultiscaleImage",
    "coordinate_system_to_pixels",
    "element_to_pixels",
    "is_slide_path",
    "open_multiscale",
    "open_slide",
    "transform_xy",
]

WSI_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf2", ".tf8", ".qptiff"})
_OPENSLIDE_ONLY = frozenset({".mrxs", ".vms", ".vmu", ".svslide", ".dcm"})
READERS = ("auto", "openslide", "tiffslide", "tifffile")
INSTALL = {
    "openslide": "pip install openslide-python openslide-bin",
    "tiffslide": "pip install tiffslide",
    "tifffile": "pip install tifffile zarr imagecodecs",
}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TIFF_VENDORS = ("svs", "ndpi", "scn", "bif", "philips", "qpi", "ventana")
# tifffile's format flags -> OpenSlide's vendor names (`MultiscaleImage.vendor` is the same whichever reader)
_VENDOR_NAMES = {"svs": "aperio", "ndpi": "hamamatsu", "scn": "leica", "bif": "ventana", "ventana": "ventana"}
# µm per unit of length, for OME `PhysicalSize*Unit` and TIFF `ResolutionUnit`
_UNIT_UM = {
    "pm": 1e-6,
    "å": 1e-4,
    "angstrom": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "micrometer": 1.0,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "in": 25400.0,
    "inch": 25400.0,
}
_MAX_DEFAULT_DPI = 1200.0


# --------------------------------------------------------------------------------------------------------------------
# the multiscale image


class MultiscaleImage:
    """An image pyramid: levels read lazily, region by region, with their downsamples and µm per pixel.

    Parameters
    ----------
    levels
        One :class:`~histospace._utils._image.ImageSource` per level, full resolution first. Level 0 sets the
        mapping from full-resolution coordinates (its `scale` and `offset`); the other levels are given the same
        mapping divided by their downsample. The sources are copied, not modified.
    mpp
        µm per level-0 pixel, one value or `(x, y)`; `None` when unknown.
    name
        Description used in messages (a path or slot).
    path
        File the image was read from, if any.
    reader
        What read it (`'openslide'`, `'tiffslide'`, `'tifffile'`, `'pil'`, `'spatialdata'`, `'array'`, ...).
    vendor
        Format reported by the reader (`'aperio'`, `'ome'`, `'generic-tiff'`, ...), if any.
    level_downsamples
        One downsample per level as the reader defines it (OpenSlide's own values); defaults to the mean of the
        per-axis downsamples.

    Attributes
    ----------
    levels
        The level sources; `levels[i].shape` is `(height, width)` of level `i`.
    downsamples
        Level-0 pixels per level pixel, float64 `(n_levels, 2)` as `(x, y)`, from the level shapes.
    level_downsamples
        One downsample per level (OpenSlide's convention: the mean of the two axes, or the reader's value).
    mpp_xy
        µm per level-0 pixel `(x, y)`, or `None`.
    """

    #: a level counts as "not coarser than asked" when its downsample exceeds the wanted one by at most this fraction
    LEVEL_RTOL = 0.01

    def __init__(
        self,
        levels: Sequence[ImageSource],
        *,
        mpp: float | Sequence[float] | None = None,
        name: str | None = None,
        path=None,
        reader: str | None = None,
        vendor: str | None = None,
        level_downsamples: Sequence[float] | None = None,
    ):
        levels = [copy.copy(lv) for lv in levels]
        if not levels:
            msg = "A MultiscaleImage needs at least one level."
            raise ValueError(msg)
        for lv in levels:
            if not isinstance(lv, ImageSource):
                msg = f"Levels must be ImageSource objects, got {type(lv).__name__}."
                raise TypeError(msg)
        self.name = name if name is not None else levels[0].name
        self.path = path if path is not None else levels[0].path
        self.reader = reader
        self.vendor = vendor
        h0, w0 = levels[0].shape
        self.downsamples = np.array([[w0 / max(lv.width, 1), h0 / max(lv.height, 1)] for lv in levels])
        if level_downsamples is None:
            level_downsamples = self.downsamples.mean(axis=1)
        if len(level_downsamples) != len(levels):
            msg = f"{self.name}: {len(level_downsamples)} level downsamples for {len(levels)} levels."
            raise ValueError(msg)
        self.level_downsamples = tuple(float(d) for d in level_downsamples)
        self.mpp_xy = _check_mpp(mpp, self.name)
        base = levels[0]
        base_xy = base._scale_xy()
        for i, lv in enumerate(levels):
            if i > 0:
                lv.scale = base.scale / self.level_downsamples[i]
                sxy = base_xy / self.downsamples[i]
                lv.scale_xy = None if np.allclose(sxy, lv.scale, rtol=1e-12, atol=0) else (float(sxy[0]), float(sxy[1]))
                lv.offset = base.offset.copy()
            lv.mpp = None if self.mpp_xy is None else float(np.mean(self.mpp_xy) * self.level_downsamples[i])
        self.levels = levels

    @property
    def n_levels(self) -> int:
        """Number of levels."""
        return len(self.levels)

    @property
    def shape(self) -> tuple[int, int]:
        """`(height, width)` of level 0."""
        return self.levels[0].shape

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """`(height, width)` of every level."""
        return [lv.shape for lv in self.levels]

    @property
    def mpp(self) -> float | None:
        """µm per level-0 pixel (mean of x and y), or `None` when unknown."""
        return None if self.mpp_xy is None else float(np.mean(self.mpp_xy))

    def level_for(self, *, mpp: float | None = None, downsample: float | None = None) -> int:
        """The level to read for a wanted resolution: the coarsest level that is not coarser than asked.

        Give either `mpp` (µm per pixel, needs :attr:`mpp`) or `downsample` (level-0 pixels per pixel). A level
        qualifies when, on both axes, its downsample is at most the wanted one times `1 + LEVEL_RTOL` (1%, so that a
        level whose size was rounded, e.g. downsample 4.0004 for 4, still counts); among those the one with the
        largest downsample is returned, and level 0 when none qualifies (the wanted resolution is finer than the
        image). Read the level and resize by `level_downsample / wanted` (at most 1.01, or an upsampling from level
        0) to reach the exact resolution.
        """
        if (mpp is None) == (downsample is None):
            msg = "Pass exactly one of `mpp=` (µm per pixel) or `downsample=` (level-0 pixels per pixel)."
            raise ValueError(msg)
        if mpp is not None:
            if not (isinstance(mpp, int | float | np.number) and mpp > 0 and math.isfinite(mpp)):
                msg = f"`mpp` must be a positive number of µm per pixel, got {mpp!r}."
                raise ValueError(msg)
            if self.mpp_xy is None:
                msg = (
                    f"{self.name}: the µm per pixel of this image is unknown (no metadata); pass `mpp=` when opening "
                    "it (e.g. `open_slide(path, mpp=0.25)`) or choose the level with `downsample=`."
                )
                raise ValueError(msg)
            want = float(mpp) / np.asarray(self.mpp_xy)
        else:
            if not (isinstance(downsample, int | float | np.number) and downsample > 0 and math.isfinite(downsample)):
                msg = f"`downsample` must be a positive number, got {downsample!r}."
                raise ValueError(msg)
            want = np.array([float(downsample)] * 2)
        ok = np.flatnonzero((self.downsamples <= want[None, :] * (1.0 + self.LEVEL_RTOL)).all(axis=1))
        if ok.size == 0:
            return 0
        return int(ok[np.argmax(self.downsamples[ok].max(axis=1))])

    def source(self, level: int = 0) -> ImageSource:
        """The :class:`~histospace._utils._image.ImageSource` of `level` (shared: copy it before changing it).

        Its `scale`/`scale_xy` and `offset` map full-resolution (level-0) coordinates to this level's pixels through
        :meth:`~histospace._utils._image.ImageSource.to_pixels`; its `mpp` is the level's µm per pixel.
        """
        if not isinstance(level, int | np.integer) or not -self.n_levels <= level < self.n_levels:
            msg = f"{self.name}: level {level!r} does not exist; the image has levels 0..{self.n_levels - 1}."
            raise IndexError(msg)
        return self.levels[int(level)]

    def downsample(self, factor: int, *, rows_per_chunk: int = 4096) -> np.ndarray:
        """Level 0 reduced by an integer `factor` to RGB `uint8` `(ceil(H / factor), ceil(W / factor), 3)`.

        Read from the coarsest level whose downsample divides `factor` (within 1%), block-averaged by the rest with
        :meth:`~histospace._utils._image.ImageSource.downsample`, then cropped or padded white to the exact shape
        (a level whose size was rounded may differ by a pixel). With one level this is a block mean of level 0.
        """
        factor = max(1, int(factor))
        best, k_best = 0, factor
        for i, d in enumerate(self.level_downsamples):
            k = factor / d
            if d <= factor * (1.0 + self.LEVEL_RTOL) and abs(k - round(k)) <= self.LEVEL_RTOL * k:
                if d > self.level_downsamples[best] or i == 0:
                    best, k_best = i, max(1, int(round(k)))
        out = self.source(best).downsample(k_best, rows_per_chunk=rows_per_chunk)
        h0, w0 = self.shape
        h_out, w_out = -(-h0 // factor), -(-w0 // factor)
        if out.shape[:2] != (h_out, w_out):
            fit = np.full((h_out, w_out, 3), 255, dtype=np.uint8)
            h, w = min(h_out, out.shape[0]), min(w_out, out.shape[1])
            fit[:h, :w] = out[:h, :w]
            out = fit
        return out

    def to_dask(self, level: int = 0, *, chunks: int | tuple | str = 1024):
        """A dask array of `level` in the native dtype, with the axes of `source(level).axes`.

        File-backed levels are wrapped so that every dask task reopens the file in its own process.
        """
        import dask.array as da

        src = self.source(level)
        arr = src.arr
        if isinstance(arr, _DaskLevel):
            return arr.arr
        if isinstance(chunks, int):
            chunks = tuple(chunks if a in "YX" else -1 for a in src.axes)
        return da.from_array(arr, chunks=chunks, lock=False, asarray=True, fancy=False)

    def close(self) -> None:
        """Close the files this process opened for the levels (they reopen on the next read)."""
        for lv in self.levels:
            close = getattr(lv.arr, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> MultiscaleImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = "unknown" if self.mpp is None else f"{self.mpp:g}"
        shapes = ", ".join(f"{w}x{h}" for h, w in self.level_shapes)
        return f"MultiscaleImage({self.name!r}, reader={self.reader!r}, levels=[{shapes}], mpp={mpp})"


def level_zero(ms: MultiscaleImage, *, kind: str = "img", scale: float | None = None) -> ImageSource:
    """A copy of level 0 of `ms` with `kind` and, when given, `scale` set (for :func:`open_image`)."""
    src = copy.copy(ms.source(0))
    src.kind = kind
    if scale is not None:
        src.scale = float(scale)
        src.scale_xy = None
    return src


def _check_mpp(mpp, name: str) -> tuple[float, float] | None:
    if mpp is None:
        return None
    vals = np.atleast_1d(np.asarray(mpp, dtype=np.float64)) if not isinstance(mpp, str) else np.array([np.nan])
    if vals.size == 1:
        vals = np.repeat(vals, 2)
    if vals.shape != (2,) or not (np.isfinite(vals).all() and (vals > 0).all()):
        msg = f"{name}: `mpp` must be a positive number of µm per pixel or an (x, y) pair, got {mpp!r}."
        raise ValueError(msg)
    return float(vals[0]), float(vals[1])


# --------------------------------------------------------------------------------------------------------------------
# level readers: array-likes that reopen their file in each process


def _open_openslide_handle(path: str):
    return _import_openslide(path).OpenSlide(path)


def _open_tiffslide_handle(path: str):
    return _import_tiffslide(path).TiffSlide(path)


_OPENERS = {"openslide": _open_openslide_handle, "tiffslide": _open_tiffslide_handle}


class _Handle:
    """A slide handle shared by the levels of one slide, opened on first use in each process (not pickled)."""

    def __init__(self, kind: str, path: str, handle=None):
        self.kind, self.path = kind, str(path)
        self._h, self._pid = handle, (os.getpid() if handle is not None else None)

    def get(self):
        if self._h is None or self._pid != os.getpid():
            self._h = _OPENERS[self.kind](self.path)
            self._pid = os.getpid()
        return self._h

    def close(self) -> None:
        if self._h is not None and self._pid == os.getpid():
            self._h.close()
        self._h, self._pid = None, None

    def __getstate__(self):
        return {"kind": self.kind, "path": self.path, "_h": None, "_pid": None}


def _norm_index(idx, shape: tuple[int, ...]) -> tuple[list[tuple[int, int, int]], list[bool]]:
    """Normalise a basic numpy index on `shape` to `(start, stop, step)` per axis and which axes are dropped."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(shape) - len(idx) + 1) + idx[k + 1 :]
    idx = idx + (slice(None),) * (len(shape) - len(idx))
    if len(idx) != len(shape):
        msg = f"Index {idx!r} does not fit an array of shape {shape}."
        raise IndexError(msg)
    ranges, drop = [], []
    for i, n in zip(idx, shape, strict=True):
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step < 1:
                msg = "Level readers support only positive slice steps."
                raise IndexError(msg)
            ranges.append((start, max(start, stop), step))
            drop.append(False)
        elif isinstance(i, int | np.integer):
            j = int(i) + n if i < 0 else int(i)
            if not 0 <= j < n:
                msg = f"Index {i} is out of bounds for an axis of size {n}."
                raise IndexError(msg)
            ranges.append((j, j + 1, 1))
            drop.append(True)
        else:
            msg = f"Level readers support only integer and slice indices, got {type(i).__name__}."
            raise IndexError(msg)
    return ranges, drop


class _RegionLevel:
    """`(H, W, C)` array-like of one level, read region by region through a slide reader's `read_region`."""

    ndim = 3

    def __init__(self, handle: _Handle, level: int, height: int, width: int, n_channels: int, dtype, downsample):
        self.handle, self.level, self.downsample = handle, int(level), float(downsample)
        self.shape = (int(height), int(width), int(n_channels))
        self.dtype = np.dtype(dtype)

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, idx) -> np.ndarray:
        (ry, rx, rc), drop = _norm_index(idx, self.shape)
        (y0, y1, sy), (x0, x1, sx) = ry, rx
        if y1 <= y0 or x1 <= x0:
            out = np.zeros((max(0, y1 - y0), max(0, x1 - x0), self.shape[2]), dtype=self.dtype)
        else:
            out = self._read(y0, y1, x0, x1)
        out = out[::sy, ::sx, rc[0] : rc[1] : rc[2]]
        return out[tuple(0 if d else slice(None) for d in drop)]

    def close(self) -> None:
        self.handle.close()

    def __array__(self, dtype=None, copy=None):
        out = self[:, :, :]
        return out if dtype is None else out.astype(dtype)


class _OpenSlideLevel(_RegionLevel):
    """One OpenSlide level; RGBA composited onto the slide's background colour."""

    def __init__(self, handle: _Handle, level: int, height: int, width: int, downsample: float, background):
        super().__init__(handle, level, height, width, 3, np.uint8, downsample)
        self.background = np.asarray(background, dtype=np.uint16).reshape(1, 1, 3)

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        # read_region takes the top-left corner in level-0 pixels; OpenSlide divides it by the level downsample
        loc = (int(round(x0 * self.downsample)), int(round(y0 * self.downsample)))
        rgba = np.asarray(self.handle.get().read_region(loc, self.level, (x1 - x0, y1 - y0)))
        return _composite(rgba, self.background)


def _composite(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's un-premultiplied RGBA onto `background` (transparent: not scanned or outside)."""
    alpha = rgba[:, :, 3:4]
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgba[:, :, :3])
    a = alpha.astype(np.uint16)
    out = (rgba[:, :, :3].astype(np.uint16) * a + background * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class _TiffSlideLevel(_RegionLevel):
    """One tiffslide level, read with `read_region(..., as_array=True, padding=False)`."""

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        ds = self.downsample
        loc = (_tiffslide_base(x0, ds), _tiffslide_base(y0, ds))
        arr = self.handle.get().read_region(loc, self.level, (x1 - x0, y1 - y0), as_array=True, padding=False)
        return np.asarray(arr).reshape(y1 - y0, x1 - x0, -1)


def _tiffslide_base(p: int, ds: float) -> int:
    """The level-0 coordinate that tiffslide maps to level pixel `p` (it uses `int(base / downsample)`)."""
    base = int(math.ceil(p * ds))
    while int(base / ds) < p:
        base += 1
    while base > 0 and int((base - 1) / ds) >= p:
        base -= 1
    return base


class _TiffLevel:
    """One level of a TIFF series in its native axes: a memory map or a zarr view of the tiles, opened per process."""

    def __init__(self, path: str, series: int, level: int, shape, dtype, memmap: bool):
        self.path, self.series, self.level, self.memmap = str(path), int(series), int(level), bool(memmap)
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self._arr, self._pid = None, None

    def _get(self):
        if self._arr is None or self._pid != os.getpid():
            import tifffile

            if self.memmap:
                self._arr = tifffile.memmap(self.path, series=self.series, level=self.level, mode="r")
            else:
                import zarr

                store = tifffile.imread(self.path, aszarr=True, series=self.series, level=self.level)
                self._arr = zarr.open(store, mode="r")
            self._pid = os.getpid()
        return self._arr

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self._get()[idx])

    def close(self) -> None:
        if self._arr is not None and self._pid == os.getpid():
            store = getattr(self._arr, "store", None)
            if store is not None and hasattr(store, "close"):
                store.close()  # the ZarrTiffStore closes its TiffFile
        self._arr, self._pid = None, None

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_arr"], d["_pid"] = None, None
        return d


class _DaskLevel:
    """A dask array read one small region at a time with the synchronous scheduler (no thread pool per patch)."""

    def __init__(self, arr):
        self.arr = arr
        self.shape, self.dtype, self.ndim = tuple(arr.shape), np.dtype(arr.dtype), arr.ndim

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self.arr[idx].compute(scheduler="synchronous"))


# --------------------------------------------------------------------------------------------------------------------
# readers


def _import_openslide(what=None):
    try:
        import openslide
    except (ImportError, OSError) as e:  # OSError: the OpenSlide C library is missing
        target = f" {str(what)!r}" if what is not None else ""
        msg = f"Reading{target} needs OpenSlide: `{INSTALL['openslide']}` ({e})."
        raise ImportError(msg) from e
    return openslide


def _import_tiffslide(what=None):
    try:
        import tiffslide
    except ImportError as e:
        target = f" {str(what)!r}" if what is not None else ""
        msg = f"Reading{target} with reader='tiffslide' needs tiffslide: `{INSTALL['tiffslide']}` ({e})."
        raise ImportError(msg) from e
    return tiffslide


def _has(module: str) -> bool:
    try:
        (_import_openslide if module == "openslide" else _import_tiffslide)()
    except ImportError:
        return False
    return True


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
    mpp = None
    try:
        mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
    except (KeyError, ValueError):
        mpp = _resolution_mpp(
            props.get("tiff.XResolution"), props.get("tiff.YResolution"), props.get("tiff.ResolutionUnit")
        )
    if mpp is not None and _is_default_dpi(props.get("tiff.ResolutionUnit"), props.get("tiff.XResolution"), mpp):
        mpp = None
    mpp = _valid_mpp(mpp)
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
    mpp = None
    if props.get("tiffslide.mpp-x") is not None and props.get("tiffslide.mpp-y") is not None:
        mpp = (float(props["tiffslide.mpp-x"]), float(props["tiffslide.mpp-y"]))
        if _is_default_dpi(props.get("tiff.ResolutionUnit"), props.get("tiff.XResolution"), mpp):
            mpp = None
    mpp = _valid_mpp(mpp)
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

    try:
        with tifffile.TiffFile(path) as tf:
            # the slide is the largest series; thumbnails, labels and macro images are smaller
            sizes = [int(np.prod([n for a, n in zip(s.axes, s.shape, strict=True) if a in "YX"])) for s in tf.series]
            si = int(np.argmax(sizes))
            series = tf.series[si]
            infos = []
            for li, lv in enumerate(series.levels):
                infos.append((li, lv.shape, lv.dtype, _tiff_axes(lv.axes, lv.shape), lv.dataoffset is not None))
            mpp = _tiff_mpp(tf, series, si)
            vendor = next((v for v in _TIFF_VENDORS if getattr(tf, f"is_{v}", False)), None)
            vendor = _VENDOR_NAMES.get(vendor, vendor) or ("ome" if tf.is_ome else "generic-tiff")
    except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError) as e:
        msg = f"Could not read the TIFF file {str(path)!r}: {e}."
        raise ValueError(msg) from e
    levels = []
    for li, shape, dtype, axes, contiguous in infos:
        memmap = False
        if contiguous:
            try:
                m = tifffile.memmap(path, series=si, level=li, mode="r")
                memmap = tuple(m.shape) == tuple(shape)
                del m
            except (ValueError, OSError):
                memmap = False
        arr = _TiffLevel(str(path), si, li, shape, dtype, memmap)
        levels.append(ImageSource(arr, axes, name=str(path), path=path))
    _probe(levels[0], path)
    return levels, _valid_mpp(mpp), vendor, None


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


# --------------------------------------------------------------------------------------------------------------------
# µm per pixel from metadata


def _valid_mpp(mpp) -> tuple[float, float] | None:
    if mpp is None:
        return None
    try:
        x, y = float(mpp[0]), float(mpp[1])
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0):
        return None
    return x, y


def _unit_um(unit) -> float | None:
    """µm per unit: OME unit strings, TIFF `ResolutionUnit` names or codes (2 inch, 3 cm, 4 mm, 5 µm)."""
    if unit is None:
        return 1.0
    if isinstance(unit, int | np.integer) or (isinstance(unit, str) and unit.strip().isdigit()):
        return {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(int(unit))
    name = getattr(unit, "name", str(unit)).strip().lower()
    name = name.replace("resunit.", "")
    return _UNIT_UM.get(name)


def _resolution_mpp(xres, yres, unit) -> tuple[float, float] | None:
    """µm per pixel from TIFF `XResolution`/`YResolution` (pixels per unit); `None` without a length unit."""
    if xres is None or unit is None:
        return None
    f = _unit_um(unit)
    if f is None:  # RESUNIT.NONE (1) or an unknown unit: no physical size
        return None
    try:
        xr = float(xres)
        yr = float(yres) if yres is not None else xr
    except (TypeError, ValueError):
        return None
    if not (xr > 0 and yr > 0):
        return None
    mpp = (f / xr, f / yr)
    return None if _is_default_dpi(unit, xr, mpp) else mpp


def _is_default_dpi(unit, xres, mpp) -> bool:
    """Resolution tags in inches at <= 1200 dpi: image software's default, not a microscope's pixel size."""
    if unit is None or xres is None or mpp is None:
        return False
    if _unit_um(unit) != 25400.0:
        return False
    try:
        dpi = float(xres)
    except (TypeError, ValueError):
        return False
    if dpi <= _MAX_DEFAULT_DPI and math.isclose(mpp[0], 25400.0 / dpi, rel_tol=1e-6):
        logg.debug(f"ignoring the TIFF resolution {dpi:g} dpi (a software default, not a pixel size)")
        return True
    return False


def _ome_mpp(xml: str, index: int) -> tuple[float, float] | None:
    """`PhysicalSizeX/Y` of OME image `index` (first image when absent), converted to µm with their units."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = root.findall("{*}Image") or root.findall("Image")
    if not images:
        return None
    image = images[index] if index < len(images) else images[0]
    pixels = image.find("{*}Pixels")
    if pixels is None:
        pixels = image.find("Pixels")
    if pixels is None:
        return None
    out = []
    for ax in ("X", "Y"):
        v = pixels.get(f"PhysicalSize{ax}")
        if v is None:
            return None
        f = _unit_um(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
        if f is None:
            return None
        out.append(float(v) * f)
    return out[0], out[1]


def _tiff_mpp(tf, series, index: int) -> tuple[float, float] | None:
    """µm per pixel of a tifffile series: OME metadata, Aperio `MPP`, then the resolution tags of its first page."""
    if tf.is_ome and tf.ome_metadata:
        mpp = _valid_mpp(_ome_mpp(tf.ome_metadata, index))
        if mpp is not None:
            return mpp
    page = series.pages[0] if series.pages else tf.pages[0]
    desc = getattr(tf.pages[0], "description", "") or ""
    if desc.startswith("Aperio"):
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            return _valid_mpp((float(m.group(1)), float(m.group(1))))
    try:
        tags = page.keyframe.tags if hasattr(page, "keyframe") else page.tags
        xr, yr = tags.get("XResolution"), tags.get("YResolution")
        unit = tags.get("ResolutionUnit")
        if xr is None or unit is None:
            return None
        xv, yv = xr.value, (yr.value if yr is not None else xr.value)
        xres = xv[0] / xv[1] if isinstance(xv, tuple) else float(xv)
        yres = yv[0] / yv[1] if isinstance(yv, tuple) else float(yv)
        return _resolution_mpp(xres, yres, int(unit.value))
    except (ZeroDivisionError, TypeError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------------------------------
# SpatialData images and transformations


def is_xarray_image(obj) -> bool:
    """Whether `obj` is an xarray `DataArray` or `DataTree` (a SpatialData image element), without importing xarray."""
    t = type(obj)
    return t.__name__ in ("DataArray", "DataTree") and t.__module__.split(".")[0] in ("xarray", "datatree")


def _dataarray_source(da, name: str) -> ImageSource:
    dims = [str(d) for d in da.dims]
    if "z" in dims:
        msg = f"{name} is a 3-D image (dims {tuple(dims)}); select a z-plane first, e.g. `image.isel(z=0)`."
        raise ValueError(msg)
    axes = "".join({"c": "C", "y": "Y", "x": "X"}.get(d, "Q") for d in dims)
    data = da.data
    arr = _DaskLevel(data) if hasattr(data, "dask") else data
    return ImageSource(arr, axes, name=name)


def _tree_levels(tree) -> list:
    """The DataArrays of a multiscale DataTree, `scale0` first."""
    keys = sorted((k for k in tree.children if re.fullmatch(r"scale\d+", str(k))), key=lambda k: int(str(k)[5:]))
    if not keys:
        msg = f"The DataTree has no `scale0`, `scale1`, ... levels (children: {list(tree.children)})."
        raise ValueError(msg)
    out = []
    for k in keys:
        node = tree[k]
        variables = list(node.data_vars.values()) if hasattr(node, "data_vars") else list(node.values())
        if len(variables) != 1:
            msg = f"DataTree level {k!r} holds {len(variables)} arrays; expected one image."
            raise ValueError(msg)
        out.append(variables[0])
    return out


def open_multiscale(
    obj,
    *,
    mpp: float | Sequence[float] | None = None,
    reader: Literal["auto", "openslide", "tiffslide", "tifffile"] = "auto",
    library_id: str | None = None,
    name: str | None = None,
) -> MultiscaleImage:
    """Open anything histospace reads as a :class:`MultiscaleImage`.

    Parameters
    ----------
    obj
        A path (:func:`open_slide` for slides and TIFFs, one level for JPEG/PNG), a SpatialData image element (an
        `xarray.DataArray` `(c, y, x)`, or a multiscale `xarray.DataTree` with `scale0`, `scale1`, ...; read lazily
        through their dask arrays, downsamples from the level shapes), a squidpy `ImageContainer` (one level, with its
        crop offset and scale), a numpy-like array, an :class:`~histospace._utils._image.ImageSource` or a
        `MultiscaleImage`.
    mpp
        µm per level-0 pixel; for files it wins over the metadata (see :func:`open_slide`).
    reader
        Reader for files (see :func:`open_slide`).
    library_id
        z-plane of an `ImageContainer` with several planes.
    name
        Description used in messages.

    Returns
    -------
    The image as levels with downsamples and µm per pixel (`None` when unknown).
    """
    from histospace._utils._image import open_image

    if isinstance(obj, MultiscaleImage):
        if mpp is None:
            return obj
        return MultiscaleImage(
            obj.levels,
            mpp=mpp,
            name=obj.name,
            path=obj.path,
            reader=obj.reader,
            vendor=obj.vendor,
            level_downsamples=obj.level_downsamples,
        )
    if isinstance(obj, str | os.PathLike):
        path = Path(obj).expanduser()
        if is_slide_path(path) or not path.is_file():
            return open_slide(path, mpp=mpp, reader=reader)
        src = open_image(path, name=name)
        return MultiscaleImage([src], mpp=mpp, name=str(path), path=path, reader="pil")
    if is_xarray_image(obj):
        label = name or ("SpatialData image" + (f" {obj.name!r}" if getattr(obj, "name", None) else ""))
        if type(obj).__name__ == "DataTree":
            levels = [_dataarray_source(da, f"{label}[scale{i}]") for i, da in enumerate(_tree_levels(obj))]
        else:
            levels = [_dataarray_source(obj, label)]
        return MultiscaleImage(levels, mpp=mpp, name=label, reader="spatialdata")
    src = open_image(obj, name=name, library_id=library_id)
    reader_name = "squidpy" if type(obj).__name__ == "ImageContainer" else "array"
    return MultiscaleImage([src], mpp=mpp, name=src.name, reader=reader_name)


def _element(sdata, key: str, what: str):
    kinds = ("images", "labels", "shapes", "points") if what == "element" else ("images",)
    for kind in kinds:
        container = getattr(sdata, kind, {})
        if key in container:
            return container[key]
    avail = {k: list(getattr(sdata, k, {}).keys()) for k in kinds}
    msg = f"`sdata` has no {what} {key!r}; it holds {avail}."
    raise KeyError(msg)


def _level_dataarray(image, level: int, image_key: str):
    if type(image).__name__ == "DataTree":
        levels = _tree_levels(image)
    else:
        levels = [image]
    if not isinstance(level, int | np.integer) or not 0 <= level < len(levels):
        msg = f"Image {image_key!r} has levels 0..{len(levels) - 1}; got `level={level!r}`."
        raise IndexError(msg)
    return levels[int(level)]


def _check_cs(sdata, coordinate_system: str, elements: dict) -> dict:
    """The transformations of `elements` to `coordinate_system`, with clear errors when one is not in it."""
    from spatialdata.transformations import get_transformation

    if coordinate_system not in sdata.coordinate_systems:
        msg = (
            f"Coordinate system {coordinate_system!r} not found; `sdata` has {list(sdata.coordinate_systems)}. "
            "Pass `coordinate_system=` naming one of them."
        )
        raise KeyError(msg)
    all_t = {k: get_transformation(e, get_all=True) for k, e in elements.items()}
    missing = [k for k, t in all_t.items() if coordinate_system not in t]
    if missing:
        common = sorted(set.intersection(*(set(t) for t in all_t.values())))
        where = "; ".join(f"{k!r} is in {sorted(t)}" for k, t in all_t.items())
        msg = (
            f"{' and '.join(repr(k) for k in missing)} not in coordinate system {coordinate_system!r} ({where}). "
            f"Pass a coordinate system holding all of them: {common}"
            + (
                "."
                if common
                else " (none; add a transformation with `spatialdata.transformations.set_transformation`)."
            )
        )
        raise ValueError(msg)
    return {k: t[coordinate_system] for k, t in all_t.items()}


def _xy_matrix(transformation) -> np.ndarray:
    return np.asarray(transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def coordinate_system_to_pixels(sdata, *, image_key: str, coordinate_system: str = "global", level: int = 0):
    """The affine map from `coordinate_system` to pixels of one level of `sdata.images[image_key]`.

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key
        The image element.
    coordinate_system
        The coordinate system the image belongs to.
    level
        Pyramid level (`scale{level}` of a multiscale image; 0 for a single-scale image).

    Returns
    -------
    A float64 `(3, 3)` matrix acting on `(x, y, 1)`: the inverse of spatialdata's transformation of that level to
    `coordinate_system` (`get_transformation`, which for `scale{k}` already holds the level's `Scale`).
    """
    image = _element(sdata, image_key, "image")
    da = _level_dataarray(image, level, image_key)
    t = _check_cs(sdata, coordinate_system, {image_key: da})[image_key]
    try:
        return _xy_matrix(t.inverse())
    except np.linalg.LinAlgError as e:
        msg = f"The transformation of {image_key!r} to {coordinate_system!r} cannot be inverted: {t}."
        raise ValueError(msg) from e


def element_to_pixels(
    sdata, *, image_key: str, element_key: str, coordinate_system: str = "global", level: int = 0
) -> np.ndarray:
    """The affine map from the intrinsic coordinates of an element (e.g. the spot circles) to pixels of an image level.

    Composed with spatialdata's API through `coordinate_system`: `Sequence([element -> coordinate_system,
    (image level -> coordinate_system)^-1])`, so both must belong to that coordinate system.

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key
        The image element.
    element_key
        The element whose coordinates are mapped (shapes, points or labels).
    coordinate_system
        The coordinate system holding both elements.
    level
        Pyramid level of the image.

    Returns
    -------
    A float64 `(3, 3)` matrix acting on `(x, y, 1)`; apply it with :func:`transform_xy`.
    """
    from spatialdata.transformations import Sequence as TSequence

    image = _element(sdata, image_key, "image")
    el = _element(sdata, element_key, "element")
    da = _level_dataarray(image, level, image_key)
    ts = _check_cs(sdata, coordinate_system, {element_key: el, image_key: da})
    try:
        seq = TSequence([ts[element_key], ts[image_key].inverse()])
    except np.linalg.LinAlgError as e:
        msg = f"The transformation of {image_key!r} to {coordinate_system!r} cannot be inverted: {ts[image_key]}."
        raise ValueError(msg) from e
    return _xy_matrix(seq)


def transform_xy(matrix: np.ndarray, xy) -> np.ndarray:
    """Apply a `(3, 3)` affine matrix to `(x, y)` points `(..., 2)`; returns float64 of the same shape."""
    xy = np.asarray(xy, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    return xy @ m[:2, :2].T + m[:2, 2]
