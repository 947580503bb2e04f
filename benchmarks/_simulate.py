"""Simulated Visium-like tissue of any size, for the scaling benchmark.

Spots on a hexagonal grid (Visium layout: array rows, columns with the offset of odd rows), seven curved layer
bands as spatial domains, Poisson counts (sparse) with domain-specific gene means, image features that are a noisy
function of the domain, and the 6-neighbour hex graph in squidpy's layout (built directly, in O(n)).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def hex_graph(rows: np.ndarray, cols: np.ndarray) -> sp.csr_matrix:
    """6-neighbour graph of spots at Visium array positions (`cols` step 2 within a row, offset on odd rows)."""
    n = rows.size
    key = rows.astype(np.int64) * (cols.max() + 4) + cols
    order = np.argsort(key)
    skey = key[order]
    src, dst = [], []
    for dr, dc in [(0, 2), (0, -2), (1, 1), (1, -1), (-1, 1), (-1, -1)]:
        k2 = (rows + dr).astype(np.int64) * (cols.max() + 4) + (cols + dc)
        pos = np.searchsorted(skey, k2)
        pos = np.minimum(pos, n - 1)
        ok = skey[pos] == k2
        src.append(np.flatnonzero(ok))
        dst.append(order[pos[ok]])
    s, d = np.concatenate(src), np.concatenate(dst)
    return sp.csr_matrix((np.ones(s.size, np.float32), (s, d)), shape=(n, n))


def simulate_tissue(
    n_spots: int, *, n_genes: int = 200, n_domains: int = 7, img_dim: int = 32, seed: int = 0
) -> ad.AnnData:
    """Return a simulated tissue of about `n_spots` spots (counts in `X`, `obsm['img_features']`, hex graph)."""
    rng = np.random.default_rng(seed)
    n_rows = int(np.ceil(np.sqrt(n_spots)))
    n_cols = int(np.ceil(n_spots / n_rows))
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    r, c = r.ravel()[:n_spots], c.ravel()[:n_spots]
    cols = 2 * c + (r % 2)
    x = cols * 0.5 * 100.0
    y = r * 100.0 * np.sqrt(3) / 2
    # curved layers: domain from a wavy distance along x
    u = (x / x.max() if x.max() > 0 else x) + 0.05 * np.sin(6 * np.pi * y / max(y.max(), 1))
    domain = np.minimum((u * n_domains).astype(int), n_domains - 1)
    means = rng.gamma(0.6, 0.25, size=(n_domains, n_genes))
    marker = rng.integers(0, n_genes, size=(n_domains, 8))
    for k in range(n_domains):
        means[k, marker[k]] *= 4
    lib = rng.lognormal(0, 0.3, size=n_spots)
    blocks = []
    for i in range(0, n_spots, 100_000):  # in blocks: no dense n x genes matrix
        lam = means[domain[i : i + 100_000]] * lib[i : i + 100_000, None]
        blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    counts = sp.vstack(blocks, format="csr")
    img = (rng.normal(size=(n_domains, img_dim))[domain] * 0.5 + rng.normal(size=(n_spots, img_dim))).astype(np.float32)
    obs = pd.DataFrame(
        {"array_row": r, "array_col": cols, "domain": pd.Categorical(domain.astype(str))},
        index=[f"s{i}" for i in range(n_spots)],
    )
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    adata.obsm["spatial"] = np.column_stack([x, y])
    adata.obsm["img_features"] = img.astype(np.float32)
    g = hex_graph(r, cols)
    adata.obsp["spatial_connectivities"] = g
    adata.obsp["spatial_distances"] = g * 100.0
    adata.uns["spatial_neighbors"] = {
        "connectivities_key": "spatial_connectivities",
        "distances_key": "spatial_distances",
        "params": {"n_neighbors": 6, "coord_type": "grid", "radius": 0, "transform": "none"},
    }
    return adata
