"""Sphinx configuration for the histospace documentation.

Build (offline, warnings are errors): ``.venv/bin/sphinx-build -W -b html docs docs/_build/html``.
Cross-links to other projects' docs (intersphinx) need the network: set ``HISTOSPACE_DOCS_INTERSPHINX=1`` to use them.
"""

from __future__ import annotations

import os
import re
import sys
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # build from a source tree without install too

# -- Project information ------------------------------------------------------
project = "histospace"
author = "histospace developers"
copyright = f"{datetime.now():%Y}, {author}"
try:
    release = version("histospace")
except PackageNotFoundError:  # pragma: no cover
    release = "0.0.0"
version = ".".join(release.split(".")[:2])

# -- General configuration ----------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxcontrib.bibtex",
]

INTERSPHINX = os.environ.get("HISTOSPACE_DOCS_INTERSPHINX", "0").lower() in ("1", "true", "yes")
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
    "sklearn": ("https://scikit-learn.org/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
    "distributed": ("https://distributed.dask.org/en/stable/", None),
}
if INTERSPHINX:  # fetches the inventories: only on a connected machine
    extensions.append("sphinx.ext.intersphinx")

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "tutorials/*.md", "tutorials/*/**"]

# autodoc / autosummary / napoleon / typehints
autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": False}
autodoc_mock_imports: list[str] = []
default_role = "literal"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True  # having a separate entry generally helps readability
napoleon_use_param = True
napoleon_custom_sections = [("Params", "Parameters")]
typehints_defaults = "braces"
always_use_bars_union = True
typehints_document_rtype = True

# myst / myst-nb: notebooks are committed executed and never re-run by the docs build
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath", "html_image", "html_admonition"]
myst_heading_anchors = 3
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "remove"
# a notebook without `language_info` metadata falls back to plain highlighting instead of failing the -W build
suppress_warnings = ["myst-nb.lexer"]

# bibliography
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
bibtex_default_style = "plain"

# -- HTML output (scverse look) ----------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "histospace"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sphinx = False
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
pygments_style = "default"


# -- Returns sections listing AnnData slots ----------------------------------------------------------------------
# STYLE.md writes the slots a function sets as "`adata.obsm['X_stereomm' | key_added]` : :class:`numpy.ndarray`"
# entries. Napoleon would render those names in bold with the backticks showing, so such a Returns section is taken
# out before napoleon runs and put back after it as a rubric and a definition list (term : classifier).
_SLOT_RETURNS: dict[int, list[str]] = {}
_AFTER_FIELDS = (".. rubric::", ".. seealso::", ".. note::", ".. warning::", ".. admonition::", ".. versionadded::")


def _take_slots_returns(app, what, name, obj, options, lines: list[str]) -> None:
    for i in range(len(lines) - 1):
        if lines[i].strip() == "Returns" and lines[i + 1].strip() and set(lines[i + 1].strip()) == {"-"}:
            break
    else:
        return
    end = len(lines)
    for j in range(i + 2, len(lines) - 1):
        nxt = lines[j + 1].strip()
        if lines[j].strip() and not lines[j].startswith(" ") and nxt and set(nxt) == {"-"}:
            end = j
            break
    body = lines[i + 2 : end]
    if not any(line.startswith("`adata.") for line in body):
        return
    _SLOT_RETURNS[id(lines)] = [".. rubric:: Returns", "", *body, ""]
    del lines[i:end]


def _put_back_slots_returns(app, what, name, obj, options, lines: list[str]) -> None:
    block = _SLOT_RETURNS.pop(id(lines), None)
    if block is None:
        return
    at = next((k for k, line in enumerate(lines) if line.startswith(_AFTER_FIELDS)), len(lines))
    lines[at:at] = ["", *block]


# -- Benchmark results: `benchmarks.md` names each results file with a `<!-- results: NAME.md -->` line ------------
# Each such line becomes an include of `benchmarks/results/NAME.md` (its own `# title` left out, as the page gives the
# section heading and the command), or a note when the file does not exist yet. Results files the page does not name
# are included at the end, so a new benchmark is never silently missing.
BENCHMARK_RESULTS = ROOT / "benchmarks" / "results"
_RESULTS_MARKER = re.compile(r"^<!--\s*results:\s*(?P<name>[\w.-]+\.md)\s*-->\s*$", re.MULTILINE)


def _include_results(path: Path, *, skip_title: bool) -> str:
    """A MyST include of a results file, its headings one level down; `skip_title` leaves out a first `# ` line."""
    rel = os.path.relpath(path, HERE).replace(os.sep, "/")
    lines = path.read_text(encoding="utf-8").splitlines()
    skip = ":start-line: 1\n" if skip_title and lines and lines[0].startswith("# ") else ""
    return f"```{{include}} {rel}\n{skip}:heading-offset: 1\n:relative-images:\n```\n"


def _add_benchmark_results(app, docname: str, source: list[str]) -> None:
    if docname != "benchmarks":
        return
    named: set[str] = set()

    def replace(m: re.Match) -> str:
        name = m.group("name")
        named.add(name)
        path = BENCHMARK_RESULTS / name
        if not path.is_file():
            return f"```{{note}}\nNo results yet (`benchmarks/results/{name}` does not exist): run the command above.\n```\n"
        return _include_results(path, skip_title=True)

    source[0] = _RESULTS_MARKER.sub(replace, source[0])
    others = (
        [f for f in sorted(BENCHMARK_RESULTS.glob("*.md")) if f.name not in named] if BENCHMARK_RESULTS.is_dir() else []
    )
    for f in others:
        source[0] += "\n\n" + _include_results(f, skip_title=False)


# -- Tutorials: `docs/tutorials` links to the repository's `tutorials/`; list the notebooks found there ------------
TUTORIALS = HERE / "tutorials"


def _add_tutorials(app, docname: str, source: list[str]) -> None:
    if docname != "tutorials":
        return
    order = [
        "stereomm_dlpfc",
        "mclstexp_her2st",
        "scanpy_squidpy_chaining",
        "real_platforms",
    ]  # tutorials/build.py ORDER
    found = sorted(TUTORIALS.glob("*.ipynb"), key=lambda f: (order.index(f.stem) if f.stem in order else 99, f.stem))
    if not found:  # an empty folder is fine (a toctree glob matching nothing would be an error with -W)
        source[0] += "\n\n```{note}\nNo tutorial notebooks yet.\n```\n"
        return
    entries = "\n".join(f"tutorials/{f.stem}" for f in found)
    source[0] += f"\n\n```{{toctree}}\n:maxdepth: 1\n\n{entries}\n```\n"


# -- Every public name is on the API page ------------------------------------------------------------------------
NAMESPACES = ("pp", "tl", "pl", "models", "datasets", "metrics")


def _check_api_complete(app, docname: str, source: list[str]) -> None:
    if docname != "api":
        return
    import importlib

    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    listed = {line.strip() for line in source[0].splitlines()}
    for ns in NAMESPACES:
        mod = importlib.import_module(f"histospace.{ns}")
        for name in getattr(mod, "__all__", []):
            if f"{ns}.{name}" not in listed:
                logger.warning(
                    f"`hs.{ns}.{name}` is public (in `__all__`) but not listed in docs/api.md", location="api"
                )


def setup(app):
    """Add benchmark results and tutorials to their pages; check that `api.md` lists every public name."""
    app.connect("source-read", _add_benchmark_results)
    app.connect("source-read", _check_api_complete)
    app.connect("source-read", _add_tutorials)
    app.connect("autodoc-process-docstring", _take_slots_returns, priority=400)  # before napoleon (500)
    app.connect("autodoc-process-docstring", _put_back_slots_returns, priority=600)  # after napoleon
