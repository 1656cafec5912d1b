"""Batched sampling on the device for the whole step.

Order (as vLLM V1): logit_bias and min_tokens bans, then penalties (repetition, frequency,
presence), then greedy rows take the argmax; random rows go through temperature, min_p,
top_k and top_p, and are sampled by the exponential race: for probabilities p and i.i.d.
E_i ~ Exp(1), argmax(p_i / E_i) is distributed as p. Seeded rows draw their noise from their
own generator, so their tokens do not depend on what else is in the batch.
Logprobs are those of the raw model distribution (before any of the processing above).
Memory: everything that takes [rows, vocab] temporaries runs 256 rows at a time (the KV budget's
profile samples the largest batch this way); a greedy-only step with nothing to process takes the
argmax of the logits in the model's dtype, with no float32 copy.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from raylight.sampling_params import MAX_LOGPROBS
from raylight.workers.token_mask import apply_token_bitmask


@dataclass
class SamplingMetadata:
    temperature: Optional[torch.Tensor]  # [S] (1.0 on greedy rows); None when all rows are greedy
    greedy: Optional[torch.Tensor]  # [S] bool; None when all rows are greedy
    all_greedy: bool
    generators: list[Optional[torch.Generator]]
    top_k: Optional[torch.Tensor] = None  # [S] long, vocab size where disabled
    top_p: Optional[torch.Tensor] = None  # [S]
    min_p: Optional[torch.Tensor] = None  # [S]
    presence_penalty: Optional[torch.Tensor] = None  # [S]; set with frequency/repetition together
    frequency_penalty: Optional[torch.Tensor] = None
    repetition_penalty: Optional[torch.Tensor] = None
    output_counts: Optional[torch.Tensor] = None  # [S, V] float: how often each token was generated
    prompt_mask: Optional[torch.Tensor] = None  # [S, V] bool: token occurs in the prompt
    bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # rows, token ids, values
    banned: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # rows, token ids (min_tokens)
    allowed: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # rows, [rows, V] bool: allowed_token_ids
    max_num_logprobs: int = -1  # -1: no row wants logprobs
    # Structured outputs: (rows, int32 bitmask [rows, ceil(V / 32)]) of allowed tokens (workers/token_mask.py).
    token_mask: Optional[tuple[torch.Tensor, torch.Tensor]] = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S]
    logprobs: Optional[torch.Tensor] = None  # [S] raw logprob of the chosen token
    ranks: Optional[torch.Tensor] = None  # [S] 1 + how many tokens were more likely
    top_ids: Optional[torch.Tensor] = None  # [S, k]
    top_logprobs: Optional[torch.Tensor] = None  # [S, k]


@functools.lru_cache(maxsize=None)
def _chunks(vocab: int) -> int:
    """A divisor of the vocabulary near its square root (0 if none in [32, 2048])."""
    best = 0
    for c in range(32, 2049):
        if vocab % c == 0 and abs(c * c - vocab) < abs(best * best - vocab):
            best = c
    return best


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1), first index on ties, as torch's. For a few rows on CUDA in two stages:
    torch reduces each row with one block, so one 128256-wide row took 28 us on an H200 (a
    hundredth of a batch-1 decode step); chunking the row spreads it over many blocks."""
    S, V = logits.shape
    if logits.device.type != "cuda" or S > 32:
        return logits.argmax(dim=-1)
    c = _chunks(V)
    return argmax_in_chunks(logits, c) if c else logits.argmax(dim=-1)


def argmax_in_chunks(logits: torch.Tensor, chunks: int) -> torch.Tensor:
    S, V = logits.shape
    best, where = logits.view(S, chunks, V // chunks).max(dim=-1)  # first max within each chunk
    chunk = best.argmax(dim=-1, keepdim=True)  # first chunk holding the row's max
    return chunk[:, 0] * (V // chunks) + where.gather(1, chunk)[:, 0]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [S, V] raw model logits (left as they are), float32 or the model's dtype: greedy rows
        with nothing to process take the argmax as they are (converting to float32 is exact: the same
        argmax, the same ties); everything else runs in float32."""
        light = (meta.all_greedy and meta.repetition_penalty is None and meta.max_num_logprobs < 0
                 and meta.bias is None and meta.banned is None and meta.allowed is None and meta.token_mask is None)
        if light:
            return SamplerOutput(argmax_rows(logits))
        logits = logits.float()  # no copy when it already is
        work, fixup = apply_row_masks(logits, meta)
        S = logits.shape[0]
        # Rows in chunks: penalties, the race (probabilities, their sort and int64 order, the noise) and
        # the logprobs each take [rows, vocab] temporaries, ~12 of them at once: ~6 GB at 1,024 rows of a
        # 128k vocabulary in one piece, ~1.5 GB a chunk.
        step = SAMPLE_CHUNK_ROWS
        parts = [self._sample_rows(logits, work, fixup, meta, a, min(a + step, S)) for a in range(0, S, step)]
        if len(parts) == 1:
            return parts[0]
        names = [f.name for f in dataclasses.fields(SamplerOutput)]
        return SamplerOutput(**{n: None if getattr(parts[0], n) is None else torch.cat([getattr(p, n) for p in parts])
                                for n in names})

    def _sample_rows(self, logits: torch.Tensor, work: torch.Tensor, fixup, meta: SamplingMetadata,
                     a: int, b: int) -> SamplerOutput:
        """Rows [a, b): their penalties, greedy and random tokens, and the raw logprobs."""
        rows = _rows(meta, a, b)
        part = apply_dense_processors(work[a:b], work is logits, fixup and (fixup[0][a:b], fixup[1][a:b]), rows)
        token_ids = argmax_rows(part)
        if not meta.all_greedy:
            token_ids = torch.where(rows.greedy, token_ids, self._race(part, rows))
        out = SamplerOutput(token_ids)
        if meta.max_num_logprobs >= 0:
            raw = logits[a:b].log_softmax(dim=-1)
            chosen = raw.gather(1, token_ids[:, None])
            out.logprobs = chosen[:, 0]
            out.ranks = (raw > chosen).sum(dim=-1) + 1
            if meta.max_num_logprobs > 0:
                out.top_logprobs, out.top_ids = raw.topk(meta.max_num_logprobs, dim=-1)
        return out

    def _race(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The exponential race over these rows' processed probabilities."""
        probs = processed_probs(logits, meta)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, g in enumerate(meta.generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)


SAMPLE_CHUNK_ROWS = 256  # rows sampled at once (bounds the sampler's temporaries; see Sampler.__call__)


def _rows(meta: SamplingMetadata, a: int, b: int) -> SamplingMetadata:
    """The dense per-row fields (what penalties, the race and the greedy choice read) for rows [a, b)."""
    def cut(t):
        return None if t is None else t[a:b]

    return dataclasses.replace(
        meta, temperature=cut(meta.temperature), greedy=cut(meta.greedy), top_k=cut(meta.top_k),
        top_p=cut(meta.top_p), min_p=cut(meta.min_p), presence_penalty=cut(meta.presence_penalty),
        frequency_penalty=cut(meta.frequency_penalty), repetition_penalty=cut(meta.repetition_penalty),
        output_counts=cut(meta.output_counts), prompt_mask=cut(meta.prompt_mask), generators=meta.generators[a:b],
        bias=None, banned=None, allowed=None, token_mask=None)


def worst_case_metadata(rows: int, vocab: int, device: torch.device) -> SamplingMetadata:
    """Metadata that takes every memory-hungry path of the sampler at once (a grammar mask, bias and
    bans on every row: two whole-batch copies; penalties, min_p, top_k, top_p, the most logprobs): what
    the KV-cache budget's profile run samples with."""
    ones = torch.ones(rows, device=device)
    every = torch.arange(rows, device=device)
    first = torch.zeros(rows, dtype=torch.long, device=device)
    allow_all = torch.full((rows, -(-vocab // 32)), -1, dtype=torch.int32, device=device)
    return SamplingMetadata(
        bias=(every, first, ones), banned=(every, first), token_mask=(every, allow_all),
        temperature=ones, greedy=torch.zeros(rows, dtype=torch.bool, device=device), all_greedy=False,
        generators=[None] * rows, top_k=torch.full((rows,), vocab - 1, dtype=torch.long, device=device),
        top_p=ones * 0.9, min_p=ones * 0.01, presence_penalty=ones * 0.1, frequency_penalty=ones * 0.1,
        repetition_penalty=ones * 1.1, output_counts=torch.zeros(rows, vocab, device=device),
        prompt_mask=torch.zeros(rows, vocab, dtype=torch.bool, device=device), max_num_logprobs=MAX_LOGPROBS)


def apply_logit_processors(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Every processor on the whole batch at once (what the sampler does chunk by chunk): allowed-token
    masks, bias, min_tokens bans, penalties; a new tensor when anything applies."""
    work, fixup = apply_row_masks(logits, meta)
    return apply_dense_processors(work, work is logits, fixup, meta)


def apply_dense_processors(logits: torch.Tensor, shared: bool, fixup, meta: SamplingMetadata) -> torch.Tensor:
    """After `apply_row_masks`, on these rows: the penalties (on a copy when `logits` is the caller's,
    `shared`), then the grammar's fallback (`fixup` of these rows): where min_tokens banned the only
    tokens the grammar allows (its end), the grammar wins."""
    if meta.repetition_penalty is not None:
        logits = apply_penalties(logits.clone() if shared else logits, meta)
    if fixup is not None:
        masked, constrained = fixup
        dead = constrained & torch.isneginf(logits.amax(dim=-1))
        logits = torch.where(dead[:, None], masked, logits)
    return logits


def apply_row_masks(logits: torch.Tensor, meta: SamplingMetadata):
    """The processors that name their rows (allowed tokens, grammar masks, bias, min_tokens bans), on
    a copy of the whole batch when any applies. Returns (logits or that copy, fixup): fixup is None, or
    (the grammar-masked logits before bias and bans, [S] bool rows under a grammar) for rows whose bans
    left nothing the grammar allows, which fall back to the grammar's choice after the penalties."""
    if meta.bias is None and meta.banned is None and meta.allowed is None and meta.token_mask is None:
        return logits, None
    logits = logits.clone()
    fixup = None
    if meta.allowed is not None:  # before the bias: a bias cannot bring back a token outside the list
        apply_allowed_tokens(logits, *meta.allowed)
    if meta.token_mask is not None:  # first: nothing below can allow a token the grammar refuses
        apply_token_bitmask(logits, *meta.token_mask, logits.shape[1])
        if meta.banned is not None:
            constrained = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
            fixup = (logits.clone(), constrained.index_fill_(0, meta.token_mask[0], True))
    if meta.bias is not None:
        rows, toks, vals = meta.bias
        logits.index_put_((rows, toks), vals, accumulate=True)
    if meta.banned is not None:
        rows, toks = meta.banned
        logits[rows, toks] = float("-inf")
    return logits, fixup


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition, frequency and presence penalties, in place on `logits` (returned), one [rows, vocab]
    float temporary at a time. Same arithmetic as HF/vLLM: positive logits shrink by dividing, negative
    ones move down by multiplying (x / 1 and x * 1 are exact)."""
    counts = meta.output_counts
    occurred = counts > 0
    seen = meta.prompt_mask | occurred
    rep = meta.repetition_penalty[:, None]
    logits.div_(torch.where(seen & (logits > 0), rep, 1.0))
    logits.mul_(torch.where(seen & (logits < 0), rep, 1.0))
    del seen
    logits.sub_(meta.frequency_penalty[:, None] * counts)
    logits.sub_(torch.where(occurred, meta.presence_penalty[:, None], 0.0))
    return logits


def apply_allowed_tokens(logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> None:
    """In place: the listed rows keep only the logits of their allowed tokens (allowed: [rows, V] bool)."""
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def processed_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, then min_p, top_k and top_p; returns unnormalised probabilities."""
    probs = (logits / meta.temperature[:, None]).softmax(dim=-1)
    if meta.min_p is not None:
        threshold = meta.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    if meta.top_k is None and meta.top_p is None:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if meta.top_k is not None:
        rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        sorted_probs = sorted_probs.masked_fill(rank >= meta.top_k[:, None], 0.0)
    if meta.top_p is not None:
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= meta.top_p[:, None], 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)
