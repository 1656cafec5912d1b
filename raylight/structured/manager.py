"""Per-sequence grammar matchers and each step's token bitmask (the engine side of structured outputs).

A constrained request carries its compiled grammar from `make_request`; each of its sequences gets
an xgrammar `GrammarMatcher` when it first samples, which catches up on the tokens the sequence
already has (a preempted request, an n-way fork, a decode replica whose first token a prefill
replica sampled). After every collected step the matchers accept the sequences' new tokens; before
a step samples, `bitmask(rows)` packs the allowed tokens of its constrained rows into one int32
tensor ([constrained rows, ceil(vocab / 32)], bit set = allowed) that the sampler applies per row
(workers/token_mask.py), beside free rows in the same batch. End of sequence is allowed only where
the grammar may end, and a sequence whose matcher has terminated stops.

Async scheduling runs a step ahead on tokens the host does not know yet: a constrained row whose
previous token is still in flight cannot have its mask yet, so `bitmask` answers DEFER and the
runner computes that step's logits but samples only after the step before it was collected and
the matcher advanced (LLMEngine.step), so the mask always follows the token actually sampled.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from raylight.workers.token_mask import DEFER  # bitmask(): a row's last token is in flight; ask again later

logger = logging.getLogger("raylight.structured")

_BATCH_FILL_ROWS = 8  # from this many constrained rows, xgrammar fills the bitmask on several threads


class _SeqState:
    __slots__ = ("grammar", "matcher", "num_accepted", "dead")

    def __init__(self, grammar):
        self.grammar = grammar
        self.matcher = None
        self.num_accepted = 0  # output tokens the matcher has taken
        self.dead = False  # a token the grammar refused (cannot happen under the mask): unconstrained from here


class StructuredOutputManager:
    def __init__(self, service, vocab_size: int):
        self.service = service  # raylight.structured.compiler.GrammarCompileService
        self.vocab_size = vocab_size
        self.width = (vocab_size + 31) // 32
        self._seqs: dict[str, _SeqState] = {}
        self._batch = None  # xgrammar.BatchGrammarMatcher, made on first use
        self._eos_row: Optional[torch.Tensor] = None

    @property
    def active(self) -> bool:
        return bool(self._seqs)

    def register(self, seq_ids: list[str], grammar) -> None:
        for sid in seq_ids:
            self._seqs[sid] = _SeqState(grammar)

    def release(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)

    def has(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def _matcher(self, st: _SeqState):
        if st.matcher is None:
            import xgrammar as xgr

            st.matcher = xgr.GrammarMatcher(st.grammar)
        return st.matcher

    def _catch_up(self, st: _SeqState, tokens: list[int]) -> Optional[int]:
        """Feeds the matcher the tokens it has not seen; returns a token it refused, else None."""
        m = self._matcher(st)
        while st.num_accepted < len(tokens) and not st.dead:
            tok = tokens[st.num_accepted]
            if m.is_terminated():
                st.num_accepted = len(tokens)
                break
            if not m.accept_token(tok):
                st.dead = True
                return tok
            st.num_accepted += 1
        return None

    def advance(self, changed) -> list:
        """After a collected step: the constrained sequences of `changed` ((sequence, token) pairs) take
        their new tokens. Returns the sequences that must stop: their grammar has terminated (they
        ended it without the end-of-sequence token, e.g. ignore_eos), or it refused a token."""
        stop = []
        seqs = self._seqs
        for seq, tok in changed:
            st = seqs.get(seq.request_id)
            if st is None or tok is None or st.dead or seq.is_finished:
                continue
            bad = self._catch_up(st, seq.output_token_ids)
            if bad is not None:
                logger.warning("structured outputs: sequence %s sampled token %d that its grammar refuses; "
                               "ending it", seq.request_id, bad)
                stop.append(seq)
            elif st.matcher.is_terminated():
                stop.append(seq)
        return stop

    def bitmask(self, rows):
        if not self._seqs:
            return None
        return self._bitmask(rows)

    def _bitmask(self, rows):
        """The step's allowed-token mask: None when no row is constrained, DEFER when a constrained row's
        previous token is not known yet, else (row indices, int32 CPU tensor [len(indices), width])."""
        seqs = self._seqs
        picked = []
        for j, row in enumerate(rows):
            st = seqs.get(row.seq_id)
            if st is None:
                continue
            # Fork rows (seq_id != request_id) read their parent's tokens: none yet, forks happen on the first.
            needed = row.num_output_tokens
            if st.num_accepted < needed and not st.dead:
                self._catch_up(st, row.output_token_ids[:needed])
                if st.num_accepted < needed and not st.dead and not st.matcher.is_terminated():
                    return DEFER  # its last token is in flight (async scheduling)
            picked.append((j, st))
        if not picked:
            return None
        mask = torch.empty((len(picked), self.width), dtype=torch.int32)
        live, live_rows = [], []
        for i, (_, st) in enumerate(picked):
            m = self._matcher(st)
            if st.dead:
                mask[i].fill_(-1)  # unconstrained: nothing left to follow
            elif m.is_terminated():
                mask[i].copy_(self._eos_mask())  # its token is dropped anyway (the sequence ended)
            else:
                live.append(m)
                live_rows.append(i)
        if len(live) >= _BATCH_FILL_ROWS:
            if self._batch is None:
                import xgrammar as xgr

                self._batch = xgr.BatchGrammarMatcher()
            self._batch.batch_fill_next_token_bitmask(live, mask, live_rows)
        else:
            for i, m in zip(live_rows, live):
                m.fill_next_token_bitmask(mask, i)
        return [j for j, _ in picked], mask

    def _eos_mask(self) -> torch.Tensor:
        """Only the end-of-sequence tokens allowed (everything, when the model has none)."""
        if self._eos_row is None:
            words = np.zeros(self.width, dtype=np.uint32)
            for t in self.service.eos_token_ids:
                if 0 <= t < self.vocab_size:
                    words[t // 32] |= np.uint32(1 << (t % 32))
            if not self.service.eos_token_ids:
                words[:] = 0xFFFFFFFF
            self._eos_row = torch.from_numpy(words.view(np.int32))
        return self._eos_row
