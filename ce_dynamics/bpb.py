"""Bits per byte: the decomposition in a unit that does not depend on the tokenizer.

A component M (nats per token, averaged over N evaluated tokens) becomes ``M * N / B / ln 2`` bits per byte,
where B is the number of UTF-8 bytes of the evaluated text: the bytes the evaluated target tokens decode to
(special tokens such as the EOS between packed documents count 0 bytes). The conversion is one factor for
all four components, so ``CE_bpb = EE_bpb + SA_bpb - Conf_bpb`` holds exactly as in nats, and families with
different tokenizers (GPT-2's 50k tokens, Qwen's 152k) compare on the same text.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

BPB_COMPONENTS = ("cross_entropy", "error_entropy", "self_alignment", "confidence")
BPB_KEYS = tuple(f"{key}_bpb" for key in BPB_COMPONENTS)


def bits_per_byte(results: Mapping[str, Any], num_bytes: int, num_tokens: int | None = None) -> dict[str, float]:
    """`{cross_entropy_bpb, error_entropy_bpb, self_alignment_bpb, confidence_bpb}` from per-token nats.

    `results` holds the four components (nats per token) and, unless `num_tokens` is given, `num_tokens`.
    """
    tokens = int(results["num_tokens"] if num_tokens is None else num_tokens)
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes <= 0:
        raise ValueError(f"bits per byte need a positive number of UTF-8 bytes, got {num_bytes!r}")
    if tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {tokens}")
    factor = tokens / num_bytes / math.log(2)
    return {f"{key}_bpb": float(results[key]) * factor for key in BPB_COMPONENTS}


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_kinds(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    stack, kinds = [decoder], set()
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            kinds.add(str(node.get("type")))
            stack.extend(node.get("decoders") or [])
    return kinds


def token_byte_lengths(tokenizer: Any) -> torch.Tensor:
    """UTF-8 bytes each token id decodes to, int64 ``[max id + 1]``; special tokens count 0.

    Byte-level BPE (GPT-2, Pythia, OPT, Qwen, Llama 3): each character of a token stands for one byte.
    SentencePiece (Llama 2, Mistral): ``<0xNN>`` is one byte and ``▁`` a space (the dummy space a
    SentencePiece tokenizer puts before each document counts as a byte). Other tokenizers: the token's
    text as UTF-8.
    """
    vocab = tokenizer.get_vocab()
    kinds = _decoder_kinds(tokenizer)
    byte_level = "ByteLevel" in kinds
    alphabet = _byte_alphabet()
    added = {int(i): tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    special |= {i for i, tok in added.items() if getattr(tok, "special", False)}
    lengths = torch.zeros(max(vocab.values()) + 1, dtype=torch.int64)
    for token, idx in vocab.items():
        if idx in special:
            continue
        if idx in added:
            lengths[idx] = len(str(added[idx]).encode("utf-8"))
        elif byte_level and all(ch in alphabet for ch in token):
            lengths[idx] = len(token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            lengths[idx] = 1
        else:
            lengths[idx] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


def target_bytes(input_ids: torch.Tensor, lengths: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """UTF-8 bytes of the evaluated targets of `[n, seq_len]` instances: tokens 1..seq_len-1 of each row
    (the ones `CausalLMModule.validation_step` scores), padding excluded."""
    targets = input_ids[:, 1:]
    if targets.numel() and int(targets.max()) >= len(lengths):
        raise ValueError(f"token id {int(targets.max())} is outside the tokenizer's vocabulary ({len(lengths)} ids)")
    per_token = lengths[targets]
    if attention_mask is not None:
        per_token = per_token * attention_mask[:, 1:].to(per_token.dtype)
    return int(per_token.sum())
