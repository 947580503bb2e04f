"""The feature engines on a dask.distributed cluster: blocks of spots and dense slides become tasks.

squidpy's idiom: `client=None` takes the active :class:`distributed.Client` when there is one (and runs locally
otherwise, or inside a task that already runs on a worker); the encoder is scattered to every worker once
(`client.scatter(..., broadcast=True)`); a slide's record (:class:`~histospace.pp._feature_sources._Library`) is
scattered once too, and holds the image's *file* (or zarr/dask graph), which each worker opens itself; only an
in-memory array travels in it (once per worker). Patch-method slides are cut into blocks of `task_size` spots, one
task each; a dense-method slide is one task (its trunk pass is a whole-tissue computation). Results are gathered
back into spot order by the caller. Nothing here imports :mod:`distributed` unless a client is in use.
"""

from __future__ import annotations

import contextvars
import dataclasses
import sys
import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from histospace.pp._feature_sources import _Library

__all__ = ["DEFAULT_TASK_SIZE", "FeatureCluster", "local_only", "resolve_client"]

#: spots per task at most when `task_size=None` (fewer when that leaves a worker idle)
DEFAULT_TASK_SIZE = 1024
#: decoded images a worker keeps (keyed by file path and level), so that the blocks of one slide decode it once
_WORKER_IMAGES = 2
_images: OrderedDict = OrderedDict()
_images_lock = threading.Lock()


_local = contextvars.ContextVar("histospace_local_only", default=False)


@contextmanager
def local_only():
    """Within this block :func:`resolve_client` answers `None`: the work is one task (a cohort's slide) already."""
    token = _local.set(True)
    try:
        yield
    finally:
        _local.reset(token)


def _on_worker() -> bool:
    """Whether this code runs inside a task on a dask worker (then it computes locally: the task is the unit)."""
    if "distributed" not in sys.modules:
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def resolve_client(client: Any) -> Any:
    """The client to use: `client` itself, else the active one (`distributed.get_client()`), else `None` (local).

    `False` forces the local path. Inside a task on a worker, or in a :func:`local_only` block, the answer is `None`:
    the task computes locally.
    """
    if client is False or _local.get():
        return None
    if client is not None:
        from distributed import Client

        if not isinstance(client, Client):
            msg = f"`client` must be a `distributed.Client`, `None` or `False`, got {type(client).__name__}."
            raise TypeError(msg)
        return None if _on_worker() else client
    if "distributed" not in sys.modules or _on_worker():  # no client can be active without the package loaded
        return None
    from distributed import get_client

    try:
        return get_client()
    except ValueError:  # no client active
        return None


def _loaded(src):
    """`src.load()`, kept per worker process for the next blocks of the same file (JPEG/PNG decode once)."""
    if src.path is None:
        return src.load()
    key = (str(src.path), src.kind, float(src.scale), int(src.height), int(src.width))
    with _images_lock:
        if key in _images:
            _images.move_to_end(key)
            return _images[key]
    out = src.load()
    with _images_lock:
        _images[key] = out
        while len(_images) > _WORKER_IMAGES:
            _images.popitem(last=False)
    return out


class _BlockLibrary:
    """A slide restricted to a block of its spots (rows `0..n-1` of the block's centres), images read once per
    worker through :func:`_loaded`.
    """  # noqa: D205

    def __init__(self, lib: _Library, n: int):
        self._lib = lib
        self.library_id, self.patch_size_px, self.multiscale = lib.library_id, lib.patch_size_px, lib.multiscale
        self.rows = np.arange(n)

    def source_for(self, size_px: float, input_size: int):
        level, src = self._lib.source_for(size_px, input_size)
        return level, _loaded(src)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _patch_task(lib, centres: np.ndarray, enc, kw: dict) -> tuple[np.ndarray, dict]:
    """Task: patch features `(n, width)` of the block of spots at full-resolution `centres` of slide `lib`."""
    import torch

    from histospace._image.features._patch import patch_library

    width = kw["d"] * len(kw["factors"])
    out = np.empty((len(centres), width), dtype=np.float32)
    rec: dict = {}
    with torch.inference_mode():
        patch_library(_BlockLibrary(lib, len(centres)), centres, enc, out, np.arange(len(centres)), rec,
                      num_workers=0, dev=torch.device("cpu"), bar=_NoBar(), **kw)  # fmt: skip
    return out, rec


def _dense_task(lib, centres: np.ndarray, enc, kw: dict):
    """Task: the dense engine over one slide (spots at full-resolution `centres`); what `_dense_library` returns,
    with the features themselves.
    """  # noqa: D205
    import torch

    from histospace._image.features._compute import _dense_library

    one = dataclasses.replace(lib, rows=np.arange(len(centres)))
    if kw.get("sample") is not None:
        return _dense_library(one, centres, enc, None, device=torch.device("cpu"), progress_bar=False, **kw)
    rest = {k: v for k, v in kw.items() if k != "width"}  # (kw may be the caller's own dict on an in-process worker)
    out = np.empty((len(centres), kw["width"]), dtype=np.float32)
    rec = _dense_library(one, centres, enc, out, device=torch.device("cpu"), progress_bar=False, **rest)
    return out, rec


class FeatureCluster:
    """The features of `compute_features` run as tasks on `client` (one per block of spots or dense slide).

    The encoder is scattered to every worker when the first task needs it; each slide's record once, when its first
    task is submitted. `record()` gives what `uns[key]['params']['distributed']` holds.
    """

    def __init__(self, client, *, task_size: int | None, batch_size: int):
        self.client, self.batch_size, self.n_tasks = client, int(batch_size), 0
        info = client.scheduler_info(n_workers=-1) if _takes_n_workers(client) else client.scheduler_info()
        self.n_workers = max(1, len(info.get("workers", {})))
        self._addresses, self._pin, self._next = sorted(info.get("workers", {})), False, 0
        self.task_size = None if task_size is None else int(task_size)
        self._enc, self._enc_future, self._libs, self._shippable = None, None, {}, {}

    def start(self, enc, n_spots: int, n_libs: int = 1) -> None:
        """Take the (CPU) encoder the tasks run, the number of spots and of slides to compute.

        With at least as many slides as workers, each slide's blocks prefer one worker (round robin;
        `allow_other_workers`, so dask may still move them): a JPEG/PNG slide is then decoded by one worker only.
        """
        self._enc, self._enc_future, self._libs = enc, None, {}
        self._pin, self._next = len(self._addresses) > 1 and n_libs >= len(self._addresses), 0
        if self.task_size is None:  # enough tasks to keep every worker busy, whole batches, at most DEFAULT_TASK_SIZE
            per = -(-max(n_spots, 1) // (4 * self.n_workers))
            self.task_size = min(DEFAULT_TASK_SIZE, max(self.batch_size, -(-per // self.batch_size) * self.batch_size))

    def can_ship(self, lib) -> bool:
        """Whether slide `lib` can be sent to the workers (its image reader pickles); else it is computed here, with
        a warning (e.g. a SpatialData image read from a TIFF through tifffile's zarr store, which holds a lock: write
        the SpatialData to zarr and read it back to have it computed on the cluster).
        """  # noqa: D205
        key = lib.library_id
        if key not in self._shippable:
            import cloudpickle

            try:
                cloudpickle.dumps(lib)
            except Exception as e:  # noqa: BLE001 - any pickling failure: the slide stays here
                self._shippable[key] = False
                warnings.warn(
                    f"library {key!r}: its image cannot be sent to the dask workers ({type(e).__name__}: {e}); its "
                    "features are computed in this process. Write the SpatialData to zarr and read it back "
                    "(`sdata.write(...)`, `spatialdata.read_zarr(...)`) to have the workers read it.",
                    UserWarning,
                    stacklevel=4,
                )
            else:
                self._shippable[key] = True
        return self._shippable[key]

    def _scattered(self, lib):
        if self._enc_future is None:
            self._enc_future = self.client.scatter(self._enc, broadcast=True, hash=False)
        key = lib.library_id
        if key not in self._libs:
            self._libs[key] = self.client.scatter(lib, broadcast=True, hash=False)
        return self._enc_future, self._libs[key]

    def submit_patch(self, lib, coords: np.ndarray, **kw) -> list:
        """Submit the patch features of slide `lib` (as :func:`~histospace._image.features._patch.patch_library`
        takes them) in tasks of `task_size` spots; returns the handle :meth:`collect_patch` takes.
        """  # noqa: D205
        enc, flib = self._scattered(lib)
        centres = coords[lib.rows]
        where = {}
        if self._pin:
            where = {"workers": [self._addresses[self._next % len(self._addresses)]], "allow_other_workers": True}
            self._next += 1
        futures = [
            (self.client.submit(_patch_task, flib, centres[s : s + self.task_size], enc, kw, pure=False, **where), s)
            for s in range(0, len(centres), self.task_size)
        ]
        self.n_tasks += len(futures)
        return [futures, kw]

    def collect_patch(self, handle: list, target: np.ndarray, rows: np.ndarray, rec: dict, *, bar) -> None:
        """Write the results of :meth:`submit_patch` into `target[rows]` in spot order, as they come."""
        from distributed import as_completed

        futures, kw = handle
        start = dict(futures)
        for fut, (x, r) in as_completed(start, with_results=True):
            s = start[fut]
            target[rows[s : s + len(x)]] = x  # back into spot order
            if s == 0:
                rec |= r
            bar.update(len(kw["factors"]) * -(-len(x) // kw["batch_size"]))
        handle.clear()

    def submit_dense(self, lib, coords: np.ndarray, width: int | None = None, **kw):
        """Submit the dense engine over slide `lib` as one task (the options of
        :func:`~histospace._image.features._compute._dense_library`; `width`: of the features, without `sample`).
        """  # noqa: D205
        enc, flib = self._scattered(lib)
        kw = {k: v for k, v in kw.items() if k not in ("device", "progress_bar")}
        if kw.get("sample") is None:
            kw["width"] = width
        self.n_tasks += 1
        return self.client.submit(_dense_task, flib, coords[lib.rows], enc, kw, pure=False)

    @staticmethod
    def collect_dense(future, lib, feats) -> dict:
        """Write a dense slide's features (:meth:`submit_dense`) into `feats[lib.rows]`; returns its record."""
        x, rec = future.result()
        feats[lib.rows] = x
        return rec

    def record(self) -> dict | None:
        """`{'scheduler', 'n_workers', 'task_size', 'n_tasks'}` of this run (`None` when no task ran)."""
        if self._enc is None:
            return None
        return {
            "scheduler": str(self.client.scheduler.address),
            "n_workers": int(self.n_workers),
            "task_size": int(self.task_size),
            "n_tasks": int(self.n_tasks),
            **(
                {"local_libraries": [k for k, v in self._shippable.items() if not v]}
                if not all(self._shippable.values())
                else {}
            ),
        }

    def close(self) -> None:
        """Forget the scattered encoder and slides (the workers release them)."""
        self._enc_future, self._libs = None, {}


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters
