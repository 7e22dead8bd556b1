"""Runs one scheduled batch: builds the flat token batch, slot mapping and block tables, calls the model,
samples. Owns the model weights and the paged KV cache tensors."""

from __future__ import annotations

import logging

import torch

from backends.engine.config import EngineConfig
from backends.engine.layers import native
from backends.engine.layers.attention import Attention, AttentionMetadata, PrefillChunk, decode_slots
from backends.engine.layers.norm import GemmaRMSNorm, RMSNorm
from backends.engine.layers.sampler import SamplerInput, SamplerOutput, sample, verify
from backends.engine.loader import load_model
from backends.engine.scheduler import ScheduledBatch, ScheduledSeq

log = logging.getLogger(__name__)


def _triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from backends.engine.layers import triton_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _use_compiled_ops(model: torch.nn.Module, kernels: native.CpuKernels) -> None:
    """The norms and attention of a model with native quantized linears run compiled too: at batch 1 their
    many small torch calls cost as much as the matrix products, and the kernels keep the same contract (a
    row's result does not depend on the batch, how its prompt was chunked, or a verify pass)."""
    for module in model.modules():
        if isinstance(module, (RMSNorm, GemmaRMSNorm, Attention)):
            module.kernels = kernels


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        if config.args.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.args.num_threads)
        self.model = load_model(config.model_path, config.hf_config, config.dtype, config.device)
        if config.quantization != "none":  # int8 / int4 weights (CPU decode is memory-bound)
            from backends.engine.layers.quantization import quantize_for_engine

            quantize_for_engine(self.model, config.quantization)  # lm_head in int8 under both
            kernels = native.kernel()
            if kernels is None:
                how = f"torch's kernels ({native.unavailable_reason()})"
            else:
                how = f"native kernels ({kernels.isa}{' + amx' if kernels.amx else ''})"
            log.info("quantization %s: %s", config.quantization, how)
            if kernels is not None:  # quantization is a CPU format (EngineConfig: none on any other device)
                _use_compiled_ops(self.model, kernels)
        self.block_size = config.args.block_size
        self.use_triton = _triton_available(self.device)
        self.num_blocks = config.args.num_kv_blocks or self._blocks_for_memory()
        self._allocate_kv_cache()

    def _kv_shape(self) -> tuple[int, int, int]:
        attn = self.model.attention_layers()
        return len(attn), attn[0].num_kv_heads, attn[0].head_dim

    def _blocks_for_memory(self) -> int:
        num_layers, num_kv_heads, head_dim = self._kv_shape()
        itemsize = torch.empty(0, dtype=self.config.dtype).element_size()
        bytes_per_block = 2 * num_layers * self.block_size * num_kv_heads * head_dim * itemsize
        min_blocks = -(-self.config.max_model_len // self.block_size)
        return max(int(self.config.args.kv_cache_memory_gb * (1 << 30)) // bytes_per_block, min_blocks)

    def _allocate_kv_cache(self) -> None:
        num_layers, num_kv_heads, head_dim = self._kv_shape()
        self.kv_cache = torch.zeros(
            2, num_layers, self.num_blocks, self.block_size, num_kv_heads, head_dim,
            dtype=self.config.dtype, device=self.device,
        )
        for i, layer in enumerate(self.model.attention_layers()):
            layer.k_cache = self.kv_cache[0, i]
            layer.v_cache = self.kv_cache[1, i]

    def _slots(self, block_table: torch.Tensor, start: int, num: int) -> torch.Tensor:
        pos = torch.arange(start, start + num)
        return block_table[pos // self.block_size].long() * self.block_size + pos % self.block_size

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat input ids, positions, attention metadata and the row of each sampling sequence."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        sample_rows: list[int] = []
        decodes = batch.decodes
        decode_tables = None
        decode_lens = None
        if decodes:
            max_blocks = max(len(d.seq.block_table) for d in decodes)
            tables = [d.seq.block_table + [-1] * (max_blocks - len(d.seq.block_table)) for d in decodes]
            decode_tables = torch.tensor(tables, dtype=torch.int32)
            decode_slot_list = []
            for row, d in enumerate(decodes):
                pos = d.seq.num_computed_tokens
                input_ids.append(d.seq.token_ids[pos])
                positions.append(pos)
                decode_slot_list.append(d.seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size)
                if d.is_sampling:
                    sample_rows.append(row)
            slots.append(torch.tensor(decode_slot_list, dtype=torch.long))
            decode_lens = torch.tensor([p + 1 for p in positions], dtype=torch.int32)
        prefills = []
        for p in batch.prefills:
            seq, start, num = p.seq, p.seq.num_computed_tokens, p.num_new_tokens
            row = len(input_ids)
            table = torch.tensor(seq.block_table, dtype=torch.int32)
            num_drafts = len(p.draft_token_ids)
            input_ids.extend(seq.token_ids[start:start + num - num_drafts] + p.draft_token_ids)
            positions.extend(range(start, start + num))
            slots.append(self._slots(table, start, num))
            chunk = PrefillChunk(row, num, start, table.to(self.device))
            if start > 0:
                chunk.slots = self._slots(table, 0, start + num).to(self.device)
            prefills.append(chunk)
            if p.is_sampling:
                sample_rows.extend(range(row + num - 1 - num_drafts, row + num))  # drafts: every position
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev),
            num_decode_tokens=len(decodes),
            decode_block_tables=decode_tables.to(dev) if decode_tables is not None else None,
            decode_context_lens=decode_lens.to(dev) if decode_lens is not None else None,
            prefills=prefills,
            use_triton=self.use_triton,
            block_size=self.block_size,
        )
        if decodes and not self.use_triton:
            max_len = int(decode_lens.max())
            meta.decode_slots = decode_slots(decode_tables, max_len, self.block_size).to(dev)
        return (torch.tensor(input_ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), meta, sample_rows)

    def _token_bitmask(self, sampling: list[ScheduledSeq]) -> torch.Tensor | None:
        """The grammar mask of each sampling row (all ones for unconstrained rows), or None when no row has
        a grammar. A sequence with drafts has one row per position: its matcher advanced over the drafts
        before that position (then rolled back). Filled on the CPU before the forward pass, so on a GPU it
        overlaps the model's work."""
        if not any(s.seq.grammar is not None for s in sampling):
            return None
        vocab = self.config.hf_config.vocab_size
        num_rows = sum(1 + len(s.draft_token_ids) for s in sampling)
        bitmask = torch.full((num_rows, (vocab + 31) // 32), -1, dtype=torch.int32)
        row = 0
        for s in sampling:
            matcher = s.seq.grammar
            if matcher is not None:
                matcher.fill_next_token_bitmask(bitmask, row)
                for j, token in enumerate(s.draft_token_ids):
                    accepted = matcher.accept_token(token)
                    assert accepted, "a draft the grammar refuses was scheduled (speculation.grammar_prefix)"
                    if not matcher.is_terminated():  # else the draft ends the sequence: its next row is unused
                        matcher.fill_next_token_bitmask(bitmask, row + j + 1)
                if s.draft_token_ids:
                    matcher.rollback(len(s.draft_token_ids))
            row += 1 + len(s.draft_token_ids)
        return bitmask

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[tuple[ScheduledSeq, SamplerOutput]]:
        """Compute the batch's tokens; for each sequence whose chunk reached its end, the tokens it commits:
        one sampled token, or with drafts the accepted drafts and one more (``sampler.verify``)."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        sampling = [s for s in batch.scheduled if s.is_sampling]
        bitmask = self._token_bitmask(sampling)
        hidden = self.model(input_ids, positions, meta)
        if not sampling:
            return []
        logits = self.model.compute_logits(hidden[sample_rows])
        if not any(s.draft_token_ids for s in sampling):
            inp = SamplerInput(
                params=[s.seq.params for s in sampling],
                token_ids=[s.seq.token_ids for s in sampling],
                num_prompt_tokens=[s.seq.num_prompt_tokens for s in sampling],
                generators=[s.seq.generator for s in sampling],
                token_bitmask=bitmask,
            )
            out = sample(logits, inp)
            return [(s, SamplerOutput([out.token_ids[i]], [out.logprobs[i]], [out.top_logprobs[i]]))
                    for i, s in enumerate(sampling)]
        # one sampler row per verified position (penalties see the drafts before it)
        rows = [(s, s.seq.token_ids + s.draft_token_ids[:j]) for s in sampling
                for j in range(len(s.draft_token_ids) + 1)]
        inp = SamplerInput(
            params=[s.seq.params for s, _ in rows],
            token_ids=[tokens for _, tokens in rows],
            num_prompt_tokens=[s.seq.num_prompt_tokens for s, _ in rows],
            generators=[s.seq.generator for s, _ in rows],
            token_bitmask=bitmask,
        )
        outs = verify(logits, inp, [s.draft_token_ids for s in sampling])
        return list(zip(sampling, outs, strict=True))
