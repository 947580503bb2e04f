"""`io.read`: one reader for every input the `histospace` command takes (h5ad, zarr, platform folders, GEM).

Only the standard library is imported here; each form's reader imports its package when it runs, so that the command
line answers `--help` at once.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from histospace._constants import SPACERANGER_SPATIAL_DIR

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["read"]

#: file names read as Stereo-seq GEM text (gzipped or not)
GEM_SUFFIXES = (".gem", ".gem.gz", ".txt", ".txt.gz", ".tsv", ".tsv.gz")
FORMS = "an .h5ad file, a SpatialData .zarr store, a Visium HD / SAW (Stereo-seq) / Visium output folder or a GEM file"


def _is_zarr(p: Path) -> bool:
    return p.is_dir() and (p.suffix == ".zarr" or any((p / f).exists() for f in ("zarr.json", ".zattrs", ".zgroup")))


def input_kind(path: str | os.PathLike) -> tuple[Path, Literal["h5ad", "gem", "zarr", "folder"]]:
    """`(path, kind)` of an input, from its name alone: `'h5ad'` (an AnnData), `'gem'`, `'zarr'` or `'folder'`.

    Raises `FileNotFoundError` for a missing path and `ValueError` for one of no known form, both naming the path.
    """
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"{p} does not exist; pass {FORMS}"
        raise FileNotFoundError(msg)
    name = p.name.lower()
    if p.is_file() and (name.endswith(".h5ad") or name.endswith(GEM_SUFFIXES)):
        return p, "h5ad" if name.endswith(".h5ad") else "gem"
    if p.is_dir():
        return p, "zarr" if _is_zarr(p) else "folder"
    msg = f"{p}: unknown input; expected {FORMS} (GEM files end in {', '.join(GEM_SUFFIXES)})"
    raise ValueError(msg)


def read(
    path: str | os.PathLike, *, bin_size: int | None = None, image: str | os.PathLike | None = None
) -> AnnData | SpatialData:
    """Read any input the `histospace` command takes: an AnnData or a SpatialData, told apart by the path alone.

    The form of `path` decides what is returned:

    - `*.h5ad`: an :class:`~anndata.AnnData` (:func:`anndata.read_h5ad`);
    - a SpatialData `*.zarr` store: a :class:`~spatialdata.SpatialData` (:func:`spatialdata.read_zarr`);
    - a Visium HD Space Ranger output folder (with `binned_outputs/`): a SpatialData with the table of `bin_size` µm
      bins and the H&E (`spatialdata_io.visium_hd`);
    - a SAW (Stereo-seq) output folder (with a `.gef` file): a SpatialData (`spatialdata_io.stereoseq`);
    - a Visium Space Ranger output folder (`spatial/` and `filtered_feature_bc_matrix.h5`): a SpatialData
      (`spatialdata_io.visium`);
    - a Stereo-seq GEM file (`.gem`, `.txt` or `.tsv`, gzipped or not): a SpatialData of `bin_size` DNB square bins
      (:func:`histospace.io.read_gem`), with `image` attached.

    Every histospace function takes either result (with a SpatialData, `table_key=` names the table when there are
    several).

    Parameters
    ----------
    path
        The file or folder.
    bin_size
        Visium HD folder: the bin side in µm (default 8); GEM file: the bin side in DNB (default 50). Not used by the
        other forms (a warning says so).
    image
        GEM file only: a full-resolution H&E image file attached to the bins with :func:`histospace.io.add_image`
        (its µm per pixel read from the file). The other forms carry their own image; give an AnnData's H&E to
        :func:`histospace.pp.image_features` as `img=`, and attach one to a SpatialData with
        :func:`histospace.io.add_image`.

    Returns
    -------
    The :class:`~anndata.AnnData` or :class:`~spatialdata.SpatialData` read from `path` (see the table above).

    Raises
    ------
    FileNotFoundError
        `path` does not exist.
    ValueError
        `path` is of no known form, a file that its form's reader cannot read, or `image` was given for a form other
        than a GEM file.
    """
    p, kind = input_kind(path)
    if image is not None and kind != "gem":
        msg = (
            f"image={str(image)!r}: only a GEM file is read with an image, and {p} is not one. Pass an AnnData's H&E to "
            "`hs.pp.image_features(adata, img=...)` or attach one to a SpatialData with `hs.io.add_image`."
        )
        raise ValueError(msg)
    if kind == "h5ad":
        _unused_bin_size(bin_size, p)
        import anndata as ad

        try:
            return ad.read_h5ad(p)
        except Exception as e:  # h5py and anndata raise many types for files that are not AnnData HDF5
            msg = f"{p} is not an .h5ad file anndata can read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            raise ValueError(msg) from e
    if kind == "gem":
        from ._add_image import add_image
        from ._gem import read_gem

        sdata = read_gem(p, bin_size=bin_size or 50)
        if image is not None:
            add_image(sdata, image)
        return sdata
    if kind == "zarr":
        _unused_bin_size(bin_size, p)
        import spatialdata as sd

        try:
            return sd.read_zarr(p)
        except Exception as e:  # zarr and spatialdata raise many types for stores that are not SpatialData
            msg = f"{p} is not a SpatialData .zarr store spatialdata can read ({type(e).__name__}: {e})"
            raise ValueError(msg) from e
    return _read_platform_folder(p, bin_size=bin_size)


def _unused_bin_size(bin_size: int | None, p: Path, *, stacklevel: int = 3) -> None:
    if bin_size is not None:
        msg = f"bin_size={bin_size} is not used for {p}: only a Visium HD folder and a GEM file are binned"
        warnings.warn(msg, UserWarning, stacklevel=stacklevel)


def _read_platform_folder(p: Path, *, bin_size: int | None) -> SpatialData:
    """A Space Ranger (Visium HD or Visium) or SAW output folder, read with spatialdata-io."""
    from histospace._utils._deps import quiet_import

    sio = quiet_import("spatialdata_io")
    files = [f.name for f in p.rglob("*") if f.is_file()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if (p / "binned_outputs").is_dir() or any(f.endswith("feature_slice.h5") for f in files):
            return sio.visium_hd(p, bin_size=bin_size or 8, load_segmentations_only=False)
        is_saw = any(f.endswith(".gef") for f in files)
        is_visium = (
            any(f.endswith("filtered_feature_bc_matrix.h5") for f in files) and (p / SPACERANGER_SPATIAL_DIR).is_dir()
        )
        if is_saw or is_visium:
            _unused_bin_size(bin_size, p, stacklevel=4)
            return sio.stereoseq(p) if is_saw else sio.visium(p)
    msg = (
        f"{p} is not a Visium HD, SAW (Stereo-seq) or Visium output folder (no binned_outputs/, .gef file or "
        "spatial/ with filtered_feature_bc_matrix.h5); pass the folder Space Ranger or SAW wrote, or a SpatialData .zarr"
    )
    raise ValueError(msg)
