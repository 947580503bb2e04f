"""`histospace domains`: the pipeline on one input, and on several (one task per input, resumable, on dask)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from histospace._cli_io import CLIError, _check_outputs, _save_figure, _table, _timed, write_output
from histospace._cli_steps import _features_needed, _has_image, _image_features, _spatial_graph
from histospace._constants import DOMAIN_KEY, FEATURES_KEY
from histospace.io._read import input_kind


def run_domains(args: argparse.Namespace, path: str, output: str, *, write=write_output) -> dict:
    """Read `path`, then image features (if there is an image), graph, StereoMM, domains; `write(data, output)`."""
    import histospace as hs

    t0 = time.perf_counter()
    kind = input_kind(path)[1]
    data = hs.io.read(path, bin_size=args.bin_size, image=args.image if kind == "gem" else None)
    table = _table(data, args.table_key)
    print(f"read {path}: {table.n_obs} spots/bins x {table.n_vars} genes ({time.perf_counter() - t0:.0f} s)")
    if args.ground_truth and args.ground_truth not in table.obs:
        msg = f"--ground-truth {args.ground_truth!r} is not a column of obs of {path}; available: {list(table.obs)}"
        raise CLIError(msg)
    tk = {"table_key": args.table_key} if args.table_key else {}
    if args.image is not None or _has_image(data) or FEATURES_KEY in table.obsm:
        with _timed("image features"):
            image = args.image if not hasattr(data, "tables") else None
            if _features_needed(data, args, label=path, image=image):
                _image_features(data, args, image=image)
        features_key = FEATURES_KEY
    else:
        print(f"{path}: no H&E image found: StereoMM runs on expression and the spatial graph only", file=sys.stderr)
        features_key = None
    with _timed("spatial graph"):
        _spatial_graph(data, args)
    with _timed("StereoMM"):
        fit = {"max_epochs": args.max_epochs, "n_models": args.n_models, "progress_bar": not args.quiet}
        hs.tl.stereomm(data, features_key=features_key, **fit, **tk)
    with _timed("domains"):
        hs.tl.domains(data, n_clusters=args.n_clusters, method=args.method, **tk)
    table = _table(data, args.table_key)
    counts = table.obs[DOMAIN_KEY].value_counts().sort_index()
    print("domains: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    record = {"n_obs": int(table.n_obs), "ari": float("nan")}
    if args.ground_truth:
        record["ari"] = float(hs.metrics.ari(table.obs[args.ground_truth], table.obs[DOMAIN_KEY]))
        print(f"ARI vs {args.ground_truth}: {record['ari']:.3f}")
    if args.plot:
        plot = args.plot if output == args.output else str(Path(output).with_suffix(".png"))
        save_domains_plot(data, plot, ground_truth=args.ground_truth, table_key=args.table_key)
    with _timed("write"):
        write(data, output)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


def save_domains_plot(data, path: str, *, ground_truth: str | None = None, table_key: str | None = None) -> None:
    """Write `hs.pl.domains` of `data` (with the ground truth beside it) to `path`."""
    import histospace as hs

    kw = {"table_key": table_key} if table_key else {}
    _save_figure(hs.pl.domains(data, key=DOMAIN_KEY, groundtruth_key=ground_truth, show=False, **kw), path)


def _domains_task(path: str, output: str, args: argparse.Namespace) -> dict:
    """One input of `histospace domains IN1 IN2 ... -o FOLDER`: written whole (`.tmp`, marker, rename) or not at all."""
    from histospace.tl._cohort import write_whole

    def write(data, out):
        write_whole(out, lambda tmp: write_output(data, str(tmp)), {"input": path})

    record = run_domains(args, path, output, write=write)
    ari = record["ari"]
    record["summary"] = f"{record['n_obs']} spots/bins" + ("" if ari != ari else f", ARI {ari:.3f}")
    return record


def domains_cohort(args: argparse.Namespace) -> int:
    """Several inputs: one output per input in the folder `-o` (`NAME.h5ad` for an .h5ad, else `NAME.zarr`)."""
    import pandas as pd

    from histospace.tl._cohort import run_each

    outdir = Path(args.output).expanduser()
    if outdir.suffix in (".h5ad", ".zarr") or (outdir.exists() and not outdir.is_dir()):
        msg = f"-o {args.output}: with several inputs (or --scheduler) -o is a folder, one output per input in it"
        raise CLIError(msg)
    names, outputs = [], []
    for path in args.input:
        kind = input_kind(path)[1]  # a missing or unknown input is named before any work
        name = Path(path.rstrip("/")).name.split(".")[0]
        names.append(name)
        outputs.append(str(outdir.resolve() / f"{name}{'.h5ad' if kind == 'h5ad' else '.zarr'}"))
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        msg = f"several inputs would be written as {dup[0]}: give the inputs distinct names"
        raise CLIError(msg)
    _check_outputs(argparse.Namespace(output=str(outdir / "x.zarr"), plot=None), spatialdata=True)
    outdir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        {"input": [str(Path(p).resolve()) for p in args.input], "output": outputs, "status": "pending",
         "n_obs": float("nan"), "ari": float("nan"), "seconds": float("nan"), "error": ""},
        index=pd.Index(names, name="input_name"),
    )  # fmt: skip
    table = run_each(table, _domains_task, (args,), scheduler=args.scheduler, on_error="warn", progress=True)
    print(table[["status", "n_obs", "ari", "seconds"]].to_string())
    return 1 if (table["status"] == "failed").any() else 0
