"""Progress bars that behave in terminals, notebooks and log files alike, and follow scanpy's verbosity."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def _interactive() -> bool:
    """A terminal, or an IPython kernel (notebooks render carriage returns and widgets)."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):
        return False
    return "ipykernel" in sys.modules


def _quiet() -> bool:
    """The user turned scanpy's output below warnings (`sc.settings.verbosity = 0`)."""
    import scanpy as sc

    try:
        return int(sc.settings.verbosity) < 1
    except (TypeError, ValueError):
        return False


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, disable: bool = False, **kw):
    """A tqdm bar: live in a terminal or notebook; one line when the bar closes otherwise (logs, pipes, CI).

    It is switched off by `disable=True` and when `scanpy.settings.verbosity` is below `'warning'`. A piped run
    writes one line per bar (no carriage returns, so warnings are not spliced into a bar), with the rate and the
    elapsed time as tqdm prints them.
    """
    from tqdm.auto import tqdm

    disable = bool(disable) or _quiet()
    if disable or _interactive():
        return tqdm(iterable, desc=desc, total=total, disable=disable, **kw)
    return _line_bar_class()(iterable, desc=desc, total=total, **kw)


_LINE_BAR = None


def _line_bar_class():
    global _LINE_BAR
    if _LINE_BAR is None:
        from tqdm import tqdm

        class LineBar(tqdm):
            """A tqdm that draws nothing while it runs and writes its final state as one line when closed."""

            def __init__(self, *args, **kwargs):
                kwargs.setdefault("file", sys.stderr)
                kwargs.setdefault("ascii", True)
                kwargs["mininterval"] = float("inf")
                kwargs["miniters"] = 0
                kwargs["leave"] = False  # tqdm would end with an empty line; close() writes the one line
                super().__init__(*args, **kwargs)

            def display(self, msg=None, pos=None):  # no live drawing
                return None

            def close(self):
                if self.disable:
                    return
                line = self.format_meter(**self.format_dict)
                super().close()
                try:
                    self.fp.write(line.strip() + "\n")
                    self.fp.flush()
                except (AttributeError, ValueError, OSError):
                    pass

        _LINE_BAR = LineBar
    return _LINE_BAR
