"""The spatial adapter: one answer to "which table, which spots, where, in which image, at what µm".

Every `pp`, `tl`, `pl` and `models` function that needs the spots of a slide asks this package rather than reading
`uns['spatial']`, `obsm['spatial']` or a SpatialData's elements itself. Its modules (imported directly; this
``__init__`` imports nothing, so that `histospace._utils` may import the adapter without a circle):

- :mod:`histospace._spatial._uns` -- the only reader and writer of the scanpy/squidpy Visium layout
  `uns['spatial'][library_id]` (`images`, `scalefactors`, `metadata`), and the names of its slots in messages;
- :mod:`histospace._spatial._platform` -- platform recognition (Visium, Visium HD, Stereo-seq, H&E tiles, legacy
  ST): technologies, their spot sizes and grids, and the name patterns of Space Ranger and the bin readers;
- :mod:`histospace._spatial._affine` -- affine maps of `(x, y)` points and the one coordinate-system checker of a
  SpatialData;
- :mod:`histospace._spatial._images` -- the image of a slide (one lookup order) and the image element of a
  SpatialData (one choice rule);
- :mod:`histospace._spatial._slide` -- the slide record (:class:`~histospace._spatial._slide.Slide`): per library
  its spot rows and ids, centres in the image's pixel frame, spot diameter, image and µm per pixel, built from an
  AnnData or from a SpatialData with spatialdata's own helpers.
"""
