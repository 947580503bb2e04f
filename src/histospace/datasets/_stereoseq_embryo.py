"""Stereo-seq bin20 sections of a Drosophila embryo, stage E14-16h (ST-GEARS sample data; Flysta3D annotation)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scanpy import logging as logg

from histospace._constants import COL_KEY, LIBRARY_KEY, ROW_KEY, SPATIAL_KEY, SPATIAL_UNS_KEY
from histospace.io._units import DNB_MICRONS

from ._common import log_loaded, spatial_uns
from ._download import DEFAULT_TIMEOUT, ensure_files, join_url, locate_dataset

__all__ = ["stereoseq_embryo"]

#: STOmics/ST-GEARS (pinned): `sample_data/0.h5ad`, `1.h5ad`, `2.h5ad` are sections S01, S02, S03 of E14-16h_a
STGEARS_URL = "https://raw.githubusercontent.com/STOmics/ST-GEARS/7dc75b0a9b4e92f528c87230b0caa0558c51a82e"
#: sections published in the ST-GEARS sample data (others in the same layout load from a local folder)
STGEARS_SAMPLES = ("S01", "S02", "S03")
FOLDER = "stereoseq"
FILE_PATTERN = "stgears_E14-16h_{sample}.h5ad"
LABEL_KEY = "annotation"
COUNTS_LAYER = "raw_counts"
POSITION_COLUMNS = ("raw_x", "raw_y")
DEFAULT_BIN_SIZE = 20


def stereoseq_embryo(
    sample: str | int,
    *,
    data_dir: str | os.PathLike | None = None,
    bin_size: int = DEFAULT_BIN_SIZE,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> ad.AnnData:
    """Load one Stereo-seq bin20 section of a Drosophila embryo (E14-16h) with its tissue annotation.

    Serial sections `E14-16h_a_S01`, `_S02`, ... of the Flysta3D atlas (Wang et al., Dev Cell 2022) as published with
    ST-GEARS (Xia et al., Nat Commun 2024): square bins of 20 x 20 DNB (10 µm), raw UMI counts of about 13,700 genes
    and a tissue label per bin (`obs['annotation']`: epidermis, muscle, CNS, trachea, ...; 6-9 per section). There
    is no image. Files are searched in this order:

    1. `data_dir`, else `$HISTOSPACE_DATA`: `stereoseq/stgears_E14-16h_<sample>.h5ad` (the ST-GEARS AnnData:
       counts in `layers['raw_counts']`, bin corners in DNB in `obs['raw_x']`/`obs['raw_y']`). Any section in this
       layout loads, whatever its number.
    2. Without either, a cache folder filled on first use from the ST-GEARS repository (`sample_data/0.h5ad`,
       `1.h5ad`, `2.h5ad` are S01, S02, S03).

    Parameters
    ----------
    sample
        Section: `'S01'`, `'S02'`, ... (or its number, `1`, `2`, ...).
    data_dir
        Data root holding `stereoseq/` (or the `stereoseq` folder itself). `None` uses `$HISTOSPACE_DATA`, else the
        cache.
    bin_size
        Side of the bins in DNB (20 for these files); `obs['raw_x']`/`obs['raw_y']` must be multiples of it.
    cache_dir
        Download cache; `None` uses `$HISTOSPACE_CACHE`, else `$XDG_CACHE_HOME/histospace` or `~/.cache/histospace`.
    base_url
        Root URL of a mirror holding `sample_data/<i>.h5ad`; `file://` works too. `None` uses the ST-GEARS
        repository on GitHub.
    timeout
        Seconds to wait for the download.

    Returns
    -------
    :class:`~anndata.AnnData`, bins x genes (Drosophila gene symbols), in the layout of `hs.io.read_gem` bins:

    `adata.X` : :class:`scipy.sparse.csr_matrix` (dtype `float32`)
        Raw UMI counts (`layers['raw_counts']` of the file; the file's log-normalised `X` is not kept).
    `adata.obs['annotation']` : categorical
        Tissue label of the bin (Flysta3D).
    `adata.obs['array_row']`, `adata.obs['array_col']` : `int64`
        Bin row and column indices (`raw_y // bin_size`, `raw_x // bin_size`).
    `adata.obs['library_id']` : categorical
        The section, e.g. `'S01'`.
    other `adata.obs` columns
        Those of the file: `slice_ID`, `raw_x`, `raw_y` (bin corners in DNB) and `new_x`, `new_y`, `new_z`
        (ST-GEARS' registered 3-D coordinates).
    `adata.obsm['spatial']` : :class:`numpy.ndarray` (dtype `float64`)
        Bin centres `(x, y)` in DNB: `raw_x + bin_size / 2`, `raw_y + bin_size / 2` (the frame of `hs.io.read_gem`).
    `adata.obsm['spatial_3d']` : :class:`numpy.ndarray` (dtype `float64`)
        ST-GEARS' registered 3-D coordinates (the file's `obsm['spatial']`), when the file has them.
    `adata.uns['spatial'][sample]` : :class:`dict`
        `'images'`: empty; `'scalefactors'`: `'microns_per_pixel'` (0.5 µm per DNB, the unit of `obsm['spatial']`)
        and `'spot_diameter_fullres'` (the bin side in DNB); `'metadata'`: `'technology'` (`'stereo-seq'`),
        `'microns_per_dnb'` (0.5), `'bin_size'` (DNB) and `'bin_size_um'` (10.0).

    Raises
    ------
    ValueError
        A malformed `sample`, a file that is not in the ST-GEARS layout, or coordinates off the `bin_size` grid.
    FileNotFoundError
        The section's file is missing under `data_dir` / `$HISTOSPACE_DATA`; the message names the expected file.
    OSError
        A download failed (the message names the URL).

    Examples
    --------
    >>> import histospace as hs
    >>> adata = hs.datasets.stereoseq_embryo("S01")  # doctest: +SKIP
    >>> hs.pp.spatial_graph(adata)  # 8-neighbour grid of the bins  # doctest: +SKIP
    """
    sid = _check_sample(sample)
    if isinstance(bin_size, bool) or not isinstance(bin_size, int | np.integer) or bin_size < 1:
        msg = f"`bin_size` must be a positive integer number of DNB, got {bin_size!r}."
        raise ValueError(msg)
    bin_size = int(bin_size)
    start = logg.info(f"loading Stereo-seq embryo section {sid}")
    loc = locate_dataset(FOLDER, data_dir=data_dir, cache_dir=cache_dir)
    path = loc.path / FILE_PATTERN.format(sample=sid)
    if not path.is_file() and loc.is_cache and sid in STGEARS_SAMPLES:
        remote = f"sample_data/{STGEARS_SAMPLES.index(sid)}.h5ad"
        ensure_files(
            loc.path, {path.name: join_url(STGEARS_URL if base_url is None else base_url, remote)}, timeout=timeout
        )
    if not path.is_file():
        hint = "" if loc.is_cache or sid in STGEARS_SAMPLES else f" (only {', '.join(STGEARS_SAMPLES)} are published)"
        msg = f"Stereo-seq embryo section {sid}: expected {path} in {loc.describe()}; not found{hint}. {loc.fix()}"
        raise FileNotFoundError(msg)
    adata = _read(path, sid, bin_size)
    log_loaded(adata, start)
    return adata


def _check_sample(sample) -> str:
    if isinstance(sample, bool) or not isinstance(sample, str | int | np.integer):
        msg = f"`sample` must be a section name such as 'S01', got {type(sample).__name__}."
        raise TypeError(msg)
    s = str(sample).strip()
    m = re.fullmatch(r"(?:E14-16h_a_)?[Ss]?0*(\d+)", s)
    if m is None or int(m.group(1)) < 1:
        msg = f"Unknown Stereo-seq embryo section {sample!r}; expected 'S01', 'S02', ... (or 1, 2, ...)."
        raise ValueError(msg)
    return f"S{int(m.group(1)):02d}"


def _read(path: Path, sid: str, bin_size: int) -> ad.AnnData:
    try:
        src = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as e:
        msg = f"Could not read {path}: {e}. Replace the file, or delete it (in the cache) so it is downloaded again."
        raise ValueError(msg) from e
    missing = [c for c in POSITION_COLUMNS if c not in src.obs]
    if missing:
        msg = f"{path} has no `obs` column(s) {missing}; expected the ST-GEARS layout (bin corners in DNB)."
        raise ValueError(msg)
    if COUNTS_LAYER in src.layers:
        counts, where = src.layers[COUNTS_LAYER], f"layers[{COUNTS_LAYER!r}]"
    else:
        counts, where = src.X, "X"
    counts = sp.csr_matrix(counts, dtype=np.float32)
    if counts.data.size and not (np.all(counts.data >= 0) and np.all(np.mod(counts.data, 1) == 0)):
        msg = f"{path}: `{where}` holds non-integer or negative values; expected raw UMI counts in `layers['raw_counts']`."
        raise ValueError(msg)
    corners = src.obs[list(POSITION_COLUMNS)].to_numpy(dtype=np.float64)
    if not np.isfinite(corners).all() or np.any(np.mod(corners, bin_size) != 0):
        msg = (
            f"{path}: `obs['raw_x']`/`obs['raw_y']` are not multiples of bin_size={bin_size} DNB; pass the bin size "
            "of the file as `bin_size=`."
        )
        raise ValueError(msg)
    obs = src.obs.copy()
    if LABEL_KEY in obs and not isinstance(obs[LABEL_KEY].dtype, pd.CategoricalDtype):
        obs[LABEL_KEY] = pd.Categorical(obs[LABEL_KEY])
    obs[ROW_KEY] = (corners[:, 1] // bin_size).astype(np.int64)
    obs[COL_KEY] = (corners[:, 0] // bin_size).astype(np.int64)
    obs[LIBRARY_KEY] = pd.Categorical([sid] * src.n_obs)
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=src.var_names.astype(str)))
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    adata.obsm[SPATIAL_KEY] = corners + bin_size / 2
    if SPATIAL_KEY in src.obsm and np.asarray(src.obsm[SPATIAL_KEY]).shape[0] == src.n_obs:
        adata.obsm["spatial_3d"] = np.asarray(src.obsm[SPATIAL_KEY], dtype=np.float64)
    adata.uns[SPATIAL_UNS_KEY] = spatial_uns(
        sid,
        images={},
        scalefactors={"microns_per_pixel": DNB_MICRONS, "spot_diameter_fullres": float(bin_size)},
        metadata={
            "technology": "stereo-seq",
            "microns_per_dnb": DNB_MICRONS,
            "bin_size": bin_size,
            "bin_size_um": bin_size * DNB_MICRONS,
        },
    )
    return adata
