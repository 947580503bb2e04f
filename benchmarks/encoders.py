"""Benchmark the pathology foundation-model encoders (random init): throughput, memory, real patches.

For every named encoder (`histospace._image.encoders._pathology.PATHOLOGY_ENCODERS`), each in its own subprocess so that the
peak RSS is the encoder's and two large models are never in memory at once:

- CPU (2 threads): patches/s of the encoder on 224-px inputs (normalisation + ViT + pooling, `inference_mode`) at the
  best of a few batch sizes, build time, and the process' peak RSS;
- GPU, when CUDA is available: patches/s in float32 and under autocast bfloat16 / float16 at the best of a few batch
  sizes, and peak GPU memory;
- her2st C2 (`hs.datasets.her2st('C2', data_dir=...)`, 224-px full-resolution patches): `hs.pp.image_features`
  end to end gives finite `(n_obs, d)` features.

Weights are random (nothing is downloaded): timings do not depend on them. The ViT-g models (H-optimus-0, GigaPath)
need about 5 GB of RAM each on the CPU.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/encoders.py [--data-dir ../shared/data] [--encoders uni h0-mini]
        [--batch-sizes 1 4 8 16] [--gpu-batch-sizes 32 64 128 256] [--device auto|cpu|cuda]

Writes `benchmarks/results/encoders.{md,json}` (`--out`). The load average is reported with the figures: timings
taken on a shared machine are pessimistic.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

N_THREADS = 2
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batch(enc, batch_size: int, device: torch.device, precision: str, min_patches: int, min_seconds: float):
    """patches/s of `enc` on random 224-px batches: one warm-up batch, then at least `min_patches` patches and
    `min_seconds` seconds."""
    dtype = PRECISIONS[precision]
    x = torch.rand(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            y = enc(x)
        return y

    y = step()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < min_patches or time.perf_counter() - t0 < min_seconds:
        y = step()
        n += batch_size
    _sync(device)
    dt = time.perf_counter() - t0
    return n / dt, bool(torch.isfinite(y.float()).all())


def worker(name: str, args) -> dict:
    """Measure one encoder (run in a subprocess)."""
    import histospace as hs
    from histospace._image import build_pathology_encoder, get_pathology_model

    torch.set_num_threads(args.threads)
    entry = get_pathology_model(name)
    out = {"encoder": name, "title": entry.title, "params": entry.n_params, "d": entry.out_dim}
    rss0 = peak_rss_gb()
    t = time.perf_counter()
    enc, d, _ = build_pathology_encoder(name, None, random_state=0)
    out["build_s"] = round(time.perf_counter() - t, 2)
    out["rss_after_build_gb"] = round(peak_rss_gb(), 3)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())

    if not args.skip_cpu:
        cpu = torch.device("cpu")
        runs = []
        for bs in args.batch_sizes:
            rate, finite = time_batch(enc, bs, cpu, "fp32", args.min_patches, args.min_seconds)
            runs.append({"batch_size": bs, "patches_per_s": round(rate, 3), "finite": finite})
            print(f"  {name} cpu bs={bs}: {rate:.2f} patches/s", file=sys.stderr, flush=True)
        best = max(runs, key=lambda r: r["patches_per_s"])
        out["cpu"] = {
            "threads": torch.get_num_threads(),
            "runs": runs,
            "best_batch_size": best["batch_size"],
            "patches_per_s": best["patches_per_s"],
            "peak_rss_gb": round(peak_rss_gb(), 3),
            "rss_before_gb": round(rss0, 3),
            "load_avg": [round(v, 2) for v in os.getloadavg()],
        }

    if use_cuda:
        dev = torch.device("cuda")
        enc = enc.to(dev)
        gpu = {"device_name": torch.cuda.get_device_name(dev)}
        for precision in args.precisions:
            if precision == "bf16" and not torch.cuda.is_bf16_supported():
                continue
            runs = []
            for bs in args.gpu_batch_sizes:
                torch.cuda.reset_peak_memory_stats(dev)
                try:
                    rate, finite = time_batch(enc, bs, dev, precision, args.min_patches_gpu, args.min_seconds)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    runs.append({"batch_size": bs, "oom": True})
                    break
                mem = torch.cuda.max_memory_allocated(dev) / 1024**3
                runs.append(
                    {"batch_size": bs, "patches_per_s": round(rate, 2), "finite": finite, "peak_gpu_gb": round(mem, 2)}
                )
                print(f"  {name} cuda {precision} bs={bs}: {rate:.1f} patches/s", file=sys.stderr, flush=True)
            ok = [r for r in runs if "patches_per_s" in r]
            best = max(ok, key=lambda r: r["patches_per_s"]) if ok else {}
            gpu[precision] = {"runs": runs, **{k: best.get(k) for k in ("batch_size", "patches_per_s", "peak_gpu_gb")}}
        out["gpu"] = gpu

    if args.data_dir:
        del enc  # image_features builds its own copy: never two models in memory at once
        gc.collect()
        if use_cuda:
            torch.cuda.empty_cache()
        dev = "cuda" if use_cuda else "cpu"
        adata = hs.datasets.her2st("C2", data_dir=args.data_dir)
        if args.n_obs:
            adata = adata[: args.n_obs].copy()
        bs = out.get("cpu", {}).get("best_batch_size", 16) if dev == "cpu" else 64
        t = time.perf_counter()
        hs.pp.image_features(
            adata,
            encoder=name,
            weights=None,
            patch_size=224,
            input_size=224,
            batch_size=bs,
            device=dev,
            progress_bar=False,
        )
        dt = time.perf_counter() - t
        x = adata.obsm["img_features"]
        out["her2st_c2"] = {
            "device": dev,
            "shape": list(x.shape),
            "expected_shape": [adata.n_obs, d],
            "finite": bool(np.isfinite(x).all()),
            "seconds": round(dt, 2),
            "patches_per_s": round(x.shape[0] / dt, 2),
            "image": adata.uns["img_features"]["params"]["image"],
            "peak_rss_gb": round(peak_rss_gb(), 3),
        }
    return out


def worker_argv(args) -> list[str]:
    """The options a worker needs, from the parsed arguments."""
    argv = ["--device", args.device, "--threads", str(args.threads), "--n-obs", str(args.n_obs)]
    argv += ["--batch-sizes", *map(str, args.batch_sizes), "--gpu-batch-sizes", *map(str, args.gpu_batch_sizes)]
    argv += ["--precisions", *args.precisions, "--min-patches", str(args.min_patches)]
    argv += ["--min-patches-gpu", str(args.min_patches_gpu), "--min-seconds", str(args.min_seconds)]
    if args.data_dir:
        argv += ["--data-dir", str(args.data_dir)]
    if args.skip_cpu:
        argv.append("--skip-cpu")
    return argv


def run_worker(name: str, argv: list[str]) -> dict:
    """Run `worker(name)` in a fresh interpreter and read its JSON (the last line of its stdout)."""
    cmd = [sys.executable, __file__, "--worker", name, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.stderr.write(proc.stderr[-4000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"encoder": name, "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def to_markdown(res: dict) -> str:
    env = res["environment"]
    lines = [
        "# Pathology foundation-model encoders: throughput and memory (random init)",
        "",
        f"torch {env['torch']}, timm {env['timm']}, {env['threads']} CPU threads, {env['cpu_count']} CPUs, load average "
        f"at start {env['load_avg_start']}, at end {env['load_avg_end']}. Each encoder runs in its own process.",
        "",
        "## CPU (224-px inputs, encoder only: normalisation + ViT + pooling)",
        "",
        "| encoder | params | d | build s | best batch | patches/s | patches/s per batch size | peak RSS GB | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["encoders"]:
        if "error" in r:
            lines.append(f"| {r['encoder']} | error: {r['error']} |||||||||")
            continue
        c = r.get("cpu")
        if c is None:
            continue
        per = ", ".join(f"{x['batch_size']}: {x['patches_per_s']:.2f}" for x in c["runs"])
        lines.append(
            f"| {r['encoder']} | {r['params'] / 1e6:.1f}M | {r['d']} | {r['build_s']:.1f} | {c['best_batch_size']} | "
            f"{c['patches_per_s']:.2f} | {per} | {c['peak_rss_gb']:.2f} | {c['load_avg'][0]:.1f} |"
        )
    gpus = [r for r in res["encoders"] if "gpu" in r]
    if gpus:
        lines += [
            "",
            f"## GPU ({gpus[0]['gpu']['device_name']}), best batch size per precision",
            "",
            "| encoder | fp32 patches/s (batch, GB) | bf16 autocast | fp16 autocast |",
            "|---|---|---|---|",
        ]
        for r in gpus:
            cells = []
            for p in ("fp32", "bf16", "fp16"):
                g = r["gpu"].get(p)
                cells.append(
                    f"{g['patches_per_s']:.0f} ({g['batch_size']}, {g['peak_gpu_gb']:.1f})"
                    if g and g.get("patches_per_s")
                    else "-"
                )
            lines.append(f"| {r['encoder']} | " + " | ".join(cells) + " |")
    her = [r for r in res["encoders"] if "her2st_c2" in r]
    if her:
        lines += [
            "",
            "## her2st C2: `hs.pp.image_features`, 224-px full-resolution patches, random weights",
            "",
            "| encoder | device | shape | expected | finite | s | patches/s | peak RSS GB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in her:
            h = r["her2st_c2"]
            lines.append(
                f"| {r['encoder']} | {h['device']} | {tuple(h['shape'])} | {tuple(h['expected_shape'])} | "
                f"{h['finite']} | {h['seconds']:.1f} | {h['patches_per_s']:.2f} | {h['peak_rss_gb']:.2f} |"
            )
    lines += [
        "",
        "Peak RSS: the whole worker process (Python, torch, timm, scanpy, the model in float32). patches/s are the best",
        "run at each batch size after a warm-up batch; on a shared machine they are pessimistic.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    from histospace._image import PATHOLOGY_ENCODERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=list(PATHOLOGY_ENCODERS))
    parser.add_argument("--data-dir", default=os.environ.get("HISTOSPACE_DATA"))
    parser.add_argument("--n-obs", type=int, default=0, help="her2st C2: only the first n spots (0: all 187)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--skip-cpu", action="store_true", help="GPU runs only")
    parser.add_argument("--threads", type=int, default=N_THREADS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--gpu-batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=list(PRECISIONS))
    parser.add_argument("--min-patches", type=int, default=16, help="CPU: patches timed per batch size (at least)")
    parser.add_argument("--min-patches-gpu", type=int, default=1024)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return
    import timm

    import histospace as hs

    res = {
        "environment": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "histospace": hs.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "encoders": [],
    }
    argv = worker_argv(args)
    for name in args.encoders:
        print(f"{name} ...", file=sys.stderr, flush=True)
        r = run_worker(name, argv)
        res["encoders"].append(r)
        print(json.dumps(r), flush=True)
    res["environment"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoders.json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    (out / "encoders.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
