"""Level readers: array-likes of one pyramid level that read regions and reopen their file in each process.

OpenSlide and tiffslide levels read through the slide's `read_region` (one handle per slide and process), TIFF
levels are memory maps or zarr views of the tiles (tifffile), dask-backed levels compute regions through a cache of
whole chunks.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections import OrderedDict

import numpy as np

INSTALL = {
    "openslide": "pip install openslide-python openslide-bin",
    "tiffslide": "pip install tiffslide",
    "tifffile": "pip install tifffile zarr imagecodecs",
}


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
        return composite_rgba(rgba, self.background)


def composite_rgba(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
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


#: `DaskLevel` reads touching more chunks than this are computed directly, not through the cache of chunks
MAX_CACHED_BLOCKS = 4


class DaskLevel:
    """A dask array read region by region with the synchronous scheduler (no thread pool per read).

    Reads smaller than a chunk (touching at most 2 x 2 chunks) go through a cache of whole chunks (least recently used
    first out, at most `cache_bytes`): a dask array computes whole chunks anyway (a 224-px patch of a level in
    4096-px chunks, or behind a `rechunk`, decodes the whole chunk), so patches and tiles read in spatial order decode
    each chunk once or twice instead of once per read. Larger reads (e.g. 2,000-px tiles of an image in 256-px chunks)
    are computed directly, as one dask graph.
    """

    #: default cache size per process
    CACHE_BYTES = 256 * 1024**2

    def __init__(self, arr, *, cache_bytes: int = CACHE_BYTES):
        self.arr = arr
        self.shape, self.dtype, self.ndim = tuple(arr.shape), np.dtype(arr.dtype), arr.ndim
        self.cache_bytes = int(cache_bytes)
        self._chunk_starts = [np.cumsum((0,) + tuple(c)) for c in arr.chunks]
        self._chunk_bytes = math.prod(max(c) if c else 0 for c in arr.chunks) * self.dtype.itemsize
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def _block(self, key: tuple[int, ...]) -> np.ndarray:
        out = self._cache.get(key)
        if out is not None:
            self._cache.move_to_end(key)
            return out
        out = np.asarray(self.arr.blocks[key].compute(scheduler="synchronous"))
        self._cache[key] = out
        self._cached_bytes += out.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return out

    def __getitem__(self, idx) -> np.ndarray:
        ranges, drop = _norm_index(idx, self.shape)
        # the chunks each axis touches: first and last chunk index
        spans = []
        for (start, stop, _), starts in zip(ranges, self._chunk_starts, strict=True):
            if stop <= start:
                return np.asarray(self.arr[idx].compute(scheduler="synchronous"))
            spans.append((int(np.searchsorted(starts, start, "right")) - 1, int(np.searchsorted(starts, stop, "left"))))
        n_blocks = math.prod(b - a for a, b in spans)
        if n_blocks > MAX_CACHED_BLOCKS or n_blocks * self._chunk_bytes > self.cache_bytes:
            # a read as large as a chunk or more: the next read shares little of it, and one dask graph for the
            # region costs less than a compute per chunk
            return np.asarray(self.arr[idx].compute(scheduler="synchronous"))
        out = np.empty(tuple(stop - start for start, stop, _ in ranges), dtype=self.dtype)
        with self._lock:
            for key in itertools.product(*(range(a, b) for a, b in spans)):
                block = self._block(key)
                src, dst = [], []
                for (start, stop, _), k, starts in zip(ranges, key, self._chunk_starts, strict=True):
                    lo, hi = max(start, int(starts[k])), min(stop, int(starts[k + 1]))
                    src.append(slice(lo - int(starts[k]), hi - int(starts[k])))
                    dst.append(slice(lo - start, hi - start))
                out[tuple(dst)] = block[tuple(src)]
        out = out[tuple(slice(None, None, step) for _, _, step in ranges)]
        return out[tuple(0 if d else slice(None) for d in drop)]

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_cache"], d["_cached_bytes"], d["_lock"] = OrderedDict(), 0, None
        return d

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
