"""HER2-positive breast tumour sections, legacy Spatial Transcriptomics (Andersson et al. 2021)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scanpy import logging as logg

from histospace._constants import COL_KEY, LIBRARY_KEY, ROW_KEY, SPATIAL_KEY, SPATIAL_UNS_KEY

from ._common import check_max_size, log_loaded, read_st_counts, st_pixels_per_step, st_spatial_uns
from ._download import DEFAULT_TIMEOUT, ensure_files, join_url, locate_dataset

__all__ = ["her2st"]

#: Raw files of the public GitHub repository `almaan/her2st`, pinned to the commit the shared copy was made from.
HER2ST_URL = "https://raw.githubusercontent.com/almaan/her2st/85df7411b987a7dec3feff9718b869a7a82091ec"

#: The 36 sections with counts: patients A-D have 6 sections, E-H have 3.
HER2ST_SECTIONS: tuple[str, ...] = tuple(
    f"{p}{i}" for p, n in zip("ABCDEFGH", (6, 6, 6, 6, 3, 3, 3, 3), strict=True) for i in range(1, n + 1)
)
#: Sections with per-spot pathologist region labels.
HER2ST_LABELLED: tuple[str, ...] = ("A1", "B1", "C1", "D1", "E1", "F1", "G2", "H1")
#: H&E file name of each section in `data/ST-imgs/<patient>/<section>/` of the repository.
HER2ST_IMAGES: dict[str, str] = {
    "A1": "9769_C1_HE_small.jpg",
    "A2": "9769_C2_HE_small.jpg",
    "A3": "9769_D1_HE_small.jpg",
    "A4": "9769_D2_HE_small.jpg",
    "A5": "9769_E1_HE_small.jpg",
    "A6": "9769_E2_HE_small.jpg",
    "B1": "BT10737_C1_HE.jpg",
    "B2": "BT10737_C2_HE.jpg",
    "B3": "BT10737_D1_HE.jpg",
    "B4": "BT10737_D2_HE.jpg",
    "B5": "BT10737_E1_HE.jpg",
    "B6": "BT10737_E2_HE.jpg",
    "C1": "5714_HE_BT_C1.jpg",
    "C2": "5714_HE_BT_C2.jpg",
    "C3": "5714_HE_BT_D1.jpg",
    "C4": "5714_HE_BT_D2.jpg",
    "C5": "5714_HE_BT_E1.jpg",
    "C6": "5714_HE_BT_E2.jpg",
    "D1": "10426_HE_BT_C1.jpg",
    "D2": "10426_HE_BT_C2.jpg",
    "D3": "10426_HE_BT_D1.jpg",
    "D4": "10426_HE_BT_D2.jpg",
    "D5": "10426_HE_BT_E1.jpg",
    "D6": "10426_HE_BT_E2.jpg",
    "E1": "HE_BT23567_D2.jpg",
    "E2": "HE_BT23567_E1.jpg",
    "E3": "HE_BT23567_E2.jpg",
    "F1": "HE_BT23810_D2.jpg",
    "F2": "HE_BT23810_E1.jpg",
    "F3": "HE_BT23810_E2.jpg",
    "G1": "HE_BT23903_C1a.jpg",
    "G2": "HE_BT23903_C2a.jpg",
    "G3": "HE_BT23903_D1a.jpg",
    "H1": "HE_BT24044_D2.jpg",
    "H2": "HE_BT24044_E1.jpg",
    "H3": "HE_BT24044_E2.jpg",
}
#: Pathologist classes, in a fixed order for the categorical `obs['label']`.
HER2ST_CLASSES = (
    "invasive cancer",
    "cancer in situ",
    "immune infiltrate",
    "breast glands",
    "connective tissue",
    "adipose tissue",
    "undetermined",
)

ST_PITCH_UM = 200.0  # centre-to-centre distance of adjacent array positions, legacy ST
ST_SPOT_UM = 100.0  # spot diameter, legacy ST
COUNTS_FIX = (
    "Delete the file to download it again (cache) or replace it with the original from github.com/almaan/her2st "
    "(data/ST-cnts)."
)
IMAGE_FIX = "Replace the file with the original from github.com/almaan/her2st (data/ST-imgs) or pass `image=False`."


def _local_files(section: str) -> dict[str, str]:
    """Relative paths (inside the her2st folder) -> relative paths in the public repository."""
    files = {
        f"counts/{section}.tsv.gz": f"data/ST-cnts/{section}.tsv.gz",
        f"spots/{section}_selection.tsv": f"data/ST-spotfiles/{section}_selection.tsv",
    }
    if section in HER2ST_LABELLED:
        files[f"pathologist_labels/{section}_labeled_coordinates.tsv"] = (
            f"data/ST-pat/lbl/{section}_labeled_coordinates.tsv"
        )
    return files


def _image_files(section: str) -> dict[str, str]:
    name = HER2ST_IMAGES[section]
    return {f"images/{section}_{name}": f"data/ST-imgs/{section[0]}/{section}/{name}"}


def her2st(
    section: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image: bool = True,
    hires_max_size: int = 2000,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> ad.AnnData:
    """Load one section of the HER2-positive breast tumour dataset (Andersson et al., Nat Commun 2021).

    Legacy Spatial Transcriptomics (ST): 100 µm spots on a 200 µm grid; 36 sections from 8 patients
    (A-D: 6 sections each, E-H: 3 each). Files are read from `data_dir`, else `$HISTOSPACE_DATA`, else a cache
    folder that is filled from the GitHub repository `almaan/her2st` on a machine with internet access.
    The folder holds `her2st/counts/<section>.tsv.gz`, `her2st/spots/<section>_selection.tsv`,
    `her2st/images/<section>_*.jpg` and `her2st/pathologist_labels/<section>_labeled_coordinates.tsv`.

    The full-resolution H&E (about 9300 x 9900 px) is not held in memory: a downscaled copy is stored as the
    `'hires'` image and the path of the full-resolution file in the metadata, so that
    :func:`histospace.pp.image_features` can cut patches from it.

    Parameters
    ----------
    section
        Section id, one of `A1`-`A6`, `B1`-`B6`, `C1`-`C6`, `D1`-`D6`, `E1`-`E3`, `F1`-`F3`, `G1`-`G3`, `H1`-`H3`.
    data_dir
        Data root holding `her2st/` (or the `her2st` folder itself). `None` uses `$HISTOSPACE_DATA`, else the cache.
    image
        Read the H&E image and store downscaled `'hires'` and `'lowres'` copies. `False` skips it (faster);
        `metadata['source_image_path']` is still set when the file exists, and nothing is downloaded for it.
    hires_max_size
        Longest side of the `'hires'` image in pixels.
    cache_dir
        Download cache; `None` uses `$HISTOSPACE_CACHE`, else `$XDG_CACHE_HOME/histospace` or `~/.cache/histospace`.
    base_url
        Root URL of a mirror of the `almaan/her2st` repository files (`data/ST-cnts/...`); `file://` works too.
        `None` uses GitHub.
    timeout
        Seconds to wait for each download.

    Returns
    -------
    :class:`~anndata.AnnData` in the scanpy/squidpy Visium layout with `n_obs` spots (named `'<section>_<x>x<y>'`)
    and the genes as `var_names` (symbols, made unique):

    `adata.X` : :class:`scipy.sparse.csr_matrix` (dtype `int32`)
        Raw UMI counts.
    `adata.obs['array_row']`, `adata.obs['array_col']` : `int`
        Array coordinates (`y` and `x` of the spot id `'<x>x<y>'`).
    `adata.obs['library_id']`, `adata.obs['patient']` : categorical
        The section (e.g. `'C2'`) and the patient (its letter, e.g. `'C'`).
    `adata.obs['label']` : categorical
        Pathologist region label, only for A1, B1, C1, D1, E1, F1, G2 and H1; NaN for unlabelled spots.
    `adata.obsm['spatial']` : :class:`numpy.ndarray` (dtype `float64`)
        Spot centres `(x, y)` in full-resolution image pixels.
    `adata.uns['spatial'][section]` : :class:`dict`
        `'images'`: `'hires'` (longest side `hires_max_size`) and `'lowres'` (600 px) `uint8` RGB arrays, empty
        when the section has no image (a warning says so) or `image=False`;
        `'scalefactors'`: `'spot_diameter_fullres'` and `'fiducial_diameter_fullres'` (100 µm in full-resolution
        pixels, fitted from the spot pixel and array coordinates; ST has no fiducials, so both are equal), and
        `'tissue_hires_scalef'`, `'tissue_lowres_scalef'` when images are stored;
        `'metadata'`: `'technology'` (`'st'`), `'spot_diameter_um'` (100.0), `'pixels_per_um'`, and
        `'source_image_path'` (absolute path of the full-resolution JPEG) when the file exists.

    Raises
    ------
    ValueError
        Unknown `section`, or files that cannot be parsed.
    FileNotFoundError
        The counts or spot file is missing under `data_dir` / `$HISTOSPACE_DATA`.
    OSError
        A download failed (the message names the URL).

    Examples
    --------
    >>> import histospace as hs
    >>> adata = hs.datasets.her2st("C2")  # doctest: +SKIP
    >>> adata.uns["spatial"]["C2"]["metadata"]["source_image_path"]  # doctest: +SKIP
    """
    section = _check_section(section)
    check_max_size(hires_max_size, "hires_max_size")
    start = logg.info(f"loading her2st section {section}")
    loc = locate_dataset("her2st", data_dir=data_dir, cache_dir=cache_dir)
    root = loc.path

    if loc.is_cache:
        wanted = _local_files(section)
        if image:
            wanted |= _image_files(section)
        base = HER2ST_URL if base_url is None else base_url
        ensure_files(root, {rel: join_url(base, src) for rel, src in wanted.items()}, timeout=timeout)

    counts_path = root / "counts" / f"{section}.tsv.gz"
    spots_path = root / "spots" / f"{section}_selection.tsv"
    for p in (counts_path, spots_path):
        if not p.is_file():
            msg = f"her2st section {section}: file {p} not found in {loc.describe()}. {loc.fix()}"
            raise FileNotFoundError(msg)

    spot_ids, genes, counts = read_st_counts(counts_path, dataset="her2st", fix=COUNTS_FIX)
    coords = _read_spots(spots_path, spot_ids)

    obs = pd.DataFrame(
        {
            ROW_KEY: coords["y"].to_numpy(dtype=np.int64),
            COL_KEY: coords["x"].to_numpy(dtype=np.int64),
            LIBRARY_KEY: pd.Categorical([section] * len(spot_ids)),
            "patient": pd.Categorical([section[0]] * len(spot_ids)),
        },
        index=pd.Index([f"{section}_{s}" for s in spot_ids]),
    )
    if section in HER2ST_LABELLED:
        lbl_path = root / "pathologist_labels" / f"{section}_labeled_coordinates.tsv"
        if lbl_path.is_file():
            obs["label"] = _read_labels(lbl_path, spot_ids)
        else:
            warnings.warn(
                f"her2st section {section}: pathologist labels {lbl_path} not found; no `obs['label']`.",
                UserWarning,
                stacklevel=3,
            )

    var_names = pd.Index(genes)
    if not var_names.is_unique:
        var_names = ad.utils.make_index_unique(var_names)  # same rule as `var_names_make_unique`
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=var_names))
    adata.obsm[SPATIAL_KEY] = coords[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)

    img_path = _find_image(root, section)
    adata.uns[SPATIAL_UNS_KEY] = st_spatial_uns(
        section,
        pixels_per_um=_pixels_per_um(coords),
        spot_um=ST_SPOT_UM,
        img_path=img_path,
        image=image,
        hires_max_size=hires_max_size,
        fix=IMAGE_FIX,
    )
    if img_path is None and image:
        msg = (
            f"her2st section {section}: no H&E image found (expected {root / 'images'}/{section}_*.jpg in "
            f"{loc.describe()}); loaded counts and spot coordinates only, `uns['spatial'][{section!r}]['images']` is "
            "empty. The shared data copy has images for C2-C6 only; the others come from the GitHub repository "
            "almaan/her2st (leave `data_dir` and HISTOSPACE_DATA unset on a machine with internet to download them)."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
    log_loaded(adata, start)
    return adata


def _check_section(section) -> str:
    if not isinstance(section, str):
        msg = f"`section` must be a str such as 'C2', got {type(section).__name__}."
        raise TypeError(msg)
    s = section.strip().upper()
    if s not in HER2ST_SECTIONS:
        msg = f"Unknown her2st section {section!r}; valid sections: {', '.join(HER2ST_SECTIONS)}."
        raise ValueError(msg)
    return s


def _read_spots(path: Path, spot_ids: list[str]) -> pd.DataFrame:
    """Spot table rows ordered like `spot_ids` (join on '<x>x<y>')."""
    try:
        df = pd.read_csv(path, sep="\t")
    except (OSError, ValueError, pd.errors.ParserError) as e:
        msg = f"Could not read the her2st spot file {path}: {e}."
        raise ValueError(msg) from e
    need = {"x", "y", "pixel_x", "pixel_y"}
    if missing := need - set(df.columns):
        msg = f"The her2st spot file {path} lacks the columns {sorted(missing)}; expected x, y, pixel_x, pixel_y."
        raise ValueError(msg)
    df.index = df["x"].astype(int).astype(str) + "x" + df["y"].astype(int).astype(str)
    df = df[~df.index.duplicated()]
    missing_ids = [s for s in spot_ids if s not in df.index]
    if missing_ids:
        msg = (
            f"{len(missing_ids)} spots of the count table have no row in {path} (e.g. {missing_ids[:3]}); "
            "the counts and spot files do not belong together."
        )
        raise ValueError(msg)
    out = df.loc[spot_ids]
    if not np.isfinite(out[["pixel_x", "pixel_y"]].to_numpy(dtype=float)).all():
        msg = f"The her2st spot file {path} has NaN pixel coordinates."
        raise ValueError(msg)
    return out


def _read_labels(path: Path, spot_ids: list[str]) -> pd.Categorical:
    """Pathologist labels joined on f'{round(x)}x{round(y)}'; spots without a label get NaN."""
    df = pd.read_csv(path, sep="\t")
    df = df.dropna(subset=["x", "y", "label"])
    keys = [f"{round(a)}x{round(b)}" for a, b in zip(df["x"], df["y"], strict=True)]
    lab = pd.Series(df["label"].astype(str).to_numpy(), index=keys)
    lab = lab[~lab.index.duplicated()]
    values = lab.reindex(spot_ids)
    present = set(values.dropna())
    cats = [c for c in HER2ST_CLASSES if c in present] + sorted(present - set(HER2ST_CLASSES))
    n_missing = int(values.isna().sum())
    if n_missing:
        logg.info(f"    {n_missing} of {len(spot_ids)} spots have no pathologist label (NaN)")
    return pd.Categorical(values.to_numpy(dtype=object), categories=cats)


def _pixels_per_um(coords: pd.DataFrame) -> float:
    """Pixels per array step (fitted on both axes) / 200 µm."""
    step_px = st_pixels_per_step(coords)
    if step_px is None:
        warnings.warn(
            "too few spots to fit the pixel size; assuming 1.28 px/µm (her2st patient C images)",
            UserWarning,
            stacklevel=3,
        )
        return 1.28
    return step_px / ST_PITCH_UM


def _find_image(root: Path, section: str) -> Path | None:
    folder = root / "images"
    if not folder.is_dir():
        return None
    cands = sorted(
        p for p in folder.iterdir() if p.name.startswith(f"{section}_") and p.suffix.lower() in {".jpg", ".jpeg"}
    )
    return cands[0] if cands else None
