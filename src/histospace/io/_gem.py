"""`io.read_gem`: Stereo-seq GEM text files (one line per DNB and gene) streamed into square bins."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scanpy import logging as logg

from histospace._utils import check_number

from ._bins import COL_KEY, ROW_KEY, bin_table, bins_sdata, element_name
from ._units import DNB_MICRONS

__all__ = ["read_gem"]

#: count column names written by the SAW versions and other GEM producers (the specification says `MIDCount`)
COUNT_COLUMNS = ("MIDCount", "MIDCounts", "MIDcount", "UMICount", "UMICounts", "count", "Count")
#: gene column names, in order of preference (`geneID` is stereopy's default index; GEM v0.1 stores symbols there)
GENE_COLUMNS = ("geneID", "geneName", "gene", "gene_id", "gene_name", "GeneID", "GeneName")
EXON_COLUMN = "ExonCount"
#: header fields naming the chip (the specification says `Stereo-seqChip`; older files use the others)
CHIP_FIELDS = ("Stereo-seqChip", "StereoChip", "STOmicsChip", "SN", "sn")
#: centre-to-centre DNB distance in nm by chip serial-number prefix (stereopy's table; 500 nm otherwise)
CHIP_RESOLUTION_NM = {
    "CL1": 900, "N1": 900, "V3": 715, "K2": 715, "S2": 715, "S1": 900, "F3": 715, "F1": 800, "V1": 800,
    "DP84": 715, "DP8": 850, "FP2": 500, "SS2": 500, "FP1": 600, "E1": 700, "DP40": 700, "G1": 700,
    "A": 500, "B": 500, "C": 500, "D": 500, "U": 715, "V": 715, "W": 715, "X": 715, "Y": 500,
}  # fmt: skip

_BITS = 21  # bits per bin index and per gene code in the 63-bit (row, col, gene) key
_MAX = 1 << _BITS
_MASK = _MAX - 1


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


#: what gzip raises on a file cut short (EOFError) or with a corrupt stream (BadGzipFile, zlib.error)
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _damaged(path: Path, e: BaseException) -> ValueError:
    """The error for a GEM file whose gzip stream ends early or is corrupt, naming the file and the fix."""
    return ValueError(
        f"GEM file {str(path)!r} is truncated or damaged ({type(e).__name__}: {e}). The file was probably cut short "
        f"by an interrupted copy or download: check it with `gzip -t {str(path)!r}` and copy or download it again."
    )


def _open_text(path: Path, gz: bool):
    return gzip.open(path, "rt", encoding="utf-8", newline="") if gz else open(path, encoding="utf-8", newline="")


def read_gem_header(path: str | os.PathLike) -> tuple[dict[str, str], int, str | None]:
    """Read the `#key=value` lines at the top of a (gzipped) GEM file.

    Returns the header fields, the number of `#` lines and the column header line (`None` when there is none).
    """
    path = Path(path)
    header: dict[str, str] = {}
    n = 0
    columns = None
    with _open_text(path, _is_gzip(path)) as f:
        for line in f:
            if line.startswith("#"):
                n += 1
                key, _, value = line[1:].rstrip("\r\n").partition("=")
                header[key.strip()] = value.strip()
                continue
            if line.strip():
                columns = line.rstrip("\r\n")
            break
    return header, n, columns


def chip_resolution_um(header: dict[str, str]) -> float | None:
    """DNB centre-to-centre distance in µm from the chip serial number in a GEM header (`None` without one)."""
    for field in CHIP_FIELDS:
        chip = header.get(field)
        if chip:
            for prefix in sorted(CHIP_RESOLUTION_NM, key=len, reverse=True):
                if chip.startswith(prefix):
                    return CHIP_RESOLUTION_NM[prefix] / 1000.0
            return None
    return None


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path, arg: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            msg = f"{str(path)!r}: column {wanted!r} (`{arg}`) not found; the file has the columns {columns}."
            raise KeyError(msg)
        return wanted
    for c in candidates:
        if c in columns:
            return c
    msg = (
        f"{str(path)!r}: no {what} column; expected one of {list(candidates)} (or pass `{arg}=`), "
        f"the file has the columns {columns}."
    )
    raise KeyError(msg)


def _coordinates(values: pd.Series, name: str, path: Path) -> np.ndarray:
    v = values.to_numpy()
    if v.dtype.kind in "iu":
        return v.astype(np.int64, copy=False)
    if v.dtype.kind == "f":
        if np.isnan(v).any():
            msg = f"{str(path)!r}: column {name!r} has missing values; every line needs integer DNB coordinates."
            raise ValueError(msg)
        if (np.floor(v) != v).any():
            bad = v[np.floor(v) != v][0]
            msg = (
                f"{str(path)!r}: column {name!r} holds non-integer coordinates (e.g. {bad}); GEM coordinates are "
                "integer DNB indices. Round or bin them first."
            )
            raise ValueError(msg)
        return v.astype(np.int64)
    msg = f"{str(path)!r}: column {name!r} is not numeric (e.g. {v[0]!r}); check the file and `sep`."
    raise ValueError(msg)


def _counts(values: pd.Series, name: str, path: Path) -> np.ndarray:
    v = _coordinates(values, name, path)
    if v.size and v.min() < 0:
        msg = f"{str(path)!r}: column {name!r} has negative counts."
        raise ValueError(msg)
    return v


def _reduce(keys: np.ndarray, vals: np.ndarray, *, kind: str = "quicksort") -> tuple[np.ndarray, np.ndarray]:
    """Sum `vals` (rows) over equal `keys`; returns the sorted unique keys and the sums."""
    if keys.size == 0:
        return keys, vals
    order = np.argsort(keys, kind=kind)
    k = keys[order]
    first = np.empty(k.size, dtype=bool)
    first[0] = True
    np.not_equal(k[1:], k[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return k[starts], np.add.reduceat(vals[order], starts, axis=0)


class _Accumulator:
    """(key -> summed values) in sorted arrays, bucketed by blocks of bin rows, merged as chunks come.

    Each chunk is reduced (sorted, summed per key) and kept pending; once the pending keys reach an eighth of the
    accumulated ones (or `min_merge`), they are reduced together and merged bucket by bucket: keys already present
    are added in place, new keys are inserted at their sorted position. Buckets hold `ROWS` rows of bins, so an
    insertion copies one bucket, not everything: memory is about 12 bytes per distinct (bin, gene) plus the pending
    chunks.
    """

    ROWS = 8

    def __init__(self, n_vals: int, min_merge: int = 1 << 22):
        self.buckets: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.size = 0
        self.n_vals = n_vals
        self.dtype = np.dtype(np.int32)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_pending = 0
        self.min_merge = min_merge

    def add(self, keys: np.ndarray, vals: np.ndarray) -> None:
        k, v = _reduce(keys, vals)
        self.pending.append((k, v))
        self.n_pending += k.size
        if self.n_pending >= max(self.size // 8, self.min_merge):
            self.merge()

    def merge(self) -> None:
        if not self.pending:
            return
        if len(self.pending) == 1:
            k, v = self.pending[0]
        else:
            k, v = _reduce(np.concatenate([p[0] for p in self.pending]), np.concatenate([p[1] for p in self.pending]))
        self.pending, self.n_pending = [], 0
        if v.size and v.max() > np.iinfo(self.dtype).max // 2 and self.dtype != np.int64:
            self.dtype = np.dtype(np.int64)
            self.buckets = {b: (bk, bv.astype(np.int64)) for b, (bk, bv) in self.buckets.items()}
        v = v.astype(self.dtype, copy=False)
        bucket = (k >> (2 * _BITS)) // self.ROWS
        cuts = np.concatenate([[0], np.flatnonzero(bucket[1:] != bucket[:-1]) + 1, [k.size]])
        for s0, s1 in zip(cuts[:-1], cuts[1:], strict=True):
            bid = int(bucket[s0])
            kk, vv = k[s0:s1], v[s0:s1]
            if bid not in self.buckets:
                self.buckets[bid] = (kk.copy(), vv.copy())
                self.size += kk.size
                continue
            bk, bv = self.buckets[bid]
            pos = np.searchsorted(bk, kk)
            hit = pos < bk.size
            hit[hit] = bk[pos[hit]] == kk[hit]
            if hit.any():
                bv[pos[hit]] += vv[hit]
            new = ~hit
            if new.any():
                self.buckets[bid] = (np.insert(bk, pos[new], kk[new]), np.insert(bv, pos[new], vv[new], axis=0))
                self.size += int(new.sum())

    def pop_sorted(self):
        """Yield the buckets' (keys, values) in key order, releasing each."""
        for bid in sorted(self.buckets):
            yield self.buckets.pop(bid)
        self.size = 0


def read_gem(
    path: str | os.PathLike,
    *,
    bin_size: int = 50,
    gene_column: str | None = None,
    count_column: str | None = None,
    exon: bool = False,
    sep: str = "\t",
    chunksize: int = 1_000_000,
    dataset_id: str | None = None,
    coordinate_system: str = "global",
    microns_per_dnb: float | None = None,
):
    """Read a Stereo-seq GEM file into square bins of `bin_size` DNB, streamed in chunks of lines.

    A GEM file is tab-separated text (plain or gzip), optionally starting with `#key=value` header lines, with the
    columns `geneID, x, y, MIDCount[, ExonCount]` (one line per DNB and gene; `x`, `y` are integer DNB coordinates).
    Column names vary between SAW versions; the count column may be called `MIDCount`, `MIDCounts`, `MIDcount`,
    `UMICount` or `UMICounts`, the gene column `geneID` or `geneName`. Lines are read in chunks of `chunksize`
    and summed per (bin, gene) as they come, so memory grows with the number of non-zero (bin, gene) pairs, not with
    the number of lines.

    Bins follow stereopy's default (`center_coordinates=False`): bin `(i, j)` holds the DNBs with
    `x // bin_size == i` and `y // bin_size == j` on the chip's absolute grid, i.e. the square
    `[i * bin_size, (i + 1) * bin_size) x [j * bin_size, (j + 1) * bin_size)` in DNB units, and its name is
    stereopy's cell name `str((i * bin_size) << 32 | (j * bin_size))`. A DNB `x` covers `[x, x + 1)`, so the bin
    centre is `((i + 0.5) * bin_size, (j + 0.5) * bin_size)`: the same frame as an image registered to the chip at
    one pixel per DNB (SAW's `*_regist.tif`).

    Parameters
    ----------
    path
        GEM file (`.gem`, `.gem.gz`, `.txt`, `.tsv`, gzip detected from the content).
    bin_size
        Side of a bin in DNB (bin50 = 25 µm at 0.5 µm per DNB).
    gene_column
        Column naming the genes (`var_names`). Default: `geneID` if present, else `geneName`. When the index is
        `geneID` and the file also has `geneName`, the names go to `var['gene_name']`. Genes sharing an identifier
        are summed.
    count_column
        Column with the counts. Default: the first of `MIDCount`, `MIDCounts`, `MIDcount`, `UMICount`,
        `UMICounts`, `count` found.
    exon
        Also sum the `ExonCount` column into `layers['exon']`.
    sep
        Field separator.
    chunksize
        Lines per chunk (memory per chunk is about 100 bytes per line).
    dataset_id
        Prefix of the element names. Default: the file name up to its first `.`.
    coordinate_system
        Name of the coordinate system (DNB units) the bins map to.
    microns_per_dnb
        Size of a DNB in µm (positive; checked before the file is read). Default: from the chip serial number in
        the header (stereopy's table of chip resolutions), else 0.5.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with:

    `sdata.shapes['{dataset_id}_bin{bin_size}']` : :class:`geopandas.GeoDataFrame`
        One square per bin (side `bin_size`, DNB units), index `0 .. n_bins - 1`, identity transformation to
        `coordinate_system`.
    `sdata.tables['bin{bin_size}']` : :class:`anndata.AnnData`
        `X`: raw counts, CSR `float32` (exact up to 2^24), bins x genes; `obs['array_col']`, `obs['array_row']`:
        the bin's column (`x // bin_size`) and row (`y // bin_size`) index (`int32`); `obs['region']`,
        `obs['instance_id']`: the annotated shapes and the square's index (spatialdata `TableModel`);
        `obsm['spatial']`: bin centres in DNB (`float64`, x, y); `layers['exon']` if `exon=True`;
        `var['gene_name']` when available; `uns['gem']`: path, bin size, header fields, columns, number of lines.
    `sdata.attrs['histospace']['microns_per_unit'][coordinate_system]` : :class:`float`
        Micrometres per DNB.
    """
    path = Path(path).expanduser()
    if not path.exists():
        msg = f"GEM file {str(path)!r} not found."
        raise FileNotFoundError(msg)
    if not path.is_file():
        msg = f"{str(path)!r} is not a file; pass the path of a GEM file (`.gem` or `.gem.gz`)."
        raise ValueError(msg)
    if isinstance(bin_size, bool) or not isinstance(bin_size, int | np.integer) or bin_size < 1:
        msg = f"`bin_size` must be a positive integer number of DNB, got {bin_size!r}."
        raise ValueError(msg)
    if isinstance(chunksize, bool) or not isinstance(chunksize, int | np.integer) or chunksize < 1:
        msg = f"`chunksize` must be a positive integer number of lines, got {chunksize!r}."
        raise ValueError(msg)
    if not isinstance(sep, str) or len(sep) != 1:
        msg = f"`sep` must be a single character, got {sep!r}."
        raise ValueError(msg)
    microns_per_dnb = check_number(microns_per_dnb, "microns_per_dnb", low=0, low_inclusive=False, allow_none=True)
    bin_size = int(bin_size)
    if path.stat().st_size == 0:
        msg = f"GEM file {str(path)!r} is empty."
        raise ValueError(msg)

    try:
        header, n_comments, column_line = read_gem_header(path)
    except _GZIP_ERRORS as e:
        raise _damaged(path, e) from e
    if column_line is None:
        msg = f"GEM file {str(path)!r} has no column header line (expected e.g. 'geneID\\tx\\ty\\tMIDCount')."
        raise ValueError(msg)
    if sep not in column_line:
        found = next((s for s in ("\t", ",", ";", " ", "|") if s in column_line), None)
        hint = f"; it looks {found!r}-separated: pass `sep={found!r}`" if found else ""
        msg = f"{str(path)!r}: the column header {column_line!r} has no {sep!r} separator{hint}."
        raise ValueError(msg)
    columns = [c.strip() for c in column_line.split(sep)]
    gene_col = _pick(columns, gene_column, GENE_COLUMNS, "gene", path, "gene_column")
    count_col = _pick(columns, count_column, COUNT_COLUMNS, "count", path, "count_column")
    for c in ("x", "y"):
        if c not in columns:
            msg = f"{str(path)!r}: no {c!r} column (DNB coordinates); the file has the columns {columns}."
            raise KeyError(msg)
    if exon and EXON_COLUMN not in columns:
        msg = f"{str(path)!r}: `exon=True` needs an {EXON_COLUMN!r} column; the file has the columns {columns}."
        raise KeyError(msg)
    name_col = "geneName" if gene_col == "geneID" and "geneName" in columns else None
    dtype = {gene_col: "category"}
    if name_col:
        dtype[name_col] = "category"

    if microns_per_dnb is None:
        microns_per_dnb = chip_resolution_um(header) or DNB_MICRONS
    if dataset_id is None:
        dataset_id = path.name.split(".")[0]
    dataset_id = element_name(dataset_id)
    table_key = f"bin{bin_size}"
    shapes_key = f"{dataset_id}_bin{bin_size}"

    start = logg.info(f"reading GEM {str(path)!r} into bin{bin_size} ({bin_size * microns_per_dnb:g} µm bins)")
    gene_index: dict[str, int] = {}
    gene_names: dict[int, str] = {}
    acc = _Accumulator(2 if exon else 1, min_merge=2 * int(chunksize))
    n_lines = 0
    xy_min = np.array([np.iinfo(np.int64).max] * 2)
    xy_max = np.array([np.iinfo(np.int64).min] * 2)
    try:
        reader = pd.read_csv(
            path,
            sep=sep,
            skiprows=n_comments,
            header=0,
            index_col=False,
            dtype=dtype,
            chunksize=int(chunksize),
            compression="gzip" if _is_gzip(path) else None,
            engine="c",
        )
    except _GZIP_ERRORS as e:
        raise _damaged(path, e) from e
    try:
        for chunk in reader:
            if len(chunk) == 0:
                continue
            g = chunk[gene_col]
            codes = g.cat.codes.to_numpy()
            if (codes < 0).any():
                msg = f"{str(path)!r}: column {gene_col!r} has empty values near line {n_comments + n_lines + 2}."
                raise ValueError(msg)
            cats = g.cat.categories
            lut = np.fromiter(
                (gene_index.setdefault(str(c), len(gene_index)) for c in cats), dtype=np.int64, count=len(cats)
            )
            gcode = lut[codes]
            if name_col:
                pairs = pd.DataFrame({"g": gcode, "n": chunk[name_col].cat.codes.to_numpy()}).drop_duplicates("g")
                ncats = chunk[name_col].cat.categories
                for gi, ni in zip(pairs["g"].to_numpy(), pairs["n"].to_numpy(), strict=True):
                    if gi not in gene_names and ni >= 0:
                        gene_names[int(gi)] = str(ncats[ni])
            x = _coordinates(chunk["x"], "x", path)
            y = _coordinates(chunk["y"], "y", path)
            lo = np.array([x.min(), y.min()])
            hi = np.array([x.max(), y.max()])
            if lo.min() < 0:
                msg = f"{str(path)!r}: negative DNB coordinates (min x = {lo[0]}, min y = {lo[1]}); expected >= 0."
                raise ValueError(msg)
            if hi.max() // bin_size >= _MAX:
                msg = f"{str(path)!r}: coordinates up to {hi.max()} give more than {_MAX} bins per axis."
                raise ValueError(msg)
            if len(gene_index) > _MAX:
                msg = f"{str(path)!r}: more than {_MAX} distinct genes."
                raise ValueError(msg)
            xy_min = np.minimum(xy_min, lo)
            xy_max = np.maximum(xy_max, hi)
            vals = _counts(chunk[count_col], count_col, path)[:, None]
            if exon:
                vals = np.column_stack([vals[:, 0], _counts(chunk[EXON_COLUMN], EXON_COLUMN, path)])
            keys = ((y // bin_size) << (2 * _BITS)) | ((x // bin_size) << _BITS) | gcode
            acc.add(keys, vals)
            n_lines += len(chunk)
            logg.debug(f"    {n_lines} lines, {acc.size + acc.n_pending} (bin, gene) pairs")
    except _GZIP_ERRORS as e:
        raise _damaged(path, e) from e
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        msg = f"Could not parse GEM file {str(path)!r} (sep={sep!r}): {e}"
        raise ValueError(msg) from e
    except ValueError as e:
        if str(path) in str(e):
            raise
        msg = f"Could not parse GEM file {str(path)!r} (sep={sep!r}): {e}"
        raise ValueError(msg) from e
    if n_lines == 0:
        msg = f"GEM file {str(path)!r} has a header but no records."
        raise ValueError(msg)
    acc.merge()

    X, rows, cols, genes, layers = _to_csr(acc, gene_index, exon=exon)
    var = pd.DataFrame(index=pd.Index(genes, name=None))
    if name_col:
        inv = {v: k for k, v in gene_index.items()}
        var["gene_name"] = [gene_names.get(gene_index[g], inv[gene_index[g]]) for g in genes]
    corner_x = cols.astype(np.int64) * bin_size
    corner_y = rows.astype(np.int64) * bin_size
    names = ((corner_x << 32) | corner_y).astype(str)
    obs = pd.DataFrame({COL_KEY: cols, ROW_KEY: rows}, index=pd.Index(names, name=None))
    centres = np.column_stack([(cols + 0.5) * bin_size, (rows + 0.5) * bin_size])
    uns = {
        "gem": {
            "path": str(path.resolve()),
            "bin_size": bin_size,
            "header": dict(header),
            "gene_column": gene_col,
            "count_column": count_col,
            "n_lines": int(n_lines),
            "min_xy": xy_min.astype(np.int64),
            "max_xy": xy_max.astype(np.int64),
        }
    }
    table = bin_table(X, obs=obs, var=var, region=shapes_key, spatial=centres, layers=layers, uns=uns)
    summary = f"{n_lines} lines -> {X.shape[0]} bins x {X.shape[1]} genes ({X.nnz} non-zero)"
    return bins_sdata(
        table,
        centres,
        bin_size,
        table_key,
        shapes_key,
        coordinate_system,
        microns_per_dnb,
        start,
        summary,
        "bin counts",
    )


def _to_csr(acc: _Accumulator, gene_index: dict[str, int], *, exon: bool):
    """CSR (bins x genes, genes sorted by name) from the accumulator, bucket by bucket (each released once copied).

    Returns X, the bins' rows and columns, the gene names and the layers.
    """
    names = np.array(list(gene_index), dtype=object)
    order = np.argsort(names.astype(str), kind="stable")
    rank = np.empty(len(names), dtype=np.int32)
    rank[order] = np.arange(len(names), dtype=np.int32)
    nnz = acc.size
    idx_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    indices = np.empty(nnz, dtype=idx_dtype)
    data = [np.empty(nnz, dtype=np.float32) for _ in range(acc.n_vals)]
    starts, rows, cols = [], [], []
    at = 0
    for keys, vals in acc.pop_sorted():
        n = keys.size
        first = np.empty(n, dtype=bool)
        first[:1] = True
        np.not_equal(keys[1:] >> _BITS, keys[:-1] >> _BITS, out=first[1:])
        st = np.flatnonzero(first)
        ub = keys[st] >> _BITS
        starts.append(st + at)
        rows.append((ub >> _BITS).astype(np.int32))
        cols.append((ub & _MASK).astype(np.int32))
        indices[at : at + n] = rank[(keys & _MASK).astype(np.int32)]
        for j, d in enumerate(data):
            d[at : at + n] = vals[:, j]
        at += n
        del keys, vals
    starts = np.concatenate(starts) if starts else np.empty(0, dtype=np.int64)
    indptr = np.append(starts, nnz).astype(idx_dtype)
    shape = (starts.size, len(names))
    mats = []
    for j, d in enumerate(data):
        m = sp.csr_matrix((d, indices if j == len(data) - 1 else indices.copy(), indptr), shape=shape, copy=False)
        m.sort_indices()
        mats.append(m)
    rows = np.concatenate(rows) if rows else np.empty(0, dtype=np.int32)
    cols = np.concatenate(cols) if cols else np.empty(0, dtype=np.int32)
    return mats[0], rows, cols, list(names[order].astype(str)), ({"exon": mats[1]} if exon else None)
