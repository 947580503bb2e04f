"""The default and the published (`preset='reference'`) settings of :class:`~histospace.models.MclSTExp`."""

from __future__ import annotations

from typing import Any

#: the settings validated by the expression benchmark (her2st C2-C6 leave-one-slide-out; see the docs)
DEFAULTS: dict[str, Any] = {"temperature": 0.1, "l2_normalize": True, "learn_temperature": True}
DEFAULT_TRAIN: dict[str, Any] = {"max_epochs": 30, "n_models": 5}
DEFAULT_WEIGHTING = "softmax"
#: rings of the spatial graph whose mean image features sit beside each spot's own (0: none; see `spatial_context=`)
DEFAULT_CONTEXT = 0
#: weight of the ring-1 mean of the predictions over the query's spatial graph (0: none; see `smooth_predictions=`)
DEFAULT_SMOOTHING = 0.0
#: principal axes of the reference expression predictions are made on (0: all; see `expression_rank=`)
DEFAULT_RANK = 16
#: the published settings (mclSTExp code): T = 1 on unnormalised embeddings, 90 epochs, one model, 1/d^2 weights
REFERENCE: dict[str, Any] = {"temperature": 1.0, "l2_normalize": False, "learn_temperature": False}
REFERENCE_TRAIN: dict[str, Any] = {"max_epochs": 90, "n_models": 1}
REFERENCE_WEIGHTING = "inverse_square"
