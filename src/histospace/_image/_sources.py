"""Image access for H&E patches: lazy sources (arrays, JPEG/PNG, TIFF memmap/zarr, squidpy ImageContainer).

Every source is read as an RGB `uint8` image:

- greyscale (`H x W` or one channel) is repeated to three channels; grey + alpha keeps the grey channel;
- RGBA drops the alpha channel;
- 16-bit and other integer images (`uint16`, `int16`, `int32`, `uint32`) are scaled by `255 / 65535` (the full 16-bit
  range, the same for every patch, so patches stay comparable), then rounded and clipped to `[0, 255]`;
- float images whose maximum (estimated on a regular subsample of at most ~4 M pixels) is `<= 1` are taken as
  `[0, 1]` and multiplied by 255, other float images are taken as `[0, 255]`; NaN becomes white (255);
- boolean images become 0 / 255.

Regions that run over the image border are padded with white (255), the colour of an empty glass slide. A patch wider
than the whole image is refused by its caller (`pp.image_features`, as `pp.tile_image` refuses a tile larger than the
image): it would be mostly padding, its size is then almost surely in the wrong units, and a huge one cannot be held.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PAD_VALUE = 255
PADDING = "constant white (255)"
_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".btf", ".qptiff"}


def _is_image_container(obj) -> bool:
    """Tell a squidpy `ImageContainer` without importing squidpy."""
    return type(obj).__name__ == "ImageContainer" and type(obj).__module__.startswith("squidpy")


class ImageSource:
    """A lazily read image with `(H, W)` size, read region by region as RGB `uint8`.

    Parameters
    ----------
    arr
        Anything sliceable with numpy indices: `numpy.ndarray` (also `numpy.memmap`), zarr or dask array.
    axes
        One character per axis of `arr`: `Y`, `X`, `S`/`C` (channels); any other axis is read at index `0`.
    kind
        Where the image comes from (for `uns` records): `'img'`, `'fullres'`, `'hires'`, `'lowres'`.
    scale
        Factor from full-resolution coordinates (`obsm['spatial']`) to pixels of this image.
    name
        Description used in messages (a path or `adata.uns[...]` slot).
    path
        File the image was read from, if any.
    offset
        Full-resolution `(x, y)` of this image's pixel-grid origin (a cropped squidpy `ImageContainer` starts there).
    mpp
        µm per pixel of this image, when known.

    Notes
    -----
    Full-resolution coordinates map to pixels of this image as `(xy - offset) * scale` (:meth:`to_pixels`); a
    pyramid level sets `scale_xy`, its per-axis scale, when the level's two axes were not reduced by exactly the
    same factor.
    """

    def __init__(
        self,
        arr,
        axes: str,
        *,
        kind: str = "img",
        scale: float = 1.0,
        name: str = "image",
        path=None,
        offset: Sequence[float] = (0.0, 0.0),
        mpp: float | None = None,
    ):
        axes = axes.upper()
        if len(axes) != len(arr.shape):
            msg = f"{name}: axes {axes!r} do not match the image shape {tuple(arr.shape)}."
            raise ValueError(msg)
        if "Y" not in axes or "X" not in axes:
            msg = f"{name}: image axes {axes!r} have no Y and X axis."
            raise ValueError(msg)
        self.arr = arr
        self.axes = axes
        self.kind = kind
        self.scale = float(scale)
        self.name = name
        self.path = path
        self.height = int(arr.shape[axes.index("Y")])
        self.width = int(arr.shape[axes.index("X")])
        ch = [i for i, a in enumerate(axes) if a in "SC"]
        if len(ch) > 1:
            # e.g. OME 'CYXS': keep the samples axis, first plane of the others
            ch = [axes.index("S")] if "S" in axes else ch[:1]
        self._ch_axis = ch[0] if ch else None
        self.n_channels = int(arr.shape[self._ch_axis]) if ch else 1
        if self.n_channels > 4:
            msg = (
                f"{name}: image has {self.n_channels} channels; expected greyscale, RGB or RGBA "
                "(H x W, H x W x 3 or H x W x 4)."
            )
            raise ValueError(msg)
        self.dtype = np.dtype(arr.dtype)
        if not (
            np.issubdtype(self.dtype, np.integer)
            or np.issubdtype(self.dtype, np.floating)
            or np.issubdtype(self.dtype, np.bool_)
        ):
            msg = f"{name}: image dtype {self.dtype} is not supported; expected uint8, uint16 or float."
            raise TypeError(msg)
        self._float_max = None
        offset = np.asarray(offset, dtype=np.float64)
        if offset.shape != (2,) or not np.isfinite(offset).all():
            msg = f"{name}: `offset` must be a finite full-resolution (x, y) pair, got {offset.tolist()!r}."
            raise ValueError(msg)
        self.offset = offset
        self.scale_xy: tuple[float, float] | None = None
        self.mpp = None if mpp is None else float(mpp)

    @property
    def shape(self) -> tuple[int, int]:
        """`(height, width)` in pixels of this image."""
        return self.height, self.width

    def _scale_xy(self) -> np.ndarray:
        return np.asarray(self.scale_xy if self.scale_xy is not None else (self.scale, self.scale), dtype=np.float64)

    def to_pixels(self, xy) -> np.ndarray:
        """Map full-resolution `(x, y)` coordinates (`obsm['spatial']`, shape `(..., 2)`) to pixels of this image.

        Returns `(xy - offset) * scale` as float64, with the same shape as `xy`.
        """
        return (np.asarray(xy, dtype=np.float64) - self.offset) * self._scale_xy()

    def from_pixels(self, pixels) -> np.ndarray:
        """Map `(x, y)` pixels of this image back to full-resolution coordinates (inverse of :meth:`to_pixels`)."""
        return np.asarray(pixels, dtype=np.float64) / self._scale_xy() + self.offset

    def _index(self, y0: int, y1: int, x0: int, x1: int) -> tuple:
        idx = []
        for i, a in enumerate(self.axes):
            if a == "Y":
                idx.append(slice(y0, y1))
            elif a == "X":
                idx.append(slice(x0, x1))
            elif i == self._ch_axis:
                idx.append(slice(None))
            else:
                idx.append(0)
        return tuple(idx)

    def _raw(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read a region in the native dtype as `(h, w, C)`."""
        out = np.asarray(self.arr[self._index(y0, y1, x0, x1)])
        kept = [a for i, a in enumerate(self.axes) if a in "YX" or i == self._ch_axis]
        order = [kept.index("Y"), kept.index("X")]
        if self._ch_axis is not None:
            order.append(kept.index(self.axes[self._ch_axis]))
        out = np.transpose(out, order)
        if out.ndim == 2:
            out = out[:, :, None]
        return out

    def float_max(self) -> float:
        """Maximum of a float image, estimated on a regular subsample (cached)."""
        if self._float_max is None:
            step = max(1, int(math.sqrt(self.height * self.width / 4e6)))
            sub = self._raw(0, self.height, 0, self.width) if step == 1 else None
            if sub is None:
                idx = list(self._index(0, self.height, 0, self.width))
                idx[self.axes.index("Y")] = slice(0, self.height, step)
                idx[self.axes.index("X")] = slice(0, self.width, step)
                sub = np.asarray(self.arr[tuple(idx)])
            with np.errstate(invalid="ignore"):
                m = np.nanmax(sub) if sub.size else 1.0
            self._float_max = float(m) if np.isfinite(m) else 1.0
        return self._float_max

    def to_uint8(self, x: np.ndarray) -> np.ndarray:
        """Convert a `(h, w, C)` region in the native dtype to RGB `uint8` `(h, w, 3)`."""
        c = x.shape[2]
        if c == 4:
            x = x[:, :, :3]
        elif c == 2:
            x = x[:, :, :1]
        dt = x.dtype
        if dt == np.uint8:
            pass
        elif np.issubdtype(dt, np.bool_):
            x = x.astype(np.uint8) * 255
        elif np.issubdtype(dt, np.integer):
            x = np.clip(np.rint(x.astype(np.float32) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        else:
            factor = 255.0 if self.float_max() <= 1.0 else 1.0
            x = np.nan_to_num(x.astype(np.float32) * factor, nan=255.0, posinf=255.0, neginf=0.0)
            x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        if x.shape[2] == 1:
            x = np.repeat(x, 3, axis=2)
        return x

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read `[y0, y1) x [x0, x1)` as RGB `uint8` `(y1 - y0, x1 - x0, 3)`, padded white outside the image."""
        out = np.full((y1 - y0, x1 - x0, 3), PAD_VALUE, dtype=np.uint8)
        cy0, cy1 = max(y0, 0), min(y1, self.height)
        cx0, cx1 = max(x0, 0), min(x1, self.width)
        if cy1 > cy0 and cx1 > cx0:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self.to_uint8(self._raw(cy0, cy1, cx0, cx1))
        return out

    def load(self) -> ImageSource:
        """Return a source that reads from memory (decodes file-backed images once); memmap/zarr stay lazy."""
        return self

    def downsample(self, factor: int, *, rows_per_chunk: int = 4096) -> np.ndarray:
        """Block-mean downsample by an integer `factor` to RGB `uint8`, reading row strips (bounded memory).

        The output has shape `(ceil(H / factor), ceil(W / factor), 3)`; partial blocks at the border are averaged
        over the pixels they hold.
        """
        factor = max(1, int(factor))
        h_out, w_out = -(-self.height // factor), -(-self.width // factor)
        out = np.empty((h_out, w_out, 3), dtype=np.uint8)
        strip = max(factor, (rows_per_chunk // factor) * factor)
        for y0 in range(0, self.height, strip):
            y1 = min(y0 + strip, self.height)
            block = self.to_uint8(self._raw(y0, y1, 0, self.width)).astype(np.float32)
            out[y0 // factor : -(-y1 // factor)] = _block_mean(block, factor)
        return out


def _block_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over `k x k` blocks of an `(h, w, 3)` float array; partial border blocks use the pixels they hold."""
    if k == 1:
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    h, w = x.shape[:2]
    hp, wp = -(-h // k) * k, -(-w // k) * k
    s = np.zeros((hp, wp, 3), dtype=np.float32)
    s[:h, :w] = x
    cnt = np.zeros((hp, wp), dtype=np.float32)
    cnt[:h, :w] = 1
    s = s.reshape(hp // k, k, wp // k, k, 3).sum(axis=(1, 3))
    cnt = cnt.reshape(hp // k, k, wp // k, k).sum(axis=(1, 3))
    return np.clip(np.rint(s / cnt[:, :, None]), 0, 255).astype(np.uint8)


class _PILFileSource(ImageSource):
    """A JPEG/PNG file: the header gives the size; the pixels are decoded once, on `load()`."""

    def __init__(self, path: Path, *, kind: str, scale: float):
        from PIL import Image

        self.path = path
        with _no_pil_bomb_check(), Image.open(path) as im:
            w, h = im.size
            mode = im.mode
            self._format = im.format
        self._mode = mode
        n_ch = {"L": 1, "LA": 2, "RGBA": 4, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1, "1": 1}.get(mode, 3)
        dtype = {"I": np.int32, "F": np.float32}.get(mode, np.uint16 if mode.startswith("I;16") else np.uint8)
        shape = (h, w, n_ch)
        super().__init__(
            np.broadcast_to(np.zeros((), dtype=dtype), shape), "YXS", kind=kind, scale=scale, name=str(path)
        )
        self.path = path

    def load(self) -> ImageSource:
        """Decode the file once: JPEG with libjpeg-turbo through torchvision (fast, no extra copy), else PIL."""
        arr, axes = None, "YXS"
        if self._format == "JPEG" and self._mode in ("RGB", "L"):
            try:
                from torchvision.io import decode_jpeg, read_file

                arr, axes = decode_jpeg(read_file(str(self.path))).numpy(), "SYX"
            except (RuntimeError, OSError, ImportError):
                arr = None
        if arr is None:
            arr = _decode_pil(self.path)
        out = ImageSource(
            arr,
            axes,
            kind=self.kind,
            scale=self.scale,
            name=self.name,
            path=self.path,
            offset=self.offset,
            mpp=self.mpp,
        )
        out.scale_xy = self.scale_xy
        return out

    def downsample(self, factor: int, **kwargs) -> np.ndarray:
        """Downsample by `factor` without keeping the full image: JPEG DCT scaling (`draft`), then a box filter."""
        from PIL import Image

        factor = max(1, int(factor))
        h_out, w_out = -(-self.height // factor), -(-self.width // factor)
        if self._mode not in ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr", "1"):  # 16-bit / float: exact path
            return self.load().downsample(factor, **kwargs)
        with _no_pil_bomb_check(), Image.open(self.path) as im:
            if im.format == "JPEG" and factor > 1:
                im.draft("RGB", (w_out, h_out))  # decodes at 1/2, 1/4 or 1/8 scale, at least (w_out, h_out)
            rgb = ImageSource(_pil_to_array(im), "YXS", name=self.name)
            im2 = Image.fromarray(rgb.read(0, rgb.height, 0, rgb.width))
        if im2.size != (w_out, h_out):
            im2 = im2.resize((w_out, h_out), Image.BOX)
        return np.asarray(im2, dtype=np.uint8).copy()


class _no_pil_bomb_check:
    """Let PIL open large whole-slide JPEGs (her2st: ~92 Mpx) without the decompression-bomb guard."""

    def __enter__(self):
        from PIL import Image

        self._old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc):
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = self._old


def _pil_to_array(im) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "RGBA", "L", "LA", "F", "I") or mode.startswith("I;16"):
        if mode.startswith("I;16"):
            arr = np.asarray(im).astype(np.uint16, copy=False)
        else:
            arr = np.asarray(im)
    elif mode == "1":
        arr = np.asarray(im.convert("L"))
    else:  # P, CMYK, YCbCr, ...
        arr = np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _decode_pil(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with _no_pil_bomb_check():
            with Image.open(path) as im:
                im.load()
                return _pil_to_array(im)
    except OSError as e:
        msg = f"Could not decode the image file {str(path)!r}: {e}. Check the file or pass `img=` with an array."
        raise ValueError(msg) from e


def _tiff_axes(axes: str, shape: Sequence[int]) -> str:
    """Map tifffile axes to ours (Y, X, S = samples/channels; other axes read at index 0)."""
    out = []
    for a, n in zip(axes, shape, strict=True):
        if a in "YX":
            out.append(a)
        elif a in "SC" and n <= 4:
            out.append(a)
        else:
            out.append("Q")
    return "".join(out)


def read_order(src: ImageSource, starts: np.ndarray) -> np.ndarray | None:
    """An order of windows that reads a chunked image chunk by chunk; `None` when any order reads as fast.

    `starts` are the windows' top-left corners (pixels of `src`, `(B, 2)` as x, y); only dask-backed levels are
    chunked in this sense (a read decodes whole chunks). Windows are grouped by the chunk of their top-left corner,
    the chunks row by row, so that a chunk and its right and lower neighbours (which the windows overlap) stay in the
    reader's cache of chunks while they are needed.
    """
    from histospace._image._levels import DaskLevel

    if not isinstance(src.arr, DaskLevel):
        return None
    chunks = src.arr.arr.chunks
    ch = max(1, max(chunks[src.axes.index("Y")]))
    cw = max(1, max(chunks[src.axes.index("X")]))
    x, y = np.floor(starts[:, 0]), np.floor(starts[:, 1])
    return np.lexsort((x, y, np.floor_divide(x, cw), np.floor_divide(y, ch)))


def crop_patches(
    src: ImageSource, centres: np.ndarray, size: float, out_size: int, *, exact: bool | None = None
) -> np.ndarray:
    """Crop square patches around `centres` (pixels of `src`, `(B, 2)` as x, y) for resizing to `out_size`.

    Returns an RGB `uint8` array `(B, s, s, 3)`. With integer crops (the default when `size >= out_size`) the window of
    `s = round(size)` pixels starts at `round(c - s / 2)`, so a 224-px patch around `x` spans `[x - 112, x + 112)`.
    When the patch is smaller than `out_size` (upsampling, e.g. from a low-resolution image) `exact=True` crops
    `ceil(size) + 3` pixels around the centre so that :func:`resize_patches` can sample the exact sub-pixel box.
    """
    if exact is None:
        exact = size < out_size
    b = centres.shape[0]
    if exact:
        s = int(math.ceil(size)) + 3
        start = np.floor(centres - size / 2.0).astype(np.int64) - 1
    else:
        s = max(1, int(round(size)))
        start = np.rint(centres - s / 2.0).astype(np.int64)
    out = np.empty((b, s, s, 3), dtype=np.uint8)
    for i in range(b):
        x0, y0 = int(start[i, 0]), int(start[i, 1])
        out[i] = src.read(y0, y0 + s, x0, x0 + s)
    return out


def resize_patches(
    batch: torch.Tensor,
    out_size: int,
    *,
    centres: np.ndarray | None = None,
    size: float | None = None,
    exact: bool = False,
) -> torch.Tensor:
    """Turn an RGB `uint8` batch `(B, s, s, 3)` into float `(B, 3, out_size, out_size)` in `[0, 1]`.

    Integer crops are resized with bilinear interpolation with antialiasing (`torch.nn.functional.interpolate`).
    Exact crops (see :func:`crop_patches`) are sampled bilinearly at the sub-pixel box `centre ± size / 2`.
    The result is channels-last in memory (faster convolutions on CPU).
    """
    import torch
    import torch.nn.functional as F

    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    if exact:
        assert centres is not None and size is not None
        b, _, s, _ = x.shape
        start = np.floor(centres - size / 2.0) - 1
        # continuous pixel positions of the output pixel centres, relative to the crop origin
        t = (np.arange(out_size) + 0.5) * (size / out_size) - 0.5
        px = centres[:, 0:1] - size / 2.0 + 0.5 + t[None, :] - start[:, 0:1]
        py = centres[:, 1:2] - size / 2.0 + 0.5 + t[None, :] - start[:, 1:2]
        gx = torch.as_tensor(2.0 * px / (s - 1) - 1.0, dtype=x.dtype, device=x.device)
        gy = torch.as_tensor(2.0 * py / (s - 1) - 1.0, dtype=x.dtype, device=x.device)
        grid = torch.stack(
            [gx[:, None, :].expand(b, out_size, out_size), gy[:, :, None].expand(b, out_size, out_size)], dim=-1
        )
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    elif x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)
