"""Shared fixtures: a tiny synthetic Visium-like AnnData, and the real data directory (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

torch.set_num_threads(2)

N_SIDE = 8  # 8 x 8 = 64 spots
N_GENES = 30
PITCH = 100.0  # full-resolution pixels between spot centres
HIRES_SCALEF = 0.5


def make_adata(n_side: int = N_SIDE, n_genes: int = N_GENES, seed: int = 0, library_id: str = "lib") -> ad.AnnData:
    """Build a tiny synthetic Visium-like AnnData with three spatial domains (vertical bands).

    Counts depend on the domain, the H&E-like image has a different colour per domain, and `obsm['img_features']`
    is a noisy function of the domain, so every modality carries signal.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    n = rows.size
    domain = np.minimum(cols * 3 // n_side, 2)
    # full-resolution pixel coordinates (x = column, y = row), offset from the image border
    spatial = np.column_stack([PITCH * (cols + 1), PITCH * (rows + 1)]).astype(np.float64)

    base = rng.gamma(2.0, 2.0, size=(3, n_genes))
    base[0, : n_genes // 3] *= 6
    base[1, n_genes // 3 : 2 * n_genes // 3] *= 6
    base[2, 2 * n_genes // 3 :] *= 6
    counts = rng.poisson(base[domain]).astype(np.float32)
    counts[0, 0] += 1  # no all-zero gene by chance

    h = w = int((n_side + 1) * PITCH * HIRES_SCALEF)
    colours = np.array([[200, 120, 170], [150, 80, 150], [230, 200, 220]], dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    col_of_px = np.clip(((xx / HIRES_SCALEF) / PITCH - 1 + 0.5).astype(int), 0, n_side - 1)
    dom_px = np.minimum(col_of_px * 3 // n_side, 2)
    img = colours[dom_px] + rng.normal(0, 20, size=(h, w, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)

    feats = np.eye(3)[domain] @ rng.normal(size=(3, 16)) + 0.3 * rng.normal(size=(n, 16))

    obs = pd.DataFrame(
        {
            "array_row": rows,
            "array_col": cols,
            "domain": pd.Categorical([f"D{d}" for d in domain]),
            "library_id": pd.Categorical([library_id] * n),
        },
        index=[f"{library_id}_spot{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"gene{i}" for i in range(n_genes)])
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.obsm["spatial"] = spatial
    adata.obsm["img_features"] = feats.astype(np.float32)
    adata.uns["spatial"] = {
        library_id: {
            "images": {"hires": img},
            "scalefactors": {
                "tissue_hires_scalef": HIRES_SCALEF,
                "spot_diameter_fullres": 0.55 * PITCH,
                "fiducial_diameter_fullres": 0.9 * PITCH,
            },
            "metadata": {},
        }
    }
    return adata


@pytest.fixture
def adata() -> ad.AnnData:
    """Tiny synthetic AnnData: 64 spots, 30 genes, counts, `obsm['spatial']`, an image and `obsm['img_features']`."""
    return make_adata()


@pytest.fixture(scope="session")
def make_slide():
    """`make_adata` itself, for fixtures of other folders that need another size, seed or library id."""
    return make_adata


@pytest.fixture(scope="module")
def adata_module() -> ad.AnnData:
    """The same tiny AnnData as `adata`, shared by the tests of a module (for fixtures that train a model once)."""
    return make_adata()


@pytest.fixture
def adata_graph(adata) -> ad.AnnData:
    """`adata` with squidpy's grid graph in `obsp['spatial_connectivities']`."""
    import squidpy as sq

    sq.gr.spatial_neighbors_grid(adata, n_neighs=4)
    return adata


@pytest.fixture
def adata_two_slides() -> ad.AnnData:
    """Two tiny slides concatenated, told apart by `obs['library_id']`, each with its own image in `uns['spatial']`."""
    a = make_adata(seed=0, library_id="s1")
    b = make_adata(seed=1, library_id="s2")
    out = ad.concat([a, b], uns_merge="unique")
    out.obs["library_id"] = pd.Categorical(out.obs["library_id"])
    return out


def _find_data_dir() -> Path | None:
    env = os.environ.get("HISTOSPACE_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    for c in candidates:
        if (c / "dlpfc").is_dir() or (c / "her2st").is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory (`HISTOSPACE_DATA` or `../shared/data`); tests using it are skipped without it."""
    d = _find_data_dir()
    if d is None:
        pytest.skip("real data not found: set HISTOSPACE_DATA to the shared data folder")
    return d


@pytest.fixture(scope="session")
def mobilenet_weights(data_dir) -> Path:
    """The shared ImageNet MobileNetV2 state_dict (torchvision keys)."""
    p = data_dir / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
    if not p.exists():
        pytest.skip(f"{p} not found")
    return p


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
