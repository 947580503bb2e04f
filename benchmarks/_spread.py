"""Spread over spots of a paired comparison of two predictions: a spatial block bootstrap.

Two methods scored on the same held-out section differ by the mean over genes of their per-gene Pearson r. How much
of that difference the spots resolve: the section's spots are grouped into square blocks (side in µm), blocks are
drawn with replacement, and each draw recomputes every gene's r of both methods on the same drawn spots. Blocks keep
the spatial autocorrelation of neighbouring spots, which a spot-level bootstrap would ignore. Over several held-out
sections, one draw per section is averaged (sections drawn independently), which gives the spread of the mean over
folds the pages report.
"""

from __future__ import annotations

import numpy as np

#: sides (µm) of the square blocks
BLOCKS_UM = (300, 500, 800)
N_BOOT = 1000


def pearson(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-column Pearson r (NaN for a constant column); `hs.metrics.pearson_per_gene` without its checks, for speed."""
    t, p = t - t.mean(axis=0), p - p.mean(axis=0)
    den = np.sqrt((t * t).sum(axis=0) * (p * p).sum(axis=0))
    return np.divide((t * p).sum(axis=0), den, out=np.full(den.shape, np.nan), where=den > 0)


def _difference(t, pa, pb, top, idx) -> tuple[float, float]:
    """Mean over genes (all, `top`) of r(pa) - r(pb) against `t` on the spots `idx` (NaN genes left out)."""
    d = pearson(t[idx], pa[idx]) - pearson(t[idx], pb[idx])
    return float(np.nanmean(d)), float(np.nanmean(d[top]))


def block_draws(t, pa, pb, xy_um, *, top, side_um: float, n_boot: int = N_BOOT, seed: int = 0):
    """`(observed (all, top), draws (n_boot, 2), n_blocks)` of the difference r(pa) - r(pb) on one section.

    `t`, `pa`, `pb`: observed and the two predictions, spots x genes; `xy_um`: the spots' positions in µm; `top`: the
    columns of the top genes (fixed from the whole section).
    """
    blk = np.unique(np.floor(np.asarray(xy_um) / side_um).astype(np.int64), axis=0, return_inverse=True)[1].ravel()
    members = [np.flatnonzero(blk == b) for b in range(blk.max() + 1)]
    rng = np.random.default_rng(seed)
    draws = np.array(
        [_difference(t, pa, pb, top, np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))]))
         for _ in range(n_boot)]
    )  # fmt: skip
    return _difference(t, pa, pb, top, np.arange(len(t))), draws, len(members)


def summary(observed, draws: np.ndarray, n_blocks) -> dict:
    """The stored figures of one comparison: observed difference, 95 % percentile interval, share of draws below 0."""
    return {
        "n_blocks": n_blocks,
        **{f"diff_{k}": round(float(observed[j]), 4) for j, k in enumerate(("all", "top"))},
        **{f"ci95_{k}": np.percentile(draws[:, j], [2.5, 97.5]).round(4).tolist() for j, k in enumerate(("all", "top"))},
        "share_below_0_all": round(float(np.mean(draws[:, 0] < 0)), 3),
    }  # fmt: skip


def table_row(label: str, side, b: dict) -> str:
    """A markdown row `| label | side µm | blocks | diff all [interval] | diff top [interval] | draws below 0 |`."""
    (lo, hi), (lo2, hi2) = b["ci95_all"], b["ci95_top"]
    return (f"| {label} | {side} µm | {b['n_blocks']} | {b['diff_all']:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
            f"{b['diff_top']:+.4f} [{lo2:+.4f}, {hi2:+.4f}] | {b['share_below_0_all']:.1%} |")  # fmt: skip
