"""StereoMM's feature preprocessing: the row-chunked path for large dense inputs gives what the in-memory one gives."""

import numpy as np
import pytest

from histospace._utils import _preprocess


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    # correlated columns with distinct variances, float32 like image features
    x = rng.normal(size=(3000, 8)) @ rng.normal(size=(8, 40)) + rng.normal(scale=0.1, size=(3000, 40))
    return (x * np.linspace(1, 5, 40) + 3).astype(np.float32)


def _chunked(monkeypatch, fn, *args):
    monkeypatch.setattr(_preprocess, "CHUNKED_ENTRIES", 0)
    monkeypatch.setattr(_preprocess, "_row_chunks", _small_chunks)
    return fn(*args)


def _small_chunks(x):  # several chunks even for a small matrix
    for i in range(0, x.shape[0], 700):
        yield np.asarray(x[i : i + 700], dtype=np.float64)


def test_chunked_mean_var_matches_numpy(features, monkeypatch):
    mean, var = _preprocess._col_mean_var(features)
    cmean, cvar = _chunked(monkeypatch, _preprocess._col_mean_var, features)
    np.testing.assert_allclose(cmean, mean, rtol=1e-12)
    np.testing.assert_allclose(cvar, var, rtol=1e-10)


def test_chunked_pca_matches_arpack(features, monkeypatch):
    mean, var = _preprocess._col_mean_var(features)
    std = np.sqrt(var)
    ref = _preprocess._pca_components(features, mean, std, 5)
    got = _chunked(monkeypatch, _preprocess._pca_components, features, mean, std, 5)
    assert got.shape == ref.shape == (40, 5)
    assert got.dtype == np.float32
    # same axes with the same sign convention (largest absolute loading positive)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # a float64 input, whose chunks are views of it, is left as it was
    x64 = features.astype(np.float64)
    before = x64.copy()
    got64 = _chunked(monkeypatch, _preprocess._pca_components, x64, mean, std, 5)
    np.testing.assert_array_equal(x64, before)
    np.testing.assert_allclose(got64, ref, atol=1e-4)


def test_small_inputs_stay_on_the_in_memory_path(features):
    assert not _preprocess._chunked(features)
    assert _preprocess._chunked(np.broadcast_to(np.float32(0), (400_000, 1280)))  # no memory
