import subprocess
import sys

import numpy as np
import pytest

from routers.features import HashedTfidf, MiniLMEmbedder, last_user_text

TEXTS = [
    "How do I file a small claims lawsuit against my landlord?",
    "Is it better to pay off my credit card or invest in an index fund?",
    "What are the side effects of ibuprofen?",
    "Mein Vermieter hat die Kaution nicht zurückgezahlt.",
]


def test_rows_are_l2_normalised_and_empty_text_is_zero():
    v = HashedTfidf(n_features=2**14).fit(TEXTS)
    X = v.transform(TEXTS + ["", "   "])
    assert X.shape == (6, 2**14)
    assert X.dtype == np.float32
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1))).ravel()
    assert np.allclose(norms[:4], 1.0, atol=1e-5)
    assert norms[4] == 0 and norms[5] == 0


def test_transform_one_matches_transform_row():
    v = HashedTfidf(n_features=2**12).fit(TEXTS)
    cols, vals = v.transform_one(TEXTS[1])
    row = v.transform([TEXTS[1]])
    assert list(cols) == list(row.indices)
    assert np.allclose(vals, row.data)
    assert np.all(np.diff(cols) > 0)


def test_back_to_back_featurizers_share_counts_but_not_idf():
    """The guard and the router featurize one text in a row: the second reuses the first's counts (a
    per-thread one-entry memo) yet applies its own IDF, and a different config or text is never reused."""
    a = HashedTfidf(n_features=2**12).fit(["loan rate bank", "court judge law", "loan loan"])
    b = HashedTfidf(n_features=2**12).fit(["doctor nurse", "loan approval", "judge"])
    c = HashedTfidf(n_features=2**10)
    text = "What is the loan rate at my bank?"
    fresh_b = HashedTfidf.from_state(*b.state()).transform(["x", text])[1].toarray()[0]
    a.transform_one(text)
    cols, vals = b.transform_one(text)
    dense = np.zeros(2**12, dtype=np.float32)
    dense[cols] = vals
    assert np.allclose(dense, fresh_b, atol=1e-6)
    assert not np.allclose(dense[cols], a.transform_one(text)[1])  # different IDF → different values
    cols_c, _ = c.transform_one(text)
    assert cols_c.max() < 2**10  # its own bucket count, not the memo of a 2**12 featurizer
    other_cols, _ = b.transform_one("court judge")
    assert not np.array_equal(other_cols, cols)
    with pytest.raises(ValueError):
        b._counts(text).cols[0] = 1  # memoised arrays are read-only


@pytest.mark.slow
def test_hash_buckets_are_stable_across_processes():
    code = (
        "from routers.features import HashedTfidf;"
        "c,_=HashedTfidf(n_features=2**16).transform_one('Stable hashing, please: ünïcode too');"
        "print(','.join(map(str,c.tolist())))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout.strip()
        for seed in (1, 2)
    }
    assert len(outs) == 1
    here, _ = HashedTfidf(n_features=2**16).transform_one("Stable hashing, please: ünïcode too")
    assert outs.pop() == ",".join(map(str, here.tolist()))


def test_idf_downweights_common_terms_and_state_round_trips():
    v = HashedTfidf(n_features=2**14, word_ngrams=(1, 1), char_ngrams=(0, 0)).fit(
        ["the cat", "the dog", "the bird", "a fish"]
    )
    cols, vals = v.transform_one("the fish")
    assert len(cols) == 2
    by_col = dict(zip(cols.tolist(), vals.tolist(), strict=True))
    the_col, _ = v.transform_one("the")
    assert by_col[int(the_col[0])] < max(by_col.values())
    meta, arrays = v.state()
    w = HashedTfidf.from_state(meta, arrays)
    assert (w.transform(TEXTS) != v.transform(TEXTS)).nnz == 0
    with pytest.raises(ValueError):
        HashedTfidf.from_state({**meta, "version": 99}, arrays)


def test_bad_construction_raises():
    with pytest.raises(ValueError):
        HashedTfidf(n_features=1000)
    with pytest.raises(ValueError):
        HashedTfidf(word_ngrams=(2, 1))


def test_last_user_text_rule():
    msgs = [
        {"role": "system", "content": "You are a legal assistant."},
        {"role": "user", "content": "My landlord kept my deposit."},
        {"role": "assistant", "content": "Where do you live?"},
        {"role": "user", "content": [{"type": "text", "text": "In California."}]},
    ]
    assert last_user_text(msgs, 200) == "My landlord kept my deposit.\nIn California."
    assert last_user_text(msgs, 20) == "In California."
    assert last_user_text(msgs, 5) == "In Ca"
    assert last_user_text([{"role": "system", "content": "x"}], 100) == ""
    with pytest.raises(ValueError):
        last_user_text(msgs, 0)


@pytest.mark.slow
def test_minilm_onnx_matches_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_HOME", str(tmp_path))
    from backends.models import prepare

    folder = prepare("minilm")
    texts = ["What are the side effects of ibuprofen?", "", "Tvivler jeg på for det bringer skam"]
    onnx = MiniLMEmbedder(folder, backend="onnx")
    a = onnx.encode(texts)
    b = MiniLMEmbedder(folder, backend="torch").encode(texts)
    assert onnx.backend == "onnx"
    assert a.shape == (3, 384) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.all((a * b).sum(axis=1) > 0.999)
    assert np.allclose(onnx.encode_one(texts[0]), a[0], atol=1e-5)
    assert (tmp_path / "onnx" / "minilm.onnx").is_file() and (tmp_path / "onnx" / "minilm.json").is_file()


@pytest.mark.slow
def test_minilm_fast_encoder_layers_and_int8(tmp_path, monkeypatch):
    """The guard's cheaper MiniLM: fewer layers + int8 weights, its own exported file, one text at a time
    (so a batch equals serving), still unit vectors that keep related texts closer than unrelated ones."""
    monkeypatch.setenv("SWITCHYARD_HOME", str(tmp_path))
    from backends.models import prepare

    folder = prepare("minilm")
    texts = ["The court ruled on the contract dispute.", "A judge decided the lawsuit over the agreement.",
             "How do I bake sourdough bread at home?"]
    fast = MiniLMEmbedder(folder, max_length=32, num_layers=2, int8=True)
    a = fast.encode(texts)
    assert fast.backend == "onnx" and fast.spec() == {"max_length": 32, "num_layers": 2, "int8": True,
                                                      "graph": "single"}
    assert (tmp_path / "onnx" / "minilm-l2-int8-single.onnx").is_file()
    assert a.shape == (3, 384) and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a[1], fast.encode_one(texts[1]))  # batch == serving, bit for bit
    sims = a @ a.T
    assert sims[0, 1] > sims[0, 2] + 0.1
    full = MiniLMEmbedder(folder, backend="onnx").encode(texts)
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


@pytest.mark.slow
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
    single = MiniLMEmbedder(folder, num_layers=2, int8=True)
    hf = MiniLMEmbedder(folder, num_layers=2, int8=True, graph="hf")
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
