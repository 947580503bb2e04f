"""Feature engines of the wing and the feature slot.

:mod:`._patch` (crop, resize, encode per spot) and :mod:`._dense` (one trunk pass over the tissue, window means;
steps in `_dense_trunk`, `_dense_resample`, `_dense_windows`, `_dense_engine`) side by side, run over the slides by
:mod:`._compute` with the on-disk cache :mod:`._cache`; :mod:`._slot` writes, reads and compares `obsm[key]` and its
provenance `uns[key]['params']`; :mod:`._recipes` holds the recipes of `pp.image_features(preset=...)`.
"""
