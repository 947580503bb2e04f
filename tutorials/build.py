"""Build the tutorial notebooks from their sources and execute them.

Sources are `tutorials/src/<name>.py` in the percent format (`# %%` starts a code cell, `# %% [markdown]` a markdown
cell whose lines start with `# `). This script writes `tutorials/<name>.ipynb` and executes it, so the committed
notebooks carry their outputs and figures.

    .venv/bin/python tutorials/build.py                # build and execute every tutorial (full data)
    .venv/bin/python tutorials/build.py stereomm_dlpfc # one tutorial
    .venv/bin/python tutorials/build.py --check        # CI: run each tutorial in fast mode in a temporary folder
    .venv/bin/python tutorials/build.py --markdown-only  # text edits only: update the notebooks without re-running

The data are read from `$HISTOSPACE_DATA` (default: `../shared/data` next to the repository). A markdown cell may
hold the placeholder `{{ runtime }}`: the build replaces it with the measured wall time of the whole notebook, the
number of CPU threads it ran on (`$OMP_NUM_THREADS`) and the CPU time of the kernel. PNG figures over 300 kB (those
drawn over an H&E image) are stored as JPEG to keep the committed notebooks small.

`--check` sets `HISTOSPACE_TUTORIAL_FAST=1`: the tutorials then use a slice of the data and few epochs, and the
committed notebooks are left untouched. It fails when a cell raises, or when a committed notebook is missing, was not
executed or is out of date with its source.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
RUNTIME = "{{ runtime }}"
# build order: the chaining tutorial reads the AnnData that the StereoMM tutorial saves (and computes it without)
ORDER = ["stereomm_dlpfc", "mclstexp_her2st", "scanpy_squidpy_chaining", "real_platforms"]


def parse_percent(text: str) -> list[nbformat.NotebookNode]:
    """Split a percent-format script into notebook cells."""
    cells: list[nbformat.NotebookNode] = []
    kind, lines = None, []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif body:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    for i, cell in enumerate(cells):  # stable ids: rebuilding an unchanged source gives the same file
        cell["id"] = f"cell-{i:03d}"
    return cells


def make_notebook(src: Path) -> nbformat.NotebookNode:
    """The notebook of one source file (not executed)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = parse_percent(src.read_text())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["histospace"] = {"source": f"src/{src.name}"}
    return nb


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s"


def runtime_text(seconds: float, cpu_seconds: float | None, threads: str) -> str:
    """How the measured runtime is written into the notebook."""
    if not cpu_seconds:
        return f"{_minutes(seconds)} wall-clock" + (f" on {threads} CPU threads" if threads else "")
    on = f" on {threads} threads" if threads else ""
    return f"{_minutes(cpu_seconds)} of CPU time{on} ({_minutes(seconds)} wall-clock when built)"


def _runtime_of(committed: nbformat.NotebookNode) -> str:
    meta = committed.metadata.get("histospace", {})
    if "wall_s" not in meta:
        return RUNTIME
    return runtime_text(meta["wall_s"], meta.get("cpu_s"), meta.get("threads", ""))


def fill_runtime(nb: nbformat.NotebookNode, text: str) -> None:
    """Replace the runtime placeholder in the markdown cells."""
    for cell in nb.cells:
        if cell.cell_type == "markdown" and RUNTIME in cell.source:
            cell.source = cell.source.replace(RUNTIME, text)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int) -> tuple[float, float]:
    """Execute a notebook in `cwd`; return the wall time and the CPU time of the kernel in seconds."""
    # figures go into the notebook even where MPLBACKEND=Agg is set (as in CI)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    cpu, t = _children_cpu(), time.perf_counter()
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return time.perf_counter() - t, _children_cpu() - cpu  # the kernel has exited: its CPU time is counted


def shrink_images(nb: nbformat.NotebookNode, *, max_png_bytes: int = 300_000, quality: int = 85) -> None:
    """Re-encode large PNG outputs (figures over an H&E image) as JPEG, so that the committed notebooks stay small."""
    import base64
    import io

    from PIL import Image

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            png = data.get("image/png")
            if png is None or len(png) < max_png_bytes:
                continue
            img = Image.open(io.BytesIO(base64.b64decode(png)))
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                flat = Image.new("RGB", img.size, "white")
                flat.paste(img, mask=img.getchannel("A"))
                img = flat
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
            jpeg = base64.b64encode(buf.getvalue()).decode("ascii")
            if len(jpeg) < len(png):
                del data["image/png"]
                data["image/jpeg"] = jpeg


def _same_source(committed: nbformat.NotebookNode, nb: nbformat.NotebookNode) -> bool:
    expected = nbformat.from_dict(nb)
    fill_runtime(expected, _runtime_of(committed))
    return [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in expected.cells]


def sync_markdown(nb: nbformat.NotebookNode, target: Path) -> bool:
    """Give the executed notebook `target` the markdown cells of `nb` (a fresh build of the source).

    The code cells must be the same, in the same order; markdown cells may be edited, added or removed.
    """
    if not target.exists():
        print(f"{target.name}: missing; build it first")
        return False
    committed = nbformat.read(target, as_version=4)
    executed = [c for c in committed.cells if c.cell_type == "code"]
    if [c.source for c in nb.cells if c.cell_type == "code"] != [c.source for c in executed]:
        print(f"{target.name}: code cells differ from the source; run tutorials/build.py {target.stem}")
        return False
    fill_runtime(nb, _runtime_of(committed))
    code = iter(executed)
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell = next(code) | {"id": cell["id"]}  # the executed cell, with the id of its position
        cells.append(nbformat.from_dict(cell))
    committed.cells = cells
    nbformat.write(committed, target)
    print(f"{target.name}: markdown updated")
    return True


def _executed(nb: nbformat.NotebookNode) -> bool:
    return all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")


def main(argv: list[str] | None = None) -> int:
    """Build (default) or check the tutorials."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="tutorial names (default: all in tutorials/src)")
    p.add_argument("--check", action="store_true", help="fast mode in a temporary folder; committed files untouched")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default: %(default)s)")
    p.add_argument(
        "--markdown-only",
        action="store_true",
        help="copy edited markdown cells into the committed notebooks without re-running them (code cells unchanged)",
    )
    p.add_argument("--keep", metavar="DIR", help="with --check: also write the executed fast notebooks into DIR")
    p.add_argument("--force", action="store_true", help="with --check: run even when a committed notebook is stale")
    args = p.parse_args(argv)
    srcs = sorted(
        (HERE / "src").glob("*.py"), key=lambda s: (ORDER.index(s.stem) if s.stem in ORDER else len(ORDER), s.stem)
    )
    if args.names:
        unknown = set(args.names) - {s.stem for s in srcs}
        if unknown:
            print(f"unknown tutorial(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        srcs = [s for s in srcs if s.stem in args.names]
    if not srcs:
        print("no tutorial sources found", file=sys.stderr)
        return 2
    os.environ.setdefault("HISTOSPACE_DATA", str(HERE.parent.parent / "shared" / "data"))
    threads = os.environ.get("OMP_NUM_THREADS", "")
    failed, t_all = [], time.perf_counter()
    for src in srcs:
        nb = make_notebook(src)
        target = HERE / f"{src.stem}.ipynb"
        if args.markdown_only:
            if not sync_markdown(nb, target):
                failed.append(src.stem)
            continue
        if args.check:
            committed = nbformat.read(target, as_version=4) if target.exists() else None
            if committed is None or not _same_source(committed, nb) or not _executed(committed):
                print(f"{target.name}: missing, not executed or out of date with {src.name}; rebuild it with")
                print(f"    .venv/bin/python tutorials/build.py {src.stem}")
                failed.append(src.stem)
                if not args.force:
                    continue
            os.environ["HISTOSPACE_TUTORIAL_FAST"] = "1"
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    sec, cpu = execute(nb, Path(tmp), args.timeout)
                except Exception as e:  # noqa: BLE001 - report any cell error and go on with the next notebook
                    print(f"{src.stem}: FAILED: {type(e).__name__}: {str(e)[-2000:]}")
                    if args.keep:  # the notebook as far as it ran
                        Path(args.keep).mkdir(parents=True, exist_ok=True)
                        nbformat.write(nb, Path(args.keep) / target.name)
                    failed.append(src.stem)
                    continue
            print(f"{src.stem}: ran in fast mode in {sec:.0f} s ({cpu:.0f} s CPU)", flush=True)
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                shrink_images(nb)
                nbformat.write(nb, Path(args.keep) / target.name)
        else:
            os.environ.pop("HISTOSPACE_TUTORIAL_FAST", None)
            sec, cpu = execute(nb, HERE, args.timeout)
            sec, cpu = round(sec, 1), round(cpu, 1)  # the text is made from what the metadata keeps (see --check)
            text = runtime_text(sec, cpu, threads)
            fill_runtime(nb, text)
            shrink_images(nb)
            nb.metadata["histospace"].update(wall_s=sec, cpu_s=cpu, threads=threads)
            nbformat.write(nb, target)
            print(f"{target.name}: executed in {sec:.0f} s ({cpu:.0f} s CPU)", flush=True)
    print(f"total: {time.perf_counter() - t_all:.0f} s")
    if failed:
        print(f"failed: {', '.join(dict.fromkeys(failed))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
