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
