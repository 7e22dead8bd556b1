import subprocess
import sys

import numpy as np
import pytest

from routers.features import HashedTfidf

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
    """The guard and the router featurize one text in a row: the second reuses the first's counts (the
    shared memo of recent texts) yet applies its own IDF, and a different config or text is never reused."""
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


def test_counts_are_shared_across_threads_for_a_batch_and_the_memo_stays_bounded():
    """The guard's and the router's batchers featurize the same batch of texts in two threads, one after
    the other: the second thread reuses every text's counts; the memo keeps at most its capacity."""
    import threading

    from routers.features import _counts_memo

    guard_side = HashedTfidf(n_features=2**12).fit(TEXTS)
    router_side = HashedTfidf(n_features=2**12).fit(["other", "idf", "entirely"])
    batch = [f"question {i} about the loan and the court" for i in range(32)]
    first: list = []
    second: list = []
    t = threading.Thread(target=lambda: first.extend(guard_side._counts(x) for x in batch))
    t.start()
    t.join()
    t = threading.Thread(target=lambda: second.extend(router_side._counts(x) for x in batch))
    t.start()
    t.join()
    assert all(a is b for a, b in zip(first, second, strict=True))
    for i in range(3 * _counts_memo.capacity):
        guard_side.transform_one(f"filler text number {i}")
    assert len(_counts_memo._entries) == _counts_memo.capacity
    assert guard_side._counts(batch[0]) is not first[0]  # evicted long ago: computed again, equal
    assert np.array_equal(guard_side._counts(batch[0]).cols, first[0].cols)
