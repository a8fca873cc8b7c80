from __future__ import annotations

import numpy as np
import pytest
from dkm.estimators import DKMClassifier, DKMRegressor
from sklearn.datasets import make_blobs, make_regression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from klcore.errors import DataError

FAST = {"num_inducing": 10, "epochs": 20, "lr": 0.05}


# Every check applies; only check_array_api_input skips itself (it needs SCIPY_ARRAY_API; the estimators
# convert to float64 numpy, then torch, so they do not claim array-API support).
@parametrize_with_checks([DKMRegressor(**FAST), DKMClassifier(**FAST)])
def test_sklearn_estimator_checks(estimator, check) -> None:  # type: ignore[no-untyped-def]
    check(estimator)


def test_regressor_in_a_pipeline_learns_a_smooth_function() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, size=(150, 1))
    y = np.sin(x[:, 0]) + 0.1 * rng.standard_normal(150)
    model = make_pipeline(
        StandardScaler(), DKMRegressor(num_inducing=20, epochs=200, lr=0.1, batch_size=64, random_state=0)
    )
    model.fit(x, y)
    grid = np.linspace(-2.5, 2.5, 50)[:, None]
    mean, std = model[-1].predict(model[0].transform(grid), return_std=True)
    assert np.sqrt(np.mean((mean - np.sin(grid[:, 0])) ** 2)) < 0.15
    assert np.all(std > 0.05) and np.all(std < 0.6)  # noise level 0.1 plus latent uncertainty


def test_classifier_probabilities_and_one_class_error() -> None:
    x, y = make_blobs(n_samples=120, centers=3, random_state=1)
    clf = DKMClassifier(num_inducing=12, epochs=40, lr=0.05).fit(StandardScaler().fit_transform(x), y)
    proba = clf.predict_proba(StandardScaler().fit_transform(x))
    assert np.allclose(proba.sum(1), 1.0)
    assert clf.score(StandardScaler().fit_transform(x), y) > 0.9
    with pytest.raises(DataError, match="one class"):
        DKMClassifier(**FAST).fit(x, np.zeros(120))


def test_regressor_multi_output_shapes() -> None:
    x, y = make_regression(n_samples=40, n_features=3, n_targets=2, random_state=0)
    reg = DKMRegressor(**FAST).fit(x, y)
    assert reg.predict(x).shape == (40, 2)
    assert reg.predict(x, return_std=True)[1].shape == (40, 2)
