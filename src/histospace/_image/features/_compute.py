"""Run the feature engines over the slides: the cache, the method of each slide, patch or dense, one PCA.

:func:`compute_features` is the work of `pp.image_features` once its inputs are checked and its encoder built: each
slide (a :class:`~histospace.pp._feature_sources._Library`) is looked up in the feature cache
(:mod:`histospace._image.features._cache`), else gets its method (`'auto'`: dense when the patches overlap enough,
:func:`~histospace._image.features._dense.choose_method`) and runs the patch engine
(:func:`~histospace._image.features._patch.patch_library`) or the dense engine
(:func:`~histospace._image.features._dense.dense_features`). With `n_components` one PCA is fitted on all slides
(dense slides on a sample) or a given one is applied. It returns the features and what each slide recorded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from histospace._image.encoders._torchvision import fuse_conv_bn
from histospace._image.features import _cache as _feature_cache
from histospace._image.features import _dense
from histospace._image.features._dense import choose_method
from histospace._image.features._patch import patch_library
from histospace._utils._preprocess import covariance_pca
from histospace._utils._progress import progress

if TYPE_CHECKING:
    from histospace.pp._feature_sources import _Library

__all__ = ["PCA_N_SPOTS", "FeatureRun", "compute_features"]


def _choose(method: str, lib: _Library, coords: np.ndarray, enc, input_size: int, context: float | None) -> str:
    """`'dense'` or `'patch'` for one slide (`method='auto'`: dense when the patches overlap enough to pay off)."""
    if method != "auto":
        return method
    _, src = lib.source_for(lib.patch_size_px, input_size)
    size = lib.patch_size_px * src.scale
    try:
        return choose_method(
            src.to_pixels(coords[lib.rows]),
            size,
            enc,
            input_size=input_size,
            context_px=None if context is None else size * context,
        )
    except (TypeError, ValueError):  # an encoder the dense engine cannot run (no map of input_size / stride cells)
        return "patch"


def _dense_library(lib: _Library, coords, enc, feats, *, input_size, context, dihedral, device, tile_size, halo,
                   progress_bar, pca=None, sample=None) -> dict | tuple:  # fmt: skip
    """Dense features of one slide into `feats[lib.rows]` (projected onto `pca` when given); returns what to record.

    With `sample`, only the full-width features of a PCA sample of at least `sample` of its spots: returns
    `(positions in lib.rows, features, record)`.
    """
    level, src = lib.source_for(lib.patch_size_px, input_size)
    src = src.load()
    size = lib.patch_size_px * src.scale
    out = _dense.dense_features(
        src,
        src.to_pixels(coords[lib.rows]),
        size,
        enc,
        input_size=input_size,
        context_px=None if context is None else size * context,
        dihedral=dihedral,
        tile_size=tile_size,
        halo=halo,
        device=device,
        batch_size=1 if device.type == "cpu" else 4,
        pca=pca,
        sample=sample,
        progress_bar=progress_bar,
    )
    if sample is None:
        feats[lib.rows] = out
    rec = {"image": src.kind, "scale": float(src.scale), "halo": int(_dense._STATS["halo"])}
    rec["n_tiles"] = int(sum(_dense._STATS["n_tiles"]))
    if lib.multiscale is not None and lib.multiscale.n_levels > 1:
        rec["level"] = int(level)
    if src.path is not None:
        rec["image_path"] = str(src.path)
    return rec if sample is None else (*out, rec)


#: spots (about) on which `n_components` fits its PCA, spread over the dense-method slides
PCA_N_SPOTS = 20_000


def _check_pca(pca: Mapping, width: int, n_components: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`(mean, components)` of a stored PCA, checked against the feature width and `n_components`."""
    try:
        mu = np.asarray(pca["mean"], dtype=np.float64)
        comp = np.asarray(pca["components"], dtype=np.float64)
    except KeyError as e:
        msg = f"`pca` has no {e.args[0]!r}: pass `adata.uns['img_features']['pca']` of an earlier call."
        raise ValueError(msg) from None
    if mu.shape != (width,) or comp.ndim != 2 or comp.shape[0] != width or not comp.shape[1]:
        msg = (
            f"`pca` was fitted on features of width {mu.shape[0] if mu.ndim == 1 else mu.shape}, these have width "
            f"{width}: compute them with the encoder options of the call that fitted it."
        )
        raise ValueError(msg)
    if n_components is not None and n_components != comp.shape[1]:
        msg = f"n_components={n_components} but `pca` has {comp.shape[1]} components; pass one of them."
        raise ValueError(msg)
    if not (np.isfinite(mu).all() and np.isfinite(comp).all()):
        msg = "`pca` holds NaN or infinite values."
        raise ValueError(msg)
    return mu, comp


def _cache_settings(lib: _Library, info: dict, weights, **options) -> dict | None:
    """What a slide's features depend on besides its centres (the key of :mod:`._cache`); `None`: uncacheable."""
    if info["weights"] == "module":  # a user module: its weights cannot be identified
        return None
    image = _feature_cache.image_digest(lib.source)
    w = _feature_cache.weights_digest(weights)
    if image is None or w is None:
        return None
    src = lib.source
    return {
        "format": _feature_cache.CACHE_FORMAT,
        "torch": torch.__version__,
        "image": image,
        "image_kind": src.kind,
        "image_shape": [int(src.height), int(src.width)],
        "scale": [float(v) for v in src._scale_xy()],
        "offset": [float(v) for v in src.offset],
        "levels": 1 if lib.multiscale is None else int(lib.multiscale.n_levels),
        "patch_size_px": float(lib.patch_size_px),
        "info": {k: v for k, v in info.items() if k != "weights"},
        "weights": w,
        **options,
    }


def _cached(root, settings, lib: _Library, coords, width: int):
    """`(key, (features, record) or None)` of a slide in the cache at `root` (`(None, None)` without a cache)."""
    if root is None or settings is None:
        return None, None
    key = _feature_cache.entry_key(settings, coords[lib.rows])
    return key, _feature_cache.load(root, key, (len(lib.rows), width))


@dataclass
class FeatureRun:
    """What :func:`compute_features` gives: features `(n_obs, width)` float32, per-slide records, the PCA."""

    features: np.ndarray
    records: dict
    reduced: bool
    pca: tuple[np.ndarray, np.ndarray] | None
    n_fit: int
    distributed: dict | None = None


def compute_features(libs, coords: np.ndarray, enc, d: int, info: dict, *, n_obs: int, encoder, weights,
                     factors: tuple[float, ...], input_size: int, batch_size: int, num_workers: int, dihedral: bool,
                     layers: str, tf_padding: bool, context: float | None, method: str, tile_size: int | None,
                     halo: int | None, n_components: int | None, pca: Mapping | None, random_state: int | None,
                     dev: torch.device, cache_root, progress_bar: bool, cluster=None) -> FeatureRun:  # fmt: skip
    """Features of every slide of `libs` (spots `coords`, full resolution) with the built encoder `enc` of width `d`.

    The options are those of :func:`histospace.pp.image_features` (checked there); `info` is the encoder's record
    (:func:`~histospace._image.encoders._build.build_encoder`), `cache_root` the cache folder or `None`. With a
    `cluster` (:class:`~histospace._image.features._distributed.FeatureCluster`) the slides not in the cache run as
    tasks on its workers' CPUs (blocks of spots, a dense slide per task), gathered back in spot order; the run's
    scheduler, workers and task size are in `FeatureRun.distributed`.
    """
    d_full = d * len(factors)
    if n_components is not None and pca is None and n_components > min(d_full, n_obs):
        msg = (
            f"n_components={n_components} is more than the {d_full} features or the {n_obs} spots; pass at "
            f"most {min(d_full, n_obs)}."
        )
        raise ValueError(msg)
    fitted = None if pca is None else _check_pca(pca, d_full, n_components)
    n_fit = 0
    reduce = n_components is not None or fitted is not None
    width = d_full if not reduce else (n_components if fitted is None else fitted[1].shape[1])
    feats = np.empty((n_obs, width), dtype=np.float32)
    # the cache is looked up first: a slide found there needs no method choice (which runs the trunk) nor features.
    # Keyed on `method` as passed ('auto' resolves the same way for the same spots and settings) and on whether a PCA
    # follows (dense slides are cached only without one); the entry records the method used.
    cache_kw = {"input_size": int(input_size), "context": context, "dihedral": bool(dihedral), "layers": layers,
                "tf_padding": bool(tf_padding), "device": dev.type, "method": method, "tile_size": tile_size,
                "halo": halo, "pca": bool(reduce)}  # fmt: skip
    if weights is None:
        cache_kw["random_state"] = random_state
    keys, hits, settings = {}, {}, {}
    if cache_root is not None:
        for lib in libs:
            settings[lib.library_id] = _cache_settings(lib, info, weights, **cache_kw)
            keys[lib.library_id], hit = _cached(cache_root, settings[lib.library_id], lib, coords, d_full)
            if hit is not None and hit[1].get("method") in ("patch", "dense"):
                hits[lib.library_id] = hit
    if len(hits) < len(libs):  # something to compute
        if isinstance(encoder, str):  # our own fresh copy: fold BatchNorm into the convolutions (faster, same output)
            fuse_conv_bn(enc.backbone)
        enc = enc.to(dev)
        if dev.type == "cpu":
            enc = enc.to(memory_format=torch.channels_last)
    if cluster is not None and len(hits) == len(libs):
        cluster = None  # everything from the cache: no task

    def ship(lib) -> bool:  # computed on the cluster (else here)
        return cluster is not None and cluster.can_ship(lib)

    if cluster is not None:  # the workers run on their CPUs: a CPU copy of the encoder
        cpu_enc = enc if dev.type == "cpu" else copy.deepcopy(enc).cpu().to(memory_format=torch.channels_last)
        todo = [lib for lib in libs if lib.library_id not in hits]
        cluster.start(cpu_enc, sum(len(lib.rows) for lib in todo), len(todo))
    methods = {lib.library_id: hits[lib.library_id][1]["method"] if lib.library_id in hits else
               _choose(method, lib, coords, enc, input_size, context) for lib in libs}  # fmt: skip
    dense_kw = {"input_size": input_size, "context": context, "dihedral": dihedral, "device": dev,
                "tile_size": tile_size, "halo": halo, "progress_bar": progress_bar}  # fmt: skip
    records = {lib.library_id: {"patch_size_px": float(lib.patch_size_px), "method": methods[lib.library_id],
                                **lib.extra} for lib in libs}  # fmt: skip
    for lib in libs:
        if lib.patch_size_um is not None:
            records[lib.library_id]["patch_size_um"] = float(lib.patch_size_um)
    dense_libs = [lib for lib in libs if methods[lib.library_id] == "dense"]
    patch_libs = [lib for lib in libs if methods[lib.library_id] == "patch"]
    held: dict = {}  # with a PCA: full-width features of whole slides, projected once the PCA is known
    fit_rows: list[np.ndarray] = []  # ... and the rows the PCA is fitted on
    if reduce and fitted is None:  # a sample of each dense slide (all its spots when it has few)
        for lib in dense_libs:
            target = max(1, math.ceil(PCA_N_SPOTS * len(lib.rows) / n_obs))
            pos, x, rec = (cluster.submit_dense(lib, coords, sample=target, **dense_kw).result() if ship(lib) else
                           _dense_library(lib, coords, enc, None, sample=target, **dense_kw))  # fmt: skip
            fit_rows.append(x)
            if pos.size == len(lib.rows):  # the whole slide: no second pass
                held[lib.library_id] = x
                records[lib.library_id] |= rec
    submitted: dict = {}  # with a cluster: every slide's tasks go in before any result is waited for
    if cluster is not None:
        patch_kw = {"d": d, "factors": factors, "input_size": input_size, "batch_size": batch_size,
                    "dihedral": dihedral}  # fmt: skip
        for lib in patch_libs:
            if lib.library_id not in hits and ship(lib):
                submitted[lib.library_id] = cluster.submit_patch(lib, coords, **patch_kw)
        if not (reduce and fitted is None):  # dense slides need no PCA from the patch slides first
            for lib in dense_libs:
                if lib.library_id not in held and not (lib.library_id in hits and not reduce) and ship(lib):
                    submitted[lib.library_id] = cluster.submit_dense(lib, coords, width, pca=fitted, **dense_kw)
    n_batches = len(factors) * sum(-(-len(lib.rows) // batch_size) for lib in patch_libs)
    with (
        progress(total=n_batches, desc="image features", disable=not progress_bar or not n_batches) as bar,
        torch.inference_mode(),
    ):
        for lib in patch_libs:
            rec = records[lib.library_id]
            # without a PCA straight into `feats`; with one, full width first, projected below
            target, rows = (np.empty((len(lib.rows), d_full), np.float32), np.arange(len(lib.rows))) if reduce else (
                feats, lib.rows)  # fmt: skip
            key, hit = keys.get(lib.library_id), hits.get(lib.library_id)
            if hit is not None:
                target[rows] = hit[0]
                rec |= hit[1]
                bar.update(len(factors) * -(-len(lib.rows) // batch_size))
                if reduce:
                    held[lib.library_id] = target
                    if fitted is None:
                        fit_rows.append(target)
                continue
            before = set(rec)
            if lib.library_id in submitted:
                cluster.collect_patch(submitted.pop(lib.library_id), target, rows, rec, bar=bar)
            else:
                patch_library(lib, coords, enc, target, rows, rec, d=d, factors=factors, input_size=input_size,
                              batch_size=batch_size, num_workers=num_workers, dihedral=dihedral, dev=dev, bar=bar)  # fmt: skip
            if key is not None:
                stored = {"method": "patch"} | {k: v for k, v in rec.items() if k not in before}
                _feature_cache.save(cache_root, key, target[rows], stored, settings[lib.library_id])
            if reduce:
                held[lib.library_id] = target
                if fitted is None:
                    fit_rows.append(target)
    if reduce and fitted is None:  # one PCA for all slides
        n_fit = sum(len(x) for x in fit_rows)
        fitted = covariance_pca(np.concatenate(fit_rows) if len(fit_rows) > 1 else fit_rows[0], int(n_components))
        del fit_rows
    for lib in dense_libs:  # (with a PCA: its maps projected before the window means)
        if lib.library_id in held:
            continue
        key, hit = keys.get(lib.library_id), hits.get(lib.library_id)  # (only without a PCA: full-width features)
        if hit is not None and not reduce:
            feats[lib.rows] = hit[0]
            records[lib.library_id] |= hit[1]
            continue
        if not ship(lib):
            rec = _dense_library(lib, coords, enc, feats, pca=fitted, **dense_kw)
        else:
            fut = submitted.pop(lib.library_id, None) or cluster.submit_dense(
                lib, coords, width, pca=fitted, **dense_kw
            )
            rec = cluster.collect_dense(fut, lib, feats)
        records[lib.library_id] |= rec
        if key is not None and not reduce:
            _feature_cache.save(cache_root, key, feats[lib.rows], {"method": "dense"} | rec, settings[lib.library_id])
    if reduce:
        for lib in libs:
            if lib.library_id in held:
                x = held.pop(lib.library_id)
                feats[lib.rows] = ((x.astype(np.float64) - fitted[0]) @ fitted[1]).astype(np.float32)

    record = None if cluster is None else cluster.record()  # (the caller closes the cluster)
    return FeatureRun(feats, records, reduce, fitted, n_fit, record)
