"""The same pipeline on an AnnData and on a SpatialData gives the same bytes (DLPFC 151673; issue #14).

DLPFC 151673 is put into a SpatialData with spatialdata-io's converter (`from_legacy_anndata`: the low-res H&E as an
image element in its own coordinate system, the spots as circles with the scale transformation to it, the table
annotating them). The default pipeline `hs.pp.image_features` -> `hs.pp.spatial_graph` -> `hs.tl.stereomm` ->
`hs.tl.domains` runs on both (seed 0, CPU); the script compares every slot written (bit for bit), the ARI, and the
SpatialData after a zarr round trip.

Usage: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/spatialdata_equivalence.py` (writes
benchmarks/results/spatialdata_equivalence.md).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("HISTOSPACE_DATA", HERE.parent.parent / "shared" / "data"))
WEIGHTS = DATA / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"


def _run(data, hs, **kw) -> float:
    t = time.perf_counter()
    hs.pp.image_features(data, weights=str(WEIGHTS), progress_bar=False, **kw)
    hs.pp.spatial_graph(data, **kw)
    hs.tl.stereomm(data, progress_bar=False, **kw)
    hs.tl.domains(data, n_clusters=7, **kw)
    return time.perf_counter() - t


def main() -> None:
    import spatialdata as sd
    import torch
    from spatialdata_io.experimental import from_legacy_anndata

    import histospace as hs

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    adata = hs.datasets.dlpfc("151673", data_dir=DATA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = from_legacy_anndata(adata.copy())
    t_a = _run(adata, hs)
    t_s = _run(sdata, hs)
    table = sdata.tables["table"]
    rows = []
    for slot, key in (
        ("obsm", "img_features"),
        ("obsp", "spatial_connectivities"),
        ("obsm", "X_stereomm"),
        ("obs", "stereomm_domain"),
    ):
        a, b = getattr(adata, slot)[key], getattr(table, slot)[key]
        if slot == "obsp":
            same = (a != b).nnz == 0
        elif slot == "obs":
            same = a.astype(str).tolist() == b.astype(str).tolist()
        else:
            same = np.array_equal(np.asarray(a), np.asarray(b))
        rows.append((f"{slot}['{key}']", "identical" if same else "DIFFERENT"))
    gt = "layer_guess_reordered"
    ari_a = hs.metrics.ari(adata.obs[gt], adata.obs["stereomm_domain"])
    ari_s = hs.metrics.ari(table.obs[gt], table.obs["stereomm_domain"])
    with tempfile.TemporaryDirectory() as tmp:
        sdata.write(Path(tmp) / "dlpfc.zarr")
        back = sd.read_zarr(Path(tmp) / "dlpfc.zarr").tables["table"]
        zarr_same = all(
            np.array_equal(np.asarray(back.obsm[k]), np.asarray(table.obsm[k])) for k in ("img_features", "X_stereomm")
        )
        zarr_same &= (back.obsp["spatial_connectivities"] != table.obsp["spatial_connectivities"]).nnz == 0
        zarr_same &= (
            back.obs["stereomm_domain"].astype(str).tolist() == table.obs["stereomm_domain"].astype(str).tolist()
        )
    lines = [
        "# AnnData and SpatialData paths on DLPFC 151673",
        "",
        "`from_legacy_anndata` (spatialdata-io) puts the section into a SpatialData; the default pipeline runs on both "
        f"(seed 0, {torch.get_num_threads()} threads, CPU).",
        "",
        "| slot | AnnData vs SpatialData |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        f"| ARI | {ari_a:.3f} vs {ari_s:.3f} |",
        f"| zarr round trip of the SpatialData | {'exact' if zarr_same else 'DIFFERENT'} |",
        f"| pipeline time (s) | {t_a:.1f} vs {t_s:.1f} |",
        "",
        f"Image features: {adata.uns['img_features']['params']['method']} method "
        f"(SpatialData: {table.uns['img_features']['params']['method']}). Load average at the end: "
        f"{os.getloadavg()[0]:.1f}.",
        "",
    ]
    out = HERE / "results" / "spatialdata_equivalence.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
