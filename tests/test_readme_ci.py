"""README gives three commands; CI must run exactly the install and test commands it gives."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_commands():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 3, "README.md must give install, main-job and test commands"
    install, _main_job, tests = blocks[:3]
    ci = (ROOT / ".ci" / "run").read_text()
    assert install in ci
    # CI sets HISTOSPACE_DATA itself; the test command after the variable must be there verbatim
    assert tests.split(" ", 1)[1] in ci


def test_main_job_is_a_console_script():
    main_job = _bash_blocks((ROOT / "README.md").read_text())[1]
    sub = main_job.split("histospace ", 1)[1].split()[0]
    # the README's subcommand exists and answers --help
    out = subprocess.run([sys.executable, "-m", "histospace", sub, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"usage: histospace {sub}" in out.stdout


def test_pre_commit_pins_are_the_dev_group_versions():
    # pre-commit and CI must run the same linters: the hook revisions equal the dev group's pins
    import tomllib

    from packaging.version import Version

    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    pins = dict(re.fullmatch(r"([\w-]+)==([\w.]+)", d).groups() for d in dev if isinstance(d, str) and "==" in d)
    hooks = (ROOT / ".pre-commit-config.yaml").read_text()
    for repo, package in (("ruff-pre-commit", "ruff"), ("pyproject-fmt", "pyproject-fmt")):
        rev = re.search(rf"{repo}\n\s+rev: v([\w.]+)", hooks).group(1)
        assert package in pins and Version(rev) == Version(pins[package]), (package, rev, pins.get(package))
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ruff check ." in ci and "ruff format --check ." in ci and "pyproject-fmt --check" in ci
