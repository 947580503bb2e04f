"""One results page per benchmark script: `results/<script>.md` and `results/<script>.json`.

A variant run (another setting, other seeds, another scale) is a *section* of its script's page, never a file of its
own: `write_page(name, md, data, section="fresh")` puts the run's markdown under a `## ` heading at the end of
`<name>.md` (replacing an earlier section of that name) and its data under `sections['fresh']` of `<name>.json`.
Writing the main run (`section=None`) replaces the page's main part and keeps its sections. History belongs in git
and the CHANGELOG, so a section is replaced, not accumulated, when its variant is run again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: the line that starts a section of a page (an HTML comment: invisible in the rendered page)
_MARK = re.compile(r"^<!-- section: (?P<name>[\w.-]+) -->\n", re.MULTILINE)


def _split(text: str) -> tuple[str, dict[str, str]]:
    """The main part of a page and its sections (name -> markdown, the mark line excluded)."""
    parts = _MARK.split(text)
    main, rest = parts[0].rstrip("\n") + "\n", parts[1:]
    return main, {rest[i]: rest[i + 1].rstrip("\n") + "\n" for i in range(0, len(rest), 2)}


def _as_section(md: str, name: str, heading: str | None) -> str:
    """A run's markdown as the section `name`: its `# title` becomes `## heading` (default: the title and the tag),
    its other headings move one level down."""
    lines = md.strip("\n").splitlines()
    title = lines[0][2:] if lines and lines[0].startswith("# ") else None
    body = lines[1:] if title is not None else lines
    body = ["#" + ln if ln.startswith("#") else ln for ln in body]
    heading = heading or f"{title or 'Variant'} (`--tag {name}`)"
    return "\n".join([f"## {heading}", *body]).rstrip() + "\n"


def load(name: str, *, section: str | None = None, out: Path = RESULTS) -> dict | None:
    """The stored data of the page `name` (or of its section `section`), `None` when there is none."""
    path = Path(out) / f"{name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if section is None else (data.get("sections") or {}).get(section)


def write_page(
    name: str,
    md: str,
    data: dict | None = None,
    *,
    section: str | None = None,
    heading: str | None = None,
    out: Path = RESULTS,
) -> Path:
    """Write the run's markdown and data as the page of script `name` (or its section `section`); return the page."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page, store = out / f"{name}.md", out / f"{name}.json"
    main, sections = _split(page.read_text()) if page.is_file() else ("", {})
    stored = json.loads(store.read_text()) if store.is_file() else {}
    if section is None:
        main = md.rstrip("\n") + "\n"
        if data is not None:
            stored = {**data, **({"sections": stored["sections"]} if stored.get("sections") else {})}
    else:
        sections[section] = _as_section(md, section, heading)
        if data is not None:
            stored.setdefault("sections", {})[section] = data
    text = main + "".join(f"\n<!-- section: {k} -->\n{v}" for k, v in sections.items())
    page.write_text(text)
    if stored:
        store.write_text(json.dumps(stored, indent=1, default=str))
    return page
