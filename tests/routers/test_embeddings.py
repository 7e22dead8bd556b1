"""MiniLM embeddings: ONNX equals torch, the guard's fast encoders, the single-text graph; serving never
exports a graph (a missing one is a one-line error naming the command)."""

import numpy as np
import pytest

from routers.embeddings import EncoderNotPrepared, MiniLMEmbedder


def test_a_missing_graph_is_an_error_that_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_HOME", str(tmp_path))
    with pytest.raises(EncoderNotPrepared, match="switchyard models prepare minilm") as e:
        MiniLMEmbedder().encode(["hello"])
    assert "\n" not in str(e.value) and not (tmp_path / "onnx").exists()  # nothing exported


@pytest.mark.slow
def test_minilm_onnx_matches_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_HOME", str(tmp_path))
    from backends.models import prepare

    folder = prepare("minilm")
    texts = ["What are the side effects of ibuprofen?", "", "Tvivler jeg på for det bringer skam"]
    onnx = MiniLMEmbedder(folder, backend="onnx").prepare()
    a = onnx.encode(texts)
    b = MiniLMEmbedder(folder, backend="torch").encode(texts)
    assert onnx.backend == "onnx"
    assert a.shape == (3, 384) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.all((a * b).sum(axis=1) > 0.999)
    assert np.allclose(onnx.encode_one(texts[0]), a[0], atol=1e-5)
    assert (tmp_path / "onnx" / "minilm.onnx").is_file() and (tmp_path / "onnx" / "minilm.json").is_file()


def test_minilm_fast_encoder_layers_and_int8(tmp_path, monkeypatch):
    """The guard's cheaper MiniLM: fewer layers + int8 weights, its own exported file, one text at a time
    (so a batch equals serving), still unit vectors that keep related texts closer than unrelated ones."""
    monkeypatch.setenv("SWITCHYARD_HOME", str(tmp_path))
    from backends.models import prepare

    folder = prepare("minilm")
    texts = ["The court ruled on the contract dispute.", "A judge decided the lawsuit over the agreement.",
             "How do I bake sourdough bread at home?"]
    fast = MiniLMEmbedder(folder, max_length=32, num_layers=2, int8=True).prepare()
    a = fast.encode(texts)
    assert fast.backend == "onnx" and fast.spec() == {"max_length": 32, "num_layers": 2, "int8": True,
                                                      "graph": "single"}
    assert (tmp_path / "onnx" / "minilm-l2-int8-single.onnx").is_file()
    assert a.shape == (3, 384) and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a[1], fast.encode_one(texts[1]))  # batch == serving, bit for bit
    sims = a @ a.T
    assert sims[0, 1] > sims[0, 2] + 0.1
    full = MiniLMEmbedder(folder, backend="onnx").prepare().encode(texts)
    assert not np.allclose(a, full, atol=1e-3)  # another embedding space: artifacts record the spec
    assert MiniLMEmbedder(folder, num_layers=6).num_layers is None  # six layers = the full model
    with pytest.raises(ValueError):
        MiniLMEmbedder(folder, num_layers=7)
    with pytest.raises(ValueError):
        MiniLMEmbedder(folder, backend="torch", int8=True)
    with pytest.raises(ValueError):
        MiniLMEmbedder(folder, int8=False, graph="single")
    with pytest.raises(ValueError):
        MiniLMEmbedder(folder, int8=True, graph="tiny")


def test_minilm_single_text_graph_matches_the_batched_one(tmp_path, monkeypatch):
    """The int8 encoder's single-text graph (no masks, no padding) computes what transformers' BertModel
    computes: exported without int8 rounding differences it would be equal; with int8 on both sides the
    vectors agree to int8 precision. Its tokenizer shortcut for long texts gives exactly the full ids."""
    monkeypatch.setenv("SWITCHYARD_HOME", str(tmp_path))
    from backends.models import prepare

    folder = prepare("minilm")
    rng = np.random.RandomState(0)
    words = ["court", "contract", "Patient", "dosage", "taxes,", "inflation.", "über", "ørkenen", "x" * 30, "(a)"]
    texts = ["What are the side effects of ibuprofen?", "", "a"] + [
        " ".join(rng.choice(words, size=n)) for n in (5, 80, 200, 400)]
    single = MiniLMEmbedder(folder, num_layers=2, int8=True).prepare()
    hf = MiniLMEmbedder(folder, num_layers=2, int8=True, graph="hf").prepare()
    a, b = single.encode(texts), hf.encode(texts)
    assert single.graph == "single" and (tmp_path / "onnx" / "minilm-l2-int8-single.onnx").is_file()
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.all((a * b).sum(axis=1) > 0.99)
    # "a " fills max_length within 5 characters a piece, "court " within 8, "contract " only in full
    tiers = ["a " * 500, "court " * 200, "contract " * 200, "court " * 60 + "contract " * 100]
    for text in texts + tiers + [" ".join(["word"] * 600), "y" * 5000, "z " * 3000]:
        full = np.asarray(single._tokenizer.encode(text).ids)
        assert np.array_equal(single._single_ids(text), full)
        assert len(full) <= single.max_length
