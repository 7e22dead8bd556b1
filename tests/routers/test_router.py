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


def _nmodel_router(alpha=0.3):
    from routers.features import HashedTfidf
    from routers.scorers import NModelScorer

    rows = routing_rows(400, seed=3)
    texts = [r.prompt for r in rows]
    scores = np.asarray([[r.weak_score, r.strong_score] for r in rows], dtype=np.float64)
    nm = NModelScorer(["big", "small"], alpha=alpha).fit(texts, scores[:, ::-1], HashedTfidf(n_features=2**14).fit(texts))
    return nm, texts


def test_nmodel_artifact_loads_and_serves(tmp_path):
    """An nmodel artifact is a Router too: predict per model, the tolerance, the first layout still loads."""
    nm, texts = _nmodel_router()
    meta, arrays = nm.state()  # the layout `train router --kind nmodel` wrote before Router served it
    artifact.Artifact(kind="router", meta={"scorer": meta, "prices": {"small": 1, "big": 5}}, arrays=arrays).save(
        tmp_path / "old")
    old = Router.load(tmp_path / "old")
    assert old.is_nmodel and old.kind == "nmodel" and old.models == ["big", "small"]
    assert old.tolerance == 0.02  # DEFAULT_TOLERANCE until calibrated
    assert old.predict(texts[0]) == pytest.approx(nm.predict(texts[0]))
    assert np.allclose(old.predict_batch(texts[:5]), nm.predict_batch(texts[:5]))
    old.tolerance = 0.07
    old.save(tmp_path / "new")
    new = Router.load(tmp_path / "new")
    assert new.tolerance == 0.07 and new.meta["prices"] == {"small": 1, "big": 5}
    assert new.predict(texts[1]) == pytest.approx(nm.predict(texts[1]))
    with pytest.raises(ValueError, match="use predict"):
        new.score("x")
    manifest = json.loads((tmp_path / "new" / "manifest.json").read_text())
    del manifest["meta"]["scorer"]["models"]
    (tmp_path / "new" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="malformed"):
        Router.load(tmp_path / "new")


def test_two_pool_router_refuses_predict(trained):
    router, _ = trained
    assert not router.is_nmodel and router.models == []
    with pytest.raises(ValueError, match="use score"):
        router.predict("x")
