"""A disk cache of image features: `pp.image_features(..., cache=True)` stores each slide's features and reuses them.

An entry holds the full-width features of one slide (before any PCA) and what `uns[key]['params']['libraries']`
records for it. Its key is a SHA-256 of everything the features depend on: the image's content (the bytes of its
file, or the pixels of an in-memory array), its scale and offset, the spot centres, the patch size, and every
feature setting (encoder, the weights file's SHA-256, mean/std, `tf_padding`, `layers`, `dihedral`, `context`,
`input_size`, method, tiles and halo, device type) plus the torch version and :data:`CACHE_FORMAT`. Any change gives
a new key, so an entry is never reused for other settings. Images that are neither a file nor an in-memory array
(a zarr or dask image without a file) and user `torch.nn.Module` encoders are not cached.

The folder is `$HISTOSPACE_CACHE/features` when `HISTOSPACE_CACHE` is set, else
`$XDG_CACHE_HOME/histospace/features` (`~/.cache/histospace/features`); :func:`feature_cache_dir` returns it and
:func:`clear_feature_cache` empties it. An unreadable or inconsistent entry is ignored, recomputed and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from scanpy import logging as logg

__all__ = ["clear_feature_cache", "feature_cache_dir"]

#: bumped when the features computed for the same settings change (invalidates every entry)
CACHE_FORMAT = 1
_SUFFIX = ".npz"
#: file digests already computed in this process: (path, size, mtime_ns) -> digest
_FILE_DIGESTS: dict[tuple, str] = {}


def feature_cache_dir() -> Path:
    """Folder of the image-feature cache of :func:`histospace.pp.image_features` (`cache=True`).

    `$HISTOSPACE_CACHE/features` when the environment variable `HISTOSPACE_CACHE` is set, else
    `$XDG_CACHE_HOME/histospace/features` (by default `~/.cache/histospace/features`). The folder may not exist yet.

    Returns
    -------
    The path of the folder.
    """
    root = os.environ.get("HISTOSPACE_CACHE")
    if root:
        return Path(root).expanduser() / "features"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "histospace" / "features"


def clear_feature_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete the cached image features of :func:`histospace.pp.image_features`.

    Parameters
    ----------
    cache_dir
        The folder given as `cache=` (`None`: :func:`feature_cache_dir`). Only cache entries (`*.npz` files in its
        two-character subfolders) are deleted, then the subfolders left empty.

    Returns
    -------
    The number of entries deleted.
    """
    root = feature_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    if not root.is_dir():
        return 0
    n = 0
    for sub in root.iterdir():
        if not (sub.is_dir() and len(sub.name) == 2):
            continue
        for f in sub.glob(f"*{_SUFFIX}"):
            f.unlink(missing_ok=True)
            n += 1
        if not any(sub.iterdir()):
            sub.rmdir()
    return n


def resolve_cache(cache) -> Path | None:
    """The folder for `cache=` (`False`/`None`: no cache, `True`: the default folder, or a path)."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return feature_cache_dir()
    if isinstance(cache, str | os.PathLike):
        return Path(cache).expanduser()
    msg = f"`cache` must be True, False or a folder path, got {type(cache).__name__}."
    raise TypeError(msg)


def file_digest(path) -> str:
    """SHA-256 of a file's bytes (memoised per path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo]


def image_digest(src) -> str | None:
    """Content digest of an `ImageSource`: its file's bytes, or its in-memory pixels; `None` when neither is cheap."""
    path = getattr(src, "path", None)
    if path is not None and Path(path).is_file():
        return "file:" + file_digest(path)
    arr = src.arr
    if isinstance(arr, np.ndarray) and not isinstance(arr, np.memmap):
        h = hashlib.sha256()
        h.update(repr((arr.shape, str(arr.dtype))).encode())
        h.update(np.ascontiguousarray(arr).data)
        return "pixels:" + h.hexdigest()
    return None


def weights_digest(weights) -> str | None:
    """What the weights are, for a key: a file's SHA-256, or the label (`'imagenet'`, `'random'`)."""
    if weights is None:
        return "random"
    if isinstance(weights, str) and weights in ("imagenet", "hub"):
        return weights
    if isinstance(weights, str | os.PathLike) and Path(weights).expanduser().is_file():
        return "file:" + file_digest(Path(weights).expanduser())
    return None


def entry_key(settings: dict, centres: np.ndarray) -> str:
    """SHA-256 of the JSON of `settings` and the bytes of the float64 `centres`."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(centres, dtype=np.float64).data)
    return h.hexdigest()


def _path(root: Path, key: str) -> Path:
    return root / key[:2] / f"{key}{_SUFFIX}"


def load(root: Path, key: str, shape: tuple[int, int]) -> tuple[np.ndarray, dict] | None:
    """`(features, record)` of an entry, or `None` when it is missing or unusable (then it is recomputed)."""
    path = _path(root, key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            feats = np.asarray(z["features"])
            record = json.loads(str(z["record"]))
            stored_key = str(z["key"])
    except Exception as e:  # noqa: BLE001 - any unreadable file is a miss: truncated, not an npz, bad JSON, ...
        logg.warning(f"ignoring the unreadable feature cache entry {path} ({type(e).__name__}); recomputing it")
        return None
    if stored_key != key or feats.shape != tuple(shape) or feats.dtype != np.float32 or not isinstance(record, dict):
        logg.warning(f"ignoring the inconsistent feature cache entry {path}; recomputing it")
        return None
    return feats, record


def save(root: Path, key: str, feats: np.ndarray, record: dict, settings: dict) -> None:
    """Write an entry atomically (a temporary file renamed into place); a failure to write only logs a warning."""
    path = _path(root, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    features=np.asarray(feats, dtype=np.float32),
                    record=np.asarray(json.dumps(record, default=_jsonable)),
                    settings=np.asarray(json.dumps(settings, sort_keys=True, default=str)),
                    key=np.asarray(key),
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        logg.warning(f"could not write the feature cache entry {path} ({e}); the features are not cached")


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
