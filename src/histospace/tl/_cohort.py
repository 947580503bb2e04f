"""`tl.predict_cohort`: expression predicted from H&E for a cohort of slides, one SpatialData zarr per slide.

Each slide is one task (:mod:`dask.distributed` when a client or scheduler is given, else a loop here): the worker
opens the slide file itself, tiles the tissue (:func:`histospace.pp.tile_image`), predicts with the trained
mclSTExp model (:func:`histospace.tl.mclstexp_predict`, which computes the tiles' image features with the reference's
settings) and writes `NAME.zarr.tmp`, then a done-marker in it, then renames it to `NAME.zarr`: a folder
`NAME.zarr` with its marker is a finished slide, anything else is not. A rerun skips finished slides. A worker that
dies mid-slide has its task rescheduled by dask (up to `distributed.scheduler.allowed-failures` times); a slide
that still fails is reported, and the others finish.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from histospace._utils import check_number

if TYPE_CHECKING:
    from histospace.models import MclSTExp

__all__ = ["predict_cohort"]

#: the file in a slide's output folder that says it was written whole
DONE_MARKER = "histospace_cohort.json"
#: the table and image element names in each slide's SpatialData
TILES_KEY, IMAGE_KEY = "tiles", "he"

_models: dict = {}  # a worker's models loaded from folders, by path
_models_lock = threading.Lock()


def is_done(out: Path) -> bool:
    """Whether `out` was written whole: a folder (`NAME.zarr`) with its done-marker, or a file (`NAME.h5ad`), which
    only ever appears by renaming a whole `NAME.h5ad.tmp`.
    """  # noqa: D205
    out = Path(out)
    return (out / DONE_MARKER).is_file() if out.suffix == ".zarr" else out.is_file()


def write_whole(out: str | os.PathLike, write, record: dict) -> None:
    """Write `out` through `out + '.tmp'` (`write(tmp)`), add the done-marker (`record`, to a folder) and rename it.

    Whatever fails leaves no `out` behind that :func:`is_done` would take for finished.
    """
    final, tmp = Path(out), Path(f"{out}.tmp")
    if tmp.exists():  # left by an attempt that died
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        write(tmp)
        if tmp.is_dir():
            (tmp / DONE_MARKER).write_text(json.dumps(record))
        if final.exists():  # a folder without the marker: not ours or not whole
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _model_of(model):
    """The model: itself, or loaded once per process from a saved folder."""
    if not isinstance(model, str | os.PathLike):
        return model
    from histospace.models import MclSTExp

    key = str(Path(model).resolve())
    with _models_lock:
        if key not in _models:
            _models[key] = MclSTExp.load(key)
        return _models[key]


def _as_task(task, *args) -> dict:
    """Run one input's `task(*args)` as a unit of work: its own dask arrays (an image read lazily, zarr writes) are
    computed in this thread, and nothing in it submits tasks to a cluster (not even from a worker).
    """  # noqa: D205
    import dask

    from histospace._image.features._distributed import local_only

    with dask.config.set(scheduler="synchronous"), local_only():  # the input is the task: nothing nested
        return task(*args)


def _predict_slide(image: str, out: str, model, options: dict) -> dict:
    """Task: tile, predict and write one slide as `out` (through `out + '.tmp'` and a done-marker); its record."""
    from spatialdata import SpatialData

    import histospace as hs

    t0 = time.perf_counter()
    sdata = SpatialData()
    hs.io.add_image(sdata, image, image_key=IMAGE_KEY, mpp=options["mpp"])
    hs.pp.tile_image(sdata, image_key=IMAGE_KEY, key_added=TILES_KEY, tile_size=options["tile_size"])
    n_tiles = int(sdata.tables[TILES_KEY].n_obs)
    hs.tl.mclstexp_predict(
        sdata, model=_model_of(model), table_key=TILES_KEY, n_neighbors=options["n_neighbors"], progress_bar=False
    )
    record = {"image": str(image), "n_tiles": n_tiles, "seconds": round(time.perf_counter() - t0, 3),
              "histospace": hs.__version__}  # fmt: skip
    write_whole(out, lambda tmp: sdata.write(tmp, overwrite=True), record)
    record["summary"] = f"{n_tiles} tiles"
    return record


def _check_target(client, scheduler: str | None) -> int | None:
    """Raise on `client=` with `scheduler=`, or a malformed `scheduler`; the workers of `'local:N'` (else `None`)."""
    if client is not None and scheduler is not None:
        msg = "Pass `client=` or `scheduler=`, not both."
        raise ValueError(msg)
    if scheduler is None:
        return None
    if not isinstance(scheduler, str) or not scheduler:
        msg = f"`scheduler` must be a scheduler address ('tcp://host:8786') or 'local:N', got {scheduler!r}."
        raise ValueError(msg)
    if not scheduler.startswith("local"):
        return None
    n = scheduler.partition(":")[2] or "2"
    if not n.isdigit() or int(n) < 1:
        msg = f"`scheduler={scheduler!r}`: 'local:N' needs a positive number of workers N, e.g. 'local:2'."
        raise ValueError(msg)
    return int(n)


def _client_for(client, scheduler: str | None):
    """`(client, cluster to close, client to close)` from `client=` / `scheduler=` (or the active client)."""
    from histospace._image.features._distributed import resolve_client

    n_local = _check_target(client, scheduler)
    if scheduler is None:
        return resolve_client(client), None, None
    from distributed import Client, LocalCluster

    if n_local is not None:
        cluster = LocalCluster(n_workers=n_local, threads_per_worker=1, processes=True, dashboard_address=None)
        c = Client(cluster)
        return c, cluster, c
    c = Client(scheduler)
    return c, None, c


def _names(images: Sequence) -> list[str]:
    names = []
    for image in images:
        p = Path(image)
        if not p.exists():
            msg = f"`images`: {p} does not exist; pass existing H&E image files (TIFF, SVS, JPEG, PNG)."
            raise FileNotFoundError(msg)
        name = p.name
        for suffix in (".ome.tiff", ".ome.tif", *p.suffixes[-1:]):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        names.append(name)
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        msg = f"`images`: several slides would be written as {sorted(seen)[0]}.zarr; give the files distinct names."
        raise ValueError(msg)
    return names


def predict_cohort(
    images: Sequence[str | os.PathLike],
    *,
    model: MclSTExp | str | os.PathLike,
    outdir: str | os.PathLike,
    client: Any = None,
    scheduler: str | None = None,
    tile_size: int = 224,
    mpp: float | None = None,
    n_neighbors: int = 200,
    on_error: Literal["raise", "warn"] = "raise",
    progress: bool = True,
) -> pd.DataFrame:
    """Predict expression over the tissue of many H&E slides, one slide per dask task, resumably.

    Every slide is tiled over its tissue (:func:`histospace.pp.tile_image`), its tiles' image features are computed
    with the reference's settings and their expression predicted by `model` (:func:`histospace.tl.mclstexp_predict`),
    and the result is written to `outdir/NAME.zarr` (`NAME`: the file name without its suffix) as a SpatialData:
    the image `'he'`, the tiles' squares `'tiles_squares'` and the table `'tiles'`. A slide is written to
    `NAME.zarr.tmp`, gets a done-marker (`histospace_cohort.json`: image, number of tiles, seconds) and is then
    renamed, so a `NAME.zarr` with its marker is a whole slide and nothing half-written is ever taken for one. Slides
    whose output is done are skipped (a rerun resumes an interrupted cohort). One line per slide is printed as it
    finishes.

    On a cluster each slide is a task: the workers open the slide files themselves (the paths must be readable
    there), the model goes to them as a saved folder (the one given, or a temporary one in `outdir` removed at the
    end) that each worker loads once, and a worker that dies mid-slide has its slide rescheduled by dask (up to
    `distributed.scheduler.allowed-failures` times, 3 by default). A slide that fails is reported and the others
    finish.

    Parameters
    ----------
    images
        Paths of the H&E slides (TIFF/OME-TIFF, SVS and other whole-slide files, JPEG, PNG).
    model
        A trained :class:`~histospace.models.MclSTExp` (:func:`histospace.tl.mclstexp_train`) trained on image
        features (`freeze_encoder=True`), or the folder it was saved to (:meth:`~histospace.models.MclSTExp.save`).
    outdir
        Folder of the outputs (created when missing).
    client
        A :class:`distributed.Client`. `None`: the active client when there is one, else the slides run one after
        the other in this process. `False`: in this process.
    scheduler
        Instead of `client`: a scheduler address (`'tcp://host:8786'`; the client is closed at the end) or
        `'local:N'` (a :class:`distributed.LocalCluster` of `N` worker processes of one thread each, closed at the
        end).
    tile_size
        Tile side in full-resolution pixels (:func:`histospace.pp.tile_image`).
    mpp
        µm per full-resolution pixel of every slide (`None`: read from each file; the model needs it to match the
        reference's patch size in µm).
    n_neighbors
        Reference spots averaged per tile (:func:`histospace.tl.mclstexp_predict`).
    on_error
        `'raise'`: once every other slide has finished, raise a `RuntimeError` naming the slides that failed (a
        rerun computes only those). `'warn'`: warn and return the table.
    progress
        Print one line per slide.

    Returns
    -------
    A :class:`pandas.DataFrame` indexed by slide name, in the order of `images`, with columns `image`, `output`,
    `status` (`'done'`, `'skipped'`: done before, `'failed'`), `n_tiles`, `seconds` and `error`. Writes
    `outdir/NAME.zarr` for every slide done.
    """
    tile_size = check_number(tile_size, "tile_size", integer=True, low=1)
    n_neighbors = check_number(n_neighbors, "n_neighbors", integer=True, low=1)
    mpp = check_number(mpp, "mpp", low=0, low_inclusive=False, allow_none=True)
    if on_error not in ("raise", "warn"):
        msg = f"`on_error` must be 'raise' or 'warn', got {on_error!r}."
        raise ValueError(msg)
    _check_target(client, scheduler)  # before any work (the model is saved for the workers below)
    if isinstance(images, str | os.PathLike):
        images = [images]
    images = [str(Path(p).expanduser().resolve()) for p in images]
    if not images:
        msg = "`images` is empty; pass one or more H&E slide files."
        raise ValueError(msg)
    names = _names(images)
    if isinstance(model, str | os.PathLike):
        if not Path(model).is_dir():
            msg = (
                f"`model`: {model} is not a saved model folder; pass a trained MclSTExp or the folder it was saved to."
            )
            raise FileNotFoundError(msg)
        model = str(Path(model).expanduser().resolve())
    elif not getattr(model, "is_trained", True):
        msg = "`model` is not trained; train it with `hs.tl.mclstexp_train` first."
        raise ValueError(msg)
    outdir = Path(outdir).expanduser().resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    options = {"tile_size": tile_size, "mpp": mpp, "n_neighbors": n_neighbors}
    table = pd.DataFrame(
        {"input": images, "output": [str(outdir / f"{n}.zarr") for n in names], "status": "pending",
         "n_tiles": pd.array([pd.NA] * len(names), dtype="Int64"), "seconds": float("nan"), "error": ""},
        index=pd.Index(names, name="slide"),
    )  # fmt: skip
    shared = model
    saved = None
    from histospace._image.features._distributed import resolve_client

    pending = not all(is_done(Path(out)) for out in table["output"])  # (all done: nothing to save the model for)
    if pending and not isinstance(model, str) and (scheduler is not None or resolve_client(client) is not None):
        # on a cluster the model is saved once and each worker loads it once (a scattered copy dies with its workers)
        import uuid

        saved = outdir / f".histospace-model-{uuid.uuid4().hex}"
        model.save(saved)
        shared = str(saved)
    try:
        table = run_each(table, _predict_slide, (shared, options), client=client, scheduler=scheduler,
                         progress=progress, on_error=on_error, what="slides")  # fmt: skip
        return table.rename(columns={"input": "image"})
    finally:
        if saved is not None:
            shutil.rmtree(saved, ignore_errors=True)


def run_each(
    table: pd.DataFrame,
    task,
    shared: tuple,
    *,
    client: Any = None,
    scheduler: str | None = None,
    progress: bool = True,
    on_error: Literal["raise", "warn"] = "raise",
    what: str = "inputs",
) -> pd.DataFrame:
    """Run `task(input, output, *shared)` for every row of `table` whose `output` is not done, resumably.

    `table` is indexed by name with columns `input`, `output`, `status`, `seconds`, `error` (and any column a
    task's record fills). Done outputs (:func:`is_done`) are skipped; each input is a dask task on `client` /
    `scheduler` (see :func:`predict_cohort`), else they run one after the other here. `task` writes its output with
    :func:`write_whole` and returns a record (`seconds`, `summary` for the progress line, and table columns); each
    call is one unit of work (no nested tasks, its own dask arrays computed in its thread). A
    failed input is reported once the others have finished: `RuntimeError` (`on_error='raise'`) or a warning.
    """
    names = list(table.index)
    todo = [n for n in names if not is_done(Path(table.at[n, "output"]))]
    for i, n in enumerate(n for n in names if n not in todo):
        table.at[n, "status"] = "skipped"
        _line(progress, f"[{i + 1}/{len(names)}] {n}: done before, skipped ({table.at[n, 'output']})")
    counter = [len(names) - len(todo)]

    def finish(name: str, rec: dict | None, err: BaseException | None) -> None:
        counter[0] += 1
        head = f"[{counter[0]}/{len(names)}] {name}:"
        if err is None:
            table.at[name, "status"] = "done"
            for k, v in rec.items():
                if k in table.columns and k not in ("input", "output", "status", "error"):
                    table.at[name, k] = v
            summary = f"{rec['summary']}, " if rec.get("summary") else ""
            _line(progress, f"{head} {summary}{rec['seconds']:.1f} s -> {table.at[name, 'output']}")
        else:
            text = " ".join(f"{type(err).__name__}: {err}".split())
            table.loc[name, ["status", "error"]] = ["failed", text]
            _line(progress, f"{head} FAILED ({text})")

    client, cluster, owned = _client_for(client, scheduler) if todo else (None, None, None)
    try:
        if client is None:
            for n in todo:
                try:
                    rec = _as_task(task, table.at[n, "input"], table.at[n, "output"], *shared)
                except Exception as e:  # noqa: BLE001 - reported per input; the others go on
                    finish(n, None, e)
                else:
                    finish(n, rec, None)
        else:
            _submit_all(client, table, todo, task, shared, finish)
    finally:
        if owned is not None:
            owned.close()
        if cluster is not None:
            cluster.close()
    failed = list(table.index[table["status"] == "failed"])
    if failed:
        msg = (
            f"{len(failed)} of {len(names)} {what} failed and were not written: "
            + "; ".join(f"{n} ({table.at[n, 'error']})" for n in failed)
            + ". The others are done; run again to retry only these."
        )
        if on_error == "raise":
            raise RuntimeError(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    return table


def _submit_all(client, table: pd.DataFrame, todo: list[str], task, shared: tuple, finish) -> None:
    from distributed import as_completed

    futures = {
        client.submit(_as_task, task, table.at[n, "input"], table.at[n, "output"], *shared,
                      key=f"histospace-{n}-{time.time_ns()}", pure=False): n
        for n in todo
    }  # fmt: skip
    for fut in as_completed(futures):
        name = futures[fut]
        try:
            rec = fut.result()
        except Exception as e:  # noqa: BLE001 - a failed input (also `KilledWorker`): reported, the others go on
            finish(name, None, e)
        else:
            finish(name, rec, None)
        fut.release()


def _line(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stdout, flush=True)
