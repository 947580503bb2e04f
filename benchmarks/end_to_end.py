"""DLPFC 151673 end to end with the command line: image features, spatial graph, StereoMM, domains (k = 7).

Runs `histospace domains` on the section as a user would (an `.h5ad` without image features, the shared MobileNetV2
weights file, `--ground-truth` for the ARI), once with the defaults (a seed ensemble of 3 StereoMM models), once
with `--n-models 1`, and once with the defaults on the first run's output, whose `obsm['img_features']` matches and
is reused (the command says so on stderr; the table's `reused` column). Each run is its own process. Reports the
wall time of the whole command (interpreter start, imports, reading and writing included), the time of each step as
the command prints it (image features, spatial graph, StereoMM, domains, write), the ARI and the command's own peak
RSS (`wait4`), with the machine's load average.

Usage: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/end_to_end.py [--repeats 1]`
(writes benchmarks/results/end_to_end.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def _run(cmd: list[str], env: dict, tmp: Path) -> tuple[float, int, int, str, str]:
    """Run `cmd`; its wall time, exit code, own peak RSS (kB, from `wait4`), stdout and stderr."""
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    with out.open("w") as fo, err.open("w") as fe:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, proc.returncode, usage.ru_maxrss, out.read_text(), err.read_text()


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
        out = Path(tmp) / "out.h5ad"
        # the third run reads the output of the first: obsm['img_features'] is there and matches, so it is reused
        runs = (("default (3 models)", [], src), ("--n-models 1", ["--n-models", "1"], src))
        runs += (("default, features in the input", [], Path(tmp) / "with_features.h5ad"),)
        for label, extra, inp in runs:
            for rep in range(args.repeats):
                cmd = [str(CLI), "domains", str(inp), "-o", str(out), "--n-clusters", "7"]
                cmd += ["--weights", str(WEIGHTS), "--ground-truth", "layer_guess_reordered", "--quiet", *extra]
                wall, code, rss_kb, stdout, stderr = _run(cmd, env, Path(tmp))
                if code:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr}")
                ari = float(re.search(r"ARI vs \S+: ([0-9.]+)", stdout).group(1))
                steps = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w[\w ]*): ([0-9.]+) s$", stdout, re.M)}
                reused = "reusing obsm['img_features']" in stderr
                rows.append(
                    {"run": label, "repeat": rep, "wall_s": wall, "ari": ari, "steps": steps, "features_reused": reused}
                    | {"peak_rss_gb": rss_kb / 1024**2, "load": os.getloadavg()[0]}
                )
                print(f"{label} #{rep}: {wall:.1f} s, ARI {ari:.3f}, steps {steps}", flush=True)
                if label.startswith("default (") and rep == 0:
                    out.rename(Path(tmp) / "with_features.h5ad")
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
        "| run | wall (s) | "
        + " | ".join(f"{n} (s)" for n in names)
        + " | features reused | ARI | peak RSS (GB) | load |",
        "|---|---|" + "---|" * len(names) + "---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r['steps'][n]:.1f}" if n in r["steps"] else "—" for n in names)
        lines.append(
            f"| {r['run']} | {r['wall_s']:.1f} | {cells} | {'yes' if r['features_reused'] else 'no'} | {r['ari']:.3f} | "
            f"{r['peak_rss_gb']:.2f} | {r['load']:.1f} |"
        )
    lines += ["", f"Machine: {meta}", ""]
    (RESULTS / "end_to_end.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
