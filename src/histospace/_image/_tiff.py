"""The header of a TIFF file read once for every reader: its main series, levels, µm per pixel, and its integrity.

:func:`read_tiff_header` is what `open_slide` (tifffile reader) and `io.add_image` read from a TIFF before any pixel:
the largest series (the slide; thumbnails, labels and macro images are smaller), its levels, the µm per pixel by the
one rule of :func:`histospace._image._mpp._tiff_mpp`, and a check that the file is whole. A file cut short (an
interrupted copy or download) keeps its header, so tifffile opens it, and the tiles beyond its end read as empty or
fail deep inside a later computation; :func:`check_tiff_complete` compares the chain of IFDs, and the extent of every
level's pixel data and of the tag values of its IFD, with the file size and raises naming the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histospace._image._mpp import _tiff_mpp, _valid_mpp

__all__ = ["TiffHeader", "TruncatedTiffError", "check_tiff_complete", "read_tiff_header"]

#: errors that tifffile and struct raise on a damaged header (a bad IFD offset gives no series: an IndexError later)
_HEADER_ERRORS = (ValueError, OSError, KeyError, IndexError, EOFError, struct.error)
_TIFF_VENDORS = ("svs", "ndpi", "scn", "bif", "philips", "qpi", "ventana")
#: pages of a level checked one by one; beyond this many, the first and the last (files are written in order)
_MAX_PAGES_CHECKED = 64


class TruncatedTiffError(ValueError):
    """A TIFF file whose pixel data or metadata run past its end (a `ValueError`)."""


def damaged_tiff(path, detail: str) -> ValueError:
    """The error for a TIFF file that cannot be parsed, naming it and the fix."""
    return ValueError(
        f"Could not read the TIFF file {str(path)!r}: it is damaged or not a TIFF ({detail}). Check that the file is "
        "complete (compare its size with the original) and copy or download it again, or convert it to a pyramidal "
        "OME-TIFF."
    )


@dataclass
class TiffHeader:
    """What the readers need from a TIFF before reading pixels."""

    #: index of the main (largest) series
    series: int
    #: tifffile axes of the series (e.g. `'YXS'`)
    axes: str
    #: per level: shape, dtype, tifffile axes, whether the pixels are stored contiguously (memory-mappable)
    levels: list[tuple[tuple[int, ...], np.dtype, str, bool]]
    #: µm per level-0 pixel `(x, y)`, or `None`
    mpp: tuple[float, float] | None
    #: `'ome'`, a vendor flag of tifffile (`'svs'`, `'ndpi'`, ...) or `None` (generic TIFF)
    vendor: str | None


def read_tiff_header(path) -> TiffHeader:
    """Open `path` with tifffile, pick its main series, read the µm per pixel and check that the file is complete.

    Raises
    ------
    ValueError
        The file cannot be parsed (damaged header, no image), or it is truncated (see :func:`check_tiff_complete`);
        the message names the file.
    """
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series or not len(tf.pages):
                _check_first_ifd(tf, path)
                raise damaged_tiff(path, "no image found in its IFDs")
            sizes = [int(np.prod([n for a, n in zip(s.axes, s.shape, strict=True) if a in "YX"])) for s in tf.series]
            si = int(np.argmax(sizes))
            series = tf.series[si]
            levels = [
                (tuple(int(n) for n in lv.shape), np.dtype(lv.dtype), str(lv.axes), lv.dataoffset is not None)
                for lv in series.levels
            ]
            check_tiff_complete(tf, series, path)
            mpp = _valid_mpp(_tiff_mpp(tf, series, si))
            vendor = next((v for v in _TIFF_VENDORS if getattr(tf, f"is_{v}", False)), None)
            vendor = vendor or ("ome" if tf.is_ome else None)
            axes = str(series.axes)
    except _HEADER_ERRORS as e:
        if str(path) in str(e):
            raise
        raise damaged_tiff(path, f"{type(e).__name__}: {e}") from e
    return TiffHeader(series=si, axes=axes, levels=levels, mpp=mpp, vendor=vendor)


def _check_first_ifd(tf, path) -> None:
    """Raise :class:`TruncatedTiffError` when the header points to a first IFD beyond the end of the file."""
    tiff = tf.tiff
    fh = tf.filehandle
    fh.seek(8 if tiff.is_bigtiff else 4)
    raw = fh.read(tiff.offsetsize)
    size = int(fh.size)
    first = int(struct.unpack(tiff.offsetformat, raw)[0]) if len(raw) == tiff.offsetsize else size
    if first >= size:
        msg = (
            f"The TIFF file {str(path)!r} is truncated: its header points to the first IFD (the image directory) at "
            f"byte {first}, the file has {size} bytes. The file was cut short, e.g. by an interrupted copy or "
            "download; copy or download it again."
        )
        raise TruncatedTiffError(msg)


def _ifd_end(tf, offset: int) -> int:
    """End (exclusive byte offset) of the IFD at `offset` and of the tag values stored outside it."""
    tiff = tf.tiff
    fh = tf.filehandle
    fh.seek(offset)
    (n,) = struct.unpack(tiff.tagnoformat, fh.read(tiff.tagnosize))
    raw = fh.read(n * tiff.tagsize)
    end = offset + tiff.tagnosize + n * tiff.tagsize + tiff.offsetsize
    if len(raw) < n * tiff.tagsize:
        return end  # the IFD itself runs past the end of the file
    from tifffile import TIFF

    for i in range(n):
        _, dtype, count, value = struct.unpack(tiff.tagheaderformat, raw[i * tiff.tagsize : (i + 1) * tiff.tagsize])
        fmt = TIFF.DATA_FORMATS.get(dtype)
        if fmt is None:  # an unknown data type: its size is unknown
            continue
        nbytes = count * struct.calcsize("<" + fmt)
        if nbytes > tiff.tagoffsetthreshold:
            (at,) = struct.unpack(tiff.offsetformat, value[: tiff.offsetsize])
            end = max(end, at + nbytes)
    return end


def _next_ifd(tf, offset: int) -> int:
    """The next-IFD pointer stored at the end of the IFD at `offset` (0 for the last IFD)."""
    tiff = tf.tiff
    fh = tf.filehandle
    fh.seek(offset)
    (n,) = struct.unpack(tiff.tagnoformat, fh.read(tiff.tagnosize))
    fh.seek(offset + tiff.tagnosize + n * tiff.tagsize)
    raw = fh.read(tiff.offsetsize)
    if len(raw) < tiff.offsetsize:
        return int(fh.size) + 1  # the pointer itself is cut off
    return int(struct.unpack(tiff.offsetformat, raw)[0])


def check_tiff_complete(tf, series, path) -> None:
    """Raise :class:`TruncatedTiffError` naming `path` when the file ends before its data do.

    The chain of IFDs must not point past the end of the file (a file cut after the main image loses its reduced
    levels, or its label and macro images, without tifffile saying more than a log line). Then every level's pages
    of `series` are checked: their tiles' or strips' `offset + bytecount`, and the tag values their IFD points to
    (such as the OME-XML description that holds `PhysicalSizeX`); for levels of more than 64 pages, the first and the
    last page.
    """
    size = int(tf.filehandle.size)
    last = tf.pages[-1] if len(tf.pages) else None
    if last is not None and not tf.tiff.is_ndpi and getattr(last, "offset", None) is not None:
        nxt = _next_ifd(tf, int(last.offset))
        if nxt >= size:
            msg = (
                f"The TIFF file {str(path)!r} is truncated: its last readable IFD (page {len(tf.pages) - 1}) points to "
                f"the next one at byte {nxt}, the file has {size} bytes, so pages (pyramid levels, label or macro "
                "images) are missing. The file was cut short, e.g. by an interrupted copy or download; copy or "
                "download it again."
            )
            raise TruncatedTiffError(msg)
    for li, level in enumerate(series.levels):
        pages = [p for p in level.pages if p is not None]
        if len(pages) > _MAX_PAGES_CHECKED:
            pages = [pages[0], pages[-1]]
        n_tiles = n_beyond = 0
        data_end = tag_end = 0
        for page in pages:
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            ends = offsets + counts
            beyond = (ends > size) & (counts > 0)
            n_tiles += ends.size
            n_beyond += int(beyond.sum())
            data_end = max(data_end, int(ends.max(initial=0)))
            if not tf.tiff.is_ndpi and getattr(page, "offset", None) is not None:
                tag_end = max(tag_end, _ifd_end(tf, int(page.offset)))
        if n_beyond:
            msg = (
                f"The TIFF file {str(path)!r} is truncated: {n_beyond} of the {n_tiles} tiles/strips of level {li} "
                f"lie beyond its end (they need {data_end} bytes, the file has {size}). The file was cut short, e.g. "
                "by an interrupted copy or download; copy or download it again."
            )
            raise TruncatedTiffError(msg)
        if tag_end > size:
            msg = (
                f"The TIFF file {str(path)!r} is truncated: the metadata of level {li} (its IFD's tag values, such as "
                f"the OME-XML or the resolution) end at byte {tag_end}, the file has {size} bytes. The file was cut "
                "short, e.g. by an interrupted copy or download; copy or download it again."
            )
            raise TruncatedTiffError(msg)
