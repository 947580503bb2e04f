"""Fixtures for `hs.io` tests: a small hand-made GEM file."""

from __future__ import annotations

import pytest

GEM_TEXT = """#FileFormat=GEMv0.1
#OffsetX=0
#OffsetY=0
geneID\tx\ty\tMIDCount\tExonCount
Gb\t0\t0\t1\t1
Ga\t3\t9\t2\t1
Gb\t9\t9\t4\t4
Ga\t10\t0\t1\t0
Gc\t25\t31\t3\t2
Gc\t29\t30\t1\t1
Ga\t21\t39\t1\t1
Gb\t5\t12\t7\t3
Gb\t5\t12\t1\t0
"""


@pytest.fixture
def gem_path(tmp_path):
    """A GEM file of 9 lines over 4 bins of 10 DNB (the records of `test_gem.RECORDS`)."""
    path = tmp_path / "a.gem"
    path.write_text(GEM_TEXT)
    return path
