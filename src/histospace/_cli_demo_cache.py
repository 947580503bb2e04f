"""The demo's trained-model cache: a second `histospace demo` reuses what an identical first run trained.

An entry is keyed by a SHA-256 of everything the training depends on: the bytes of the training data (counts, image
features, spatial graph, gene and spot names, slide labels, positions), the training call's options, the torch
version, the number of torch threads and the **source code of the installed histospace package** (so any change of
the code makes a new key). StereoMM entries hold what `hs.tl.stereomm` writes (`obsm['X_stereomm']` and
`uns['stereomm']`, as an `.h5ad`); mclSTExp entries are a folder written by :meth:`histospace.models.MclSTExp.save`.
They live next to the image-feature cache, in `<hs.pp.feature_cache_dir()>/../demo_models`; `histospace demo
--no-cache` neither reads nor writes them, and deleting the folder is safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np

from histospace._constants import CONNECTIVITIES_KEY, FEATURES_KEY, LIBRARY_KEY, SPATIAL_KEY, STEREOMM_KEY


def demo_cache_dir() -> Path:
    """`<hs.pp.feature_cache_dir()>/../demo_models`."""
    import histospace as hs

    return hs.pp.feature_cache_dir().parent / "demo_models"


@cache
def _source_digest() -> str:
    """SHA-256 of every `.py` file of the installed histospace package (names and bytes)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _update(h, part) -> None:
    import scipy.sparse as sp

    if sp.issparse(part):
        part = part.tocsr()
        for a in (np.asarray(part.shape), part.data, part.indices, part.indptr):
            _update(h, np.asarray(a))
    elif isinstance(part, np.ndarray):
        h.update(repr((part.shape, part.dtype.str)).encode())
        h.update(np.ascontiguousarray(part).tobytes() if part.dtype != object else repr(part.tolist()).encode())
    else:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())


def training_key(kind: str, *parts) -> str:
    """The key of a training run: `kind`, the code, torch's version and threads, and `parts` (arrays or JSON)."""
    import torch

    h = hashlib.sha256()
    for p in (kind, _source_digest(), torch.__version__, torch.get_num_threads(), *parts):
        _update(h, p)
    return h.hexdigest()[:40]


def _options(kwargs: dict) -> dict:
    """The options that decide the result (a progress bar does not)."""
    return {k: v for k, v in kwargs.items() if k != "progress_bar"}


def _anndata_parts(adata, features_key: str) -> list:
    return [
        adata.X,
        np.asarray(adata.obsm[features_key]),
        np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64),
        np.asarray(adata.obs_names, dtype=object),
        np.asarray(adata.var_names, dtype=object),
    ]


def stereomm(adata, *, use_cache: bool, **kwargs) -> bool:
    """`hs.tl.stereomm(adata, **kwargs)`, or its result from an identical earlier run; whether it was reused."""
    import anndata as ad

    import histospace as hs

    key = training_key(
        "stereomm", *_anndata_parts(adata, FEATURES_KEY), adata.obsp[CONNECTIVITIES_KEY], _options(kwargs)
    )
    path = demo_cache_dir() / f"stereomm_{key}.h5ad"
    if use_cache and path.is_file():
        try:
            saved = ad.read_h5ad(path)
            if saved.n_obs == adata.n_obs and (saved.obs_names == adata.obs_names).all():
                adata.obsm[STEREOMM_KEY] = saved.obsm[STEREOMM_KEY]
                adata.uns["stereomm"] = saved.uns["stereomm"]
                return True
        except Exception:  # noqa: BLE001 - an unreadable entry is retrained and overwritten
            pass
    hs.tl.stereomm(adata, **kwargs)
    if use_cache:
        out = ad.AnnData(obs=adata.obs[[]], obsm={STEREOMM_KEY: adata.obsm[STEREOMM_KEY]})
        out.uns["stereomm"] = adata.uns["stereomm"]
        _atomic(path, lambda tmp: out.write_h5ad(tmp))
    return False


def mclstexp_train(ref, *, use_cache: bool, **kwargs):
    """`(hs.tl.mclstexp_train(ref, **kwargs), reused)`, the model loaded from an identical earlier run if there is one."""
    import histospace as hs

    parts = [*_anndata_parts(ref, FEATURES_KEY), np.asarray(ref.obs.get(LIBRARY_KEY, []), dtype=object)]
    path = demo_cache_dir() / f"mclstexp_{training_key('mclstexp', *parts, _options(kwargs))}"
    if use_cache and path.is_dir():
        try:
            return hs.models.MclSTExp.load(path), True
        except (OSError, ValueError):
            pass
    model = hs.tl.mclstexp_train(ref, **kwargs)
    if use_cache:
        _atomic(path, lambda tmp: model.save(tmp))
    return model, False


def _atomic(path: Path, write) -> None:
    """Write an entry under a temporary name and rename it into place; a failure leaves no entry (and is ignored)."""
    tmpdir = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp"))
        write(tmpdir / path.name)
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmpdir / path.name, path)
    except OSError:
        pass
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
