import subprocess
import sys

import histospace as hs


def test_namespaces_and_version():
    for name in ["pp", "tl", "pl", "models", "datasets", "metrics", "io"]:
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


def test_docstrings_have_no_unfilled_placeholders():
    """Every public function's shared parameter text is filled in (`@doc_params` on the right function)."""
    import inspect
    import re

    from histospace._utils._docs import COMMON_PARAMS

    placeholder = re.compile(r"^\s*\{(" + "|".join(map(re.escape, COMMON_PARAMS)) + r")\}\s*$", re.MULTILINE)
    found = []
    for ns in (hs.pp, hs.tl, hs.pl, hs.datasets, hs.metrics, hs.models, hs.io):
        for name in getattr(ns, "__all__", dir(ns)):
            obj = getattr(ns, name, None)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            members = (
                [obj, *(m for _, m in inspect.getmembers(obj, inspect.isfunction))] if inspect.isclass(obj) else [obj]
            )
            found += [f"{ns.__name__}.{name}" for m in members if placeholder.search(m.__doc__ or "")]
    assert not found, f"unfilled docstring placeholders in {found}"


def test_no_hint_names_the_deprecated_squidpy_spatial_neighbors():
    # `squidpy.gr.spatial_neighbors` is deprecated in squidpy 1.8 and goes in 1.9: hints, docs and tutorials name the
    # per-mode functions (`spatial_neighbors_grid`, ...) instead
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *(root / "src").rglob("*.py"), *(root / "docs").glob("*.md")]
    files += [*(root / "tutorials" / "src").glob("*.py"), *(root / "benchmarks").glob("*.py")]
    pattern = re.compile(r"spatial_neighbors(?![_\w])\s*[(`]")
    found = [f"{f.relative_to(root)}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
             if pattern.search(line)]  # fmt: skip
    assert not found, found
