"""MiniLM sentence embeddings (all-MiniLM-L6-v2) through ONNX Runtime, and the export of their graphs.

Serving reads a graph that was exported beforehand and never exports one itself: an artifact that uses
MiniLM ships its exact ``.onnx`` file and tokenizer (``encoder_files`` / ``embedder_from_files``, sha256
in the artifact's manifest), and the example cache reads the graph ``switchyard models prepare`` exported
to ``$SWITCHYARD_HOME/onnx``. Exporting (``MiniLMEmbedder.prepare``) needs torch, transformers and onnx:
the ``engine`` extra; serving needs onnxruntime and tokenizers only.

Nothing is loaded at import time.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from routers.artifact import sha256_file

EMBEDDING_DIM = 384
GRAPHS = ("hf", "single")  # MiniLMEmbedder(graph=...): the exported ONNX graph


class EncoderNotPrepared(ValueError):
    """The ONNX graph an embedder needs was never exported (serving does not export)."""


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: ``encode(texts) -> float32 [n, 384]``, rows L2-normalised.

    - Mean pooling over non-padding tokens, then L2 norm (sentence-transformers' recipe);
      texts are truncated to ``max_length`` word pieces (256, the model's own limit).
    - ``backend``: ``"onnx"`` (ONNX Runtime) or ``"auto"`` (the same) read the graph ``onnx_file``, or
      by default ``$SWITCHYARD_HOME/onnx/<name>.onnx`` beside its ``.json`` checksum record; ``load`` never
      exports: a missing graph is an ``EncoderNotPrepared`` error naming the command that exports it.
      ``prepare()`` exports it (once; again when the source weights or the file no longer match) and
      loads: training and ``switchyard models prepare`` call it. ``"torch"`` runs transformers' model
      (tests, comparisons).
    - ``tokenizer_file``: the tokenizer.json to use (default: the bundled model folder's).
    - ``num_threads`` intra-op threads (1 = the serving setting).
    - A cheaper encoder for latency budgets (the guard's): ``num_layers`` keeps only the first of the six
      transformer layers, ``int8`` quantizes the exported graph's weights (ONNX Runtime dynamic int8).
      int8 quantizes activations per batch, so an int8 encoder encodes one text at a time: what a batch
      gives then equals what serving gives. Both are ONNX-only and part of the exported file's name.
    - ``graph``: ``"hf"`` exports transformers' BertModel (batched, padded, attention mask);
      ``"single"`` (int8 only; the default there) exports a graph for one unpadded text — ids in, unit
      pooled vector out, no mask, shape or padding ops — which ONNX Runtime runs ~35 % faster. The two
      compute the same function (cosine ≥ 0.995 between their int8 outputs, from int8 rounding).
      Artifacts record the graph (an older one without the record means ``"hf"``: what
      ``switchyard artifact add-encoder`` exports for it).
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
        onnx_file: str | Path | None = None,
        tokenizer_file: str | Path | None = None,
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
        self.onnx_file = Path(onnx_file) if onnx_file is not None else None
        self.tokenizer_file = Path(tokenizer_file) if tokenizer_file is not None else None
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
        """Read the tokenizer and the graph (or the torch model); never exports. Raises
        ``EncoderNotPrepared`` when the ONNX graph is missing or does not match its checksum record."""
        with self._lock:
            if self.backend is not None:
                return self
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.tokenizer_path()))
            tok.enable_truncation(max_length=self.max_length)
            tok.enable_padding(pad_id=0, pad_token="[PAD]")
            if self.requested_backend == "torch":
                self._torch_model = self._load_torch()
            else:
                self._session = self._onnx_session(self.graph_file())
            self._tokenizer = tok
            self.backend = self.requested_backend if self.requested_backend == "torch" else "onnx"
            return self

    def prepare(self, force: bool = False) -> MiniLMEmbedder:
        """Export this encoder's ONNX graph to ``onnx_path()`` unless a matching one is there (``force``:
        export again), then ``load``. Needs torch, transformers and onnx (the ``engine`` extra)."""
        if self.requested_backend != "torch" and self.onnx_file is None:
            path = self.onnx_path()
            record = path.with_suffix(".json")
            source_sha = sha256_file(self.model_dir / "model.safetensors")
            if force or _record(path).get("source_sha256") != source_sha:
                self._export_onnx(path, record, source_sha)
        return self.load()

    def num_tokens(self, texts: list[str]) -> int:
        """Word pieces of ``texts`` as encoded (special tokens included, after truncation, no padding)."""
        self.load()
        return sum(sum(e.attention_mask) for e in self._tokenizer.encode_batch(texts))

    def tokenizer_path(self) -> Path:
        return self.tokenizer_file or self.model_dir / "tokenizer.json"

    def graph_file(self) -> Path:
        """The ONNX graph ``load`` reads: ``onnx_file``, or the prepared one (checked against its record)."""
        if self.onnx_file is not None:
            return self.onnx_file
        path = self.onnx_path()
        if not _record(path):
            raise EncoderNotPrepared(
                f"MiniLM's ONNX graph {str(path)!r} is not prepared; run `switchyard models prepare minilm` "
                "(the engine extra exports it once)" if not self.num_layers and not self.int8 else
                f"MiniLM's ONNX graph {str(path)!r} is not prepared; it ships inside the artifact that uses it "
                "(`switchyard artifact add-encoder DIR` adds it to an older one)")
        return path

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

    def _onnx_session(self, path: Path):
        import onnxruntime as ort

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
        rec_tmp.write_text(json.dumps({"source_sha256": source_sha, "onnx_sha256": sha256_file(tmp),
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




def _record(path: Path) -> dict[str, Any]:
    """The checksum record beside an exported graph when both exist and match, else {}."""
    record = path.with_suffix(".json")
    if not (path.is_file() and record.is_file()):
        return {}
    try:
        rec = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return rec if rec.get("onnx_sha256") == sha256_file(path) else {}


def encoder_files(embedder: MiniLMEmbedder, prefix: str) -> dict[str, Path]:
    """The files an artifact ships for ``embedder``: its exact ONNX graph and its tokenizer, under names
    starting with ``prefix`` (empty when the embedder runs torch: nothing to ship)."""
    if embedder.backend is None:
        embedder.load()
    if embedder.backend != "onnx":
        return {}
    return {f"{prefix}minilm.onnx": embedder.graph_file(), f"{prefix}tokenizer.json": embedder.tokenizer_path()}


def embedder_from_files(spec: dict[str, Any], files: dict[str, Path], prefix: str,
                        num_threads: int = 1) -> MiniLMEmbedder | None:
    """The embedder an artifact shipped (``encoder_files``) with the options ``spec`` recorded; None when
    the artifact ships no graph under ``prefix``."""
    graph, tokenizer = files.get(f"{prefix}minilm.onnx"), files.get(f"{prefix}tokenizer.json")
    if graph is None or tokenizer is None:
        return None
    return MiniLMEmbedder(max_length=int(spec.get("max_length", 256)), num_layers=spec.get("num_layers"),
                          int8=bool(spec.get("int8")), graph=spec.get("graph", "hf"), num_threads=num_threads,
                          onnx_file=graph, tokenizer_file=tokenizer)
