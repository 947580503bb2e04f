"""Tests of the `histospace` command line (`histospace._cli.main`) on tiny synthetic files."""

from __future__ import annotations

import anndata as ad
import numpy as np

from histospace._cli import main


def test_cli_predict_query(adata, tmp_path):
    ref = adata.copy()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query = adata.copy()
    del query.obs["library_id"]
    query.write_h5ad(tmp_path / "query.h5ad")
    out = tmp_path / "pred.h5ad"
    argv = ["predict", "--reference", str(tmp_path / "ref.h5ad"), "--query", str(tmp_path / "query.h5ad")]
    argv += ["-o", str(out), "--max-epochs", "1", "--n-models", "2", "--n-neighbors", "5", "--quiet"]
    assert main(argv) == 0
    pred = ad.read_h5ad(out)
    # the panel (highly variable genes of the reference) is all 30 genes, so the query gets a layer
    assert pred.shape == adata.shape and pred.layers["mclstexp"].shape == adata.shape
    params = pred.uns["mclstexp"]["params"]
    assert params["n_models"] == 2 and params["n_neighbors"] == 5
    assert np.isfinite(pred.layers["mclstexp"]).all()


def test_cli_predict_bad_input(adata, tmp_path, capsys):
    adata.write_h5ad(tmp_path / "ref.h5ad")
    argv = ["predict", "--reference", str(tmp_path / "ref.h5ad"), "-o", str(tmp_path / "o.h5ad"), "--quiet"]
    assert main(argv) == 2  # neither --query nor --image
    assert "exactly one of --query" in capsys.readouterr().err
    argv += ["--query", str(tmp_path / "missing.h5ad")]
    assert main(argv) == 2
    assert "missing.h5ad" in capsys.readouterr().err
