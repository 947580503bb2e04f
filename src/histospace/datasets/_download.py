"""Where dataset files live (data dir, `HISTOSPACE_DATA`, cache) and how missing files are fetched."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from scanpy import logging as logg

ENV_DATA = "HISTOSPACE_DATA"
ENV_CACHE = "HISTOSPACE_CACHE"
DEFAULT_TIMEOUT = 60.0

__all__ = [
    "DatasetLocation",
    "default_cache_dir",
    "download_file",
    "ensure_files",
    "locate_dataset",
]


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the download cache: `cache_dir`, else `$HISTOSPACE_CACHE`, else `$XDG_CACHE_HOME/histospace`, else `~/.cache/histospace`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env := os.environ.get(ENV_CACHE):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "histospace"


@dataclass(frozen=True)
class DatasetLocation:
    """The folder of one dataset (e.g. `<root>/her2st`) and where it came from."""

    path: Path
    source: str  # "data_dir", "HISTOSPACE_DATA" or "cache"
    cache: Path  # the cache folder of this dataset, named in error messages

    @property
    def is_cache(self) -> bool:
        return self.source == "cache"

    def describe(self) -> str:
        if self.source == "data_dir":
            return f"`data_dir` ({self.path})"
        if self.source == ENV_DATA:
            return f"${ENV_DATA} ({self.path})"
        return f"the cache ({self.path})"

    def fix(self) -> str:
        """Text telling the user how to get the missing files."""
        return (
            f"Pass `data_dir=` (or set the environment variable {ENV_DATA}) to a folder that holds "
            f"`{self.cache.name}/` with these files, or leave both unset on a machine with internet access so the "
            f"public files are downloaded into the cache {self.cache}."
        )


def locate_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
) -> DatasetLocation:
    """Find the folder of dataset `name`.

    `data_dir` (else `$HISTOSPACE_DATA`) may point at the root holding `<name>/` or at the dataset folder itself.
    Without either, the cache folder `<cache>/<name>` is returned (it may not exist yet).
    """
    cache = default_cache_dir(cache_dir) / name
    if data_dir is not None:
        root, source = Path(data_dir).expanduser(), "data_dir"
    elif os.environ.get(ENV_DATA):
        root, source = Path(os.environ[ENV_DATA]).expanduser(), ENV_DATA
    else:
        return DatasetLocation(cache, "cache", cache)
    if not root.is_dir():
        where = "`data_dir`" if source == "data_dir" else f"${ENV_DATA}"
        msg = (
            f"{where} = {str(root)!r} is not a directory. Point it at the data root (holding `{name}/`) or at the "
            f"`{name}` folder itself, or leave `data_dir=None` with {ENV_DATA} unset to download into {cache}."
        )
        raise FileNotFoundError(msg)
    path = root / name if (root / name).is_dir() else root
    return DatasetLocation(path.resolve(), source, cache)


def download_file(url: str, dest: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download `url` to `dest` atomically (temporary file in the same folder, then rename).

    Raises
    ------
    OSError
        When the download fails; the message names the URL.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    start = logg.info(f"downloading {url}")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        os.replace(tmp, dest)
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSError; bad URLs are ValueError
        Path(tmp).unlink(missing_ok=True)
        reason = e.reason if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError) else e
        msg = (
            f"Could not download {url} to {dest}: {reason}. Check the internet connection (or `base_url=`), or "
            f"download the file by hand and pass `data_dir=` / set {ENV_DATA} to its folder."
        )
        raise OSError(msg) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logg.info(f"    saved {dest} ({dest.stat().st_size / 1e6:.1f} MB)", time=start)
    return dest


def ensure_files(root: Path, files: Mapping[str, str], *, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Path]:
    """Download every `{relative path: url}` in `files` that is not yet under `root`; return the local paths."""
    out = {}
    for rel, url in files.items():
        dest = root / rel
        if not dest.is_file():
            download_file(url, dest, timeout=timeout)
        out[rel] = dest
    return out


def join_url(base: str, rel: str) -> str:
    """Join a base URL (http(s):// or file://) and a relative path."""
    return base.rstrip("/") + "/" + rel.lstrip("/")
