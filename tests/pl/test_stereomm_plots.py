import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

import histospace as hs


@pytest.fixture
def adata_dom(adata_graph):
    hs.tl.stereomm(adata_graph, hidden=[8], n_latent=4, max_epochs=3, device="cpu", progress_bar=False)
    hs.tl.domains(adata_graph, n_clusters=3)
    return adata_graph


def test_domains_plot(adata_dom, tmp_path):
    ax = hs.pl.domains(adata_dom, groundtruth_key="domain", show=False)
    assert "ARI" in ax.get_title()
    assert ax.get_xlabel() and ax.get_ylabel()
    assert ax.get_images(), "the H&E image is drawn under the spots"
    assert ax.get_legend() is not None or ax.figure.legends
    ax.figure.savefig(tmp_path / "domains.png")
    plt.close("all")
    ax = hs.pl.domains(adata_dom, img=False, show=False)
    assert not ax.get_images()
    plt.close("all")


def test_domains_plot_errors(adata_dom):
    with pytest.raises(KeyError, match="hs.tl.domains"):
        hs.pl.domains(adata_dom, key="nope", show=False)
    with pytest.raises(KeyError, match="library_id"):
        hs.pl.domains(adata_dom, library_id="other", show=False)


def test_training_history_model_and_adata(adata_graph):
    model = hs.tl.stereomm(
        adata_graph, hidden=[8], n_latent=4, max_epochs=3, device="cpu", progress_bar=False, return_model=True
    )
    ax = hs.pl.training_history(model, show=False)
    assert len(ax.get_lines()) == 3 and ax.get_xlabel() == "epoch"
    plt.close("all")
    _, ax0 = plt.subplots()
    ax = hs.pl.training_history(adata_graph, key="stereomm", metrics=["loss"], ax=ax0, show=False)
    assert ax is ax0 and len(ax.get_lines()) == 1
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), adata_graph.uns["stereomm"]["history"]["loss"], rtol=1e-6)
    plt.close("all")


def test_training_history_generic_model():
    class Dummy:
        history = {"train_loss": [3.0, 2.0, 1.0], "val_loss": np.array([3.5, 2.5])}

    ax = hs.pl.training_history(Dummy(), show=False)
    assert len(ax.get_lines()) == 2
    plt.close("all")


def test_training_history_errors(adata_graph):
    with pytest.raises(KeyError, match="stereomm"):
        hs.pl.training_history(adata_graph, key="stereomm", show=False)
    with pytest.raises(ValueError, match="key="):
        hs.pl.training_history(adata_graph, show=False)
    with pytest.raises(TypeError):
        hs.pl.training_history(object(), show=False)


# ---------------------------------------------------------------------------------------------------------------------
# square bins (Visium HD, Stereo-seq): squares at the grid pitch, one raster image above the threshold
# ---------------------------------------------------------------------------------------------------------------------


def _bins(side, *, pitch=16.0, image=True, seed=0):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    r, c = r.ravel(), c.ravel()
    keep = rng.random(r.size) >= 0.1
    r, c = r[keep], c[keep]
    dom = pd.Categorical([f"L{k}" for k in np.minimum(c * 3 // side, 2)])
    names = [f"s_008um_{a:05d}_{b:05d}-1" for a, b in zip(r, c, strict=True)]
    a = ad.AnnData(obs=pd.DataFrame({"array_row": r, "array_col": c, "stereomm_domain": dom}, index=names))
    a.obsm["spatial"] = np.column_stack([(c + 0.5) * pitch, (r + 0.5) * pitch])
    if image:
        scalef = 0.25
        n = int(side * pitch * scalef)
        a.uns["spatial"] = {
            "hd": {
                "images": {"hires": rng.integers(0, 255, size=(n, n, 3), dtype=np.uint8)},
                "scalefactors": {"tissue_hires_scalef": scalef, "spot_diameter_fullres": pitch},
                "metadata": {},
            }
        }
    return a


def test_domains_bins_squares_at_true_size():
    from matplotlib.collections import PolyCollection

    a = _bins(20)
    ax = hs.pl.domains(a, show=False)
    assert len(ax.get_images()) == 1, "the H&E image under the bins"
    (coll,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(coll.get_paths()) == a.n_obs
    verts = coll.get_paths()[0].vertices
    assert np.ptp(verts[:, 0]) == pytest.approx(16.0) and np.ptp(verts[:, 1]) == pytest.approx(16.0)
    # squares tile: the first bin's square is centred on it
    np.testing.assert_allclose(verts[:4].mean(axis=0), a.obsm["spatial"][0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["L0", "L1", "L2"]
    assert len(a.uns["stereomm_domain_colors"]) == 3  # like scanpy
    assert ax.get_xlabel() == "x (pixels)"
    ax = hs.pl.domains(a, size=0.5, show=False)
    (coll,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert np.ptp(coll.get_paths()[0].vertices[:, 0]) == pytest.approx(8.0)


def test_domains_bins_raster_above_threshold(tmp_path):
    import time

    from matplotlib.colors import to_rgba

    a = _bins(90)  # ~7,300 bins
    assert a.n_obs > 5000
    t0 = time.perf_counter()
    ax = hs.pl.domains(a, show=False)
    ax.figure.savefig(tmp_path / "bins.png", dpi=80)
    assert time.perf_counter() - t0 < 10
    assert not ax.collections, "no patch per bin"
    he, raster = ax.get_images()
    assert he.get_array().shape[:2] == a.uns["spatial"]["hd"]["images"]["hires"].shape[:2]
    rgba = raster.get_array()
    left, right, _, top = raster.get_extent()
    p = (right - left) / rgba.shape[1]
    assert 16.0 / p == pytest.approx(round(16.0 / p))  # whole pixels per bin
    xy = a.obsm["spatial"]
    iy, ix = ((xy[:, 1] - top) / p).astype(int), ((xy[:, 0] - left) / p).astype(int)
    colors = a.uns["stereomm_domain_colors"]
    want = np.array([to_rgba(colors[k]) for k in a.obs["stereomm_domain"].cat.codes])
    np.testing.assert_allclose(rgba[iy, ix] / 255.0, want, atol=1 / 255)
    assert (tmp_path / "bins.png").stat().st_size > 0


def test_domains_bins_image_array_and_palette():
    a = _bins(12, image=False)
    img = np.zeros((96, 96, 3), dtype=np.uint8)
    ax = hs.pl.domains(a, img=img, scale_factor=0.5, palette=["red", "green", "blue"], alpha=0.5, show=False)
    (he,) = ax.get_images()
    assert he.get_extent() == pytest.approx([-1.0, 191.0, 191.0, -1.0])
    assert "stereomm_domain_colors" not in a.uns  # an explicit palette is not stored
    ax = hs.pl.domains(a, img=False, show=False)
    assert not ax.get_images() and ax.get_xlabel() == "x"


def test_domains_bins_errors():
    a = _bins(12)
    with pytest.raises(TypeError, match="crop_coord"):
        hs.pl.domains(a, crop_coord=(0, 0, 10, 10), show=False)
    with pytest.raises(ValueError, match="img"):
        hs.pl.domains(a, img=np.zeros((4, 4, 7)), show=False)
    with pytest.raises(ValueError, match="scale_factor"):
        hs.pl.domains(a, img=np.zeros((4, 4, 3)), scale_factor=-1, show=False)


def test_domains_many_spots_rasterised():
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 3000, size=(6000, 2))
    a = ad.AnnData(obs=pd.DataFrame({"d": pd.Categorical(rng.integers(0, 4, 6000).astype(str))}))
    a.obsm["spatial"] = xy
    ax = hs.pl.domains(a, key="d", show=False)
    assert len(ax.get_images()) == 1 and not ax.collections


def test_training_history_spatialdata(adata_graph):
    # issue #24 (6): every pl function takes a SpatialData, with `table_key=` naming its table
    import spatialdata as sd

    hs.tl.stereomm(adata_graph, hidden=[8], n_latent=4, max_epochs=3, device="cpu", progress_bar=False)
    other = adata_graph[:10].copy()
    del other.uns["stereomm"]
    sdata = sd.SpatialData(tables={"table": adata_graph, "other": other})
    ax = hs.pl.training_history(sdata, key="stereomm", table_key="table", metrics=["loss"], show=False)
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), adata_graph.uns["stereomm"]["history"]["loss"], rtol=1e-6)
    plt.close("all")
    with pytest.raises(ValueError, match=r"2 tables.*pass `table_key=`"):
        hs.pl.training_history(sdata, key="stereomm", show=False)
    with pytest.raises(KeyError, match=r"`adata.uns\['stereomm'\]` not found.*hs.tl.stereomm"):
        hs.pl.training_history(sdata, key="stereomm", table_key="other", show=False)
    with pytest.raises(KeyError, match=r"`sdata.tables\['nope'\]` not found"):
        hs.pl.training_history(sdata, key="stereomm", table_key="nope", show=False)
    with pytest.raises(TypeError, match="`model_or_adata` must be an AnnData, a SpatialData or a model"):
        hs.pl.training_history([1.0, 0.5], show=False)
