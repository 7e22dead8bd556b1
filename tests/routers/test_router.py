"""The serving Router: artifact round trip, load errors, a MiniLM kind ships its encoder graph."""

import json

import numpy as np
import pytest

from routers import artifact
from routers.artifact import ArtifactError
from routers.router import Router
from tests.routers.conftest import routing_rows
from training.fit import TrainConfig, fit_router


def test_artifact_round_trip(trained, tmp_path):
    router, _ = trained
    texts = ["tell me about the eigenvalue", "what fruit is this", ""]
    before = router.score_batch(texts)
    router.save(tmp_path / "r")
    loaded = Router.load(tmp_path / "r")
    assert loaded.kind == "tfidf_ridge"
    assert loaded.threshold == pytest.approx(router.threshold)
    assert np.allclose(loaded.score_batch(texts), before, atol=1e-6)
    assert loaded.score(texts[0]) == pytest.approx(before[0], abs=1e-6)
    assert (tmp_path / "r" / "MODEL_CARD.md").read_text().startswith("# switchyard router artifact")


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        Router.load(tmp_path / "missing")


def test_knn_with_real_minilm_round_trip(tmp_path):
    """The MiniLM kinds end to end on the bundled all-MiniLM-L6-v2 (short prompts keep it quick)."""
    rows = routing_rows(240, seed=7)
    router = fit_router(rows, TrainConfig(kind="knn", strong_share=0.4))
    texts = ["please explain the eigenvalue of this matrix", "what color is the fruit"]
    s = router.score_batch(texts)
    assert s[0] < s[1]
    router.save(tmp_path / "k")
    loaded = Router.load(tmp_path / "k")
    assert np.allclose(loaded.score_batch(texts), s, atol=1e-3)
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"encoder.minilm.onnx", "encoder.tokenizer.json"}  # serving never exports
    assert loaded.feats.embedder.graph_file() == tmp_path / "k" / "encoder.minilm.onnx"
    artifact.update_meta(tmp_path / "k", threshold=0.25)  # `switchyard calibrate` rewrites the folder in place
    assert Router.load(tmp_path / "k").threshold == 0.25
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    del manifest["files"]  # an artifact written before artifacts shipped their encoder
    (tmp_path / "k" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="ships no encoder graph.*switchyard artifact add-encoder"):
        Router.load(tmp_path / "k")
