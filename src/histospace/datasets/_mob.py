"""Mouse olfactory bulb sections, legacy Spatial Transcriptomics '2k' array (the STUtility example data)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scanpy import logging as logg

from histospace._constants import COL_KEY, LIBRARY_KEY, ROW_KEY, SPATIAL_KEY, SPATIAL_UNS_KEY

from ._common import check_max_size, log_loaded, read_st_counts, st_pixels_per_step, st_spatial_uns
from ._download import DEFAULT_TIMEOUT, ensure_files, join_url, locate_dataset

__all__ = ["mob"]

#: Raw files of the public GitHub repository `jbergenstrahle/STUtility`, pinned to the commit the shared copy came from.
MOB_URL = "https://raw.githubusercontent.com/jbergenstrahle/STUtility/9a8f421499e58b13340ee386db07b0eba923c88c"
#: The sections of that repository (`inst/extdata/counts/`); MOB1-MOB3 are in the shared data copy.
MOB_SECTIONS: tuple[str, ...] = ("MOB1", "MOB2", "MOB3", "MOB4")
METADATA_FILE = "metaData.csv"

#: Array step of the '2k' ST array: the positions form a checkerboard (x + y even) whose nearest neighbours are
#: diagonal, 141 µm apart (STUtility sets `min.spot.distance <- 141` for the '2k' platform in
#: `R/image_processing.R`), i.e. 100 µm per step of `x` or `y` (100 * sqrt(2) = 141) and 200 µm between
#: neighbours of one row (x +- 2), the pitch of the '1k' array.
ST2K_STEP_UM = 100.0
ST_SPOT_UM = 100.0  # spot diameter of legacy ST arrays (Ståhl et al. 2016; STUtility: 100 µm)
COUNTS_FIX = (
    "Delete the file to download it again (cache) or replace it with the original from "
    "github.com/jbergenstrahle/STUtility (inst/extdata/counts)."
)
IMAGE_FIX = (
    "Replace the file with the original from github.com/jbergenstrahle/STUtility (inst/extdata/counts) or pass "
    "`image=False`."
)


def _remote_files(section: str, *, image: bool) -> dict[str, str]:
    """Relative paths (inside the mob folder) -> relative paths in the public repository."""
    files = {
        f"{section}.tsv": f"inst/extdata/counts/{section}.tsv",
        f"alignment_table_{section}.tsv": f"inst/extdata/counts/alignment_table_{section}.tsv",
        METADATA_FILE: f"inst/extdata/{METADATA_FILE}",
    }
    if image:
        files[f"{section}.jpg"] = f"inst/extdata/counts/{section}.jpg"
    return files


def mob(
    section: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image: bool = True,
    hires_max_size: int = 2000,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> ad.AnnData:
    """Load one section of the mouse olfactory bulb (MOB) dataset shipped with STUtility (Bergenstråhle et al. 2020).

    Legacy Spatial Transcriptomics, '2k' array: about 1,930 spots per section, 1,000 genes, and a 1905 x 1905 px H&E
    JPEG. `MOB1` and `MOB2` come from animal 1, `MOB3` and `MOB4` from animal 2 (`metaData.csv`). Files are read from
    `data_dir`, else `$HISTOSPACE_DATA`, else a cache folder filled from the GitHub repository
    `jbergenstrahle/STUtility` (`inst/extdata/`) on a machine with internet access. The folder `mob/` holds
    `<section>.tsv` (counts, spots x genes), `alignment_table_<section>.tsv` (array `x`, `y` and spot centres
    `pixel_x`, `pixel_y` in the JPEG), `<section>.jpg` and `metaData.csv`; any section with these files loads.

    Scale: the array positions `x`, `y` (1-based, `x + y` even) form a checkerboard whose nearest neighbours are
    diagonal, 141 µm apart (the figure STUtility uses for the '2k' platform, `R/image_processing.R`), so one step
    of `x` or `y` is 100 µm and neighbours of one row (`x` +- 2) are 200 µm apart, the pitch of the first ST array
    (Ståhl et al. 2016: spots of 100 µm, 200 µm centre to centre). Pixels per µm are the fitted pixels per array
    step (mean of the two axes, fitted on every row of the alignment table) / 100 µm; on MOB1-MOB3 about 0.228
    px/µm (4.4 µm per pixel). The two axes differ: a step of `y` spans about 11 % more pixels than a step of `x` in
    all three sections (and in STUtility's other '2k' data), so the array's physical steps are not exactly equal
    and the µm scale is good to about +-5 % along either axis. The spot diameter is taken as 100 µm (legacy ST).

    Parameters
    ----------
    section
        Section name, `'MOB1'`-`'MOB4'` (`MOB1`-`MOB3` in the shared data copy), or any section stored in the same
        layout.
    data_dir
        Data root holding `mob/` (or the `mob` folder itself). `None` uses `$HISTOSPACE_DATA`, else the cache.
    image
        Read the H&E image and store `'hires'` and `'lowres'` copies. `False` skips it (faster);
        `metadata['source_image_path']` is still set when the file exists, and nothing is downloaded for it.
    hires_max_size
        Longest side of the `'hires'` image in pixels (the 1905-px JPEG is kept as it is with the default).
    cache_dir
        Download cache; `None` uses `$HISTOSPACE_CACHE`, else `$XDG_CACHE_HOME/histospace` or `~/.cache/histospace`.
    base_url
        Root URL of a mirror of the `jbergenstrahle/STUtility` repository files (`inst/extdata/...`); `file://`
        works too. `None` uses GitHub.
    timeout
        Seconds to wait for each download.

    Returns
    -------
    :class:`~anndata.AnnData` in the scanpy/squidpy Visium layout with `n_obs` spots (named `'<section>_<x>x<y>'`)
    and the genes as `var_names` (Ensembl mouse gene ids without the version suffix; the files have no symbols):

    `adata.X` : :class:`scipy.sparse.csr_matrix` (dtype `int32`)
        Raw UMI counts.
    `adata.var['gene_ids']` : `str`
        The gene ids as in the count table, with their version (e.g. `'ENSMUSG00000064339.1'`).
    `adata.obs['array_row']`, `adata.obs['array_col']` : `int`
        Array coordinates (`y` and `x` of the spot id `'<x>x<y>'`).
    `adata.obs['library_id']`, `adata.obs['animal']` : categorical
        The section (e.g. `'MOB3'`) and the animal (`'1'` or `'2'`, column `individual` of `metaData.csv`). No
        `'animal'` column when `metaData.csv` is missing or does not list the section (a warning says so).
    `adata.obsm['spatial']` : :class:`numpy.ndarray` (dtype `float64`)
        Spot centres `(x, y)` in full-resolution image pixels: `pixel_x`, `pixel_y` of the alignment table; the few
        spots with counts but no row there (about 0.5 %) are placed by the affine map from array to pixel
        coordinates fitted on all rows (residual about 1 px).
    `adata.uns['spatial'][section]` : :class:`dict`
        `'images'`: `'hires'` (longest side `hires_max_size`) and `'lowres'` (600 px) `uint8` RGB arrays, empty
        with `image=False` or when the section has no image (a warning says so);
        `'scalefactors'`: `'spot_diameter_fullres'` and `'fiducial_diameter_fullres'` (100 µm in full-resolution
        pixels; ST has no fiducials, so both are equal), and `'tissue_hires_scalef'`, `'tissue_lowres_scalef'` when
        images are stored;
        `'metadata'`: `'technology'` (`'st'`), `'array'` (`'2k'`), `'spot_diameter_um'` (100.0),
        `'array_step_um'` (100.0), `'pixels_per_um'`, and `'source_image_path'` (absolute path of the JPEG) when the
        file exists.

    Raises
    ------
    TypeError
        `section` is not a str.
    ValueError
        An empty or path-like `section`, or files that cannot be parsed or do not belong together.
    FileNotFoundError
        The count table or alignment table is missing under `data_dir` / `$HISTOSPACE_DATA`; the message names it.
    OSError
        A download failed (the message names the URL).

    Examples
    --------
    >>> import histospace as hs
    >>> adata = hs.datasets.mob("MOB1")  # doctest: +SKIP
    >>> adata.obs["animal"].unique()  # doctest: +SKIP
    """
    section = _check_section(section)
    check_max_size(hires_max_size, "hires_max_size")
    start = logg.info(f"loading MOB section {section}")
    loc = locate_dataset("mob", data_dir=data_dir, cache_dir=cache_dir)
    root = loc.path
    if loc.is_cache:
        base = MOB_URL if base_url is None else base_url
        wanted = _remote_files(section, image=image)
        ensure_files(root, {rel: join_url(base, src) for rel, src in wanted.items()}, timeout=timeout)

    counts_path = root / f"{section}.tsv"
    table_path = root / f"alignment_table_{section}.tsv"
    for p in (counts_path, table_path):
        if not p.is_file():
            msg = f"MOB section {section}: file {p} not found in {loc.describe()}. {loc.fix()}"
            raise FileNotFoundError(msg)

    spot_ids, genes, counts = read_st_counts(counts_path, dataset="MOB", fix=COUNTS_FIX)
    table = _read_alignment(table_path)
    xy, n_fitted = _spot_pixels(table, spot_ids, table_path)
    step_px = st_pixels_per_step(table)
    if step_px is None:
        msg = f"The MOB alignment table {table_path} has too few array positions to fit the pixel size."
        raise ValueError(msg)
    px_per_um = step_px / ST2K_STEP_UM
    animal = _read_animal(root / METADATA_FILE, section)

    arr = np.array([s.split("x") for s in spot_ids], dtype=np.int64)
    obs = pd.DataFrame(
        {
            ROW_KEY: arr[:, 1],
            COL_KEY: arr[:, 0],
            LIBRARY_KEY: pd.Categorical([section] * len(spot_ids)),
        },
        index=pd.Index([f"{section}_{s}" for s in spot_ids]),
    )
    if animal is not None:
        obs["animal"] = pd.Categorical([animal] * len(spot_ids))
    var_names = pd.Index([re.sub(r"\.\d+$", "", g) for g in genes])
    if not var_names.is_unique:
        var_names = ad.utils.make_index_unique(var_names)
    var = pd.DataFrame({"gene_ids": np.asarray(genes, dtype=object)}, index=var_names)
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm[SPATIAL_KEY] = xy

    img_path = root / f"{section}.jpg"
    adata.uns[SPATIAL_UNS_KEY] = st_spatial_uns(
        section,
        pixels_per_um=px_per_um,
        spot_um=ST_SPOT_UM,
        img_path=img_path if img_path.is_file() else None,
        image=image,
        hires_max_size=hires_max_size,
        fix=IMAGE_FIX,
        metadata={"array": "2k", "array_step_um": ST2K_STEP_UM},
    )
    if image and not img_path.is_file():
        msg = (
            f"MOB section {section}: no H&E image {img_path} in {loc.describe()}; loaded counts and spot coordinates "
            f"only, `uns['spatial'][{section!r}]['images']` is empty. Add the JPEG from "
            "github.com/jbergenstrahle/STUtility (inst/extdata/counts) or pass `image=False`."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
    if n_fitted:
        logg.info(f"    {n_fitted} spots without a row in {table_path.name} placed by the fitted array-to-pixel map")
    log_loaded(adata, start)
    return adata


def _check_section(section) -> str:
    if not isinstance(section, str):
        msg = f"`section` must be a str such as 'MOB1', got {type(section).__name__}."
        raise TypeError(msg)
    s = section.strip()
    if s.upper() in MOB_SECTIONS:
        s = s.upper()
    if not s or any(c in s for c in "/\\") or s in {".", ".."}:
        msg = (
            f"`section` must name a section such as 'MOB1' (files '<section>.tsv' and 'alignment_table_<section>.tsv' "
            f"in the mob folder), got {section!r}; known sections: {', '.join(MOB_SECTIONS)}."
        )
        raise ValueError(msg)
    return s


def _read_alignment(path: Path) -> pd.DataFrame:
    """The alignment table indexed by spot id '<x>x<y>' (first row of a repeated id kept)."""
    try:
        df = pd.read_csv(path, sep="\t")
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        msg = f"Could not read the MOB alignment table {path}: {e}. {COUNTS_FIX}"
        raise ValueError(msg) from e
    need = {"x", "y", "pixel_x", "pixel_y"}
    if missing := need - set(df.columns):
        msg = (
            f"The MOB alignment table {path} lacks the columns {sorted(missing)}; expected x, y, pixel_x, pixel_y "
            "(the output of the ST spot detector)."
        )
        raise ValueError(msg)
    df = df.dropna(subset=sorted(need))
    if df.empty:
        msg = f"The MOB alignment table {path} has no row with x, y, pixel_x and pixel_y."
        raise ValueError(msg)
    df.index = df["x"].round().astype(int).astype(str) + "x" + df["y"].round().astype(int).astype(str)
    return df[~df.index.duplicated()]


def _spot_pixels(table: pd.DataFrame, spot_ids: list[str], path: Path) -> tuple[np.ndarray, int]:
    """Pixel centres of `spot_ids`: from the table, else from the affine array-to-pixel map fitted on the table."""
    xy = table.reindex(spot_ids)[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    missing = np.isnan(xy).any(axis=1)
    n_missing = int(missing.sum())
    if n_missing > 0.5 * len(spot_ids):
        msg = (
            f"{n_missing} of {len(spot_ids)} spots of the count table have no row in {path} (e.g. "
            f"{[s for s, m in zip(spot_ids, missing, strict=True) if m][:3]}); the counts and alignment table do "
            "not belong together."
        )
        raise ValueError(msg)
    if n_missing:
        design = np.column_stack([table["x"], table["y"], np.ones(len(table))]).astype(np.float64)
        if len(table) < 3 or np.linalg.matrix_rank(design) < 3:
            msg = f"{n_missing} spots have no row in {path}, and its rows are too few to place them by a fitted map."
            raise ValueError(msg)
        coef = np.linalg.lstsq(design, table[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64), rcond=None)[0]
        arr = np.array([s.split("x") for s in np.asarray(spot_ids)[missing]], dtype=np.float64)
        xy[missing] = np.column_stack([arr, np.ones(len(arr))]) @ coef
    return xy, n_missing


def _read_animal(path: Path, section: str) -> str | None:
    """The `individual` of `section` in STUtility's `metaData.csv` (`;`-separated, one row per count file)."""
    if not path.is_file():
        warnings.warn(f"MOB: {path} not found; no `obs['animal']`.", UserWarning, stacklevel=3)
        return None
    try:
        meta = pd.read_csv(path, sep=";", dtype=str)
        names = meta["samples"].map(lambda p: Path(str(p).replace("\\", "/")).name.split(".")[0])
        rows = meta.loc[names == section, "individual"]
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as e:
        msg = (
            f"Could not read {path}: {e}. Expected STUtility's `;`-separated table with the columns `samples` "
            "(paths of the count files) and `individual`."
        )
        raise ValueError(msg) from e
    if rows.empty:
        warnings.warn(f"MOB: section {section} is not listed in {path}; no `obs['animal']`.", UserWarning, stacklevel=3)
        return None
    return str(rows.iloc[0]).strip()
