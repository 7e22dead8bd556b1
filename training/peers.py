"""RouteLLM's routers trained on our rows, for a same-run comparison (``switchyard eval router --peers``).

Two of RouteLLM's routers (Ong et al., 2024, "RouteLLM: Learning to Route LLMs with Preference Data"),
trained on the same training rows as our router and scored on the same held-out rows, with the same
prompt embeddings — our MiniLM (all-MiniLM-L6-v2, 384-d, L2-normalised) instead of OpenAI's
``text-embedding-3-small`` (1536-d), which this machine cannot reach.

Rows become RouteLLM battles: ``model_a`` = the strong model, ``model_b`` = the weak one, ``winner`` =
``model_a`` when ``strong_score > weak_score``, ``model_b`` when lower, ``tie`` when equal (RouteLLM's
golden-label augmentation does the same with benchmark correctness).

- ``routellm_mf`` (matrix factorization): RouteLLM 0.2.0 ships the trainer
  (``routellm/routers/matrix_factorization/train_matrix_factorization.py``: ``PairwiseDataset``,
  ``MFModel_Train``, ``train_loops``). With ``impl="routellm"`` (or ``"auto"`` when the package is
  installed under ``.bench/routellm``) those are imported and run unchanged, with the hyperparameters of
  that file's ``__main__`` (dim 128, batch 64, 100 epochs, noise alpha 0.1, Adam lr 3e-4, weight decay
  1e-5, projection on), ``text_dim=384``, ``num_models=len(MODEL_IDS)`` and its model ids for
  gpt-4-1106-preview / mixtral-8x7b-instruct-v0.1; battles are filtered to decisive ones as there.
  Deviation: it trains on every training battle (its example holds 5 % out only to print accuracy; here
  that 5 % is printed but also trained on, so every peer sees the same rows). ``impl="ours"`` runs
  :class:`MFTrain` / :func:`train_mf` below, a line-for-line copy of those three (same seed, same
  shuffling, same loss). Scoring is the formula of its serving ``MFModel.pred_win_rate`` written here —
  ``sigmoid(w·((P_s/|P_s| − P_w/|P_w|) ⊙ proj(q)))`` — because ``MFModel.forward`` calls OpenAI.
- ``routellm_sw`` (similarity-weighted ranking): RouteLLM ships no trainer (the router is
  nonparametric); its serving class ``SWRankingRouter`` loads battles and embeddings from the Hugging
  Face hub and embeds with OpenAI. Its per-prompt computation is reproduced here: cosine similarity of
  the prompt to every training battle, weights ``10 · 10^(sim / max sim)``
  (``SWRankingRouter.get_weightings``), a weighted Elo MLE with ties (``compute_elo_mle_with_tie``, from
  the package with ``impl="routellm"``, else the copy :func:`elo_mle_with_tie`), strong win rate
  ``1 − 1 / (1 + 10^((R_s − R_w)/400))``. Tiers (``compute_tiers``, 10 tiers) are the identity with two
  models (each model is its own tier), so they are not applied. With two models that Elo MLE has a
  closed form — the strong win rate is the weighted share of strong wins plus half the ties — and every
  prompt is scored by it (the logistic-regression fit costs ~0.3 s a prompt on 12k battles); the report
  gives the largest gap between the two on the first evaluated prompts, through the package's function
  with ``impl="routellm"`` (≈ 1e-5: the solver's tolerance).

Both return P(weak good enough) = 1 − strong win rate, the direction of our scorers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import RoutingRow

PEERS = ("routellm_mf", "routellm_sw")
IMPLS = ("auto", "routellm", "ours")
STRONG = "gpt-4-1106-preview"  # RouteLLM's names of the pair our rows record (ids in its MODEL_IDS)
WEAK = "mixtral-8x7b-instruct-v0.1"
ROUTELLM_VERSION = "0.2.0"


def bench_dir() -> Path:
    """Where ``pip install --no-deps --target .bench/routellm routellm==0.2.0`` puts the package."""
    return Path(os.environ.get("SWITCHYARD_BENCH_DIR") or Path(__file__).resolve().parent.parent / ".bench")


def routellm_path() -> Path | None:
    path = bench_dir() / "routellm"
    return path if (path / "routellm" / "__init__.py").is_file() else None


def resolve_impl(impl: str) -> str:
    """``"routellm"`` or ``"ours"``; ValueError (one line) for an unknown name or a missing package."""
    if impl not in IMPLS:
        raise ValueError(f"--peers-impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "ours":
        return impl
    if routellm_path() is None:
        if impl == "routellm":
            raise ValueError(f"--peers-impl routellm: routellm {ROUTELLM_VERSION} is not installed under "
                             f"{bench_dir() / 'routellm'} (pip install --no-deps --target "
                             f"{bench_dir() / 'routellm'} routellm=={ROUTELLM_VERSION} pandas pytz)")
        return "ours"
    return "routellm"


@contextlib.contextmanager
def _routellm_on_path():
    """Import RouteLLM from .bench (its similarity_weighted/utils.py builds an OpenAI client at import:
    a dummy key is set for that; nothing calls the API)."""
    path = str(routellm_path())
    added = path not in sys.path
    if added:
        sys.path.insert(0, path)
    os.environ.setdefault("OPENAI_API_KEY", "sk-unused-routellm-peer")
    try:
        yield
    finally:
        if added:
            sys.path.remove(path)


# --------------------------------------------------------------------------------------------------
# battles
# --------------------------------------------------------------------------------------------------


def winner(row: RoutingRow) -> str:
    s, w = float(row.strong_score), float(row.weak_score)  # type: ignore[arg-type]
    return "model_a" if s > w else "model_b" if w > s else "tie"


def battles(rows: Sequence[RoutingRow]) -> list[dict]:
    """RouteLLM's pairwise format, one battle per row; ``idx`` indexes the row's prompt embedding."""
    return [{"idx": i, "model_a": STRONG, "model_b": WEAK, "winner": winner(r)} for i, r in enumerate(rows)]


# --------------------------------------------------------------------------------------------------
# matrix factorization: a copy of routellm 0.2.0 train_matrix_factorization.py (impl="ours")
# --------------------------------------------------------------------------------------------------

MF_HPARAMS = {"dim": 128, "batch_size": 64, "num_epochs": 100, "alpha": 0.1, "use_proj": True, "lr": 3e-4,
              "weight_decay": 1e-5}


def _mf_classes():
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, Dataset

    # RouteLLM's ids of the two models in its 64-model MODEL_IDS table, and its table's size: the same
    # embedding table, initialised from the same seed, so this copy trains the same weights as the package
    model_ids = {STRONG: 24, WEAK: 36}
    num_models = 64

    class PairwiseDataset(Dataset):
        def __init__(self, data):
            self.models_a = torch.tensor([model_ids[s["model_a"]] for s in data], dtype=torch.int64)
            self.models_b = torch.tensor([model_ids[s["model_b"]] for s in data], dtype=torch.int64)
            self.prompt_id = [s["idx"] for s in data]
            self.winners = [s["winner"] for s in data]

        def __len__(self):
            return len(self.models_a)

        def __getitem__(self, index):
            assert self.winners[index] in ["model_a", "model_b"], self.winners[index]
            if self.winners[index] == "model_a":
                return self.models_a[index], self.models_b[index], self.prompt_id[index]
            return self.models_b[index], self.models_a[index], self.prompt_id[index]

        def get_dataloaders(self, batch_size, shuffle=True):
            return DataLoader(self, batch_size, shuffle=shuffle)

    class MFTrain(torch.nn.Module):
        def __init__(self, dim, num_models, num_prompts, text_dim=1536, num_classes=1, use_proj=True,
                     npy_path=None):
            super().__init__()
            self.use_proj = use_proj
            self.P = torch.nn.Embedding(num_models, dim)
            self.Q = torch.nn.Embedding(num_prompts, text_dim).requires_grad_(False)
            self.Q.weight.data.copy_(torch.tensor(np.load(npy_path)))
            if self.use_proj:
                self.text_proj = torch.nn.Linear(text_dim, dim, bias=False)
            else:
                assert text_dim == dim, f"text_dim {text_dim} must be equal to dim {dim} if not using projection"
            self.classifier = nn.Linear(dim, num_classes, bias=False)

        def get_device(self):
            return self.P.weight.device

        def forward(self, model_win, model_loss, prompt, test=False, alpha=0.05):
            model_win_embed = F.normalize(self.P(model_win), p=2, dim=1)
            model_loss_embed = F.normalize(self.P(model_loss), p=2, dim=1)
            prompt_embed = self.Q(prompt)
            if not test:
                prompt_embed += torch.randn_like(prompt_embed) * alpha  # noise, as RouteLLM: stabilises training
            if self.use_proj:
                prompt_embed = self.text_proj(prompt_embed)
            return self.classifier((model_win_embed - model_loss_embed) * prompt_embed).squeeze()

    def evaluator(net, test_iter, device):
        net.eval()
        correct = num_samples = 0
        with torch.no_grad():
            for models_a, models_b, prompts in test_iter:
                net(models_a, models_b, prompts)  # as RouteLLM's evaluator: a noisy forward for its loss
                logits = net(models_a, models_b, prompts, test=True)
                correct += (logits > 0).sum().item()
                num_samples += len(models_a)
        net.train()
        return correct / num_samples

    def train_loops(net, train_iter, test_iter, lr, weight_decay, alpha, num_epochs, device="cpu", **kwargs):
        optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        loss = nn.BCEWithLogitsLoss(reduction="mean")
        for _ in range(num_epochs):
            net.train()
            for models_a, models_b, prompts in train_iter:
                output = net(models_a.to(device), models_b.to(device), prompts.to(device), alpha=alpha)
                ls = loss(output, torch.ones_like(output))
                optimizer.zero_grad()
                ls.backward()
                optimizer.step()
            evaluator(net, test_iter, device)

    return PairwiseDataset, MFTrain, train_loops, model_ids, num_models


@dataclass
class MFPeer:
    """A trained MF router: the model embeddings, projection and classifier, as plain arrays."""

    p_strong: np.ndarray  # L2-normalised model embeddings [dim]
    p_weak: np.ndarray
    proj: np.ndarray  # [dim, text_dim] (identity when use_proj is off)
    classifier: np.ndarray  # [dim]
    num_battles: int
    impl: str

    def strong_win_rate(self, emb: np.ndarray) -> np.ndarray:
        """RouteLLM's ``MFModel.pred_win_rate(strong, weak, prompt)`` for each row of ``emb``."""
        logits = ((emb @ self.proj.T) * (self.p_strong - self.p_weak)) @ self.classifier
        return 1.0 / (1.0 + np.exp(-logits))

    def score(self, emb: np.ndarray) -> np.ndarray:
        return 1.0 - self.strong_win_rate(emb)


def train_mf(train_emb: np.ndarray, rows: Sequence[RoutingRow], impl: str, workdir: Path,
             log: Callable[[str], None] = print, num_epochs: int | None = None) -> MFPeer:
    """Train RouteLLM's MF router on the decisive battles of ``rows`` (embeddings ``train_emb``, same order)."""
    import torch

    hp = dict(MF_HPARAMS, num_epochs=num_epochs or MF_HPARAMS["num_epochs"])
    data = [b for b in battles(rows) if b["winner"] in ("model_a", "model_b") and b["model_a"] != b["model_b"]]
    if len(data) < 2:
        raise ValueError(f"--peers: RouteLLM's MF router needs decisive battles (one model better than the other); "
                         f"the training rows have {len(data)}")
    if impl == "routellm":
        with _routellm_on_path():
            from routellm.routers.matrix_factorization import train_matrix_factorization as tmf
            from routellm.routers.matrix_factorization.model import MODEL_IDS
        PairwiseDataset, MFTrain, train_loops, model_ids, num_models = (
            tmf.PairwiseDataset, tmf.MFModel_Train, tmf.train_loops, MODEL_IDS, len(MODEL_IDS))
    else:
        PairwiseDataset, MFTrain, train_loops, model_ids, num_models = _mf_classes()
    torch.manual_seed(42)  # the seeds its module sets at import
    np.random.seed(42)
    random.seed(42)
    shuffled = data.copy()
    random.shuffle(shuffled)
    monitor = shuffled[int(len(shuffled) * 0.95):] or shuffled[:1]
    npy = workdir / "routellm_mf_prompt_embeddings.npy"
    np.save(npy, train_emb.astype(np.float32))
    net = MFTrain(dim=hp["dim"], num_models=num_models, num_prompts=len(rows), text_dim=train_emb.shape[1],
                  use_proj=hp["use_proj"], npy_path=str(npy))
    with contextlib.redirect_stderr(io.StringIO()):  # routellm's train_loops draws a tqdm bar per epoch
        train_loops(net, PairwiseDataset(shuffled).get_dataloaders(batch_size=hp["batch_size"], shuffle=True),
                    PairwiseDataset(monitor).get_dataloaders(1024, shuffle=False), lr=hp["lr"],
                    weight_decay=hp["weight_decay"], alpha=hp["alpha"], num_epochs=hp["num_epochs"], device="cpu")
    with torch.no_grad():
        p = torch.nn.functional.normalize(net.P.weight, p=2, dim=1).numpy()
        proj = net.text_proj.weight.numpy() if hp["use_proj"] else np.eye(hp["dim"], dtype=np.float32)
        clf = net.classifier.weight.numpy()[0]
    log(f"routellm_mf: trained ({impl}) on {len(data)} decisive battles of {len(rows)} rows, "
        f"{hp['num_epochs']} epochs")
    return MFPeer(p_strong=p[model_ids[STRONG]].astype(np.float64), p_weak=p[model_ids[WEAK]].astype(np.float64),
                  proj=proj.astype(np.float64), classifier=clf.astype(np.float64), num_battles=len(data), impl=impl)


# --------------------------------------------------------------------------------------------------
# similarity-weighted ranking
# --------------------------------------------------------------------------------------------------


def elo_mle_with_tie(model_a: np.ndarray, model_b: np.ndarray, winners: np.ndarray, sample_weight=None,
                     scale: float = 400, base: float = 10, init_rating: float = 1000) -> dict[str, float]:
    """A copy of routellm 0.2.0 ``similarity_weighted/utils.py: compute_elo_mle_with_tie`` without pandas:
    battles duplicated, a tie counts as one win for each side, unpenalised logistic regression without
    intercept; returns rating per model."""
    from sklearn.linear_model import LogisticRegression

    models = list(dict.fromkeys([*model_a.tolist(), *model_b.tolist()]))
    col = {m: i for i, m in enumerate(models)}
    a = np.concatenate([model_a, model_a])
    b = np.concatenate([model_b, model_b])
    w = np.concatenate([winners, winners])
    n = len(a)
    x = np.zeros([n, len(models)])
    x[np.arange(n), [col[m] for m in a]] = +math.log(base)
    x[np.arange(n), [col[m] for m in b]] = -math.log(base)
    y = np.zeros(n)
    y[w == "model_a"] = 1.0
    tie = (w == "tie") | (w == "tie (bothbad)")
    tie[len(tie) // 2:] = False
    y[tie] = 1.0
    lr = LogisticRegression(fit_intercept=False, C=np.inf)  # = penalty=None (its spelling before sklearn 1.8)
    if sample_weight is not None:
        lr.fit(x, y, sample_weight=np.concatenate([sample_weight, sample_weight]))
    else:
        lr.fit(x, y)
    scores = scale * lr.coef_[0] + init_rating
    return dict(zip(models, scores.tolist(), strict=True))


def sw_weightings(similarities: np.ndarray) -> np.ndarray:
    """``SWRankingRouter.get_weightings``."""
    return 10 * 10 ** (similarities / np.max(similarities))


@dataclass
class SWPeer:
    """RouteLLM's similarity-weighted ranking router over the training battles (nonparametric)."""

    train_emb: np.ndarray  # [n, d]
    winners: np.ndarray  # "model_a" (strong) | "model_b" (weak) | "tie", per training battle
    impl: str

    def _weights(self, emb: np.ndarray) -> np.ndarray:
        """``SWRankingRouter``'s weights of every training battle for each row of ``emb`` [m, n]."""
        norms = np.linalg.norm(self.train_emb, axis=1)
        sims = (emb @ self.train_emb.T) / (norms[None, :] * np.linalg.norm(emb, axis=1)[:, None])
        return 10 * 10 ** (sims / np.max(sims, axis=1, keepdims=True))

    def strong_win_rate(self, emb: np.ndarray, chunk: int = 256) -> np.ndarray:
        """The weighted Elo MLE's strong win rate, in closed form: with two models the MLE of RouteLLM's
        ``compute_elo_mle_with_tie`` (battles duplicated, a tie = one win each) puts the strong model's
        win probability at the weighted share of strong wins plus half the ties. :meth:`elo_check`
        compares it with the logistic-regression fit itself."""
        won = (self.winners == "model_a").astype(np.float64)
        tie = ((self.winners == "tie") | (self.winners == "tie (bothbad)")).astype(np.float64)
        out = np.empty(len(emb))
        for start in range(0, len(emb), chunk):
            w = self._weights(emb[start:start + chunk])
            out[start:start + chunk] = (w @ won + 0.5 * (w @ tie)) / w.sum(axis=1)
        return out

    def strong_win_rate_elo(self, emb: np.ndarray) -> float:
        """One prompt through the Elo fit as RouteLLM runs it (its function, or the copy), ratings →
        ``1 − 1 / (1 + 10^((R_s − R_w)/400))`` as ``calculate_strong_win_rate``."""
        weights = self._weights(emb[None, :])[0]
        a = np.full(len(self.winners), STRONG, dtype=object)
        b = np.full(len(self.winners), WEAK, dtype=object)
        if self.impl == "routellm":
            import pandas as pd

            with _routellm_on_path():
                from routellm.routers.similarity_weighted.utils import compute_elo_mle_with_tie
            with warnings.catch_warnings():  # sklearn >= 1.8 deprecates its penalty=None
                warnings.simplefilter("ignore", FutureWarning)
                res = compute_elo_mle_with_tie(pd.DataFrame({"model_a": a, "model_b": b, "winner": self.winners}),
                                               sample_weight=weights)
            strong, weak = float(res[STRONG]), float(res[WEAK])
        else:
            res = elo_mle_with_tie(a, b, self.winners, sample_weight=weights)
            strong, weak = res[STRONG], res[WEAK]
        weak_winrate = 1 / (1 + 10 ** ((strong - weak) / 400))
        return 1 - weak_winrate

    def elo_check(self, emb: np.ndarray, num: int = 10) -> float:
        """Largest |closed form − Elo fit| over the first ``num`` rows of ``emb`` (the fit costs ~0.3 s a
        prompt on 12k battles, so every prompt is scored by the closed form)."""
        sample = emb[:num]
        closed = self.strong_win_rate(sample)
        return float(max(abs(c - self.strong_win_rate_elo(e)) for c, e in zip(closed, sample, strict=True)))

    def score(self, emb: np.ndarray) -> np.ndarray:
        return 1.0 - self.strong_win_rate(emb)


def train_sw(train_emb: np.ndarray, rows: Sequence[RoutingRow], impl: str) -> SWPeer:
    if impl == "routellm":
        with _routellm_on_path():
            import pandas  # noqa: F401  (its utils need pandas; fail here, once, with a clear message)
    winners = np.asarray([b["winner"] for b in battles(rows)], dtype=object)
    if not ((winners == "model_a").any() or (winners == "model_b").any()):
        raise ValueError("--peers: RouteLLM's SW router needs at least one decisive training battle")
    return SWPeer(train_emb=train_emb.astype(np.float64), winners=winners, impl=impl)


# --------------------------------------------------------------------------------------------------
# embeddings and the one entry point
# --------------------------------------------------------------------------------------------------


ENCODERS = {
    "minilm": {},  # all-MiniLM-L6-v2 as trained (fp32, six layers): the default
    "minilm-l3-int8": {"num_layers": 3, "int8": True},  # the guard's encoder: first three layers, int8 (~7x less CPU)
}


class CachedMiniLM:
    """MiniLM (``encoder``: a name of :data:`ENCODERS`; 256 word pieces, L2-normalised) remembering every
    text it embedded, in memory and (``path``) in one ``.npz`` file, so repeated evaluations embed once.
    A cache file of another encoder is refused, never overwritten."""

    def __init__(self, path: str | Path | None = None, encoder: str = "minilm", num_threads: int = 1) -> None:
        from routers.embeddings import MiniLMEmbedder

        if encoder not in ENCODERS:
            raise ValueError(f"--peers-encoder must be one of {', '.join(ENCODERS)}; got {encoder!r}")
        self.encoder = encoder
        self.embedder = MiniLMEmbedder(num_threads=num_threads, max_length=256, **ENCODERS[encoder])
        self.path = Path(path) if path else None
        self.cache: dict[str, np.ndarray] = {}
        if self.path is not None:
            if self.path.is_dir():
                raise ValueError(f"--embedding-cache {self.path} is a folder; give a .npz file")
            if self.path.exists():
                try:
                    with np.load(self.path, allow_pickle=False) as z:
                        spec = json.loads(str(z["spec"]))
                        if spec == self.embedder.spec():
                            self.cache = dict(zip(z["texts"].tolist(), z["vectors"], strict=True))
                except (OSError, KeyError, ValueError) as e:
                    raise ValueError(f"--embedding-cache {self.path}: not an embedding cache ({e})") from None
                if spec != self.embedder.spec():
                    raise ValueError(f"--embedding-cache {self.path} holds embeddings of another encoder ({spec}); "
                                     f"give another file for {encoder}")

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.embedder.prepare()
            order = sorted(missing, key=len)  # similar lengths per batch: less padding
            self.cache.update(zip(order, self.embedder.encode(order, batch_size=32), strict=True))
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(self.path.name + ".tmp.npz")
                np.savez(tmp, texts=np.array(list(self.cache)), vectors=np.stack(list(self.cache.values())),
                         spec=np.array(json.dumps(self.embedder.spec())))
                os.replace(tmp, self.path)
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)


def _describe(embed) -> str:
    what, embedder = getattr(embed, "encoder", None), getattr(embed, "embedder", None)
    what = f"all-MiniLM-L6-v2 as '{what}' {embedder.spec()}" if what and embedder else "the embedder given"
    return f"{what}, 384-d (RouteLLM used OpenAI text-embedding-3-small, 1536-d)"


@dataclass
class PeerRun:
    scores: dict[str, np.ndarray]  # peer name → P(weak good enough) per evaluated text
    info: dict  # what was trained, how, by whose code


def peer_scores(train_rows: Sequence[RoutingRow], eval_texts: Sequence[str],
                embed: Callable[[list[str]], np.ndarray], impl: str, workdir: Path,
                log: Callable[[str], None] = print, mf_epochs: int | None = None) -> PeerRun:
    """Train both peers on ``train_rows`` and score ``eval_texts`` (pairwise rows only)."""
    impl = resolve_impl(impl)
    if not train_rows:
        raise ValueError("--peers: no training rows")
    train_emb = np.asarray(embed([r.prompt for r in train_rows]), dtype=np.float32)
    eval_emb = np.asarray(embed(list(eval_texts)), dtype=np.float64)
    mf = train_mf(train_emb, train_rows, impl, workdir, log=log, num_epochs=mf_epochs)
    sw = train_sw(train_emb, train_rows, impl)
    scores = {"routellm_mf": mf.score(eval_emb), "routellm_sw": sw.score(eval_emb)}
    elo_gap = sw.elo_check(eval_emb)
    log(f"routellm_sw: {len(train_rows)} training battles ({impl}); closed-form win rate within {elo_gap:.1e} of "
        f"the weighted Elo fit on {min(10, len(eval_emb))} evaluated prompts")
    code = (f"routellm {ROUTELLM_VERSION} from {routellm_path()}" if impl == "routellm"
            else "training/peers.py (a copy of routellm 0.2.0's code; the package is not installed)")
    info = {
        "implementation": impl,
        "embeddings": _describe(embed),
        "num_training_rows": len(train_rows),
        "routellm_mf": {"trainer": f"{code}: PairwiseDataset, MFModel_Train, train_loops"
                        if impl == "routellm" else code,
                        "scoring": "MFModel.pred_win_rate's formula (training/peers.py; its forward calls OpenAI)",
                        "num_battles": mf.num_battles, "hparams": dict(MF_HPARAMS, num_epochs=mf_epochs
                                                                      or MF_HPARAMS["num_epochs"])},
        "routellm_sw": {"elo": f"{code}: compute_elo_mle_with_tie" if impl == "routellm" else code,
                        "router": "SWRankingRouter.get_weightings / calculate_strong_win_rate re-implemented in "
                                  "training/peers.py (RouteLLM ships no trainer; its class loads hub data)",
                        "scoring": "the two-model Elo MLE in closed form (weighted share of strong wins + half "
                                   "the ties), checked against the Elo fit",
                        "max_abs_gap_closed_form_vs_elo_fit": round(elo_gap, 6),
                        "num_battles": len(train_rows)},
    }
    return PeerRun(scores=scores, info=info)
