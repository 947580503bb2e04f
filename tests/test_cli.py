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
    argv += ["--weights", "none", "--patch-size", "40", "--input-size", "32"]  # random-init MobileNetV2, small (fast)
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


def test_cli_bad_files_exit_2_with_one_line(adata, tmp_path, capsys):
    # a text file named .h5ad, a CSV, a missing weights file, a bad option value: exit 2, one line, no traceback
    (tmp_path / "text.h5ad").write_text("not an HDF5 file\n")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    base = ["-o", str(tmp_path / "o.h5ad"), "--n-clusters", "3", "--quiet"]
    assert main(["domains", str(tmp_path / "text.h5ad"), *base]) == 2
    err = capsys.readouterr().err
    assert "is not an .h5ad file anndata can read" in err and len(err.strip().splitlines()) == 1
    assert main(["domains", str(tmp_path / "table.csv"), *base]) == 2
    assert "unknown input" in capsys.readouterr().err
    adata.write_h5ad(tmp_path / "a.h5ad")
    assert (
        main(
            ["domains", str(tmp_path / "a.h5ad"), *base, "--weights", str(tmp_path / "none.pt"), "--recompute-features"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "none.pt" in err and "not found" in err and len(err.strip().splitlines()) == 1
    assert main(["domains", str(tmp_path / "a.h5ad"), *base, "--mean", "0.5,x"]) == 2
    assert "numbers" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()


def test_cli_offline_imagenet_exits_2(adata, tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1, "get_state_dict", offline)
    adata.write_h5ad(tmp_path / "a.h5ad")
    argv = ["domains", str(tmp_path / "a.h5ad"), "-o", str(tmp_path / "o.h5ad"), "--n-clusters", "3", "-q"]
    assert main([*argv, "--recompute-features"]) == 2
    err = capsys.readouterr().err
    assert "Could not download" in err and len(err.strip().splitlines()) == 1


def test_cli_domains_reuses_features_and_graph(adata_graph, tmp_path, capsys):
    import histospace as hs

    kw = {"encoder": "mobilenet_v2", "weights": None, "input_size": 32, "progress_bar": False}
    hs.pp.image_features(adata_graph, **kw)
    hs.pp.spatial_graph(adata_graph)
    adata_graph.write_h5ad(tmp_path / "a.h5ad")
    out = tmp_path / "o.h5ad"
    argv = ["domains", str(tmp_path / "a.h5ad"), "-o", str(out), "--n-clusters", "3", "--weights", "none", "-q"]
    argv += ["--input-size", "32"]
    assert main([*argv, "--max-epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "reusing obsm['img_features']" in err and "reusing obsp['spatial_connectivities']" in err
    res = ad.read_h5ad(out)
    np.testing.assert_array_equal(res.obsm["img_features"], adata_graph.obsm["img_features"])
    assert "stereomm_domain" in res.obs
    # other encoder asked: recomputed
    assert main([*argv, "--max-epochs", "2", "--encoder", "resnet50"]) == 0
    assert "reusing obsm['img_features']" not in capsys.readouterr().err
    assert ad.read_h5ad(out).uns["img_features"]["params"]["encoder"] == "resnet50"


def test_cli_help_is_fast_and_quiet():
    import subprocess
    import sys
    import time

    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "histospace", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "domains" in r.stdout and r.stderr == ""
    assert time.perf_counter() - t < 5  # about 0.4 s; generous for a loaded CI machine
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import histospace, sys; print(sorted(m for m in ('torch', 'squidpy', 'spatialdata') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "[]" and r.stderr == ""
