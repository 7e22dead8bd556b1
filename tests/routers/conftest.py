"""Shared fixtures of the router tests: a trained tfidf_ridge router on synthetic routing rows."""

import pytest

from tests.training.router_synth import synth_rows
from training.data import parse_routing_row
from training.fit import TrainConfig, fit_router


def routing_rows(n, seed=0):
    return [parse_routing_row(r, f"synth:{i}") for i, r in enumerate(synth_rows(n, seed=seed))]


@pytest.fixture(scope="session")
def trained():
    """(router, rows): tfidf_ridge on 1,200 synthetic rows, 20 % held out."""
    rows = routing_rows(1200)
    router = fit_router(rows, TrainConfig(kind="tfidf_ridge", eval_fraction=0.2, strong_share=0.4))
    return router, rows
