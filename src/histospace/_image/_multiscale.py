"""The multiscale image: levels read lazily region by region, their downsamples, µm per pixel and level choice.

See :mod:`histospace._image._readers` (files) and :mod:`histospace._image._open` (anything) for what builds one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np

from histospace._image._levels import DaskLevel
from histospace._image._sources import ImageSource

__all__ = ["MultiscaleImage", "level_zero"]


class MultiscaleImage:
    """An image pyramid: levels read lazily, region by region, with their downsamples and µm per pixel.

    Parameters
    ----------
    levels
        One :class:`~histospace._image._sources.ImageSource` per level, full resolution first. Level 0 sets the
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
        """The :class:`~histospace._image._sources.ImageSource` of `level` (shared: copy it before changing it).

        Its `scale`/`scale_xy` and `offset` map full-resolution (level-0) coordinates to this level's pixels through
        :meth:`~histospace._image._sources.ImageSource.to_pixels`; its `mpp` is the level's µm per pixel.
        """
        if not isinstance(level, int | np.integer) or not -self.n_levels <= level < self.n_levels:
            msg = f"{self.name}: level {level!r} does not exist; the image has levels 0..{self.n_levels - 1}."
            raise IndexError(msg)
        return self.levels[int(level)]

    def downsample(self, factor: int, *, rows_per_chunk: int = 4096) -> np.ndarray:
        """Level 0 reduced by an integer `factor` to RGB `uint8` `(ceil(H / factor), ceil(W / factor), 3)`.

        Read from the coarsest level whose downsample divides `factor` (within 1%), block-averaged by the rest with
        :meth:`~histospace._image._sources.ImageSource.downsample`, then cropped or padded white to the exact shape
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
        if isinstance(arr, DaskLevel):
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
