"""Entry point of `python -m histospace` and the `histospace` console script."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
