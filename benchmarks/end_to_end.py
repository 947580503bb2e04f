"""DLPFC 151673 end to end with the command line: image features, spatial graph, StereoMM, domains (k = 7).

Runs `histospace domains` on the section as a user would (an `.h5ad` without image features, the shared MobileNetV2
weights file, `--ground-truth` for the ARI), once with the defaults (a seed ensemble of 3 StereoMM models) and once
with `--n-models 1`, each in its own process. Reports the wall time of the whole command (`/usr/bin/time`-like:
interpreter start, imports, reading and writing included), the time of each step from scanpy's logging at
`-v` (features, graph, StereoMM, domains), the ARI and the peak RSS, with the machine's load average.

Usage: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/end_to_end.py [--repeats 1]`
(writes benchmarks/results/end_to_end.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = Path(os.environ.get("HISTOSPACE_DATA", HERE.parent.parent / "shared" / "data"))
WEIGHTS = DATA / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
CLI = Path(sys.executable).with_name("histospace")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    import histospace as hs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "151673.h5ad"
        hs.datasets.dlpfc("151673", data_dir=DATA).write_h5ad(src)
        env = {**os.environ, "OMP_NUM_THREADS": str(N_THREADS), "MKL_NUM_THREADS": str(N_THREADS)}
        for label, extra in (("default (3 models)", []), ("--n-models 1", ["--n-models", "1"])):
            for rep in range(args.repeats):
                cmd = [str(CLI), "domains", str(src), "-o", str(Path(tmp) / "out.h5ad"), "--n-clusters", "7"]
                cmd += ["--weights", str(WEIGHTS), "--ground-truth", "layer_guess_reordered", "--quiet", *extra]
                before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                t = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                wall = time.perf_counter() - t
                rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                if r.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
                ari = float(re.search(r"ARI vs \S+: ([0-9.]+)", r.stdout).group(1))
                steps = {
                    m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w[\w ]*): ([0-9.]+) s$", r.stdout, re.M)
                }
                rows.append(
                    {"run": label, "repeat": rep, "wall_s": wall, "ari": ari, "steps": steps}
                    | {"peak_rss_gb": max(rss, before) / 1024**2, "load": os.getloadavg()[0]}
                )
                print(f"{label} #{rep}: {wall:.1f} s, ARI {ari:.3f}, steps {steps}", flush=True)
    meta = {"threads": N_THREADS, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpus": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "end_to_end.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    names = sorted({k for r in rows for k in r["steps"]})
    lines = [
        "# DLPFC 151673 end to end (`histospace domains`, k = 7)",
        "",
        f"{N_THREADS} CPU threads; wall time of the whole command (start-up, reading, image features, graph, StereoMM, "
        "domains, writing); steps as the command prints them; load: 1-min load average after the run.",
        "",
        "| run | wall (s) | " + " | ".join(f"{n} (s)" for n in names) + " | ARI | peak RSS (GB) | load |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r['steps'][n]:.1f}" if n in r["steps"] else "—" for n in names)
        lines.append(
            f"| {r['run']} | {r['wall_s']:.1f} | {cells} | {r['ari']:.3f} | {r['peak_rss_gb']:.2f} | {r['load']:.1f} |"
        )
    lines += ["", f"Machine: {meta}", ""]
    (RESULTS / "end_to_end.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
