"""`switchyard eval router --peers`: RouteLLM's MF and SW routers trained on the same rows (training/peers.py).

Never needs .bench or the network: the peers run through training/peers.py's copy of RouteLLM's code, and
the test that compares the copy with the package itself is skipped where the package is not installed."""

import json
import math

import numpy as np
import pytest

from tests.training.router_synth import HARD, synth_rows, write_jsonl
from training import peers
from training.cli import main
from training.data import RoutingRow, eval_bucket, parse_routing_row
from training.evaluate import metrics


def _bag_embedder(dim: int = 48):
    """Deterministic stand-in for MiniLM: the normalised sum of fixed random word vectors, where every
    hard topic word shares one direction (what a sentence encoder gives "integral" and "eigenvalue")."""
    rng = np.random.default_rng(7)
    hard = rng.normal(size=dim)
    vocab: dict[str, np.ndarray] = {}

    def vec(word: str) -> np.ndarray:
        if word not in vocab:
            v = rng.normal(size=dim)
            vocab[word] = (3 * hard + 0.5 * v) if word in HARD else v
        return vocab[word]

    def embed(texts: list[str]) -> np.ndarray:
        out = np.stack([sum(vec(w) for w in t.split()) for t in texts]) if texts else np.zeros((0, dim))
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    embed.calls = []  # type: ignore[attr-defined]
    return embed


def _rows(n: int, seed: int) -> list[RoutingRow]:
    return [parse_routing_row(r, "synth") for r in synth_rows(n, seed=seed)]


def test_peers_learn_which_prompts_need_the_strong_model(tmp_path):
    train, held = _rows(400, seed=1), _rows(300, seed=2)
    run = peers.peer_scores(train, [r.prompt for r in held], _bag_embedder(), "ours", tmp_path, log=lambda m: None,
                            mf_epochs=30)
    strong = np.asarray([r.strong_score for r in held], dtype=float)
    weak = np.asarray([r.weak_score for r in held], dtype=float)
    hard = np.asarray([any(w in r.prompt.split() for w in HARD) for r in held])
    rand = metrics(np.random.default_rng(0).random(len(held)), strong, weak).apgr
    for name in peers.PEERS:
        s = run.scores[name]
        assert s.shape == (len(held),) and np.all((s > 0) & (s < 1)), name
        assert s[hard].mean() < s[~hard].mean(), name  # P(weak good enough) lower on hard prompts
        assert metrics(s, strong, weak).apgr > rand + 0.2, name
    assert run.info["implementation"] == "ours"
    assert run.info["routellm_mf"]["num_battles"] == sum(r.strong_score != r.weak_score for r in train)
    assert run.info["routellm_sw"]["num_battles"] == len(train)
    assert run.info["routellm_sw"]["max_abs_gap_closed_form_vs_elo_fit"] < 1e-3


def test_battles_use_routellm_names_and_ties():
    rows = [RoutingRow("a", "s", "1", 1.0, 0.0), RoutingRow("b", "s", "2", 0.0, 1.0), RoutingRow("c", "s", "3", 1, 1),
            RoutingRow("d", "s", "4", 0.7, 0.9)]
    assert [b["winner"] for b in peers.battles(rows)] == ["model_a", "model_b", "tie", "model_b"]
    assert {(b["model_a"], b["model_b"]) for b in peers.battles(rows)} == {("gpt-4-1106-preview",
                                                                            "mixtral-8x7b-instruct-v0.1")}


def test_sw_win_rate_is_the_weighted_elo_of_the_neighbours():
    """With two models the weighted Elo MLE with ties has a closed form: the strong win rate is the
    similarity-weighted share of (strong wins + half the ties)."""
    emb = np.asarray([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8], [0.6, -0.8]])
    winners = np.asarray(["model_a", "tie", "model_b", "model_b", "model_a"], dtype=object)
    sw = peers.SWPeer(train_emb=emb, winners=winners, impl="ours")
    q = np.asarray([0.9, 0.1])
    sims = emb @ q / (np.linalg.norm(emb, axis=1) * np.linalg.norm(q))
    w = 10 * 10 ** (sims / sims.max())
    expected = (w[winners == "model_a"].sum() + 0.5 * w[winners == "tie"].sum()) / w.sum()
    assert math.isclose(sw.strong_win_rate_elo(q), expected, abs_tol=1e-4)  # the Elo fit (copy of RouteLLM's)
    assert math.isclose(sw.score(q[None, :])[0], 1 - expected, rel_tol=1e-12)  # the closed form it is scored by
    assert sw.elo_check(np.stack([q, -q, [0.3, 0.3]])) < 1e-4


@pytest.mark.skipif(peers.routellm_path() is None, reason="routellm 0.2.0 is not installed under .bench/routellm")
def test_our_copy_trains_what_the_routellm_package_trains(tmp_path):
    train, held = _rows(200, seed=3), _rows(50, seed=4)
    embed = _bag_embedder()
    ours = peers.peer_scores(train, [r.prompt for r in held], embed, "ours", tmp_path, log=lambda m: None,
                             mf_epochs=5)
    theirs = peers.peer_scores(train, [r.prompt for r in held], embed, "routellm", tmp_path, log=lambda m: None,
                               mf_epochs=5)
    assert theirs.info["implementation"] == "routellm"
    for name in peers.PEERS:
        np.testing.assert_allclose(ours.scores[name], theirs.scores[name], atol=1e-4, err_msg=name)


@pytest.fixture
def synth_model(tmp_path, monkeypatch):
    rows = synth_rows(600, seed=1) + synth_rows(200, seed=6, source="other")
    for r in rows[600:]:
        r["id"] = "o" + r["id"]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    model = tmp_path / "m"
    assert main(["train", "router", "--data", str(data), "--out", str(model)]) == 0
    embed = _bag_embedder()

    class FakeMiniLM:  # what the CLI builds; the real one would export and run MiniLM
        def __init__(self, path=None, encoder="minilm"):
            embed.calls.append(path)

        def __call__(self, texts):
            return embed(texts)

    monkeypatch.setattr(peers, "CachedMiniLM", FakeMiniLM)
    monkeypatch.setattr(peers, "MF_HPARAMS", dict(peers.MF_HPARAMS, num_epochs=20))
    return data, model, rows, embed


def test_eval_peers_json_puts_each_peer_beside_ours(synth_model, tmp_path, capsys, monkeypatch):
    data, model, rows, embed = synth_model
    monkeypatch.setenv("SWITCHYARD_BENCH_DIR", str(tmp_path / "no-bench"))  # auto → our copy
    capsys.readouterr()
    cache = tmp_path / "emb.npz"
    assert main(["eval", "router", "--model", str(model), "--data", str(data), "--peers", "--json",
                 "--embedding-cache", str(cache)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert embed.calls == [str(cache)]
    held = [r for r in rows if eval_bucket(r["id"]) < 20]
    assert report["num_eval_rows"] == len(held)
    for src in ("synth", "other", "all"):
        entry = report["sources"][src]
        assert {"tfidf_source_ridge", "tfidf_lr", "routellm_mf", "routellm_sw", "random", "oracle"} <= set(entry)
        for name in ("routellm_mf", "routellm_sw"):
            assert entry[name]["n"] == entry["tfidf_source_ridge"]["n"]
            assert 0 <= entry[name]["cpt50"] <= 1 and entry[name]["strong_share_at_threshold"] is None
    synth = report["sources"]["synth"]
    assert synth["routellm_mf"]["apgr"] > synth["random"]["apgr"] + 0.1
    assert synth["routellm_sw"]["apgr"] > synth["random"]["apgr"] + 0.1
    # the peers are fitted on the very rows the TF-IDF+LR baseline is fitted on, and say whose code ran
    assert report["peers"]["num_training_rows"] == report["baseline_fit"]["num_rows"] == len(rows) - len(held)
    assert report["peers"]["implementation"] == "ours"
    assert "routellm_mf" in out and "tfidf_lr baseline and RouteLLM peers fitted on" in out


@pytest.mark.parametrize("extra, message", [
    (["--peers", "--peers-impl", "routellm"], "routellm 0.2.0 is not installed under"),
    (["--peers", "--peers-impl", "openai"], "--peers-impl must be one of auto, routellm, ours"),
    (["--embedding-cache", "x.npz"], "--peers-impl, --peers-encoder and --embedding-cache are for --peers"),
])
def test_bad_peer_options_one_line_error(synth_model, tmp_path, capsys, monkeypatch, extra, message):
    data, model, _, _ = synth_model
    monkeypatch.setenv("SWITCHYARD_BENCH_DIR", str(tmp_path / "no-bench"))
    capsys.readouterr()
    assert main(["eval", "router", "--model", str(model), "--data", str(data), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_embedding_cache_that_is_a_folder_or_of_another_encoder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        peers.CachedMiniLM(tmp_path)
    with pytest.raises(ValueError, match="--peers-encoder must be one of minilm, minilm-l3-int8"):
        peers.CachedMiniLM(None, encoder="bert")
    other = tmp_path / "l3.npz"
    spec = peers.CachedMiniLM(None, encoder="minilm-l3-int8").embedder.spec()
    np.savez(other, texts=np.array(["a"]), vectors=np.zeros((1, 384), np.float32), spec=np.array(json.dumps(spec)))
    with pytest.raises(ValueError, match="holds embeddings of another encoder"):
        peers.CachedMiniLM(other)
    assert peers.CachedMiniLM(other, encoder="minilm-l3-int8").cache.keys() == {"a"}
