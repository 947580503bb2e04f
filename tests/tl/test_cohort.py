"""`hs.tl.predict_cohort`: one SpatialData zarr per slide, written atomically, resumable, failures reported, and a
worker killed mid-run on a process LocalCluster."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import histospace as hs

TINY = {"model_kwargs": {"n_heads": 2, "dim_head": 8, "projection_dim": 16}}
FIT = {"max_epochs": 2, "batch_size": 32, "n_models": 1, "device": "cpu", "progress_bar": False}
OPTS = {"tile_size": 32, "n_neighbors": 20}


@pytest.fixture(scope="module")
def model(make_slide):
    ref = make_slide()
    ref.uns["spatial"]["lib"].setdefault("metadata", {})["spot_diameter_um"] = 55.0  # 1 µm per pixel
    hs.pp.image_features(ref, encoder="mobilenet_v2", weights=None, input_size=32, patch_size=55, progress_bar=False)
    return hs.tl.mclstexp_train(ref, genes=list(ref.var_names), **TINY, **FIT)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    return [
        str(
            hs.datasets.write_wsi(
                d / f"s{i}.tif",
                hs.datasets.simulate_tissue(width_um=256, height_um=256, random_state=i),
                mpp=1.0,
                tile=128,
            )
        )  # fmt: skip
        for i in range(4)
    ]


@pytest.fixture(scope="module")
def local_run(model, slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return out, hs.tl.predict_cohort(slides, model=model, outdir=out, client=False, progress=False, **OPTS)


def _prediction(path):
    import spatialdata as sd

    return np.asarray(sd.read_zarr(path).tables["tiles"].obsm["mclstexp"], dtype=np.float64)


def test_cohort_writes_one_zarr_per_slide_and_resumes(local_run, model, slides, capsys):
    out, table = local_run
    assert list(table.index) == ["s0", "s1", "s2", "s3"]
    assert (table["status"] == "done").all()
    assert (table["n_tiles"] > 0).all()
    for name in table.index:
        path = out / f"{name}.zarr"
        assert (path / "histospace_cohort.json").is_file()
        pred = _prediction(path)
        assert pred.shape == (table.at[name, "n_tiles"], 30)  # the 30 genes of the reference
        assert np.isfinite(pred).all()
    assert not list(out.glob("*.tmp"))
    again = hs.tl.predict_cohort(slides, model=model, outdir=out, client=False, **OPTS)
    assert (again["status"] == "skipped").all()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(slides)  # one progress line per slide
    assert all("skipped" in line for line in lines)


def test_failed_slide_is_reported_others_finish(model, slides, tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    half = tmp_path / "out" / "s0.zarr"  # a folder without the done-marker (e.g. half-copied): not taken for done
    half.mkdir(parents=True)
    with pytest.raises(RuntimeError, match=r"1 of 3 slides failed.*bad") as info:
        hs.tl.predict_cohort([slides[0], str(bad), slides[1]], model=model, outdir=tmp_path / "out", client=False,
                             progress=False, **OPTS)  # fmt: skip
    assert "run again" in str(info.value)
    assert (tmp_path / "out" / "s0.zarr" / "histospace_cohort.json").is_file()
    assert (tmp_path / "out" / "s1.zarr" / "histospace_cohort.json").is_file()
    assert not (tmp_path / "out" / "bad.zarr").exists()
    assert not (tmp_path / "out" / "bad.zarr.tmp").exists()
    with pytest.warns(UserWarning, match="bad"):
        table = hs.tl.predict_cohort([slides[0], str(bad)], model=model, outdir=tmp_path / "out", client=False,
                                     on_error="warn", progress=False, **OPTS)  # fmt: skip
    assert list(table["status"]) == ["skipped", "failed"]
    assert "bad.tif" in table.at["bad", "image"]


def test_saved_model_folder_and_bad_input(model, slides, local_run, tmp_path):
    model.save(tmp_path / "model")
    table = hs.tl.predict_cohort(slides[:1], model=tmp_path / "model", outdir=tmp_path / "out", client=False,
                                 progress=False, **OPTS)  # fmt: skip
    np.testing.assert_allclose(_prediction(tmp_path / "out" / "s0.zarr"), _prediction(local_run[0] / "s0.zarr"),
                               atol=1e-5)  # fmt: skip
    assert table.at["s0", "status"] == "done"
    with pytest.raises(FileNotFoundError, match="nowhere.tif"):
        hs.tl.predict_cohort(["nowhere.tif"], model=model, outdir=tmp_path / "x")
    with pytest.raises(ValueError, match="local:N"):
        hs.tl.predict_cohort(slides, model=model, outdir=tmp_path / "x", scheduler="local:zero")
    with pytest.raises(ValueError, match="not both"):
        hs.tl.predict_cohort(slides, model=model, outdir=tmp_path / "x", scheduler="local:1", client=False)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


@pytest.mark.distributed
@pytest.mark.slow  # two worker processes start (histospace, torch) twice: ~40 s idle, minutes on a loaded machine
@pytest.mark.timeout(300)
def test_worker_killed_mid_run(model, slides, local_run, tmp_path):
    """A process LocalCluster whose workers are all killed while a slide is being written: with no retries allowed
    the run names the slides not done (nothing half-written is done); the rerun finishes only those, and every
    prediction equals the local run's."""
    import dask
    import distributed

    out = tmp_path / "out"
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl,
        distributed.Client(cl) as client,
    ):
        # client=False with an active client: the slide and its features stay in this process
        one = hs.tl.predict_cohort(slides[:1], model=model, outdir=tmp_path / "here", client=False, progress=False,
                                   **OPTS)  # fmt: skip
        assert one.at["s0", "status"] == "done"
        killed = threading.Event()

        def killer():
            t0 = time.time()
            while time.time() - t0 < 120 and not list(out.glob("*.zarr.tmp")):
                time.sleep(0.005)
            try:
                client.run(os._exit, 1)  # every worker process dies at once, mid-slide
            except Exception:  # noqa: BLE001 - the workers die before they answer
                pass
            killed.set()

        threading.Thread(target=killer, daemon=True).start()
        with pytest.raises(RuntimeError, match="slides failed") as info:
            hs.tl.predict_cohort(slides, model=model, outdir=out, client=client, progress=False, **OPTS)
        assert killed.is_set()
        assert "KilledWorker" in str(info.value)
        done = {p.name.removesuffix(".zarr") for p in out.glob("*.zarr") if (p / "histospace_cohort.json").is_file()}
        assert len(done) < len(slides)
        assert all(n in str(info.value) for n in {"s0", "s1", "s2", "s3"} - done)  # the slides not done are named
        client.wait_for_workers(2, timeout=60)  # the nannies restart them
        table = hs.tl.predict_cohort(slides, model=model, outdir=out, client=client, progress=False, **OPTS)
    assert set(table.index[table["status"] == "skipped"]) == done
    assert (table["status"] != "failed").all()
    assert not list(out.glob("*.tmp"))
    for name in table.index:
        np.testing.assert_allclose(_prediction(out / f"{name}.zarr"), _prediction(local_run[0] / f"{name}.zarr"),
                                   atol=1e-5)  # fmt: skip


@pytest.mark.slow  # the command's validated feature recipe (8 views, context) on the reference and 3 slides
def test_cli_predict_several_images(make_slide, slides, tmp_path, capsys):
    from histospace._cli import main

    ref = make_slide()
    ref.uns["spatial"]["lib"].setdefault("metadata", {})["spot_diameter_um"] = 55.0
    ref.write_h5ad(tmp_path / "ref.h5ad")
    argv = ["predict", "--reference", str(tmp_path / "ref.h5ad"), "--image", *slides[:2], "-o", str(tmp_path / "o")]
    argv += ["--max-epochs", "1", "--n-models", "1", "--n-neighbors", "5", "--tile-size", "32", "--quiet"]
    argv += ["--weights", "none", "--patch-size", "40", "--input-size", "32"]
    assert main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    assert [ln.split()[1] for ln in lines] == ["s0:", "s1:"] or sorted(ln.split()[1] for ln in lines) == ["s0:", "s1:"]
    for name in ("s0", "s1"):
        assert (tmp_path / "o" / f"{name}.zarr" / "histospace_cohort.json").is_file()
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"no")
    argv[argv.index("--image") + 1 : argv.index("-o")] = [slides[0], str(bad)]
    assert main(argv) == 1  # the bad slide fails, the done one is skipped
    assert "bad" in capsys.readouterr().err
    assert main([*argv, "--genes", "gene1"]) == 2
