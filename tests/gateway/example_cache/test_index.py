"""VectorIndex: exact values, and the two-stage search equal to a full scan."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.example_cache.index import VectorIndex


def test_vector_index_exact_values():
    idx = VectorIndex(3, capacity=1)
    idx.add("a", np.array([1, 0, 0]))
    idx.add("b", np.array([0, 1, 0]))
    idx.add("c", np.array([0.6, 0.8, 0]))
    assert idx.search(np.array([1, 0, 0]), 2) == [("a", 1.0), ("c", pytest.approx(0.6))]
    assert [i for i, _ in idx.search(np.array([0, 1, 0]), 5, min_similarity=0.5)] == ["b", "c"]
    assert idx.remove("a") and not idx.remove("a")
    assert idx.ids() == ["c", "b"]  # last row moved into the hole
    assert [i for i, _ in idx.search(np.array([1, 0, 0]), 5)] == ["c", "b"]
    idx.add("c", np.array([0, 0, 1]))  # replace in place
    assert len(idx) == 2 and idx.search(np.array([0, 0, 1]), 1) == [("c", 1.0)]
    with pytest.raises(ValueError):
        idx.add("d", np.array([1, 0]))
    with pytest.raises(ValueError):
        VectorIndex(0)


@pytest.mark.parametrize("min_similarity", [-1.0, 0.5, 0.9])
def test_two_stage_search_equals_a_full_scan(min_similarity):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 48)) * np.linspace(3, 0.1, 48)  # anisotropic, like real embeddings
    vecs = centres[rng.integers(0, 20, 900)] + rng.normal(scale=0.3, size=(900, 48))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    idx = VectorIndex(48, capacity=8, head_dim=8, rotate_at=300)
    for i, v in enumerate(vecs):
        idx.add(str(i), v)
    assert idx.rotation is not None
    for i in range(0, 900, 7):  # removals after the rotation was fitted
        idx.remove(str(i))
    live = np.array([i for i in range(900) if i % 7])
    pruned = 0
    for _ in range(40):
        q = vecs[rng.integers(0, 900)] + rng.normal(scale=0.2, size=48).astype(np.float32)
        q /= np.linalg.norm(q)
        full = vecs[live] @ q
        order = np.argsort(-full, kind="stable")[:5]
        want = [(str(live[o]), full[o]) for o in order if full[o] >= min_similarity]
        got = idx.search(q, 5, min_similarity)
        assert [g[0] for g in got] == [w[0] for w in want]
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-4)
        pruned += idx.num_exact_rows_last < len(live)
    assert pruned > 0  # the bound did skip rows
