"""Incremental detokenization and stop-string matching for one sequence at a time.

Text is produced by decoding a small window of recent tokens (``prefix_offset:read_offset`` as context),
so leading-space and multi-byte characters come out right; an incomplete UTF-8 tail ("\\ufffd") waits
for the next token. Text that could be the start of a stop string is held back until it is decided.
"""

from __future__ import annotations

from backends.engine.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def append(self, seq: Sequence, output_ids: list[int], flush: bool = False) -> None:
        """Extend ``seq.output_text`` with the text of ``output_ids`` not yet decoded."""
        prefix = self._decode(output_ids[seq.prefix_offset:seq.read_offset])
        full = self._decode(output_ids[seq.prefix_offset:])
        if len(full) > len(prefix) and (flush or not full.endswith("\ufffd")):
            seq.output_text += full[len(prefix):]
            seq.prefix_offset = seq.read_offset
            seq.read_offset = len(output_ids)

    @staticmethod
    def find_stop(seq: Sequence, num_new_chars: int) -> bool:
        """Truncate ``seq.output_text`` at the first stop string that ends in the new text; True if found."""
        stops = seq.params.stop
        if not stops or num_new_chars <= 0:
            return False
        text = seq.output_text
        start = max(0, len(text) - num_new_chars - max(len(s) for s in stops) + 1)
        best = -1
        for s in stops:
            pos = text.find(s, start)
            if pos != -1 and (best == -1 or pos < best):
                best = pos
        if best == -1:
            return False
        seq.output_text = text[:best]
        return True

    @staticmethod
    def emittable(seq: Sequence) -> str:
        """Text decided since the last call: everything, minus a tail that may begin a stop string."""
        text = seq.output_text
        end = len(text)
        if not seq.is_finished and seq.params.stop:
            longest = max(len(s) for s in seq.params.stop) - 1
            for k in range(min(longest, len(text) - seq.num_emitted_chars), 0, -1):
                tail = text[len(text) - k:]
                if any(s.startswith(tail) for s in seq.params.stop):
                    end = len(text) - k
                    break
        new = text[seq.num_emitted_chars:end]
        seq.num_emitted_chars = max(seq.num_emitted_chars, end)
        return new
