"""10x Visium human dorsolateral prefrontal cortex (spatialLIBD; Maynard et al. 2021)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scanpy import logging as logg

from histospace._constants import COL_KEY, LIBRARY_KEY, ROW_KEY, SPACERANGER_SPATIAL_DIR, SPATIAL_KEY, SPATIAL_UNS_KEY

from ._common import log_loaded, spatial_uns
from ._download import DEFAULT_TIMEOUT, DatasetLocation, ensure_files, join_url, locate_dataset

__all__ = ["dlpfc"]

#: The 12 spatialLIBD samples (3 donors x 2 pairs of adjacent sections).
DLPFC_SAMPLES: tuple[str, ...] = (
    "151507",
    "151508",
    "151509",
    "151510",
    "151669",
    "151670",
    "151671",
    "151672",
    "151673",
    "151674",
    "151675",
    "151676",
)
#: spatialLIBD's public bucket: `h5/<id>_filtered_feature_bc_matrix.h5`, `images/<id>_tissue_{hires,lowres}_image.png`.
DLPFC_S3_URL = "https://spatial-dlpfc.s3.us-east-2.amazonaws.com"
#: LieberInstitute/HumanPilot (pinned): `10X/<id>/tissue_positions_list.txt`, `scalefactors_json.json`, and
#: `10X/barcode_level_layer_map.tsv` (the manual layer annotation, `layer_guess_reordered`).
DLPFC_GITHUB_URL = (
    "https://raw.githubusercontent.com/LieberInstitute/HumanPilot/044446d6bd8fc154aa74f7be62ec67effb1ec376"
)
DLPFC_LAYERS = ("Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM")
VISIUM_SPOT_UM = 55.0
LABEL_KEY = "layer_guess_reordered"
LAYER_MAP = "barcode_level_layer_map.tsv"
POSITION_FILES = ("tissue_positions_list.csv", "tissue_positions_list.txt", "tissue_positions.csv")


def _remote_files(sample_id: str, *, image: bool, fullres_image: bool) -> dict[str, tuple[str, str]]:
    """Relative path in the dlpfc folder -> (public host, path on that host)."""
    s3, gh = DLPFC_S3_URL, DLPFC_GITHUB_URL
    files = {
        f"{sample_id}/{sample_id}_filtered_feature_bc_matrix.h5": (s3, f"h5/{sample_id}_filtered_feature_bc_matrix.h5"),
        f"{sample_id}/spatial/tissue_positions_list.csv": (gh, f"10X/{sample_id}/tissue_positions_list.txt"),
        f"{sample_id}/spatial/scalefactors_json.json": (gh, f"10X/{sample_id}/scalefactors_json.json"),
        LAYER_MAP: (gh, f"10X/{LAYER_MAP}"),
    }
    if image:
        files[f"{sample_id}/spatial/tissue_lowres_image.png"] = (s3, f"images/{sample_id}_tissue_lowres_image.png")
        files[f"{sample_id}/spatial/tissue_hires_image.png"] = (s3, f"images/{sample_id}_tissue_hires_image.png")
    if fullres_image:
        files[f"{sample_id}/{sample_id}_full_image.tif"] = (s3, f"images/{sample_id}_full_image.tif")
    return files


def dlpfc(
    sample_id: str | int,
    *,
    data_dir: str | os.PathLike | None = None,
    image: bool = True,
    fullres_image: bool = False,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> ad.AnnData:
    """Load one 10x Visium section of the human dorsolateral prefrontal cortex (Maynard et al., Nat Neurosci 2021).

    The 12 spatialLIBD samples carry a manual annotation of the six cortical layers and white matter
    (`obs['layer_guess_reordered']`), the usual ground truth for spatial domain methods (k = 7, or 5 for
    151669-151672). Files are searched in this order:

    1. `data_dir`, else `$HISTOSPACE_DATA`: `dlpfc/<id>/<id>_5000genes.h5ad` (an AnnData already in this layout,
       e.g. the shared copy with 5000 genes and the low-resolution image), else the 10x files
       `dlpfc/<id>/<id>_filtered_feature_bc_matrix.h5` (or `filtered_feature_bc_matrix.h5`) with
       `dlpfc/<id>/spatial/{tissue_positions_list.csv, scalefactors_json.json, tissue_*_image.png}` and the
       layer annotation `dlpfc/barcode_level_layer_map.tsv` (or `dlpfc/<id>/<id>_layer_annotations.tsv.gz`).
    2. Without either, a cache folder that is filled on first use from the public spatialLIBD files (all genes):
       the count matrix and images from the `spatial-dlpfc` AWS bucket, the spot positions, scale factors and
       layer annotation from the GitHub repository `LieberInstitute/HumanPilot`.

    Parameters
    ----------
    sample_id
        spatialLIBD sample id: 151507-151510, 151669-151676.
    data_dir
        Data root holding `dlpfc/` (or the `dlpfc` folder, or the sample folder itself). `None` uses
        `$HISTOSPACE_DATA`, else the cache.
    image
        Keep the H&E images (`'hires'`, `'lowres'`) in `uns['spatial']` (and download them into the cache).
        `False` leaves `'images'` empty.
    fullres_image
        Also download the full-resolution TIFF (about 0.5-1 GB) into the cache, so that
        `metadata['source_image_path']` is set. A file `<id>_full_image.tif` in the sample folder is always used.
    cache_dir
        Download cache; `None` uses `$HISTOSPACE_CACHE`, else `$XDG_CACHE_HOME/histospace` or `~/.cache/histospace`.
    base_url
        Root URL of a mirror that holds the bucket paths (`h5/...`, `images/...`) and the HumanPilot paths
        (`10X/...`) under one root; `file://` works too. `None` uses the public sources.
    timeout
        Seconds to wait for each download.

    Returns
    -------
    :class:`~anndata.AnnData` in the scanpy/squidpy Visium layout, spots (barcodes) x genes (symbols, made unique;
    Ensembl ids in `var['gene_ids']`):

    `adata.X` : :class:`scipy.sparse.csr_matrix` (dtype `int32`)
        Raw UMI counts.
    `adata.obs['array_row']`, `adata.obs['array_col']` : `int`
        Visium array coordinates.
    `adata.obs['in_tissue']` : `int`
        1 for every spot (only spots under tissue are kept).
    `adata.obs['layer_guess_reordered']` : categorical
        Manual annotation, `Layer1`-`Layer6` and `WM`; NaN for the few unannotated spots.
    `adata.obs['library_id']` : categorical
        The sample id.
    other `adata.obs` columns
        spatialLIBD spot metadata when a local `.h5ad` carries it (e.g. `sum_umi`, `sum_gene`, `cell_count`).
    `adata.obsm['spatial']` : :class:`numpy.ndarray` (dtype `float64`)
        Spot centres `(x, y)` in full-resolution image pixels.
    `adata.uns['spatial'][sample_id]` : :class:`dict`
        `'images'`: `'hires'` (2000 px) and/or `'lowres'` (600 px) `uint8` RGB arrays, whichever exists;
        `'scalefactors'`: `'tissue_hires_scalef'`, `'tissue_lowres_scalef'`, `'spot_diameter_fullres'`,
        `'fiducial_diameter_fullres'` (10x Space Ranger);
        `'metadata'`: `'technology'` (`'visium'`), `'spot_diameter_um'` (55.0), and `'source_image_path'` when a
        full-resolution image file exists.

    Raises
    ------
    ValueError
        Unknown `sample_id`, or files that do not belong together.
    FileNotFoundError
        The sample's files are missing under `data_dir` / `$HISTOSPACE_DATA`; the message names the expected file.
    OSError
        A download failed (the message names the URL).

    Examples
    --------
    >>> import histospace as hs
    >>> adata = hs.datasets.dlpfc("151673")  # doctest: +SKIP
    >>> adata.obs["layer_guess_reordered"].value_counts()  # doctest: +SKIP
    """
    sid = _check_sample_id(sample_id)
    start = logg.info(f"loading DLPFC sample {sid}")
    loc = locate_dataset("dlpfc", data_dir=data_dir, cache_dir=cache_dir)
    root = loc.path
    sample_dir = root / sid
    if not sample_dir.is_dir() and root.name == sid:  # data_dir points at the sample folder itself
        sample_dir, root = root, root.parent

    h5ad_path = sample_dir / f"{sid}_5000genes.h5ad"
    if h5ad_path.is_file():
        adata = _from_h5ad(h5ad_path, sid)
    else:
        h5_path = _find_10x(sample_dir, sid)
        if h5_path is None and loc.is_cache:
            remote = _remote_files(sid, image=image, fullres_image=fullres_image)
            urls = {rel: join_url(host if base_url is None else base_url, path) for rel, (host, path) in remote.items()}
            ensure_files(root, urls, timeout=timeout)
            h5_path = _find_10x(sample_dir, sid)
        if h5_path is None:
            _raise_missing(loc, sample_dir, sid)
        adata = _from_10x(h5_path, sample_dir, root, sid, loc, image=image)

    images = adata.uns[SPATIAL_UNS_KEY][sid]["images"]
    if not image:
        images.clear()
    full = _find_fullres(sample_dir, sid)
    meta = adata.uns[SPATIAL_UNS_KEY][sid]["metadata"]
    meta.update({"technology": "visium", "spot_diameter_um": VISIUM_SPOT_UM})
    if full is not None:
        meta["source_image_path"] = str(full.resolve())
    log_loaded(adata, start)
    return adata


def _check_sample_id(sample_id) -> str:
    if isinstance(sample_id, bool) or not isinstance(sample_id, str | int | np.integer):
        msg = f"`sample_id` must be a str such as '151673', got {type(sample_id).__name__}."
        raise TypeError(msg)
    sid = str(sample_id).strip()
    if sid not in DLPFC_SAMPLES:
        msg = f"Unknown DLPFC sample_id {sample_id!r}; valid ids: {', '.join(DLPFC_SAMPLES)}."
        raise ValueError(msg)
    return sid


def _find_10x(sample_dir: Path, sid: str) -> Path | None:
    for name in (f"{sid}_filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix.h5"):
        if (sample_dir / name).is_file():
            return sample_dir / name
    return None


def _find_fullres(sample_dir: Path, sid: str) -> Path | None:
    for p in (sample_dir / f"{sid}_full_image.tif", sample_dir / SPACERANGER_SPATIAL_DIR / f"{sid}_full_image.tif"):
        if p.is_file():
            return p
    return None


def _raise_missing(loc: DatasetLocation, sample_dir: Path, sid: str):
    msg = (
        f"DLPFC sample {sid}: expected {sample_dir / f'{sid}_5000genes.h5ad'} (or the 10x files "
        f"{sample_dir / f'{sid}_filtered_feature_bc_matrix.h5'} and {sample_dir / SPACERANGER_SPATIAL_DIR}/"
        f"{{tissue_positions_list.csv, scalefactors_json.json}}) in {loc.describe()}; not found. {loc.fix()}"
    )
    raise FileNotFoundError(msg)


def _as_int_csr(x, path: Path) -> sp.csr_matrix:
    x = sp.csr_matrix(x)
    if x.dtype.kind == "f":
        if not np.all(np.mod(x.data, 1) == 0):
            msg = f"{path} holds non-integer values; expected raw UMI counts."
            raise ValueError(msg)
        x = x.astype(np.int32)
    return x


def _from_h5ad(path: Path, sid: str) -> ad.AnnData:
    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as e:
        msg = f"Could not read {path}: {e}. Replace the file or delete it so the 10x files are used."
        raise ValueError(msg) from e
    adata.X = _as_int_csr(adata.X, path)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    spatial = adata.uns.get(SPATIAL_UNS_KEY, {})
    lib = spatial.get(sid) or (next(iter(spatial.values())) if len(spatial) == 1 else None)
    if lib is None or SPATIAL_KEY not in adata.obsm:
        msg = f"{path} lacks `uns['spatial'][{sid!r}]` or `obsm['spatial']`; it is not a Visium AnnData of {sid}."
        raise ValueError(msg)
    for col in (ROW_KEY, COL_KEY):
        if col in adata.obs:
            adata.obs[col] = adata.obs[col].astype(np.int64)
    if LABEL_KEY in adata.obs and not isinstance(adata.obs[LABEL_KEY].dtype, pd.CategoricalDtype):
        adata.obs[LABEL_KEY] = pd.Categorical(adata.obs[LABEL_KEY])
    adata.obs[LIBRARY_KEY] = pd.Categorical([sid] * adata.n_obs)
    adata.obsm[SPATIAL_KEY] = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    adata.uns = {
        SPATIAL_UNS_KEY: spatial_uns(
            sid, images=lib.get("images", {}), scalefactors=lib.get("scalefactors", {}), metadata=lib.get("metadata")
        )
    }
    return adata


def _from_10x(
    h5_path: Path, sample_dir: Path, root: Path, sid: str, loc: DatasetLocation, *, image: bool
) -> ad.AnnData:
    import scanpy as sc

    spatial_dir = sample_dir / SPACERANGER_SPATIAL_DIR
    pos_path = next((spatial_dir / n for n in POSITION_FILES if (spatial_dir / n).is_file()), None)
    sf_path = spatial_dir / "scalefactors_json.json"
    for p in (pos_path or spatial_dir / POSITION_FILES[0], sf_path):
        if not p.is_file():
            msg = f"DLPFC sample {sid}: file {p} not found in {loc.describe()}. {loc.fix()}"
            raise FileNotFoundError(msg)
    try:
        with warnings.catch_warnings():  # duplicated symbols are made unique just below
            warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
            adata = sc.read_10x_h5(h5_path)
    except Exception as e:  # h5py raises OSError, scanpy KeyError/ValueError for wrong content
        msg = f"Could not read the 10x count matrix {h5_path}: {e}. Delete it to download it again, or replace it."
        raise ValueError(msg) from e
    adata.X = _as_int_csr(adata.X, h5_path)
    adata.var_names_make_unique()

    pos = _read_positions(pos_path)
    missing = ~adata.obs_names.isin(pos.index)
    if missing.any():
        msg = f"{int(missing.sum())} barcodes of {h5_path} have no row in {pos_path}; the files do not belong together."
        raise ValueError(msg)
    pos = pos.loc[adata.obs_names]
    adata.obs["in_tissue"] = pos["in_tissue"].to_numpy(dtype=np.int64)
    adata.obs[ROW_KEY] = pos[ROW_KEY].to_numpy(dtype=np.int64)
    adata.obs[COL_KEY] = pos[COL_KEY].to_numpy(dtype=np.int64)
    labels = _read_labels(sample_dir, root, sid, adata.obs_names)
    if labels is not None:
        adata.obs[LABEL_KEY] = labels
    else:
        warnings.warn(
            f"DLPFC sample {sid}: no layer annotation ({root / LAYER_MAP}) found; no `obs[{LABEL_KEY!r}]`.",
            UserWarning,
            stacklevel=3,
        )
    adata.obs[LIBRARY_KEY] = pd.Categorical([sid] * adata.n_obs)
    adata.obsm[SPATIAL_KEY] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)

    try:
        scalefactors = {k: float(v) for k, v in json.loads(sf_path.read_text()).items()}
    except (ValueError, TypeError, AttributeError) as e:
        msg = f"Could not parse {sf_path}: {e}. Expected the Space Ranger scalefactors_json.json."
        raise ValueError(msg) from e
    images = {}
    for res in ("hires", "lowres"):
        p = spatial_dir / f"tissue_{res}_image.png"
        if image and p.is_file():
            images[res] = _read_png(p)
    adata.uns[SPATIAL_UNS_KEY] = spatial_uns(sid, images=images, scalefactors=scalefactors)
    return adata


def _read_positions(path: Path) -> pd.DataFrame:
    cols = ["barcode", "in_tissue", ROW_KEY, COL_KEY, "pxl_row_in_fullres", "pxl_col_in_fullres"]
    with open(path) as f:
        first = f.readline()
    has_header = first.startswith("barcode")
    try:
        df = pd.read_csv(path, header=0 if has_header else None, names=None if has_header else cols)
    except (ValueError, pd.errors.ParserError) as e:
        msg = f"Could not read the spot positions {path}: {e}."
        raise ValueError(msg) from e
    if list(df.columns) != cols:
        msg = f"{path} has columns {list(df.columns)}; expected the Space Ranger columns {cols}."
        raise ValueError(msg)
    return df.set_index("barcode")


def _read_labels(sample_dir: Path, root: Path, sid: str, barcodes: pd.Index) -> pd.Categorical | None:
    per_sample = sample_dir / f"{sid}_layer_annotations.tsv.gz"
    if per_sample.is_file():
        lab = pd.read_csv(per_sample, sep="\t", index_col=0)[LABEL_KEY].astype(object)
    elif (root / LAYER_MAP).is_file():
        m = pd.read_csv(root / LAYER_MAP, sep="\t", header=None, names=["barcode", "sample", "layer"], dtype=str)
        m = m[m["sample"] == sid]
        lab = pd.Series(
            [f"Layer{v[1:]}" if v.startswith("L") else v for v in m["layer"]], index=m["barcode"].to_numpy()
        )
    else:
        return None
    lab = lab[~lab.index.duplicated()].reindex(barcodes)
    present = set(lab.dropna())
    cats = [c for c in DLPFC_LAYERS if c in present] + sorted(present - set(DLPFC_LAYERS))
    return pd.Categorical(lab.to_numpy(dtype=object), categories=cats)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as e:
        msg = f"Could not read the image {path}: {e}. Delete it to download it again, or pass `image=False`."
        raise ValueError(msg) from e
