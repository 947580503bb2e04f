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
