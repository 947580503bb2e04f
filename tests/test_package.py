import subprocess
import sys

import histospace as hs


def test_namespaces_and_version():
    for name in ["pp", "tl", "pl", "models", "datasets", "metrics"]:
        mod = getattr(hs, name)
        assert mod.__all__, name
        for public in mod.__all__:
            assert callable(getattr(mod, public)), f"hs.{name}.{public}"
    assert isinstance(hs.__version__, str) and hs.__version__ != "0.0.0"


def test_fixture_layout(adata, adata_graph):
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
    lib = next(iter(adata.uns["spatial"]))
    assert adata.uns["spatial"][lib]["images"]["hires"].dtype.name == "uint8"
    assert adata_graph.obsp["spatial_connectivities"].nnz > 0


def test_import_is_light():
    # importing histospace must not import squidpy (slow) until a function needs it
    code = "import sys, histospace; print('squidpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
