"""The native int4 kernel (backends/engine/layers/cpu_kernels.c via native.py): its packing, its arithmetic
against a float64 reference of the same scheme, the contract that a row's result does not depend on its batch
or the thread count, the fallback to torch's kernel, and the engine on it (greedy speculation identity)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backends.engine.args import SpeculationConfig
from backends.engine.layers import native
from backends.engine.layers.quantization import Int4Linear, Int8Linear, quantize_model
from backends.engine.sampling_params import SamplingParams
from tests.engine.helpers import prompts, tiny_engine


@pytest.fixture(scope="module")
def kernel() -> native.CpuKernels:
    k = native.kernel()
    assert k is not None, f"the native kernel must build on the test machine: {native.unavailable_reason()}"
    return k


PACK = {4: (native.pack_q4, native.unpack_q4), 8: (native.pack_q8, native.unpack_q8)}


def run(kernels: native.CpuKernels, bits: int, *args) -> torch.Tensor:
    return (kernels.q4_linear if bits == 4 else kernels.q8_linear)(*args)


def reference(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernels' scheme, with the activations quantized in float32 exactly as the C does (two int8 levels
    per block of 32: s = max|x| / 127, q1 = round(x / s), q2 = round((x / s - q1) * 256), round half to even)
    and the products summed in float64."""
    m, k = x.shape
    xb = x.float().reshape(m, k // 32, 32)
    s = xb.abs().amax(dim=2, keepdim=True) / 127.0
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
    v = xb * inv
    q1 = torch.round(v).clamp(-127, 127)
    q2 = torch.round((v - q1) * 256.0).clamp(-127, 127)
    xhat = (s.double() / 256.0) * (256.0 * q1.double() + q2.double())
    y = xhat.reshape(m, k) @ weights.double().t()
    return y if bias is None else y + bias.double()


def test_two_level_activations_are_closer_to_x_than_a_bf16_rounding():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 256, generator=g) * torch.logspace(-2, 2, 256)  # blocks mixing small and large values
    eye = torch.eye(256)
    xhat = reference(x, eye, None)  # x through the kernels' activation quantization, times the identity
    err_native = float((xhat - x.double()).norm() / x.double().norm())
    err_bf16 = float((x.bfloat16().double() - x.double()).norm() / x.double().norm())
    assert err_native < err_bf16 / 4, (err_native, err_bf16)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trip_is_exact_for_representable_weights_and_within_half_a_step_otherwise(bits):
    pack, unpack = PACK[bits]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(21, 64, generator=g)
    blocks = pack(w)
    assert blocks.shape == (2, 2, 320 if bits == 4 else 544) and blocks.dtype == torch.uint8  # 21 rows: 2 tiles
    back = unpack(blocks, 21)
    groups = w.reshape(21, 2, 32)
    step = (groups.amax(2) - groups.amin(2)) / 15 if bits == 4 else groups.abs().amax(2) / 127
    err = (back - w).abs().reshape(21, 2, 32).amax(2)
    assert bool((err <= step * 0.5 + 2e-3).all())
    # weights already on the grid (q * d (+ o) with fp16 d and o) come back exactly
    assert torch.equal(unpack(pack(back), 21), back)
    with pytest.raises(ValueError, match="multiple of the int. (group|block) size 32"):
        pack(torch.randn(8, 40))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,k,n,with_bias", [(1, 64, 8, False), (5, 96, 13, True), (9, 576, 960, False)])
def test_kernel_matches_the_float64_reference(kernel, bits, m, k, n, with_bias):
    pack, unpack = PACK[bits]
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g) * 3
    x[0, :32] = 0.0  # an all-zero activation block
    lin = nn.Linear(k, n, bias=with_bias)
    blocks = pack(lin.weight)
    bias = lin.bias.detach() if with_bias else None
    y = run(kernel, bits, x, blocks, n, bias)
    ref = reference(x, unpack(blocks, n), bias)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_rows_result_does_not_depend_on_its_batch_or_the_thread_count(kernel, bits):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(11, 192, generator=g)
    blocks = PACK[bits][0](torch.randn(40, 192, generator=g))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [run(kernel, bits, x[i:i + 1].contiguous(), blocks, 40, None)[0] for i in range(11)]
        torch.set_num_threads(2)
        batched = run(kernel, bits, x, blocks, 40, None)
        shuffled = run(kernel, bits, x.flip(0).contiguous(), blocks, 40, None).flip(0)
    finally:
        torch.set_num_threads(threads)
    for i in range(11):
        assert torch.equal(alone[i], batched[i]) and torch.equal(alone[i], shuffled[i])


def test_amx_tiles_and_vnni_give_the_same_bits_for_every_batch_size(kernel, tmp_path, monkeypatch):
    """Where the CPU has AMX-INT8, products of 16 rows or more (int8: 8) run on AMX tiles (8 tokens a tile,
    three weight tiles at a time); the integer sums are the VNNI path's, so every float is too: with or without bias, a
    ragged last weight tile, token counts across the 8-token chunks, one or two threads. The VNNI side is a
    second build loaded with ``SWITCHYARD_NATIVE_AMX=0``."""
    import ctypes
    import subprocess

    has_amx = "amx_int8" in native._cpu_flags()
    assert kernel.use_amx(True) == has_amx  # on wherever the CPU has it (Linux grants the tile state)
    target = tmp_path / "vnni.so"
    subprocess.run([native.compiler(), *native.FLAGS, str(native.SOURCE), "-o", str(target), "-lm"], check=True,
                   capture_output=True)
    monkeypatch.setenv("SWITCHYARD_NATIVE_AMX", "0")
    vnni = native.CpuKernels(ctypes.CDLL(str(target)), kernel.isa)
    assert not vnni.amx
    g = torch.Generator().manual_seed(5)
    w = torch.randn(56, 192, generator=g)  # 4 weight tiles, the last one half padding
    bias = torch.randn(56, generator=g)
    threads = torch.get_num_threads()
    try:
        for bits in (4, 8):
            blocks = PACK[bits][0](w)
            for m in (1, 7, 8, 9, 16, 21):
                x = torch.randn(m, 192, generator=g) * 2
                for b in (None, bias):
                    for n in (1, 2):
                        torch.set_num_threads(n)
                        assert torch.equal(run(vnni, bits, x, blocks, 56, b), run(kernel, bits, x, blocks, 56, b)), \
                            (bits, m, b is None, n)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layer_type,tolerance", [(Int4Linear, 0.08), (Int8Linear, 0.015)])
def test_native_and_torch_kernels_agree_with_fp32(layer_type, tolerance):
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(128, 48, bias=True)
    x = torch.randn(6, 3, 128, generator=g)
    with torch.inference_mode():
        ref = lin(x)
        fast, slow = layer_type.from_linear(lin, kernel="native"), layer_type.from_linear(lin, kernel="torch")
        assert (fast.kernel, slow.kernel) == ("native", "torch")
        for layer in (fast, slow):
            y = layer(x)
            assert y.shape == ref.shape and y.dtype == torch.float32
            assert float((y - ref).norm() / ref.norm()) <= tolerance
            assert float((layer(x.bfloat16()).float() - ref).norm() / ref.norm()) <= tolerance + 0.01
    with pytest.raises(ValueError, match="quantized kernel must be auto, native or torch"):
        layer_type.from_linear(lin, kernel="gpu")


def test_without_the_kernel_int4_falls_back_to_torch_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SWITCHYARD_NATIVE_KERNELS", "0")
    assert native.kernel() is None and native.unavailable_reason() == "SWITCHYARD_NATIVE_KERNELS=0"
    assert Int4Linear.from_linear(nn.Linear(64, 16)).kernel == "torch"
    with pytest.raises(ValueError, match="native quantized kernels cannot run here: SWITCHYARD_NATIVE_KERNELS=0"):
        Int4Linear.from_linear(nn.Linear(64, 16), kernel="native")
    # a broken compiler: the build fails with a reason, nothing is cached, torch's kernel serves
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("SWITCHYARD_NATIVE_KERNELS")
    monkeypatch.setenv("SWITCHYARD_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.kernel() is None
    assert native.unavailable_reason().startswith("building cpu_kernels.c failed")
    assert not list((tmp_path / "kernels").glob("*.so"))
    # a cache folder that cannot be created (a read-only home): a reason too, not an exception
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("CC")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SWITCHYARD_HOME", str(blocker))
    assert native.kernel() is None and native.unavailable_reason().startswith("building cpu_kernels.c failed")


def test_the_kernel_is_built_once_per_machine_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SWITCHYARD_HOME", str(tmp_path))
    k = native.kernel()
    assert k is not None and k.isa in ("avx512-vnni", "avx-vnni", "avx2")
    [built] = (tmp_path / "kernels").glob("cpu_kernels-*.so")
    monkeypatch.setattr(native, "_state", {})
    assert native.kernel() is not None
    assert list((tmp_path / "kernels").glob("cpu_kernels-*.so")) == [built]


@pytest.mark.parametrize("method,layer_type", [("int4", Int4Linear), ("int8", Int8Linear)])
def test_quantize_model_uses_the_native_kernels_where_they_run(kernel, method, layer_type):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    assert quantize_model(model, method) == 2
    assert {m.kernel for m in model.modules() if isinstance(m, layer_type)} == {"native"}
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    assert quantize_model(model, method, kernel="torch") == 2
    assert {m.kernel for m in model.modules() if isinstance(m, layer_type)} == {"torch"}


def test_int4_engine_greedy_tokens_identical_alone_batched_and_with_speculation(kernel, tiny_model_dir):
    """With the native kernel a row's linear outputs do not depend on its batch, so an int4 engine's greedy
    answer is the same alone, in a batch, and with n-gram speculation's multi-token verify passes."""
    folder = tiny_model_dir("llama")
    base = prompts(3, [6, 11, 9], seed=4)
    batch = [(p * 4)[:24] for p in base]  # repetitive: n-gram drafts get accepted
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = tiny_engine(folder, quantization="int4")
    layers = [m for m in engine.model_runner.model.modules() if isinstance(m, Int4Linear | Int8Linear)]
    assert {m.kernel for m in layers} == {"native"} and isinstance(engine.model_runner.model.lm_head, Int8Linear)
    alone = [engine.generate([p], params)[0].token_ids for p in batch]
    together = [r.token_ids for r in tiny_engine(folder, quantization="int4").generate(batch, params)]
    spec = tiny_engine(folder, quantization="int4", speculation=SpeculationConfig(method="ngram"))
    drafted = [spec.generate([p], params)[0].token_ids for p in batch]
    assert together == alone
    assert drafted == alone
    assert spec.stats().num_accepted_tokens_total > 0


@pytest.mark.parametrize("isa,flags", [("avx-vnni", ["-mno-avx512f"]), ("avx2", ["-mno-avx512f", "-mno-avxvnni"])])
def test_the_256_bit_paths_give_the_same_bits_as_this_machines_build(kernel, tmp_path, isa, flags):
    """A CPU without AVX-512 runs 256-bit AVX-VNNI (8 rows a register), one without VNNI AVX2's maddubs instead
    of vpdpbusd: the same integer sums, so the same floats. Each is built here with those instruction sets
    turned off and compared bit for bit with this machine's build, at batch sizes on either side of the
    4-token groups and the AMX threshold."""
    import ctypes
    import subprocess

    target = tmp_path / f"{isa}.so"
    subprocess.run([native.compiler(), *native.FLAGS, *flags, str(native.SOURCE), "-o", str(target), "-lm"],
                   check=True, capture_output=True)
    narrow = native.CpuKernels(ctypes.CDLL(str(target)), isa)
    assert not narrow.amx
    g = torch.Generator().manual_seed(11)
    for m in (1, 5, 17):
        x = torch.randn(m, 192, generator=g) * 4
        w = torch.randn(24, 192, generator=g)
        for bits in (4, 8):
            blocks = PACK[bits][0](w)
            assert torch.equal(run(kernel, bits, x, blocks, 24, None), run(narrow, bits, x, blocks, 24, None))


# ------------------------------------------------------------------------------ the float32 ops around them


def test_rms_norm_matches_a_float64_reference_and_does_not_depend_on_the_batch(kernel):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 64, generator=g) * 3
    w = torch.randn(64, generator=g)
    for offset in (0.0, 1.0):  # Llama's w, Gemma's (1 + w)
        y = kernel.rms_norm(x, w, 1e-6, offset)
        x64 = x.double()
        want = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + w.double())
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
        assert all(torch.equal(kernel.rms_norm(x[i:i + 1], w, 1e-6, offset)[0], y[i]) for i in range(7))
    wide = torch.randn(5, 96, generator=g)
    assert torch.equal(kernel.rms_norm(wide[:, 16:80], w, 1e-6, 0.0),  # rows with a stride
                       kernel.rms_norm(wide[:, 16:80].contiguous(), w, 1e-6, 0.0))
    assert kernel.rms_norm(torch.randn(2, 12), torch.ones(12), 1e-6, 0.0) is None  # not a multiple of 8: torch's


def paged_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_paged_attention_matches_torch_and_does_not_depend_on_the_batch_or_threads(kernel):
    """Decode rows and chunk rows (positions start .. start + n - 1) of sequences with scattered block tables:
    the compiled kernel agrees with the torch reference (GQA, with and without a sliding window), and each
    row's bits are the same alone, in the step's batch, and on 1 or 2 threads."""
    from backends.engine.layers.attention import paged_prefill_attention_torch

    block_size, kv_heads, heads, head_dim = 4, 2, 6, 16
    k_cache, v_cache = paged_cache(64, block_size, kv_heads, head_dim, seed=1)
    g = torch.Generator().manual_seed(2)
    # (block table, first row's position, rows): a decode row at 13, a chunk of 3 at 5..7, a long chunk at 0..29
    seqs = [(torch.randperm(64, generator=g)[:8].int(), 13, 1), (torch.randperm(64, generator=g)[:8].int(), 5, 3),
            (torch.randperm(64, generator=g)[:8].int(), 0, 30)]
    slots, offsets, lengths = [], [], []
    base = 0
    for table, start, num in seqs:
        pos = torch.arange(start + num)
        keys = table[pos // block_size].long() * block_size + pos % block_size
        slots.append(keys)
        offsets += [base] * num
        lengths += list(range(start + 1, start + num + 1))
        base += len(keys)
    rows = native.AttentionRows(torch.cat(slots), torch.tensor(offsets), torch.tensor(lengths))
    total = sum(num for _, _, num in seqs)
    qkv = torch.randn(total, heads + 2 * kv_heads, head_dim, generator=g)
    q = qkv[:, :heads]  # strided tokens, as the models pass it
    for window in (None, 6):
        out = kernel.paged_attention(q, k_cache, v_cache, rows, 0.25, window)
        row = 0
        for table, start, num in seqs:
            want = paged_prefill_attention_torch(q[row:row + num].contiguous(), k_cache, v_cache, table, start, 0.25,
                                                 sliding_window=window)
            torch.testing.assert_close(out[row:row + num], want, rtol=1e-5, atol=1e-5)
            row += num
        for t in range(total):
            one = native.AttentionRows(rows.slots, rows.offsets[t:t + 1], rows.lengths[t:t + 1])
            assert torch.equal(kernel.paged_attention(q[t:t + 1], k_cache, v_cache, one, 0.25, window)[0], out[t])
    # enough work for the kernel's threads: the same bits on one thread and on two
    big = native.AttentionRows(rows.slots[-30:].repeat(40), torch.arange(1200) // 30 * 30,
                               (torch.arange(1200) % 30) + 1)
    qs = torch.randn(1200, heads, head_dim, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = kernel.paged_attention(qs, k_cache, v_cache, big, 0.25, None)
        torch.set_num_threads(2)
        two_threads = kernel.paged_attention(qs, k_cache, v_cache, big, 0.25, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, two_threads)
    assert kernel.paged_attention(torch.randn(1, 6, 12), *paged_cache(4, 4, 2, 12, seed=3), rows, 0.25, None) is None


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_int4_engine_output_does_not_depend_on_batching_chunking_preemption_or_drafts(kernel, tiny_model_dir, arch):
    """Every row's norms and attention go through the compiled kernels too, so a sequence's greedy answer is
    the same alone, in a batch whose token budget splits prompts into other chunks, recomputed after
    preemption, resumed from cached prefix blocks, and with speculation's verify passes."""
    from backends.engine.layers.attention import Attention
    from backends.engine.layers.norm import GemmaRMSNorm, RMSNorm

    folder = tiny_model_dir(arch)
    base = prompts(6, [6, 9, 7], seed=8)
    batch = [(p * 3)[:14] for p in base]
    params = SamplingParams(temperature=0, max_tokens=26, ignore_eos=True)
    alone = tiny_engine(folder, quantization="int4")
    compiled = [m for m in alone.model_runner.model.modules() if isinstance(m, Attention | RMSNorm | GemmaRMSNorm)]
    assert compiled and all(m.kernels is kernel for m in compiled)
    want = [alone.generate([p], params)[0].token_ids for p in batch]
    chunked = tiny_engine(folder, quantization="int4", max_num_batched_tokens=16)  # 14-token prompts: most split in two
    assert [r.token_ids for r in chunked.generate(batch, params)] == want
    tight = tiny_engine(folder, quantization="int4", num_kv_blocks=20, max_model_len=64,
                        speculation=SpeculationConfig(method="ngram", verify_cost=0.0))
    assert [r.token_ids for r in tight.generate(batch, params)] == want
    assert tight.stats().num_preemptions > 0 and tight.stats().num_accepted_tokens_total > 0
    again = [tight.generate([batch[0]], params)[0] for _ in range(2)]  # the second resumes from cached blocks
    assert [r.token_ids for r in again] == want[:1] * 2 and again[1].num_cached_tokens > 0


def test_a_step_mixing_decodes_verifies_and_prompt_chunks_matches_each_row_alone(kernel):
    """One step with a decode row, a verify chunk and a prompt chunk through the compiled attention: each row
    equals the kernel on that row alone, and all are close to the torch path's."""
    from backends.engine.layers.attention import Attention, AttentionMetadata, PrefillChunk, decode_slots

    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    layer = Attention(heads, kv_heads, head_dim, head_dim ** -0.5)
    layer.k_cache, layer.v_cache = paged_cache(32, block_size, kv_heads, head_dim, seed=6)
    g = torch.Generator().manual_seed(7)
    tables = [torch.randperm(32, generator=g)[:8].int() for _ in range(3)]

    def slots(table, start, num):
        pos = torch.arange(start, start + num)
        return table[pos // block_size].long() * block_size + pos % block_size

    def meta():
        verify = PrefillChunk(1, 3, 9, tables[1], slots=slots(tables[1], 0, 12))
        prompt = PrefillChunk(4, 6, 0, tables[2])
        m = AttentionMetadata(torch.cat([slots(tables[0], 10, 1), slots(tables[1], 9, 3), slots(tables[2], 0, 6)]),
                              1, tables[0].view(1, -1), torch.tensor([11], dtype=torch.int32), [verify, prompt],
                              block_size=block_size)
        m.decode_slots = decode_slots(m.decode_block_tables, 11, block_size)
        return m

    q = torch.randn(10, heads, head_dim, generator=g)
    k = torch.randn(10, kv_heads, head_dim, generator=g)
    v = torch.randn(10, kv_heads, head_dim, generator=g)
    layer.kernels = kernel
    mixed = layer(q, k, v, meta())
    rows = meta().kernel_rows()
    assert rows.lengths.tolist() == [11, 10, 11, 12, 1, 2, 3, 4, 5, 6]
    for t in range(10):
        one = native.AttentionRows(rows.slots, rows.offsets[t:t + 1], rows.lengths[t:t + 1])
        assert torch.equal(mixed[t], kernel.paged_attention(q[t:t + 1], layer.k_cache, layer.v_cache, one,
                                                            layer.scale, None)[0])
    layer.kernels = None
    torch.testing.assert_close(mixed, layer(q, k, v, meta()), rtol=1e-5, atol=1e-5)
