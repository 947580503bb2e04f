"""Default slot names read and written by histospace (one place, so every function agrees on them)."""

from __future__ import annotations

#: `adata.obsm`: spot centres in full-resolution image pixels (x, y); scanpy/squidpy's name
SPATIAL_KEY = "spatial"
#: `adata.uns`: per-library images, scale factors and metadata (scanpy/squidpy Visium layout)
SPATIAL_UNS_KEY = "spatial"
#: `adata.obs`: the slide each spot belongs to
LIBRARY_KEY = "library_id"
#: `adata.obsm` / `adata.uns`: image features from `pp.image_features` (squidpy's name)
FEATURES_KEY = "img_features"
#: Space Ranger's folder of images, scale factors and spot positions (a file layout, not a slot)
SPACERANGER_SPATIAL_DIR = "spatial"
#: `adata.obsp`: spatial graph (squidpy's layout)
CONNECTIVITIES_KEY = "spatial_connectivities"
#: `adata.obsm`: StereoMM latent (`X_` prefix so that `sc.pp.neighbors(use_rep=...)` works)
STEREOMM_KEY = "X_stereomm"
#: `adata.obs`: spatial domains of the StereoMM latent
DOMAIN_KEY = "stereomm_domain"
#: `adata.obsm` / `adata.layers` / `adata.uns`: mclSTExp predictions
MCLSTEXP_KEY = "mclstexp"
#: `adata.obs` columns with integer array coordinates (row, column)
POSITION_KEYS = ("array_row", "array_col")
#: the two names of `POSITION_KEYS`
ROW_KEY, COL_KEY = POSITION_KEYS


# ---- spatial graph keys (squidpy's `{key}_connectivities` rule) ------------------------------------------------------
#: base name of the spatial graph: `pp.spatial_graph(key_added=...)` and squidpy's `key_added`
GRAPH_KEY = "spatial"


def graph_keys(key_added: str = GRAPH_KEY) -> tuple[str, str, str]:
    """`(connectivities, distances, uns)` keys of the spatial graph named `key_added`, as squidpy names them.

    `graph_keys('spatial')` is `('spatial_connectivities', 'spatial_distances', 'spatial_neighbors')`.
    """
    return f"{key_added}_connectivities", f"{key_added}_distances", f"{key_added}_neighbors"


def connectivity_key_in(obsp, key: str) -> str:
    """The `obsp` key of a graph named by the user: `key` itself when present (`'x_connectivities'`, or any matrix),
    else `graph_keys(key)[0]` when present (the base name given to `pp.spatial_graph(key_added='x')`), else `key`
    (so that the reader's own "not found" error names what the user passed).
    """  # noqa: D205
    if key in obsp:
        return key
    long = graph_keys(key)[0]
    return long if long in obsp else key


#: `adata.obsp` / `adata.uns` keys of the default spatial graph (`graph_keys()`); `CONNECTIVITIES_KEY` is the first
_, DISTANCES_KEY, NEIGHBORS_KEY = graph_keys()
