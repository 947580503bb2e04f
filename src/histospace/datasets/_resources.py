"""Files that go with the datasets: the her2st gene panel and the MobileNetV2 ImageNet weights of the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

from ._download import locate_dataset

__all__ = ["her2st_genes", "mobilenet_v2_weights"]

#: the 785-gene panel of HisToGene / Hist2ST / mclSTExp on her2st, inside the her2st folder
HER2ST_GENES_FILE = Path("gene_lists") / "her2st_785genes_hist2st.txt"
#: the ImageNet MobileNetV2 weights (Coral's TF model, converted to torchvision keys), inside the data root
MOBILENET_V2_FILE = Path("mobilenet_v2_imagenet_coral") / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"


def _local_file(dataset: str, rel: Path, data_dir, *, what: str) -> Path:
    loc = locate_dataset(dataset, data_dir=data_dir, cache_dir=None)
    path = loc.path / rel
    if not path.is_file():
        msg = (
            f"{what} not found: {path} does not exist (looked in {loc.describe()}). This file is not downloaded: pass "
            f"`data_dir=` (or set $HISTOSPACE_DATA) to the data folder that holds `{dataset}/{rel.as_posix()}`."
        )
        raise FileNotFoundError(msg)
    return path


def her2st_genes(*, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The 785-gene her2st panel of HisToGene, Hist2ST and mclSTExp, in the file's order.

    Read from `her2st/gene_lists/her2st_785genes_hist2st.txt` in `data_dir`, else `$HISTOSPACE_DATA` (either the data
    root or the `her2st` folder itself), the panel taken from `biomed-AI/Hist2ST` (`data/her_hvg_cut_1000.npy`).

    Parameters
    ----------
    data_dir
        The data folder; default `$HISTOSPACE_DATA`.

    Returns
    -------
    The gene symbols, one per line of the file.

    Raises
    ------
    FileNotFoundError
        The file is not in the data folder (the message names the path looked at and the fix).
    """
    path = _local_file("her2st", HER2ST_GENES_FILE, data_dir, what="the her2st gene panel")
    return [g.strip() for g in path.read_text().split() if g.strip()]


def mobilenet_v2_weights(*, data_dir: str | os.PathLike | None = None) -> Path:
    """The path of the ImageNet MobileNetV2 weights that the demo, benchmarks and tutorials use, for `weights=`.

    Coral's ImageNet MobileNetV2 converted to torchvision's keys (input `x / 127.5 - 1`, which
    :func:`histospace.pp.image_features` knows from the file), read from
    `weights/mobilenet_v2_imagenet_coral/mobilenet_v2_imagenet_fp32_torchvision_keys.pt` in `data_dir`, else
    `$HISTOSPACE_DATA`. On a connected machine, `weights='imagenet'` downloads torchvision's own weights instead.

    Parameters
    ----------
    data_dir
        The data folder; default `$HISTOSPACE_DATA`.

    Returns
    -------
    The path of the weights file, to pass as `weights=` to :func:`histospace.pp.image_features`.

    Raises
    ------
    FileNotFoundError
        The file is not in the data folder (the message names the path looked at and the fix).
    """
    return _local_file("weights", MOBILENET_V2_FILE, data_dir, what="the MobileNetV2 ImageNet weights")
