"""Guards of the package's architecture (docs/architecture.md): slot names have one owner, modules import without
circles, `uns['spatial']` is read through the spatial adapter."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import histospace._constants as const

SRC = Path(const.__file__).parent

#: default slot names owned by `histospace._constants`
SLOT_NAMES = {
    const.SPATIAL_KEY,
    const.SPATIAL_UNS_KEY,
    const.LIBRARY_KEY,
    const.FEATURES_KEY,
    const.CONNECTIVITIES_KEY,
    const.DISTANCES_KEY,
    const.NEIGHBORS_KEY,
    const.STEREOMM_KEY,
    const.DOMAIN_KEY,
    const.MCLSTEXP_KEY,
    *const.POSITION_KEYS,
}

#: (file, literal): strings that spell a slot name but are something else
NOT_SLOTS = {
    ("_utils/_docs.py", "library_id"): "the name of a documented parameter",
    ("_image/features/_recipes.py", "mclstexp"): "the name of a feature preset",
    ("pp/_image_features.py", "mclstexp"): "the preset name in `Literal[...]`",
    ("_cli.py", "mclstexp"): "preset='mclstexp'",
    ("_cli_demo_cache.py", "mclstexp"): "the name of a cache entry kind",
    ("pl/_domains.py", "library_id"): "squidpy's keyword argument",
    ("pl/_mclstexp.py", "mclstexp"): "a method name of a cross-validation result",
    ("pl/_predictability.py", "mclstexp"): "a method name of a cross-validation result",
    ("tl/_gene_scores.py", "mclstexp"): "a method name of a cross-validation result",
    ("tl/_evaluate.py", "mclstexp"): "a method name of a cross-validation result",
    ("tl/_mclstexp.py", "mclstexp"): "a method name of a cross-validation result",
    ("tl/_evaluate.py", "spatial"): "the `pvalues='spatial'` option",
    ("_spatial/_slide.py", "library_id"): "a field of the Slide record",
}


def _code_strings(tree: ast.AST):
    """String constants of a module that are code (not docstrings, not pieces of f-strings)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path.relative_to(SRC).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def test_no_bare_slot_literals():
    bare = [
        f"{rel}:{node.lineno}: {node.value!r}"
        for rel, tree in _modules()
        if rel != "_constants.py"
        for node in _code_strings(tree)
        if node.value in SLOT_NAMES and (rel, node.value) not in NOT_SLOTS
    ]
    assert not bare, "slot names spelled outside histospace._constants (use its constants):\n" + "\n".join(bare)


def test_not_slots_allowlist_is_current():
    """Every entry of NOT_SLOTS still occurs (a stale exception would hide a new bare literal)."""
    seen = {
        (rel, node.value) for rel, tree in _modules() for node in _code_strings(tree) if (rel, node.value) in NOT_SLOTS
    }
    assert seen == set(NOT_SLOTS)


def _import_graph() -> dict[str, set[str]]:
    """Module -> histospace modules it imports (module level and inside functions; `TYPE_CHECKING` blocks excluded)."""
    mods = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(("histospace", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        mods[name] = path
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods] or [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[m].update(t for t in targets if t in mods and t != m)
    return edges


def test_no_import_cycles():
    edges = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            connect(v)
    assert len(edges) > 50
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(
    ("func", "kwargs"),
    [
        ("write_wsi", {"format": "ome", "tile": 64, "levels": 1}),
        ("write_visium_hd", {"bin_sizes": (16,), "image": False, "hires_size": 200, "lowres_size": 50}),
    ],
)
def test_mpp_is_the_one_name(tmp_path, func, kwargs):
    """`mpp=` is µm per pixel everywhere; the writers' old `microns_per_pixel=` warns and means the same."""
    import histospace as hs

    tissue = hs.datasets.simulate_tissue(width_um=200, height_um=160, n_genes=20, random_state=0)
    write = getattr(hs.datasets, func)
    new = write(tmp_path / "new.ome.tif" if func == "write_wsi" else tmp_path / "new", tissue, mpp=4.0, **kwargs)
    with pytest.warns(FutureWarning, match=rf"`microns_per_pixel=` of `hs.datasets.{func}` is deprecated.*`mpp=`"):
        old = write(
            tmp_path / "old.ome.tif" if func == "write_wsi" else tmp_path / "old",
            tissue,
            microns_per_pixel=4.0,
            **kwargs,
        )
    if func == "write_wsi":
        import tifffile

        with tifffile.TiffFile(new) as a, tifffile.TiffFile(old) as b:
            assert a.pages[0].shape == b.pages[0].shape == (40, 50, 3)
    else:
        a = json.loads((new / "spatial" / "scalefactors_json.json").read_text())
        b = json.loads((old / "spatial" / "scalefactors_json.json").read_text())
        assert a == b
        assert a["microns_per_pixel"] == 4.0
    with pytest.raises(ValueError, match=r"Pass `mpp=` only"):
        write(tmp_path / "both", tissue, mpp=4.0, microns_per_pixel=4.0, **kwargs)
    assert not (tmp_path / "both").exists()


def test_no_module_over_600_lines():
    """A module that grows past 600 lines is split by what it does (issue 21's bound)."""
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
