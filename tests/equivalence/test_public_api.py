"""Every public function on an AnnData and on the equivalent SpatialData gives the same result (issue #21, item 5).

Each test runs one public function (or a model's fit/predict entry point) on both forms of the slide of
`conftest.py` with the same options and seed, and compares what was written: `obs`, `obsm`, `obsp`, `layers` and
`X` bit for bit, the `uns[key]` record (its `params` up to the names of the SpatialData's elements), returned
arrays and models, and for plots the drawn data (image extent, spot centres and sizes, colours, the figure's pixels).
A difference that is a defect of the library is kept as a `strict` xfail naming it, for the lead to fix.
`test_every_public_function_has_a_case` fails when a public function gets neither a case nor a reasoned skip.
"""

from __future__ import annotations

import inspect

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData
from torch import nn

import histospace as hs

from .conftest import assert_same_params, assert_same_table, assert_same_value

#: the public names each test covers (`namespace.name`, `models.Class.method` for the model classes' methods)
COVERED: set[str] = set()


def covers(*names: str):
    """Record the public functions a test runs on both forms (read by the guard test)."""

    def deco(f):
        COVERED.update(names)
        return f

    return deco


#: public functions without an AnnData/SpatialData pair to compare, with the reason
SKIP = {
    "pp.clear_feature_cache": "no data input: empties the on-disk feature cache folder",
    "pp.feature_cache_dir": "no data input: returns the feature cache folder",
    "pl.gene_correlation": "draws mclstexp_cross_validate's result dict (or per-gene scores), not an AnnData/SpatialData",
    "pl.top_genes": "draws mclstexp_cross_validate's result dict, not an AnnData/SpatialData",
    "io.read": "reader: a path in, an AnnData (.h5ad) or a SpatialData out; no data input (tests/io/test_read.py)",
    "io.read_gem": "reader: a GEM file path in, a SpatialData out; there is no AnnData/SpatialData input",
    "io.read_stereopy": "converter: stereopy's AnnData (or .h5ad) in, a SpatialData out; no SpatialData input form",
    "io.add_image": "SpatialData only: adds an image element (an AnnData has no elements); tests/io/test_add_image.py",
    "io.microns_per_unit": "SpatialData only: reads a coordinate system's µm per unit (sdata.attrs); tests/io",
    "io.set_microns_per_unit": "SpatialData only: writes a coordinate system's µm per unit (sdata.attrs); tests/io",
    "io.rebin": "SpatialData only: adds a new table and shapes element of larger bins; tests/io/test_rebin.py",
    "tl.predict_cohort": "slide files in, one SpatialData zarr per slide out; no data input (tests/tl/test_cohort.py)",
}

NAMESPACES = ("pp", "tl", "pl", "io", "models")

STEREOMM = {"hidden": [8], "n_latent": 4, "max_epochs": 2, "n_models": 1, "device": "cpu", "progress_bar": False}
MCL_MODEL = {"n_heads": 1, "dim_head": 8, "n_layers": 1, "projection_dim": 16}
MCL_TRAIN = {"max_epochs": 1, "n_models": 1, "device": "cpu", "progress_bar": False}
#: a tiny deterministic encoder: the 16-px patch averaged over 4 x 4 blocks (48 numbers that are the patch's pixels)
TINY = {"encoder": nn.Sequential(nn.AvgPool2d(4), nn.Flatten()), "weights": None, "input_size": 16}
FEAT = {**TINY, "progress_bar": False, "device": "cpu"}
#: for functions that read only the table (no positions, no image): one layout is enough
TABLE_ONLY = pytest.mark.parametrize("pair", ["legacy"], indirect=True)


def _same_latent(pair, key: str = "X_stereomm") -> None:
    """The same random latent in both forms (so that the functions after StereoMM start from equal inputs)."""
    z = np.random.default_rng(0).normal(size=(pair.adata.n_obs, 4)).astype(np.float32)
    pair.adata.obsm[key] = z
    pair.table.obsm[key] = z.copy()


def _same_domains(pair, key: str = "stereomm_domain") -> None:
    for t in (pair.adata, pair.table):
        t.obs[key] = t.obs["domain"].copy()


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def _image_extents(ax) -> list:
    return [tuple(float(v) for v in im.get_extent()) for im in ax.images]


# ---- the guard -----------------------------------------------------------------------------------------------------


def _public_names() -> set[str]:
    """Every public function of the namespaces, plus the model classes' methods that take data (`adata=`)."""
    names = set()
    for ns in NAMESPACES:
        mod = getattr(hs, ns)
        for name in mod.__all__:
            obj = getattr(mod, name)
            names.add(f"{ns}.{name}")
            if inspect.isclass(obj):
                for attr, member in inspect.getmembers(obj, callable):
                    if attr.startswith("_"):
                        continue
                    try:
                        params = inspect.signature(member).parameters
                    except (TypeError, ValueError):  # pragma: no cover - builtins
                        continue
                    if "adata" in params:
                        names.add(f"{ns}.{name}.{attr}")
    return names


def test_every_public_function_has_a_case():
    public = _public_names()
    missing = sorted(public - COVERED - set(SKIP))
    assert not missing, f"public functions with no AnnData/SpatialData equivalence case and no skip reason: {missing}"
    stale = sorted((COVERED | set(SKIP)) - public)
    assert not stale, f"cases or skips for names that are no longer public: {stale}"
    assert not COVERED & set(SKIP), f"both covered and skipped: {sorted(COVERED & set(SKIP))}"


# ---- pp ----------------------------------------------------------------------------------------------------------


@covers("pp.spatial_graph")
def test_spatial_graph_grid_of_spots(pair):
    for data in pair.forms():
        assert hs.pp.spatial_graph(data, coord_type="grid", n_neighs=4, bins=False, key_added="g") is None
    # the SpatialData names where its centres came from ("table: centres of the annotated shapes in 'lib_hires'")
    assert_same_table(pair.adata, pair.table, uns=("g_neighbors",), form_keys=("spatial_key",))


@pytest.mark.parametrize("kw", [{}, {"coord_type": "grid", "n_neighs": 4}], ids=["defaults", "grid"])
def test_spatial_graph_bins_detection(pair, kw):
    """Visium spots stay spots in both forms (the SpatialData's bin test uses the circles' diameter in its own units).

    The edges are the same; distances are in the units of the coordinates each form has: full-resolution pixels for
    the AnnData, the coordinate system's units for the SpatialData (hires pixels, half as many, in the `legacy`
    layout of spatialdata-io's `from_legacy_anndata`; full-resolution pixels in the `global` layout).
    """
    for data in pair.forms():
        hs.pp.spatial_graph(data, **kw)
    a, t = pair.adata, pair.table
    assert not a.uns["spatial_neighbors"]["params"].get("bins") and not t.uns["spatial_neighbors"]["params"].get("bins")
    assert_same_value(a.obsp["spatial_connectivities"], t.obsp["spatial_connectivities"], "connectivities")
    if pair.layout == "global" or kw:  # grid distances are ring numbers, in no unit
        assert_same_table(a, t, uns=("spatial_neighbors",), form_keys=("spatial_key",))
    else:
        np.testing.assert_allclose(t.obsp["spatial_distances"].toarray() * 2, a.obsp["spatial_distances"].toarray())


def _check_patch_params(pair, key: str) -> None:
    """The params that describe the pixel grid read: the same patch, counted in each form's pixels."""
    pa, pt = pair.adata.uns[key]["params"], pair.table.uns[key]["params"]
    # the AnnData counts in full-resolution pixels (its hires image at scale 0.5); the SpatialData in the pixels of
    # the image element (the hires image, scale 1): the same tissue
    assert pa["scale"] == 0.5 and pt["scale"] == 1.0
    assert pt["patch_size_px"] == pytest.approx(pa["patch_size_px"] * pa["scale"], rel=1e-12)
    assert pa["library_ids"] == ["lib"] and pt["library_ids"] == [pair.shapes_key]  # slide id vs the shapes element
    assert pt["image_key"] == pair.image_key and pt["shapes_key"] == pair.shapes_key and pt["table_key"] == "table"


FORM_FEATURE_PARAMS = ("spatial_key", "library_ids", "libraries", "image", "scale", "patch_size_px")


@covers("pp.image_features")
@pytest.mark.parametrize(
    ("method", "encoder"),
    [
        ("patch", TINY["encoder"]),
        ("dense", nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())),
    ],
    ids=["patch", "dense"],
)
def test_image_features(pair, method, encoder):
    torch.manual_seed(0)
    kw = {**FEAT, "encoder": encoder, "method": method, "key_added": "f"}
    for data in pair.forms():
        assert hs.pp.image_features(data, **kw) is None
    assert pair.adata.obsm["f"].dtype == np.float32 and np.isfinite(pair.adata.obsm["f"]).all()
    assert_same_table(pair.adata, pair.table, uns=("f",), form_keys=FORM_FEATURE_PARAMS)
    _check_patch_params(pair, "f")


@covers("pp.tile_image")
def test_tile_image(pair):
    """The H&E image as an array and as the only image of a SpatialData: the same tiles at the same places."""
    import spatialdata as sd

    img = pair.adata.uns["spatial"]["lib"]["images"]["hires"]
    tiles = hs.pp.tile_image(img, tile_size=64, tissue_fraction=0.3)
    s = sd.SpatialData(images={"he": pair.sdata.images[pair.image_key]})
    assert hs.pp.tile_image(s, tile_size=64, tissue_fraction=0.3) is None
    t = s.tables["tiles"]
    assert tiles.n_obs > 10 and list(tiles.obs_names) == list(t.obs_names)
    for c in tiles.obs.columns:
        assert_same_value(tiles.obs[c].to_numpy(), t.obs[c].to_numpy(), f"obs[{c!r}]")
    assert_same_value(tiles.obsm["spatial"], t.obsm["spatial"], "obsm['spatial']")
    squares = s.shapes["tiles_squares"].geometry
    np.testing.assert_array_equal(np.column_stack([squares.centroid.x, squares.centroid.y]), tiles.obsm["spatial"])
    np.testing.assert_allclose(
        np.sqrt(squares.area), tiles.uns["spatial"]["he"]["scalefactors"]["spot_diameter_fullres"]
    )
    assert_same_params(tiles.uns["tile_image"]["params"], t.uns["tile_image"]["params"], "uns['tile_image']['params']")
    assert t.uns["tile_image"]["params"]["image_key"] == "he"


# ---- tl ----------------------------------------------------------------------------------------------------------


@covers("tl.stereomm")
@TABLE_ONLY
def test_stereomm(pair):
    for data in pair.forms():
        assert hs.tl.stereomm(data, **STEREOMM) is None
    assert pair.adata.obsm["X_stereomm"].shape == (pair.adata.n_obs, 4)
    assert_same_table(pair.adata, pair.table, uns=("stereomm",))


@covers("tl.domains")
@TABLE_ONLY
def test_domains(pair):
    _same_latent(pair)
    for data in pair.forms():
        assert hs.tl.domains(data, n_clusters=3, n_models=1, n_init=2) is None
    assert pair.adata.obs["stereomm_domain"].nunique() == 3
    assert_same_table(pair.adata, pair.table, uns=("stereomm_domain",))


def _same_model(m1, m2) -> None:
    s1, s2 = m1.module.state_dict(), m2.module.state_dict()
    assert set(s1) == set(s2)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), f"module weight {k} differs"
    assert m1.genes == m2.genes
    assert_same_value(m1.reference_expression, m2.reference_expression, "reference_expression")
    assert_same_value(m1.history, m2.history, "history")


@covers("tl.mclstexp_train")
@TABLE_ONLY
def test_mclstexp_train(pair):
    models = [hs.tl.mclstexp_train(d, n_top_genes=20, model_kwargs=MCL_MODEL, **MCL_TRAIN) for d in pair.forms()]
    _same_model(*models)
    assert_same_table(pair.adata, pair.table)  # nothing written to either


@pytest.fixture(scope="module")
def mcl_model(make_slide):
    """mclSTExp trained on the slide's AnnData (the same data as both forms of `pair`)."""
    from .conftest import N_SIDE

    return hs.tl.mclstexp_train(make_slide(n_side=N_SIDE), n_top_genes=20, model_kwargs=MCL_MODEL, **MCL_TRAIN)


def _gene_scores(model) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n = len(model.genes)
    return pd.DataFrame(
        {"pcc": rng.uniform(-0.2, 0.8, n), "mean_expression": rng.uniform(0.1, 5, n), "fdr": rng.uniform(0, 0.2, n)},
        index=model.genes,
    )


@covers("tl.mclstexp_predict")
@TABLE_ONLY
def test_mclstexp_predict(pair, mcl_model):
    for data in pair.forms():
        out = hs.tl.mclstexp_predict(
            data, model=mcl_model, n_neighbors=5, gene_scores=_gene_scores(mcl_model), progress_bar=False
        )
        assert out is None
    assert pair.adata.obsm["mclstexp"].shape == (pair.adata.n_obs, len(mcl_model.genes))
    assert_same_table(pair.adata, pair.table, uns=("mclstexp",))


@covers("tl.mclstexp_cross_validate")
@TABLE_ONLY
def test_mclstexp_cross_validate(pair):
    for t in (pair.adata, pair.table):  # two "slides": left and right half
        t.obs["section"] = np.where(t.obs["array_col"].to_numpy() < 6, "s1", "s2")
    kw = {
        "groupby": "section",
        "genes": list(pair.adata.var_names[:10]),
        "model_kwargs": MCL_MODEL,
        "train_kwargs": {"max_epochs": 1, "n_models": 1, "device": "cpu"},
        "predict_kwargs": {"n_neighbors": 5},
        "baselines": ("knn",),
        "knn_k": 5,
    }
    ra, rs = (hs.tl.mclstexp_cross_validate(d, **kw) for d in pair.forms())
    assert {"summary", "pearson", "gene_scores", "params"} <= set(ra)
    for r in (ra, rs):
        r["params"].pop("table_key", None)  # the SpatialData's table
        for k, v in r.items():  # wall-clock seconds of each fold and method differ from run to run
            if isinstance(v, pd.DataFrame):
                r[k] = v.drop(columns=[c for c in v.columns if str(c).endswith("_time_s")])
    assert_same_value(ra, rs, "result")
    assert_same_table(pair.adata, pair.table)


# ---- models --------------------------------------------------------------------------------------------------------


@covers("models.StereoMM", "models.StereoMM.load")
@TABLE_ONLY
def test_stereomm_model(pair, tmp_path):
    kw = {k: STEREOMM[k] for k in ("max_epochs", "n_models", "device", "progress_bar")}
    ma, ms = (hs.models.StereoMM(d, hidden=[8], n_latent=4).train(**kw) for d in pair.forms())
    za, zs = ma.get_latent_representation(), ms.get_latent_representation()
    assert_same_value(za, zs, "latent")
    assert_same_value(ma.history, ms.history, "history")
    ms.save(tmp_path / "m")
    for data in pair.forms():
        again = hs.models.StereoMM.load(tmp_path / "m", adata=data)
        assert_same_value(again.get_latent_representation(), zs, f"latent after load with {type(data).__name__}")
    assert_same_table(pair.adata, pair.table)


@TABLE_ONLY
def test_stereomm_tiles_follow_the_shapes(pair):
    """Mini-batch tiles of a SpatialData are cut from the centres of its shapes (as pp and pl read them), not from
    whatever the table's `obsm['spatial']` holds: scrambling that slot leaves the model unchanged."""
    kw = {k: STEREOMM[k] for k in ("max_epochs", "n_models", "device", "progress_bar")} | {"batch_size": 40}
    za = hs.models.StereoMM(pair.sdata, hidden=[8], n_latent=4).train(**kw).get_latent_representation()
    rng = np.random.default_rng(0)
    pair.table.obsm["spatial"] = pair.table.obsm["spatial"][rng.permutation(pair.table.n_obs)]
    zs = hs.models.StereoMM(pair.sdata, hidden=[8], n_latent=4).train(**kw).get_latent_representation()
    assert_same_value(za, zs, "latent")


@covers("models.MclSTExp")
@TABLE_ONLY
def test_mclstexp_model(pair):
    ma, ms = (hs.models.MclSTExp(d, n_top_genes=20, **MCL_MODEL).train(**MCL_TRAIN) for d in pair.forms())
    _same_model(ma, ms)
    assert_same_table(pair.adata, pair.table)


@covers("models.MclSTExp.predict")
@TABLE_ONLY
def test_mclstexp_model_predict(pair, mcl_model):
    pa, ps = (mcl_model.predict(d, n_neighbors=5, return_std=True) for d in pair.forms())
    assert_same_value(pa, ps, "predict")


@covers("models.MclSTExp.get_image_embedding")
@TABLE_ONLY
def test_mclstexp_model_embedding(pair, mcl_model):
    ea, es = (mcl_model.get_image_embedding(d) for d in pair.forms())
    assert_same_value(ea, es, "embedding")


@covers("models.MclSTExp.check_query")
@TABLE_ONLY
def test_mclstexp_model_check_query(pair, mcl_model):
    for data in pair.forms():
        assert mcl_model.check_query(data) is None


@pytest.fixture(scope="module")
def mcl_model_um(make_slide):
    """mclSTExp whose reference features come from a named encoder at a known µm scale (1 µm per full-res px).

    The model rebuilds its reference's encoder by name, so no tiny module here: mobilenet_v2 at 16 px (its first
    use imports torchvision, the most of this fixture's time).
    """
    from .conftest import N_SIDE

    ref = make_slide(n_side=N_SIDE)
    ref.uns["spatial"]["lib"]["metadata"]["spot_diameter_um"] = 55.0  # = spot_diameter_fullres: 1 µm per pixel
    hs.pp.image_features(ref, encoder="mobilenet_v2", weights=None, input_size=16, progress_bar=False, device="cpu")
    return hs.tl.mclstexp_train(ref, n_top_genes=20, model_kwargs=MCL_MODEL, **MCL_TRAIN)


@covers("models.MclSTExp.query_features")
@TABLE_ONLY
def test_mclstexp_query_features(pair, mcl_model_um):
    assert mcl_model_um.feature_settings["patch_size_um"] == pytest.approx(165.0)
    # `mpp`: µm per full-resolution pixel of the AnnData, per pixel of the SpatialData's image (the hires image)
    fa, ua = mcl_model_um.query_features(pair.adata, mpp=1.0)
    fs, us = mcl_model_um.query_features(
        pair.sdata, mpp=1.0 / pair.adata.uns["spatial"]["lib"]["scalefactors"]["tissue_hires_scalef"]
    )
    assert fa.shape == (pair.adata.n_obs, 1280)
    assert_same_value(fa, fs, "features")
    assert_same_params(ua["params"], us["params"], "uns entry", form_keys=FORM_FEATURE_PARAMS)
    assert_same_table(pair.adata, pair.table)  # nothing written


# ---- pl ------------------------------------------------------------------------------------------------------------


@covers("pl.training_history")
@TABLE_ONLY
def test_training_history(pair):
    loss = np.linspace(2.0, 1.0, 5)
    for t in (pair.adata, pair.table):
        t.uns["stereomm"] = {"params": {"max_epochs": 5}, "history": {"loss": loss.copy(), "kl": loss / 10}}
    axes = [hs.pl.training_history(d, key="stereomm", show=False) for d in pair.forms()]
    lines = [
        [(ln.get_label(), np.asarray(ln.get_xdata()), np.asarray(ln.get_ydata())) for ln in ax.lines] for ax in axes
    ]
    assert len(lines[0]) == 2
    assert_same_value(lines[0], lines[1], "lines")
    assert axes[0].get_yscale() == axes[1].get_yscale()
    assert_same_value(_pixels(axes[0].figure), _pixels(axes[1].figure), "figure pixels")
    plt.close("all")


@covers("pl.gene_predictability")
@TABLE_ONLY
def test_gene_predictability(pair, mcl_model):
    for data in pair.forms():
        hs.tl.mclstexp_predict(
            data, model=mcl_model, n_neighbors=5, gene_scores=_gene_scores(mcl_model), progress_bar=False
        )
    axes = [hs.pl.gene_predictability(d, n_labels=3, show=False) for d in pair.forms()]
    offsets = [[np.asarray(c.get_offsets()) for c in ax.collections] for ax in axes]
    assert offsets[0] and len(offsets[0][0]) > 0
    assert_same_value(offsets[0], offsets[1], "points")
    assert [t.get_text() for t in axes[0].texts] == [t.get_text() for t in axes[1].texts]
    assert_same_value(_pixels(axes[0].figure), _pixels(axes[1].figure), "figure pixels")
    plt.close("all")


def _drawn_spots(ax) -> dict:
    """What a domain/expression panel shows: image extents, spot centres and diameters (in the axes' data units)."""
    from matplotlib.collections import EllipseCollection, PatchCollection

    out = {"xlim": ax.get_xlim(), "ylim": ax.get_ylim(), "extent": _image_extents(ax)}
    out["image_shape"] = [im.get_array().shape for im in ax.images]
    for c in ax.collections:
        if isinstance(c, PatchCollection):  # squidpy: one circle path per spot, in data units
            ext = np.array([p.get_extents().bounds for p in c.get_paths()])
            out["centres"] = ext[:, :2] + ext[:, 2:] / 2
            out["diameters"] = ext[:, 2]
            out["colours"] = np.asarray(c.get_facecolors())
        elif isinstance(c, EllipseCollection):  # histospace's renderer: offsets and widths in data units
            out["centres"] = np.asarray(c.get_offsets())
            out["diameters"] = np.broadcast_to(np.asarray(c.get_widths()), (len(out["centres"]),)).copy()
            out["colours"] = np.asarray(c.get_facecolors())
    return out


@covers("pl.domains")
def test_plot_domains_title_and_legend(pair):
    """What both forms agree on: the title and the legend's categories."""
    _same_domains(pair)
    axes = [hs.pl.domains(d, show=False) for d in pair.forms()]
    assert axes[0].get_title() == axes[1].get_title() == "stereomm_domain"
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]
    assert legends[0] == legends[1] == ["D0", "D1", "D2"]
    plt.close("all")


@covers("pl.domains")
def test_plot_domains_colours_and_spots(pair):
    """The same picture: squidpy draws the AnnData, histospace's renderer the SpatialData, over the whole image in its
    pixels; limits, image, colours bit for bit, spot centres and diameters to float precision (squidpy derives them
    from circle paths).
    """
    _same_domains(pair)
    drawn = [_drawn_spots(hs.pl.domains(d, show=False)) for d in pair.forms()]
    plt.close("all")
    assert_same_value(pair.adata.uns["stereomm_domain_colors"], pair.table.uns["stereomm_domain_colors"], "colours")
    for name in ("centres", "diameters"):
        np.testing.assert_allclose(drawn[0].pop(name), drawn[1].pop(name), rtol=1e-12, atol=1e-9, err_msg=name)
    assert_same_value(drawn[0], drawn[1], "drawn spots")


def _pvo_panels(pair, model) -> tuple[list[dict], list[dict], list[np.ndarray]]:
    """Predict both forms and draw `pl.predicted_vs_observed` of two genes: the panels of each form and the pixels."""
    for data in pair.forms():
        hs.tl.mclstexp_predict(data, model=model, n_neighbors=5, progress_bar=False)
    figs = [hs.pl.predicted_vs_observed(d, genes=model.genes[:2], show=False) for d in pair.forms()]
    pa, ps = ([_drawn_spots(ax) | {"title": ax.get_title()} for ax in f.axes if ax.images] for f in figs)
    # the one thing the forms name differently: the library (the AnnData's library id, the SpatialData's shapes element)
    assert [f.get_suptitle() for f in figs] == ["lib", pair.shapes_key]
    for f in figs:
        f.suptitle("")
    pixels = [_pixels(f) for f in figs]
    plt.close("all")
    return pa, ps, pixels


@covers("pl.predicted_vs_observed")
def test_predicted_vs_observed_values(pair, mcl_model):
    """What both forms agree on: the panels, their titles and the colours of each spot (the values drawn)."""
    pa, ps, _ = _pvo_panels(pair, mcl_model)
    assert len(pa) == len(ps) == 4
    for a, s in zip(pa, ps, strict=True):
        assert a["title"] == s["title"]
        assert_same_value(a["colours"], s["colours"], f"colours of {a['title']!r}")
        # the same spots over the same image pixels: centres counted in pixels of the drawn image
        for p in (a, s):
            x0, x1, y0, y1 = p["extent"][0]
            h, w = p["image_shape"][0][:2]
            p["in_image"] = (p["centres"] - [x0, y1]) / [(x1 - x0) / w, (y0 - y1) / h]
        np.testing.assert_allclose(a["in_image"], s["in_image"], rtol=0, atol=1e-9)


@covers("pl.predicted_vs_observed")
def test_predicted_vs_observed_figure(pair, mcl_model):
    pa, ps, pixels = _pvo_panels(pair, mcl_model)
    for a, s in zip(pa, ps, strict=True):
        assert_same_value(a, s, f"panel {a['title']!r}")
    assert_same_value(pixels[0], pixels[1], "figure pixels")


# ---- either form on its own: copy=True and errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("func", "kw", "written"),
    [
        (hs.pp.spatial_graph, {"coord_type": "grid", "n_neighs": 4, "key_added": "g"}, ("obsp", "g_connectivities")),
        (hs.pp.image_features, {**FEAT, "key_added": "f"}, ("obsm", "f")),
        (
            hs.tl.domains,
            {"use_rep": "img_features", "n_clusters": 3, "n_models": 1, "n_init": 2},
            ("obs", "img_features_domain"),
        ),
    ],
    ids=["spatial_graph", "image_features", "domains"],
)
def test_copy_returns_the_input_form_and_leaves_it(form, func, kw, written):
    data, table = form
    slot, key = written
    before = {s: set(getattr(table, s)) for s in ("obs", "obsm", "obsp", "uns")}
    out = func(data, copy=True, **kw)
    assert type(out) is type(data)
    out_table = out if isinstance(out, AnnData) else out.tables["table"]
    assert key in (out_table.obs.columns if slot == "obs" else getattr(out_table, slot))
    assert {s: set(getattr(table, s)) for s in before} == before


def _slots(t: AnnData) -> dict:
    return {
        s: sorted(map(str, getattr(t, s).keys() if s != "obs" else t.obs.columns))
        for s in ("obs", "obsm", "obsp", "uns")
    }


ERRORS = {
    "pp.spatial_graph": (lambda d: hs.pp.spatial_graph(d, n_neighs=0), ValueError),
    "pp.image_features": (lambda d: hs.pp.image_features(d, input_size=0, progress_bar=False), ValueError),
    "tl.stereomm": (lambda d: hs.tl.stereomm(d, features_key="nope", **STEREOMM), KeyError),
    "tl.domains": (lambda d: hs.tl.domains(d, use_rep="nope"), KeyError),
    "tl.mclstexp_train": (lambda d: hs.tl.mclstexp_train(d, features_key="nope", progress_bar=False), KeyError),
    "tl.mclstexp_cross_validate": (lambda d: hs.tl.mclstexp_cross_validate(d, groupby="nope"), KeyError),
    "pl.training_history": (lambda d: hs.pl.training_history(d, key="nope", show=False), KeyError),
    "pl.predicted_vs_observed": (lambda d: hs.pl.predicted_vs_observed(d, genes=["gene1"], show=False), KeyError),
    "pl.gene_predictability": (lambda d: hs.pl.gene_predictability(d, show=False), KeyError),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_are_the_same_and_write_nothing(pair, name):
    """A bad argument raises the same exception with the same message in both forms, before anything is written."""
    func, exc = ERRORS[name]
    before = [_slots(pair.adata), _slots(pair.table)]
    messages = []
    for data in pair.forms():
        with pytest.raises(exc) as info:
            func(data)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert [_slots(pair.adata), _slots(pair.table)] == before


def test_plot_domains_error_names_the_table(pair):
    """The one message that differs, on purpose: with a SpatialData it names the table's column."""
    messages = []
    for data in pair.forms():
        with pytest.raises(KeyError, match=r"obs\['nope'\]` not found; run `hs.tl.domains") as info:
            hs.pl.domains(data, key="nope", show=False)
        messages.append(str(info.value))
    assert "`adata.obs['nope']`" in messages[0] and "`sdata.tables['table'].obs['nope']`" in messages[1]
