"""`tl.domains`: spatial domains from a latent representation (Gaussian mixture, KMeans or Leiden)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scanpy import logging as logg

from histospace._constants import CONNECTIVITIES_KEY, DOMAIN_KEY, STEREOMM_KEY, connectivity_key_in
from histospace._utils import check_number, check_obsm, check_obsp, check_random_state, doc_params, version_string
from histospace._utils._data import binary_adjacency, check_key_added
from histospace._utils._sdata import as_table, table_output

if TYPE_CHECKING:
    from spatialdata import SpatialData

_HINTS = {
    STEREOMM_KEY: "Run `hs.tl.stereomm(adata)` first.",
}


def _reduce(x: np.ndarray, n_pcs: int | None, random_state) -> np.ndarray:
    if n_pcs is None or x.shape[1] <= n_pcs:
        return x
    from sklearn.decomposition import PCA

    return PCA(n_components=n_pcs, random_state=random_state).fit_transform(x)


def _gmm(x, k, covariance_type, random_state, n_init=10):
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(k, covariance_type=covariance_type, random_state=random_state, reg_covar=1e-5, n_init=n_init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lab = gm.fit_predict(x)
    return lab, gm


def _align(labels: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
    """Relabel `labels` to agree most with `ref` (Hungarian matching on their contingency table)."""
    from scipy.optimize import linear_sum_assignment

    table = np.zeros((k, k), dtype=np.int64)
    np.add.at(table, (labels, ref), 1)
    rows, cols = linear_sum_assignment(-table)
    mapping = np.arange(k)
    mapping[rows] = cols
    return mapping[labels]


def _gmm_consensus(x, k, covariance_type, random_state, n_runs):
    """Majority vote of `n_runs` Gaussian mixtures fitted from different starts, their labels aligned to each other.

    Each run is one k-means-initialised fit (seeds drawn from `random_state`); the labellings are aligned to the one
    of highest likelihood, then to their vote, until the vote is stable. Linear in the number of spots (no n x n
    co-association matrix). Returns the voted labels and the mean agreement of the runs with them.
    """
    from sklearn.mixture import GaussianMixture

    seeds = np.random.default_rng(random_state).integers(0, 2**31 - 1, size=n_runs)
    runs, scores = [], []
    for seed in seeds:
        gm = GaussianMixture(k, covariance_type=covariance_type, random_state=int(seed), reg_covar=1e-5, n_init=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs.append(gm.fit_predict(x))
        scores.append(gm.score(x))
    return _vote(runs, k, start=int(np.argmax(scores)))


def _vote(runs: list[np.ndarray], k: int, start: int = 0) -> tuple[np.ndarray, float]:
    """Majority vote of labellings (labels `0..k-1`), aligned to `runs[start]`, then to their vote until it is stable.

    Returns the voted labels and the mean agreement of the runs with them.
    """
    vote = np.asarray(runs[start])
    n = vote.size
    for _ in range(10):
        aligned = np.stack([_align(r, vote, k) for r in runs])
        counts = np.zeros((k, n), dtype=np.int32)
        for a in aligned:
            counts[a, np.arange(n)] += 1
        new = counts.argmax(axis=0)
        if np.array_equal(new, vote):
            break
        vote = new
    return vote, float((aligned == vote).mean())


#: restarts of each Gaussian mixture of the scan over `cluster_range` (`n_clusters=None`), at most
SCAN_N_INIT = 10


def _choose_k(xr, method, cluster_range, covariance_type, n_init, random_state) -> tuple[np.ndarray, int, str]:
    """`(labels, k, criterion)`: the number of clusters in `cluster_range` of lowest BIC (GMM) or best silhouette.

    Warns when that number is the largest tried: the criterion may still improve beyond the range.
    """
    ks = range(cluster_range[0], min(cluster_range[1], xr.shape[0] - 1) + 1)
    scores = {}
    if method == "gmm":
        for k in ks:
            lab, gm = _gmm(xr, k, covariance_type, random_state, n_init)
            scores[k] = (gm.bic(xr), lab)
        criterion = "bic"
    else:
        from sklearn.metrics import silhouette_score

        for k in ks:
            if k < 2:
                continue
            lab = _kmeans(xr, k, random_state)
            s = silhouette_score(xr, lab, sample_size=min(5000, len(lab)), random_state=random_state)
            scores[k] = (-s, lab)
        criterion = "silhouette"
    kbest = min(scores, key=lambda k: scores[k][0])
    if len(ks) > 1 and kbest == ks[-1]:  # on larger sections BIC takes 15 of (2, 15) (docs/benchmarks.md)
        warnings.warn(
            f"n_clusters=None: the {'BIC' if criterion == 'bic' else 'silhouette score'} chose {kbest}, the largest "
            f"number tried (cluster_range={tuple(cluster_range)}); it may keep improving beyond it and is then no "
            "estimate of the number of domains. Pass n_clusters= (e.g. the number of annotated regions) or a wider "
            "cluster_range.",
            UserWarning,
            stacklevel=3,
        )
    return scores[kbest][1], int(kbest), criterion


def _n_models(adata: AnnData, use_rep: str, width: int, n_models: int | None) -> int:
    """The number of side-by-side latents in `obsm[use_rep]`: given, else what `hs.tl.stereomm` recorded.

    `hs.tl.stereomm` writes `n_models` and `n_latent` to `uns[<use_rep without 'X_'>]['params']`; other entries under
    that name (e.g. mclSTExp's, whose `n_models` describes its predictions, not `obsm['X_mclstexp']`) are not read.
    """
    if n_models is None:
        uns_key = use_rep[2:] if use_rep.startswith("X_") and len(use_rep) > 2 else use_rep
        entry = adata.uns.get(uns_key)
        params = entry.get("params") if isinstance(entry, Mapping) else None
        params = params if isinstance(params, Mapping) else {}
        stored, n_latent = params.get("n_models"), params.get("n_latent")
        n_models = 1
        if stored is not None and n_latent is not None and int(stored) > 1:
            if int(n_latent) * int(stored) != width:
                msg = (
                    f"`adata.uns[{uns_key!r}]['params']` describes {int(stored)} models of latent {int(n_latent)}, "
                    f"but `adata.obsm[{use_rep!r}]` has {width} columns; it was overwritten after `hs.tl.stereomm`. "
                    "Pass `n_models=` (1 for one representation), or run `hs.tl.stereomm` again."
                )
                raise ValueError(msg)
            n_models = int(stored)
    n_models = check_number(n_models, "n_models", integer=True, low=1)
    if width % n_models:
        msg = (
            f"`adata.obsm[{use_rep!r}]` has {width} columns, not a multiple of n_models={n_models}: it cannot hold "
            f"{n_models} latents of equal width side by side."
        )
        raise ValueError(msg)
    return int(n_models)


def _kmeans(x, k, random_state):
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=10, random_state=random_state).fit_predict(x)


class _Leiden:
    """Leiden on a kNN graph of the representation, built once (no write to the user's AnnData)."""

    def __init__(self, x, n_neighbors, random_state):
        from sklearn.neighbors import kneighbors_graph

        # exact kNN (scikit-learn), symmetrised, unweighted: no numba compilation, deterministic
        knn = kneighbors_graph(x, n_neighbors=min(n_neighbors, x.shape[0] - 1), mode="connectivity")
        self.adjacency = sp.csr_matrix(knn.maximum(knn.T))
        self.tmp = AnnData(np.zeros((x.shape[0], 1), dtype=np.float32))
        self.random_state = random_state

    def __call__(self, resolution: float) -> np.ndarray:
        import scanpy as sc

        sc.tl.leiden(
            self.tmp,
            adjacency=self.adjacency,
            resolution=resolution,
            random_state=self.random_state,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            key_added="_l",
        )
        return self.tmp.obs["_l"].astype(int).to_numpy()


def _leiden_bisect(leiden: _Leiden, k: int, lo: float, hi: float, max_steps: int = 50):
    """The reference's search: bisect the resolution in [lo, hi] until exactly k clusters (hi grows by 1 if short)."""
    tried: list[tuple[float, int, np.ndarray]] = []

    def run(r):
        lab = leiden(r)
        tried.append((r, len(np.unique(lab)), lab))
        return tried[-1][1]

    for _ in range(10):
        if run(hi) >= k:
            break
        lo, hi = hi, hi + 1.0
    if tried[-1][1] == k:
        return tried[-1][2], tried[-1][0], True
    if run(lo) == k:
        return tried[-1][2], lo, True
    for _ in range(max_steps):
        mid = 0.5 * (lo + hi)
        n = run(mid)
        if n == k:
            return tried[-1][2], mid, True
        if n < k:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    r, n, lab = min(tried, key=lambda t: (abs(t[1] - k), t[0]))
    return lab, r, False


def _refine(labels: np.ndarray, adj: sp.csr_matrix, n_iter: int) -> np.ndarray:
    """Majority vote over each spot and its spatial neighbours (ties keep the spot's own label)."""
    adj = binary_adjacency(adj)
    k = labels.max() + 1
    lab = labels.copy()
    for _ in range(n_iter):
        onehot = sp.csr_matrix((np.ones(len(lab), np.float32), (np.arange(len(lab)), lab)), shape=(len(lab), k))
        votes = np.asarray((adj @ onehot).todense()) + 0.5 * onehot.toarray()  # own label breaks ties
        new = votes.argmax(1)
        if np.array_equal(new, lab):
            break
        lab = new
    return lab


def _relabel(lab: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..k-1 by decreasing size (ties by first appearance): stable names across runs."""
    uniq, first, counts = np.unique(lab, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first[i]))
    mapping = np.empty(lab.max() + 1, dtype=int)
    mapping[uniq[order]] = np.arange(len(uniq))
    return mapping[lab]


@doc_params()
def domains(
    adata: AnnData | SpatialData,
    *,
    table_key: str | None = None,
    use_rep: str = STEREOMM_KEY,
    n_clusters: int | None = 7,
    method: Literal["gmm", "kmeans", "leiden"] = "gmm",
    covariance_type: Literal["tied", "full", "diag", "spherical"] = "tied",
    n_pcs: int | None = 10,
    n_init: int | None = None,
    consensus: bool | None = None,
    n_models: int | None = None,
    ensemble: Literal["joint", "vote"] = "joint",
    n_neighbors: int = 20,
    resolution_range: tuple[float, float] = (0.1, 1.2),
    cluster_range: tuple[int, int] = (2, 15),
    refine: bool | int = True,
    connectivity_key: str = CONNECTIVITIES_KEY,
    random_state: int | None = 0,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | SpatialData | None:
    """Cluster a latent representation into spatial domains.

    The clustering methods (`'gmm'`, `'kmeans'`, `'leiden'`), how `n_clusters=None` picks the number of domains and
    the spatial refinement are described in the Notes.

    Parameters
    ----------
    adata
        {adata}
    table_key
        {table_key}
    use_rep
        Key in `adata.obsm` with the representation (e.g. `'X_stereomm'` from `hs.tl.stereomm`).
    n_clusters
        Number of domains; `None` chooses it (see Notes).
    method
        `'gmm'`, `'kmeans'` or `'leiden'`.
    covariance_type
        Covariance of the Gaussian mixture.
    n_pcs
        Cluster the first `n_pcs` principal components when the representation is wider (`None`: never).
    n_init
        Restarts of the Gaussian mixture: with `consensus` all of them vote, else the best likelihood is kept.
        `None`: 50 for a seed ensemble clustered jointly, else 10 (see Notes).
    consensus
        Gaussian mixture: label each spot by the majority vote of the `n_init` fits (their labels aligned to each
        other by Hungarian matching) instead of keeping the fit of highest likelihood. Linear in the number of spots.
        `None`: `True` for a seed ensemble clustered jointly, else `False` (see Notes).
    n_models
        Number of latents side by side in `use_rep` (a seed ensemble, `hs.tl.stereomm(n_models=...)`). `None` reads
        `'n_models'` from `adata.uns[<use_rep without 'X_'>]['params']` when `hs.tl.stereomm` wrote it there (with
        `'n_latent'`), else 1.
    ensemble
        How a seed ensemble (`n_models > 1`) is clustered with `'gmm'` and `'kmeans'`: `'joint'` clusters the
        first `n_pcs` principal components of the side-by-side latents (what the models share dominates them, and
        what one model alone adds is averaged out); `'vote'` clusters each latent on its own and gives every spot
        the majority label, the labellings aligned by Hungarian matching. Leiden always clusters them together.
    n_neighbors
        Neighbours of the kNN graph for Leiden.
    resolution_range
        Initial Leiden resolution interval.
    cluster_range
        Numbers of clusters tried when `n_clusters=None`.
    refine
        Spatial majority-vote refinement passes (`False`/0: none). Needs `adata.obsp[connectivity_key]`.
    connectivity_key
        Key in `adata.obsp` with the spatial graph used by `refine`, or the graph's base name (`key_added` of
        `hs.pp.spatial_graph`: `'x'` reads `obsp['x_connectivities']`).
    random_state
        {random_state}
    key_added
        Key in `adata.obs`; `None` gives `'stereomm_domain'` for `use_rep='X_stereomm'`, else `f'{use_rep}_domain'`
        (a leading `'X_'` removed).
    copy
        {copy}

    Returns
    -------
    `None` if `copy=False`, else an `AnnData` (a `SpatialData` for a SpatialData). Sets the following fields (of the
    table, for a SpatialData):

    `adata.obs['stereomm_domain' | key_added]` : :class:`pandas.Categorical`
        Domain labels `'0'`, `'1'`, ... numbered by decreasing size.
    `adata.uns['stereomm_domain' | key_added]` : :class:`dict`
        `'params'` (method, number of clusters found after the refinement, the Leiden resolution, ...) and
        `'version'`; with `n_clusters=None` also `'n_clusters_chosen'` (the number the criterion picked, before the
        refinement, which can empty a small domain) and `'criterion'`.

    Notes
    -----
    - `'gmm'` (default): scikit-learn's Gaussian mixture, the pure-Python stand-in for R's `mclust` that spatial
      domain papers (GraphST, STAGATE) use. Default covariance `'tied'` (one full covariance shared by all
      components, mclust's `EEE` model, which those papers use); `'full'` is mclust's `VVV`. Fitted on the first
      `n_pcs` principal components of the representation when it is wider, from `n_init` k-means-initialised
      starts: the fit of best likelihood is kept, or with `consensus` each spot takes the majority label of the
      fits. The defaults are the settings the stability benchmark validated on DLPFC (10 seeds of the model and
      the clustering, two sets of models): for a seed ensemble (`n_models > 1`, `ensemble='joint'`) the vote of 50
      fits, which brought the ARI's sd on 151674 from 0.041 (the three models' best fits, voted) to 0.019-0.030
      at a higher mean; for one latent the best of 10, which varied less than the vote of 50 there.
    - `'kmeans'`: scikit-learn KMeans (10 restarts) on the same PCs.
    - `'leiden'`: Leiden on an `n_neighbors` kNN graph of the representation (exact, symmetrised), with the StereoMM reference's search:
      the resolution is bisected in `resolution_range` (the upper end grows by 1 while it gives too few clusters)
      until exactly `n_clusters` clusters appear. When no resolution gives exactly `n_clusters`, the closest
      clustering is kept with a warning.

    `n_clusters=None` picks the number in `cluster_range`: the lowest BIC for `'gmm'` (best likelihood of at most 10
    restarts per number; with `consensus` the vote then runs at the number chosen), the highest silhouette score for
    `'kmeans'` and `'leiden'` (Leiden scans resolutions over `resolution_range`). When the scan of `'gmm'` or
    `'kmeans'` ends at the top of `cluster_range` a `UserWarning` says so: on larger sections BIC tends to keep
    falling (15 of (2, 15) on DLPFC, 7 layers), and such a number is no estimate of the number of domains.

    With `ensemble='vote'` and a seed ensemble (`n_models > 1`), `n_clusters=None` picks the number on the first
    model's latent and uses it for all of them; `uns[key_added]['params']['model_agreement']` is the mean fraction
    of spots on which a model agrees with the vote.

    `refine` smooths the labels over the spatial graph, as GraphST's refinement: each spot takes the label most
    common among its spatial neighbours and itself (its own label wins ties), repeated `refine` times (`True` = 1).
    """
    if method not in ("gmm", "kmeans", "leiden"):
        msg = f"method={method!r} is not one of 'gmm', 'kmeans', 'leiden'."
        raise ValueError(msg)
    random_state = check_random_state(random_state)
    n_pcs = check_number(n_pcs, "n_pcs", integer=True, low=1, allow_none=True)
    n_init = check_number(n_init, "n_init", integer=True, low=1, allow_none=True)
    if ensemble not in ("joint", "vote"):
        msg = f"`ensemble` must be 'joint' or 'vote', got {ensemble!r}."
        raise ValueError(msg)
    n_neighbors = check_number(n_neighbors, "n_neighbors", integer=True, low=1)
    adata, ctx = as_table(adata, table_key)
    if adata.n_obs < 2:
        msg = f"`adata` has {adata.n_obs} spot(s); spatial domains need at least 2."
        raise ValueError(msg)
    hint = _HINTS.get(
        use_rep, f"Compute the representation first (e.g. `hs.tl.stereomm(adata, key_added={use_rep!r})`)."
    )
    x = check_obsm(adata, use_rep, hint=hint).astype(np.float64)
    n_models = _n_models(adata, use_rep, x.shape[1], n_models)
    n_clusters = check_number(n_clusters, "n_clusters", integer=True, low=1, allow_none=True)
    if n_clusters is not None:
        if adata.n_obs < n_clusters:
            msg = f"`adata` has {adata.n_obs} spots, fewer than n_clusters={n_clusters}."
            raise ValueError(msg)
    else:
        lo_k, hi_k = cluster_range
        if not (1 <= lo_k <= hi_k):
            msg = f"`cluster_range` must be (low, high) with 1 <= low <= high, got {cluster_range!r}."
            raise ValueError(msg)
        if adata.n_obs <= lo_k:
            msg = f"`adata` has {adata.n_obs} spots, too few for cluster_range={cluster_range!r}."
            raise ValueError(msg)
    if isinstance(refine, bool | np.bool_):  # True/False: one pass or none
        n_refine = int(refine)
    else:
        try:
            n_refine = check_number(refine, "refine", integer=True, low=0)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} Pass True/False or a number of refinement passes (0, 1, 2, ...).") from None
    adj = None
    if n_refine:
        connectivity_key = connectivity_key_in(adata.obsp, connectivity_key)  # `key_added` of pp.spatial_graph too
        adj = check_obsp(
            adata,
            connectivity_key,
            hint="Build it with `hs.pp.spatial_graph(adata)` or `squidpy.gr.spatial_neighbors_grid(adata)`, or pass refine=False.",
        )
        if adj.shape != (adata.n_obs, adata.n_obs):
            msg = f"`adata.obsp[{connectivity_key!r}]` has shape {adj.shape}; expected ({adata.n_obs}, {adata.n_obs})."
            raise ValueError(msg)
    if key_added is None:
        key_added = DOMAIN_KEY if use_rep == STEREOMM_KEY else f"{use_rep.removeprefix('X_')}_domain"
    check_key_added(key_added)

    start = logg.info(f"finding spatial domains ({method}) in {use_rep!r}")
    params: dict = {
        "use_rep": use_rep,
        "method": method,
        "n_models": n_models,
        "refine": n_refine,
        "random_state": random_state,
    }
    if method == "leiden":
        leiden = _Leiden(x, n_neighbors, random_state)
        params.update(n_neighbors=int(n_neighbors))
        if n_clusters is None:
            from sklearn.metrics import silhouette_score

            best = None
            for r in np.linspace(resolution_range[0], resolution_range[1], 12):
                lab = leiden(float(r))
                k = len(np.unique(lab))
                if not (cluster_range[0] <= k <= cluster_range[1]) or k < 2:
                    continue
                s = silhouette_score(x, lab, sample_size=min(5000, len(lab)), random_state=random_state)
                if best is None or s > best[0]:
                    best = (s, lab, float(r))
            if best is None:
                msg = f"no Leiden resolution in {resolution_range} gives a number of clusters in {cluster_range}."
                raise ValueError(msg)
            labels, res = best[1], best[2]
            params["criterion"] = "silhouette"
            params["n_clusters_chosen"] = int(len(np.unique(labels)))
        else:
            labels, res, exact = _leiden_bisect(leiden, int(n_clusters), *resolution_range)
            if not exact:
                warnings.warn(
                    f"no Leiden resolution gives exactly {n_clusters} clusters; kept the closest: "
                    f"{len(np.unique(labels))} clusters at resolution {res:.4g}. Try method='gmm' or 'kmeans' for an "
                    "exact number.",
                    UserWarning,
                    stacklevel=2,
                )
        params["resolution"] = float(res)
    else:
        blocks = np.split(x, n_models, axis=1) if ensemble == "vote" else [x]  # one block per clustering
        joint = n_models > 1 and ensemble == "joint"
        n_init = (50 if joint else 10) if n_init is None else n_init
        consensus = joint if consensus is None else bool(consensus)
        if n_pcs is not None:
            params["n_pcs"] = int(min(n_pcs, blocks[0].shape[1]))
        if n_models > 1:
            params["ensemble"] = ensemble
        if method == "gmm":
            params["covariance_type"] = covariance_type
            params["n_init"] = int(n_init)
            params["consensus"] = bool(consensus)
        k = None if n_clusters is None else int(n_clusters)
        runs, agreements = [], []
        for block in blocks:
            xr = _reduce(block, n_pcs, random_state)
            scanned = None
            if k is None:  # chosen on the first block, kept for the others (the vote needs one k)
                scanned, k, params["criterion"] = _choose_k(
                    xr, method, cluster_range, covariance_type, min(n_init, SCAN_N_INIT), random_state
                )
                params["n_clusters_chosen"] = k
            if method == "gmm" and consensus:
                lab, agreement = _gmm_consensus(xr, k, covariance_type, random_state, n_init)
                agreements.append(agreement)
            elif scanned is not None:  # the scan's fit at the number it chose
                lab = scanned
            elif method == "gmm":
                lab, _ = _gmm(xr, k, covariance_type, random_state, n_init)
            else:
                lab = _kmeans(xr, k, random_state)
            runs.append(np.asarray(lab, dtype=int))
        if agreements:
            params["consensus_agreement"] = float(np.mean(agreements))
        labels = runs[0]
        if len(runs) > 1:
            labels, params["model_agreement"] = _vote(runs, k)
    labels = _relabel(np.asarray(labels, dtype=int))
    if n_refine:
        labels = _relabel(_refine(labels, adj, n_refine))
    k_found = int(len(np.unique(labels)))
    params["n_clusters"] = k_found
    if n_clusters is not None:
        params["n_clusters_requested"] = int(n_clusters)

    out = adata.copy() if copy else adata
    cats = [str(i) for i in range(k_found)]
    out.obs[key_added] = pd.Categorical([str(v) for v in labels], categories=cats)
    out.uns[key_added] = {"params": params, "version": version_string()}
    logg.info(
        f"    found {k_found} domains",
        time=start,
        deep=f"added\n    {key_added!r}, domains (adata.obs)\n    {key_added!r}, parameters (adata.uns)",
    )
    return table_output(ctx, out, copy)
