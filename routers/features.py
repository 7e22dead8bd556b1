"""Text → features, the same code at training and at serving time.

Three pieces, shared by the guard, the router and the example cache:

- ``HashedTfidf``: hashed word and character n-gram TF-IDF. Stable across processes and machines
  (a fixed FNV-1a/splitmix64 hash over Unicode code points and a CRC-32 over words — never Python's
  ``hash()``), language-agnostic, fast for one short query (a few hundred microseconds).
- ``MiniLMEmbedder``: all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 norm, as
  sentence-transformers does), through ONNX Runtime (exported once, checksummed) with a torch fallback.
- ``last_user_text``: which part of a multi-turn chat the guard and the router look at.

Nothing is loaded at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FEATURES_VERSION = 1

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_SPACE_RE = re.compile(r"\s+")
_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_WORD_SEED = np.uint64(0x5157A5D1)
_CHAR_SEED = np.uint64(0xC4A2B00F)


_last_counts = threading.local()  # HashedTfidf._counts' one-entry memo, per thread


@dataclass(frozen=True)
class _Counts:
    """The IDF-free part of one text's TF-IDF row: per non-empty part (word, char) its sorted unique
    bucket ids and term weights (``1 + log tf`` or ``tf``); the row's columns (their union) and, when
    there are two parts, where each part's ids land in it."""

    parts: list[tuple[np.ndarray, np.ndarray]]
    cols: np.ndarray
    inv: np.ndarray | None


def _seed(base: np.uint64, n: int) -> np.uint64:
    return np.uint64((int(base) + n * int(_GOLDEN)) & 0xFFFFFFFFFFFFFFFF)


_MAX_N = 16  # n-gram orders with a precomputed seed; longer ones compute theirs
_CHAR_SEEDS = tuple(_seed(_CHAR_SEED, n) for n in range(_MAX_N))
_WORD_SEEDS = tuple(_seed(_WORD_SEED, n) for n in range(_MAX_N))


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the low bits we keep."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def normalize_text(text: str) -> str:
    """Lower-case and collapse whitespace; the one normalisation every featurizer applies."""
    return _SPACE_RE.sub(" ", text.lower()).strip()


def char_ngram_hashes(text: str, ngram_range: tuple[int, int]) -> np.ndarray:
    """uint64 hashes of every character n-gram (n in ``ngram_range``) of ``" " + text + " "``."""
    lo, hi = ngram_range
    cps = np.frombuffer((" " + text + " ").encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    out: list[np.ndarray] = []
    h = (_FNV_OFFSET ^ cps) * _FNV_PRIME  # n = 1 at every position
    for n in range(1, hi + 1):
        if n > 1:
            if len(cps) < n:
                break
            h = (h[:-1] ^ cps[n - 1:]) * _FNV_PRIME
        if n >= lo:
            out.append(h ^ (_CHAR_SEEDS[n] if n < _MAX_N else _seed(_CHAR_SEED, n)))
    return _mix(np.concatenate(out)) if out else np.zeros(0, dtype=np.uint64)  # one elementwise pass


def word_ngram_hashes(text: str, ngram_range: tuple[int, int]) -> np.ndarray:
    """uint64 hashes of every word n-gram (``\\w+`` tokens) of a normalised text."""
    lo, hi = ngram_range
    words = _WORD_RE.findall(text)
    if not words:
        return np.zeros(0, dtype=np.uint64)
    base = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
    out: list[np.ndarray] = []
    h = (_FNV_OFFSET ^ base) * _FNV_PRIME
    mixed = _mix(base) if hi > 1 else base
    for n in range(1, hi + 1):
        if n > 1:
            if len(base) < n:
                break
            h = (h[:-1] ^ mixed[n - 1:]) * _FNV_PRIME
        if n >= lo:
            out.append(h ^ (_WORD_SEEDS[n] if n < _MAX_N else _seed(_WORD_SEED, n)))
    return _mix(np.concatenate(out)) if out else np.zeros(0, dtype=np.uint64)  # one elementwise pass


class HashedTfidf:
    """Hashed word + character n-gram TF-IDF.

    Contract:
    - ``transform`` returns a ``scipy.sparse.csr_matrix`` [n, n_features] float32. The word part and the
      character part are each L2-normalised and scaled by 1/sqrt(2), so every non-empty row has L2 norm 1
      (like a FeatureUnion of two normalised TF-IDF vectors; the row is renormalised after word and char
      n-grams that share a bucket are summed); an empty text gives an all-zero row.
    - Term frequency is ``1 + log(tf)`` when ``sublinear_tf``; IDF is sklearn's smoothed
      ``log((1 + n) / (1 + df)) + 1``, learned by ``fit`` (before ``fit`` the IDF is all ones).
    - Bucket ids depend only on the text and ``n_features``: the same in every process.
    - ``state()`` → ``(meta, arrays)`` with JSON-able meta and one array ``"idf"``; callers that store
      several featurizers in one artifact prefix the array names themselves.
    - Thread-safe for ``transform``/``transform_one`` after ``fit``.
    """

    def __init__(
        self,
        n_features: int = 2**18,
        word_ngrams: tuple[int, int] = (1, 2),
        char_ngrams: tuple[int, int] = (2, 5),
        sublinear_tf: bool = True,
    ) -> None:
        if n_features <= 0 or n_features & (n_features - 1):
            raise ValueError(f"n_features must be a power of two, got {n_features}")
        for name, (lo, hi) in (("word_ngrams", word_ngrams), ("char_ngrams", char_ngrams)):
            if not (0 <= lo <= hi) or (lo == 0 and hi != 0):
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, or (0, 0) to disable")
        self.n_features = int(n_features)
        self.word_ngrams = (int(word_ngrams[0]), int(word_ngrams[1]))
        self.char_ngrams = (int(char_ngrams[0]), int(char_ngrams[1]))
        self.sublinear_tf = bool(sublinear_tf)
        self.idf = np.ones(self.n_features, dtype=np.float32)
        self.num_docs = 0
        self._mask = np.uint64(self.n_features - 1)

    # -- bucket ids ---------------------------------------------------------------------------
    def _parts(self, text: str) -> list[np.ndarray]:
        """Bucket ids of the word part and the char part (each possibly empty)."""
        norm = normalize_text(text)
        parts = []
        if self.word_ngrams[0] > 0:
            parts.append((word_ngram_hashes(norm, self.word_ngrams) & self._mask).view(np.int64))  # < 2**63
        if self.char_ngrams[0] > 0 and norm:
            parts.append((char_ngram_hashes(norm, self.char_ngrams) & self._mask).view(np.int64))
        return parts

    def _counts(self, text: str) -> _Counts:
        """Everything about one text's row but the IDF (see ``_Counts``).

        The guard and the router featurize the same text back to back with the same hashing settings, so
        the last result is kept per thread and reused when the next call asks for the same text and
        settings (a one-entry memo: it never helps one request with another's text). Its arrays are
        read-only.
        """
        key = (text, self.n_features, self.word_ngrams, self.char_ngrams, self.sublinear_tf)
        last = getattr(_last_counts, "value", None)
        if last is not None and last[0] == key:
            return last[1]
        parts = []
        for ids in self._parts(text):
            if len(ids):
                u, tf = np.unique(ids, return_counts=True)
                parts.append((u, (1.0 + np.log(tf)) if self.sublinear_tf else tf.astype(np.float64)))
        if len(parts) > 1:  # word and char buckets may collide: the row's columns are their union
            cols, inv = np.unique(np.concatenate([u for u, _ in parts]), return_inverse=True)
        else:
            cols, inv = (parts[0][0] if parts else np.zeros(0, dtype=np.int64)), None
        counts = _Counts(parts, cols, inv)
        for arr in (cols, inv, *(x for part in parts for x in part)):
            if arr is not None:
                arr.flags.writeable = False
        _last_counts.value = (key, counts)
        return counts

    def _row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(sorted unique column ids, float32 values) of one text."""
        counts = self._counts(text)
        if not counts.parts:
            return counts.cols, np.zeros(0, dtype=np.float32)
        scale = 1.0 / np.sqrt(len(counts.parts))
        vals = []
        for u, tfw in counts.parts:
            w = tfw * self.idf[u]
            w *= scale / np.sqrt(np.dot(w, w))
            vals.append(w)
        if counts.inv is None:
            return counts.cols, vals[0].astype(np.float32)
        w = np.bincount(counts.inv, weights=np.concatenate(vals), minlength=len(counts.cols))
        return counts.cols, (w / np.sqrt(np.dot(w, w))).astype(np.float32)  # word/char bucket collisions

    # -- API ------------------------------------------------------------------------------------
    def fit(self, texts: Iterable[str]) -> HashedTfidf:
        """Learn the IDF from ``texts``; returns self."""
        df = np.zeros(self.n_features, dtype=np.int64)
        n = 0
        for text in texts:
            parts = self._parts(text)
            if parts:
                df[np.unique(np.concatenate(parts))] += 1
            n += 1
        if n == 0:
            raise ValueError("HashedTfidf.fit needs at least one text")
        self.num_docs = n
        self.idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        return self

    def transform(self, texts: Sequence[str]):
        """[n, n_features] csr_matrix float32, rows as described in the class contract."""
        from scipy.sparse import csr_matrix

        indptr = [0]
        cols, vals = [], []
        for text in texts:
            c, v = self._row(text)
            cols.append(c)
            vals.append(v)
            indptr.append(indptr[-1] + len(c))
        indices = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        data = np.concatenate(vals) if vals else np.zeros(0, dtype=np.float32)
        return csr_matrix(
            (data, indices.astype(np.int32), np.asarray(indptr, dtype=np.int64)),
            shape=(len(indptr) - 1, self.n_features),
        )

    def transform_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The fast path for one query: (sorted column ids int64, values float32), no scipy."""
        return self._row(text)

    def fit_transform(self, texts: Sequence[str]):
        return self.fit(texts).transform(texts)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {
            "type": "hashed_tfidf",
            "version": FEATURES_VERSION,
            "n_features": self.n_features,
            "word_ngrams": list(self.word_ngrams),
            "char_ngrams": list(self.char_ngrams),
            "sublinear_tf": self.sublinear_tf,
            "num_docs": self.num_docs,
        }
        return meta, {"idf": self.idf.copy()}

    to_arrays = state

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> HashedTfidf:
        if meta.get("type") != "hashed_tfidf" or meta.get("version") != FEATURES_VERSION:
            raise ValueError(
                f"featurizer state is {meta.get('type')!r} v{meta.get('version')}, "
                f"expected 'hashed_tfidf' v{FEATURES_VERSION}; retrain the artifact"
            )
        obj = cls(
            n_features=int(meta["n_features"]),
            word_ngrams=tuple(meta["word_ngrams"]),
            char_ngrams=tuple(meta["char_ngrams"]),
            sublinear_tf=bool(meta["sublinear_tf"]),
        )
        idf = np.asarray(arrays["idf"], dtype=np.float32)
        if idf.shape != (obj.n_features,):
            raise ValueError(f"idf has shape {idf.shape}, expected ({obj.n_features},)")
        obj.idf = idf
        obj.num_docs = int(meta.get("num_docs", 0))
        return obj

    from_arrays = from_state


# --------------------------------------------------------------------------------------------------
# MiniLM sentence embeddings
# --------------------------------------------------------------------------------------------------

EMBEDDING_DIM = 384
GRAPHS = ("hf", "single")  # MiniLMEmbedder(graph=...): the exported ONNX graph


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: ``encode(texts) -> float32 [n, 384]``, rows L2-normalised.

    - Mean pooling over non-padding tokens, then L2 norm (sentence-transformers' recipe);
      texts are truncated to ``max_length`` word pieces (256, the model's own limit).
    - ``backend``: ``"onnx"`` (ONNX Runtime; the graph is exported once to
      ``$SWITCHYARD_HOME/onnx/minilm.onnx`` beside a ``.json`` checksum record and re-exported when the
      source weights or the file no longer match), ``"torch"``, or ``"auto"`` (onnx, else torch).
    - ``num_threads`` intra-op threads (1 = the serving setting).
    - A cheaper encoder for latency budgets (the guard's): ``num_layers`` keeps only the first of the six
      transformer layers, ``int8`` quantizes the exported graph's weights (ONNX Runtime dynamic int8).
      int8 quantizes activations per batch, so an int8 encoder encodes one text at a time: what a batch
      gives then equals what serving gives. Both are ONNX-only and part of the exported file's name.
    - ``graph``: ``"hf"`` exports transformers' BertModel (batched, padded, attention mask);
      ``"single"`` (int8 only; the default there) exports a graph for one unpadded text — ids in, unit
      pooled vector out, no mask, shape or padding ops — which ONNX Runtime runs ~35 % faster. The two
      compute the same function (cosine ≥ 0.995 between their int8 outputs, from int8 rounding).
      Artifacts record the graph; an older artifact without it loads with ``"hf"``.
    - Loading is lazy (first ``encode``) and guarded by a lock; ``encode`` is thread-safe afterwards.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        backend: str = "auto",
        max_length: int = 256,
        num_threads: int = 1,
        num_layers: int | None = None,
        int8: bool = False,
        graph: str | None = None,
    ) -> None:
        if backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"backend must be one of auto, onnx, torch; got {backend!r}")
        graph = graph or ("single" if int8 else "hf")
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {', '.join(GRAPHS)}; got {graph!r}")
        if graph == "single" and not int8:
            raise ValueError("graph 'single' is for int8 encoders (fp32 encodes batches: use 'hf')")
        if num_layers is not None and not 1 <= int(num_layers) <= 6:
            raise ValueError(f"num_layers must be in 1..6 (MiniLM-L6 has six), got {num_layers}")
        if (num_layers is not None or int8) and backend == "torch":
            raise ValueError("num_layers / int8 need the onnx backend")
        self._model_dir = Path(model_dir) if model_dir is not None else None
        self.requested_backend = "onnx" if (num_layers is not None or int8) else backend
        self.max_length = int(max_length)
        self.num_threads = int(num_threads)
        self.num_layers = None if num_layers is None or int(num_layers) == 6 else int(num_layers)
        self.int8 = bool(int8)
        self.graph = graph
        self.backend: str | None = None  # the one actually in use, after load
        self._lock = threading.Lock()
        self._tokenizer = None
        self._session = None
        self._torch_model = None

    # -- loading ------------------------------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            from backends.models import prepare

            self._model_dir = Path(prepare("minilm"))
        return self._model_dir

    def load(self) -> MiniLMEmbedder:
        with self._lock:
            if self.backend is not None:
                return self
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
            tok.enable_truncation(max_length=self.max_length)
            tok.enable_padding(pad_id=0, pad_token="[PAD]")
            self._tokenizer = tok
            if self.requested_backend in ("auto", "onnx"):
                try:
                    self._session = self._onnx_session()
                    self.backend = "onnx"
                    return self
                except Exception:
                    if self.requested_backend == "onnx":
                        raise
            self._torch_model = self._load_torch()
            self.backend = "torch"
            return self

    def _load_torch(self):
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(self.model_dir))
        model.eval()
        return model

    def spec(self) -> dict[str, Any]:
        """The options that change the embeddings (stored in artifacts that depend on them)."""
        return {"max_length": self.max_length, "num_layers": self.num_layers, "int8": self.int8, "graph": self.graph}

    def onnx_path(self) -> Path:
        from backends.models import switchyard_home

        name = "minilm" + (f"-l{self.num_layers}" if self.num_layers else "") + ("-int8" if self.int8 else "")
        return switchyard_home() / "onnx" / f"{name}{'-single' if self.graph == 'single' else ''}.onnx"

    def _onnx_session(self):
        import onnxruntime as ort

        path = self.onnx_path()
        record = path.with_suffix(".json")
        source_sha = _sha256(self.model_dir / "model.safetensors")
        ok = False
        if path.is_file() and record.is_file():
            try:
                rec = json.loads(record.read_text())
                ok = rec.get("source_sha256") == source_sha and rec.get("onnx_sha256") == _sha256(path)
            except (OSError, json.JSONDecodeError):
                ok = False
        if not ok:
            self._export_onnx(path, record, source_sha)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.num_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def _export_onnx(self, path: Path, record: Path, source_sha: str) -> None:
        """Export the encoder (last_hidden_state) once; atomic rename so concurrent loaders never see half a file."""
        import torch

        model = self._load_torch()
        if self.num_layers:
            model.encoder.layer = model.encoder.layer[: self.num_layers]
            model.config.num_hidden_layers = self.num_layers
        if self.graph == "single":
            self._export_graph(_single_text_encoder(model), (torch.ones(8, dtype=torch.long),), ["input_ids"],
                               ["embedding"], {"input_ids": {0: "seq"}}, path, record, source_sha)
            return

        class _Encoder(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).last_hidden_state

        dummy = torch.ones(1, 8, dtype=torch.long)
        axes = {0: "batch", 1: "seq"}
        self._export_graph(_Encoder(model), (dummy, dummy, torch.zeros_like(dummy)),
                           ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state"],
                           {"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                            "last_hidden_state": axes}, path, record, source_sha)

    def _export_graph(self, module, args, input_names, output_names, dynamic_axes, path: Path, record: Path,
                      source_sha: str) -> None:
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python control flow in HF code
            torch.onnx.export(module, args, str(tmp), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)
        if self.int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            q_tmp = path.with_name(f"{path.name}.{os.getpid()}.int8.tmp")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(str(tmp), str(q_tmp), weight_type=QuantType.QInt8)
            os.replace(q_tmp, tmp)
        rec_tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
        rec_tmp.write_text(json.dumps({"source_sha256": source_sha, "onnx_sha256": _sha256(tmp),
                                       "max_length": self.max_length}, indent=2))
        os.replace(tmp, path)
        os.replace(rec_tmp, record)

    # -- encoding -----------------------------------------------------------------------------------
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 [len(texts), 384], each row L2-normalised (an empty text still gets [CLS] [SEP])."""
        if self.backend is None:
            self.load()
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        if self.graph == "single":
            for i, text in enumerate(texts):
                out[i] = self._session.run(None, {"input_ids": self._single_ids(text)})[0]
            return out
        if self.int8:
            batch_size = 1  # activations are quantized per batch: one text at a time, as when serving
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start:start + batch_size])
            encs = self._tokenizer.encode_batch(batch)
            ids = np.asarray([e.ids for e in encs], dtype=np.int64)
            mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
            hidden = self._hidden(ids, mask)
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out[start:start + len(batch)] = pooled
        return out

    def encode_one(self, text: str) -> np.ndarray:
        return self.encode([text], batch_size=1)[0]

    def _single_ids(self, text: str) -> np.ndarray:
        """Word-piece ids of one text, truncated to ``max_length`` (with [CLS]/[SEP]) — exactly what the
        tokenizer gives for the whole text, without tokenizing what truncation drops: a long text is first
        cut at a space about 5, then 8 characters per kept piece in (the guard's 32 pieces need at most 174
        characters in 99 % of its dev texts; tokenizing 160 instead of 256 characters saves a third of the
        tokenizer's time). BERT's pre-tokenizer splits at every space and its normaliser works per
        character, so a prefix's pieces are the text's first pieces; when no prefix fills ``max_length``
        the whole text is tokenized instead."""
        for chars_per_piece in (5, 8):
            limit = chars_per_piece * self.max_length
            if len(text) <= limit:
                break
            cut = text.rfind(" ", 0, limit)
            if cut > 0:
                ids = self._tokenizer.encode(text[:cut]).ids
                if len(ids) >= self.max_length:
                    return np.asarray(ids, dtype=np.int64)
        return np.asarray(self._tokenizer.encode(text).ids, dtype=np.int64)

    def _hidden(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        types = np.zeros_like(ids)
        if self.backend == "onnx":
            return self._session.run(
                None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            )[0]
        import torch

        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        with torch.inference_mode():
            return self._torch_model(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                token_type_ids=torch.from_numpy(types),
            ).last_hidden_state.float().numpy()


def _single_text_encoder(model):
    """BertModel → a module mapping one unpadded text's ids [T] to its unit mean-pooled embedding [d]:
    the same function as the batched graph for a batch of one, written without masks or padding."""
    import torch

    cfg = model.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    class _Single(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = model.embeddings
            self.layers = model.encoder.layer

        def forward(self, input_ids):
            n = input_ids.shape[0]
            e = self.embeddings
            x = e.word_embeddings(input_ids) + e.position_embeddings.weight[:n] + e.token_type_embeddings.weight[0]
            x = e.LayerNorm(x)
            for layer in self.layers:
                att = layer.attention.self
                q = att.query(x).view(n, heads, head_dim).transpose(0, 1)
                k = att.key(x).view(n, heads, head_dim).transpose(0, 1)
                v = att.value(x).view(n, heads, head_dim).transpose(0, 1)
                p = torch.softmax(q @ k.transpose(1, 2) * (head_dim ** -0.5), dim=-1)
                ctx = (p @ v).transpose(0, 1).reshape(n, heads * head_dim)
                x = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + x)
                x = layer.output.LayerNorm(layer.output.dense(torch.nn.functional.gelu(layer.intermediate.dense(x))) + x)
            pooled = x.mean(dim=0)
            return pooled / pooled.norm().clamp_min(1e-12)

    return _Single()


# --------------------------------------------------------------------------------------------------
# Multi-turn chats
# --------------------------------------------------------------------------------------------------


def message_text(content: Any) -> str:
    """Text of one OpenAI message ``content``: a string, or the ``text`` parts of a content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text") or ""))
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(p for p in parts if p)
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def last_user_text(messages: Sequence[dict[str, Any]], max_chars: int = 2000) -> str:
    """The text the guard and the router see for a chat.

    Rule: the last ``user`` turn, preceded by earlier ``user`` turns (newest first, joined by newlines)
    while the total stays within ``max_chars``. System/developer prompts and assistant/tool turns are
    excluded: they are written by the deployment or the model, not by the person whose request is being
    judged. A last user turn longer than ``max_chars`` is cut to its first ``max_chars`` characters.
    No user turn at all → ``""``. Messages are dicts with ``role`` and ``content`` (string or parts).
    """
    if max_chars <= 0:
        raise ValueError("max_chars must be positive")
    user_texts = []
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError(f"a message must be a dict with role/content, got {type(m).__name__}")
        if m.get("role") == "user":
            text = message_text(m.get("content")).strip()
            if text:
                user_texts.append(text)
    if not user_texts:
        return ""
    picked = [user_texts[-1][:max_chars]]
    used = len(picked[0])
    for text in reversed(user_texts[:-1]):
        if used + 1 + len(text) > max_chars:
            break
        picked.append(text)
        used += 1 + len(text)
    return "\n".join(reversed(picked))
