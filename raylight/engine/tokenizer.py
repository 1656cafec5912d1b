"""Tokenizer loading, prompt rendering and incremental detokenization."""

from __future__ import annotations

import os
from typing import Any, Optional


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: Optional[str]):
    """The tokenizer in `path`, or None where there is none (random-weight test models, presets):
    such models take token-id prompts and return token ids without text."""
    if path is None or (os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f))
                                                          for f in TOKENIZER_FILES)):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never run a repository's code


def apply_chat_template(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                        **kwargs) -> list[int]:
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so chat messages cannot be rendered")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template; pass plain prompts instead")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, **kwargs)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


class IncrementalDetokenizer:
    """Text deltas, one sampled token at a time, whose concatenation equals the full decode:
    held back while a multi-byte character is incomplete (tokenizers' DecodeStream)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.token_ids: list[int] = []
        backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer is not None else None
        self._backend = backend
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        if self.tokenizer is None:
            return ""
        if self._stream is not None:
            piece = self._stream.step(self._backend, token_id) or ""
        else:  # slow tokenizer: diff full decodes (quadratic, but only for tokenizers without a fast backend)
            full = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
            piece = "" if full.endswith("\ufffd") else full[len(self.text):]
        self.text += piece
        return piece

