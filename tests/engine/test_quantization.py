"""Weight-only int8/int4 linear layers and quantize_model.

Rules (stated, and what the tests check):
- Layer: relative Frobenius error of the output vs fp32 ``F.linear`` <= 1.5% for int8 (per-channel,
  bf16 activations) and <= 8% for int4 (groups of 32; the expected error of 4-bit uniform weights is ~6%).
- Tiny random model (HF transformers Llama/Qwen3/Gemma3, 8 prompts x 16 greedy tokens): int8 top-1
  agreement with fp32 under teacher forcing (both fed the fp32 greedy sequence) >= 95%, and at least 5 of 8
  free-running greedy continuations identical. Random tiny models have near-flat logits, so some flips
  are expected; int4 only has to keep teacher-forced agreement >= 60%.
- Through the engine (``EngineArgs(quantization="int8")``): >= 5 of 8 greedy continuations equal the
  fp32 engine's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backends.engine.layers.quantization import Int4Linear, Int8Linear, quantize_model
from tests.engine.helpers import prompts, tiny_engine


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_close_to_fp32(bias):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=bias)
    x = torch.randn(2, 5, 256)  # 3-d input keeps its leading dims
    q = Int8Linear.from_linear(lin, kernel="torch")  # the native kernel: tests/engine/test_native_kernel.py
    with torch.inference_mode():
        y, yq = F.linear(x, lin.weight, lin.bias), q(x)
    assert yq.shape == y.shape and yq.dtype == torch.float32
    assert _rel_err(yq, y) <= 0.015
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (96, 256)
    assert int(q.weight_int8.abs().amax(dim=1).min()) == 127  # every row uses the full range
    assert _rel_err(q.dequantized_weight(), lin.weight.detach()) <= 0.01  # scales are stored in bf16


def test_int8_linear_fp32_activations_and_batch_32():
    torch.manual_seed(1)
    lin = nn.Linear(128, 64)
    x = torch.randn(32, 128)
    with torch.inference_mode():
        assert _rel_err(Int8Linear.from_linear(lin, torch.float32)(x), lin(x)) <= 0.01


@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_close_to_fp32(bias):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=bias)
    x = torch.randn(7, 256)
    with torch.inference_mode():
        assert _rel_err(Int4Linear.from_linear(lin)(x), lin(x)) <= 0.08
    with pytest.raises(ValueError, match="group size"):
        Int4Linear.from_linear(nn.Linear(40, 8))


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.block = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.lm_head.weight = self.embed.weight


def test_quantize_model_replaces_linears_but_not_embeddings_or_lm_head():
    model = _Toy()
    assert quantize_model(model, "int8") == 2
    assert isinstance(model.block[0], Int8Linear) and isinstance(model.block[2], Int8Linear)
    assert type(model.embed) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.embed.weight  # tie untouched
    model = _Toy()
    assert quantize_model(model, "int8", include_lm_head=True) == 3
    assert isinstance(model.lm_head, Int8Linear) and type(model.embed) is nn.Embedding
    assert quantize_model(_Toy(), "int4") == 2


def test_unknown_method_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown quantization method 'fp8'; valid: int8, int4"):
        quantize_model(_Toy(), "fp8")
    with pytest.raises(ValueError, match="nn.Module"):
        quantize_model("not a model", "int8")  # type: ignore[arg-type]


def _hf(folder):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


# Random tiny weights (hidden size 64) have near-uniform next-token distributions, so these bars only catch a
# broken layer; the quality gate on real weights is `switchyard bench quantization` and
# test_real_model_teacher_forced_agreement below. The native kernels also round activations to int8 (per
# block of 32), which on 64-wide random activations flips a few more near-ties than torch's bf16 casts.
@pytest.mark.parametrize("arch,method,kernel,min_teacher_forced,min_identical", [
    ("llama", "int8", "torch", 0.95, 5), ("qwen3", "int8", "torch", 0.95, 5), ("gemma3", "int8", "torch", 0.95, 5),
    ("llama", "int4", "torch", 0.6, 0),
    ("llama", "int8", "native", 0.9, 4), ("qwen3", "int8", "native", 0.9, 4), ("gemma3", "int8", "native", 0.9, 1),
    ("llama", "int4", "native", 0.6, 0),
])
def test_quantized_tiny_model_greedy_tokens_mostly_agree(tiny_model_dir, arch, method, kernel, min_teacher_forced,
                                                         min_identical):
    folder = tiny_model_dir(arch)
    ref, quant = _hf(folder), _hf(folder)
    assert quantize_model(quant, method, kernel=kernel) > 0
    batch = torch.tensor(prompts(8, [12], seed=1))
    with torch.inference_mode():
        kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
        out_ref, out_q = ref.generate(batch, **kwargs), quant.generate(batch, **kwargs)
        top_ref = ref(out_ref).logits.argmax(-1)[:, 11:-1]
        top_q = quant(out_ref).logits.argmax(-1)[:, 11:-1]
    agreement = float((top_ref == top_q).float().mean())
    identical = sum(bool(torch.equal(a[12:], b[12:])) for a, b in zip(out_ref, out_q, strict=True))
    assert agreement >= min_teacher_forced, agreement
    assert identical >= min_identical, identical


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_quantization_option_mostly_matches_fp32(tiny_model_dir, method):
    from backends.engine.sampling_params import SamplingParams

    folder = tiny_model_dir("llama")
    batch = prompts(8, [5, 9, 14], seed=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = tiny_engine(folder).generate(batch, params)
    quant_engine = tiny_engine(folder, quantization=method)
    layer_type = Int8Linear if method == "int8" else Int4Linear
    assert any(isinstance(m, layer_type) for m in quant_engine.model_runner.model.modules())
    quant = quant_engine.generate(batch, params)
    identical = sum(a.token_ids == b.token_ids for a, b in zip(ref, quant, strict=True))
    first_equal = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(ref, quant, strict=True))
    assert all(len(r.token_ids) == 12 for r in quant)
    # int4 on random tiny weights drifts sooner than int8; greedy paths diverge after a first flip (real
    # weights: test_real_model_teacher_forced_agreement)
    assert identical >= (5 if method == "int8" else 1), identical
    assert first_equal >= 6, first_equal


def test_quantization_is_a_cpu_format_resolved_against_the_device(tiny_model_dir, monkeypatch, caplog):
    """int8/int4 run on CPU; on CUDA an explicit device is a clear error, and device auto (a config written for
    CPU, like the embedded default, on a machine with a GPU) runs unquantized with a warning."""
    from backends.engine.args import EngineArgs
    from backends.engine.config import EngineConfig

    folder = tiny_model_dir("llama")
    assert EngineConfig.from_args(folder, EngineArgs(quantization="int4"), device="cpu").quantization == "int4"
    assert EngineConfig.from_args(folder, EngineArgs(quantization="none", device="cuda")).quantization == "none"
    with pytest.raises(ValueError, match="quantization 'int8' is a CPU weight format"):
        EngineConfig.from_args(folder, EngineArgs(quantization="int8", device="cuda"))
    with pytest.raises(ValueError, match="set quantization to none, or device to cpu"):
        EngineConfig.from_args(folder, EngineArgs(quantization="int8"), device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level("WARNING"):
        config = EngineConfig.from_args(folder, EngineArgs(quantization="int4"))
    assert config.device.type == "cuda" and config.quantization == "none" and config.dtype == torch.bfloat16
    assert "CPU weight format" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert EngineConfig.from_args(folder, EngineArgs(quantization="int4")).quantization == "int4"


TEXT = (
    "The harbour town wakes before the sun. Fishing boats slip out past the breakwater while the bakery on the "
    "square pulls its first loaves from the oven, and the smell drifts down to the quay where the night shift "
    "is stacking crates of ice. By seven the market stalls are open: oranges from the valley, cheese from the "
    "hill farms, and a man who has sold the same brass compasses for forty years. Tourists arrive on the "
    "nine o'clock ferry, blinking at the light, and the cafes put out their chairs. In the afternoon the wind "
    "turns and the harbour empties again; by evening only the gulls and the harbour master remain, writing up "
    "the day's tides in a ledger that his grandfather started. Ask him about the storm of 1962 and he will "
    "tell you, at length, how the sea came over the wall and filled the square to the height of a man."
)


def test_real_model_teacher_forced_agreement(bundled_model_dir):
    """smollm2-135m, quantized as the engine quantizes it (quantize_for_engine: int4 layers, int8 lm_head), fed
    a fixed English text: its next-token argmax agrees with fp32's at almost every position and its
    negative log-likelihood stays within 2 %, with either kernel."""
    import transformers as tf

    from backends.engine.layers.quantization import quantize_for_engine

    folder = bundled_model_dir("smollm2-135m")
    tok = tf.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits_ref = ref(ids).logits[0]
    nll_ref = float(F.cross_entropy(logits_ref[:-1], ids[0, 1:]))
    for kernel in ("native", "torch"):
        model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        quantize_model(model, "int4", kernel=kernel)
        model.lm_head = Int8Linear.from_linear(model.lm_head, kernel=kernel)
        assert quantize_for_engine(model, "int4") == 0  # nothing left: the same layers the engine quantizes
        with torch.inference_mode():
            logits = model(ids).logits[0]
        agreement = float((logits.argmax(-1) == logits_ref.argmax(-1)).float().mean())
        nll = float(F.cross_entropy(logits[:-1], ids[0, 1:]))
        assert agreement >= 0.93, (kernel, agreement)
        assert nll <= nll_ref * 1.02, (kernel, nll, nll_ref)
