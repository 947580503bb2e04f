"""Tests of the `histospace` command line (`histospace._cli.main`) on tiny synthetic files."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pytest

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


# ---- issue #24: nothing silent on real files ------------------------------------------------------------------------
def _files(folder):
    """Every file under `folder` with its size and modification time (to show an input was left as it was)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def sdata_zarr(adata, tmp_path):
    """The tiny slide as a SpatialData .zarr whose H&E is only an image element (no `uns['spatial']`, no features)."""
    from spatialdata_io.experimental import from_legacy_anndata

    s = from_legacy_anndata(adata)
    table = s.tables["table"]
    del table.obsm["img_features"]
    table.uns.pop("spatial", None)
    path = tmp_path / "slide.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notices about its next release
        s.write(path)
    return path


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--n-clusters", "0"], "argument --n-clusters: expected a positive integer, got '0'"),
        (["--n-clusters", "3", "--max-epochs", "0"], "argument --max-epochs: expected a positive integer, got '0'"),
        (["--n-clusters", "3", "--mean", "0.5,x"], "argument --mean: expected one number or three comma-separated"),
        (["--n-clusters", "3", "--std", "1,2"], "argument --std: expected one number or three comma-separated"),
        (["--n-clusters", "3", "--patch-size", "-40"], "argument --patch-size: expected a positive number, got '-40'"),
        (["--n-clusters", "3", "--method", "mclust"], "argument --method: invalid choice: 'mclust'"),
        ([], "the following arguments are required: --n-clusters"),
    ],
)
def test_cli_bad_option_values_one_line(adata, tmp_path, capsys, options, named):
    # issue #24 (2): argparse printed its 13-line usage; every expected failure is one line and exit code 2
    adata.write_h5ad(tmp_path / "a.h5ad")
    before = _files(tmp_path)
    assert main(["domains", str(tmp_path / "a.h5ad"), "-o", str(tmp_path / "o.h5ad"), "-q", *options]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("histospace domains: error: ") and named in err and "see histospace domains --help" in err
    assert _files(tmp_path) == before  # nothing written


def test_cli_help_and_version_exit_0(capsys):
    assert main(["--version"]) == 0 and "histospace" in capsys.readouterr().out
    assert main(["domains", "--help"]) == 0 and "--n-clusters" in capsys.readouterr().out
    assert main([]) == 2 and len(capsys.readouterr().err.splitlines()) == 1


def test_cli_outputs_checked_before_any_work(adata, sdata_zarr, tmp_path, capsys):
    # issue #24 (5): `-o result.h5ad` for a SpatialData input was refused after the whole pipeline had run
    adata.write_h5ad(tmp_path / "a.h5ad")
    before = _files(tmp_path)
    base = ["--n-clusters", "3", "-q"]
    cases = [
        (
            ["domains", str(sdata_zarr), "-o", str(tmp_path / "r.h5ad"), *base],
            "-o .*r.h5ad: the result is a SpatialData",
        ),
        (["domains", str(tmp_path / "a.h5ad"), "-o", str(tmp_path / "r.csv"), *base], r"r.csv.*ending in \.h5ad"),
        (
            ["domains", str(tmp_path / "a.h5ad"), "-o", str(tmp_path / "r.h5ad"), "--plot", "d.xyz", *base],
            "--plot d.xyz",
        ),
        (
            ["domains", str(tmp_path / "a.h5ad"), "-o", str(tmp_path / "a.h5ad" / "r.h5ad"), *base],
            r"a\.h5ad is not a folder this user can write to",
        ),
        (
            ["predict", "--reference", str(tmp_path / "a.h5ad"), "--query", str(sdata_zarr), "-o", "p.h5ad", "-q"],
            r"-o p.h5ad: the result is a SpatialData, written as \.zarr; pass -o ending in \.zarr",
        ),
    ]
    for argv, match in cases:
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1 and re.search(match, err), err  # no "read ..." line: no work
    # an obs column that is not there is named right after reading, before any step
    argv = ["domains", str(tmp_path / "a.h5ad"), "-o", str(tmp_path / "r.h5ad"), *base, "--ground-truth", "layer"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert (
        "--ground-truth 'layer' is not a column of obs" in err
        and out.startswith("read ")
        and len(out.splitlines()) == 1
    )
    assert _files(tmp_path) == before


FAST = ["--weights", "none", "--input-size", "32", "--max-epochs", "2"]


def test_cli_features_without_recorded_settings(adata, tmp_path, capsys):
    # issue #24 (3): obsm['img_features'] from another tool (no uns['img_features']) and no image: "No image"
    bare = adata.copy()
    del bare.uns["spatial"]
    assert "img_features" in bare.obsm and "img_features" not in bare.uns
    bare.write_h5ad(tmp_path / "bare.h5ad")
    adata.write_h5ad(tmp_path / "ref.h5ad")
    before = _files(tmp_path)
    out = tmp_path / "o.h5ad"
    # StereoMM takes features of any width: reused, with a warning saying so (and progress, one line per bar)
    assert (
        main(["domains", str(tmp_path / "bare.h5ad"), "-o", str(out), "--n-clusters", "3", "--n-models", "2", *FAST])
        == 0
    )
    err = capsys.readouterr().err
    assert "bare.h5ad: obsm['img_features'] (16 columns) has no recorded settings" in err
    assert "reusing it as it is; pass --recompute-features" in err
    np.testing.assert_array_equal(ad.read_h5ad(out).obsm["img_features"], bare.obsm["img_features"])
    assert "\r" not in err and sum("StereoMM" in line for line in err.splitlines()) == 2  # one line per bar
    out.unlink()
    # recomputing them needs an image: the error says why one was wanted
    argv = ["domains", str(tmp_path / "bare.h5ad"), "-o", str(out), "--n-clusters", "3", "-q", "--recompute-features"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "bare.h5ad: --recompute-features was passed, and it holds no H&E image" in err
    assert "pass --image HE_FILE" in err
    # mclSTExp needs the reference's width (2 x 696 MobileNetV2 stage features), not 16: refused before the
    # reference's features are computed
    argv = ["predict", "--reference", str(tmp_path / "ref.h5ad"), "--query", str(tmp_path / "bare.h5ad"), "-q"]
    assert main([*argv, "-o", str(out), *FAST, "--patch-size", "40"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert (
        "bare.h5ad: obsm['img_features'] has 16 columns and no recorded settings, the mobilenet_v2 features 1392" in err
    )
    assert "no H&E image" in err and "--image HE_FILE" in err and "image features" not in capsys.readouterr().out
    assert _files(tmp_path) == before  # the input is read, not written; no output left by the failures


def test_cli_predict_spatialdata_reference_keeps_its_image(sdata_zarr, adata, tmp_path, capsys):
    # issue #24 (4): the reference's table was kept without its H&E image element ("No image found")
    query = adata.copy()
    del query.obs["library_id"]
    query.write_h5ad(tmp_path / "q.h5ad")
    before = _files(sdata_zarr)
    out = tmp_path / "pred.h5ad"
    argv = ["predict", "--reference", str(sdata_zarr), "--query", str(tmp_path / "q.h5ad"), "-o", str(out), "-q"]
    argv += [*FAST, "--n-models", "1", "--n-neighbors", "5", "--patch-size", "40"]
    assert main(argv) == 0, capsys.readouterr().err
    pred = ad.read_h5ad(out)
    assert pred.layers["mclstexp"].shape == adata.shape and np.isfinite(pred.layers["mclstexp"]).all()
    assert pred.uns["img_features"]["params"]["encoder"] == "mobilenet_v2"
    assert _files(sdata_zarr) == before  # the reference file is read, not written


def test_cli_demo_without_data_names_the_file_and_writes_nothing(tmp_path, capsys, monkeypatch):
    # the demo finds its weights and gene panel through hs.datasets: a missing data folder is one line, exit 2
    monkeypatch.delenv("HISTOSPACE_DATA", raising=False)
    monkeypatch.setenv("HISTOSPACE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo_out"
    assert main(["demo", "--out-dir", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "MobileNetV2 ImageNet weights not found" in err and "HISTOSPACE_DATA" in err and len(err.splitlines()) == 1
    assert main(["demo", "--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(out), "-q"]) == 2
    assert "nowhere' is not a directory" in capsys.readouterr().err
    assert not out.exists()


def test_cli_domains_several_inputs_resumable(adata_graph, tmp_path, capsys):
    """`histospace domains A B BAD -o FOLDER`: one output per input written whole, the damaged input named (exit 1),
    and a rerun skips what is done; the output equals a one-input run's.
    """
    import histospace as hs

    hs.pp.image_features(adata_graph, encoder="mobilenet_v2", weights=None, input_size=32, progress_bar=False)
    hs.pp.spatial_graph(adata_graph)
    for name in ("a", "b"):
        adata_graph.write_h5ad(tmp_path / f"{name}.h5ad")
    (tmp_path / "bad.h5ad").write_bytes(b"not an h5ad")
    opts = ["--n-clusters", "3", "--weights", "none", "--input-size", "32", "--max-epochs", "2", "--n-models", "1"]
    inputs = [str(tmp_path / f"{n}.h5ad") for n in ("a", "b", "bad")]
    out = tmp_path / "out"
    assert main(["domains", *inputs, "-o", str(out), *opts, "-q"]) == 1
    text = capsys.readouterr().out
    assert re.search(r"bad: FAILED \(", text) and "1 of 3 inputs failed" not in text  # the warning goes to stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.h5ad", "b.h5ad"]  # nothing of the failed input, no .tmp
    one = tmp_path / "one.h5ad"
    assert main(["domains", inputs[0], "-o", str(one), *opts, "-q"]) == 0
    np.testing.assert_array_equal(ad.read_h5ad(out / "a.h5ad").obsm["X_stereomm"], ad.read_h5ad(one).obsm["X_stereomm"])
    capsys.readouterr()
    assert main(["domains", *inputs[:2], "-o", str(out), *opts, "-q"]) == 0  # resumed: both skipped
    assert text.count("done before") == 0 and capsys.readouterr().out.count("done before, skipped") == 2
    assert main(["domains", *inputs[:2], "-o", str(tmp_path / "x.h5ad"), *opts]) == 2  # -o must be a folder
    assert "-o" in capsys.readouterr().err
