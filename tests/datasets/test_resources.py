"""`hs.datasets.her2st_genes` and `hs.datasets.mobilenet_v2_weights`: files of the data folder, with clear errors."""

from __future__ import annotations

import pytest

import histospace as hs


def test_her2st_genes_from_data_dir_and_env(tmp_path, monkeypatch):
    (tmp_path / "her2st" / "gene_lists").mkdir(parents=True)
    (tmp_path / "her2st" / "gene_lists" / "her2st_785genes_hist2st.txt").write_text("ERBB2\nGNAS \n\nFASN\n")
    assert hs.datasets.her2st_genes(data_dir=tmp_path) == ["ERBB2", "GNAS", "FASN"]
    assert hs.datasets.her2st_genes(data_dir=tmp_path / "her2st") == ["ERBB2", "GNAS", "FASN"]  # the folder itself
    monkeypatch.setenv("HISTOSPACE_DATA", str(tmp_path))
    assert hs.datasets.her2st_genes() == ["ERBB2", "GNAS", "FASN"]


def test_mobilenet_v2_weights_path(tmp_path):
    f = tmp_path / "weights" / "mobilenet_v2_imagenet_coral" / "mobilenet_v2_imagenet_fp32_torchvision_keys.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x")
    assert hs.datasets.mobilenet_v2_weights(data_dir=tmp_path) == f.resolve()


def test_missing_files_name_the_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("HISTOSPACE_DATA", raising=False)
    with pytest.raises(
        FileNotFoundError, match=r"her2st gene panel not found: .*her2st_785genes_hist2st\.txt .*`data_dir=`"
    ):
        hs.datasets.her2st_genes(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"MobileNetV2 ImageNet weights not found: .*torchvision_keys\.pt"):
        hs.datasets.mobilenet_v2_weights(data_dir=tmp_path)
    monkeypatch.setenv("HISTOSPACE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"looked in the cache .*not downloaded"):
        hs.datasets.mobilenet_v2_weights()
    with pytest.raises(FileNotFoundError, match=r"`data_dir` = .*nowhere.* is not a directory"):
        hs.datasets.her2st_genes(data_dir=tmp_path / "nowhere")


@pytest.mark.data
def test_real_panel_and_weights(data_dir):
    genes = hs.datasets.her2st_genes(data_dir=data_dir)
    assert len(genes) == 785 and len(set(genes)) == 785
    assert hs.datasets.mobilenet_v2_weights(data_dir=data_dir).stat().st_size > 1_000_000
