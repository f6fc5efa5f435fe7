"""The text of a row's new tokens as it reads after its prompt.

Tokenizers decode a run of tokens differently alone and after the prompt: a SentencePiece
tokenizer drops the word-start space of the first token decoded alone, a byte-level BPE keeps it
(`' positive'`), and a row cut by the token limit can stop inside a multi-byte character, which
decodes to U+FFFD. `continuation` decodes the new tokens after the prompt's last tokens and keeps
what follows the prompt's text, drops one leading space (the separator between prompt and
answer, whichever tokenizer), and drops a trailing character left incomplete (its remaining bytes were never generated).
"""

from __future__ import annotations

CONTEXT_TOKENS = 4
"""Prompt tokens decoded before the new ones (enough for any merge across the boundary)."""
REPLACEMENT = "\ufffd"


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def continuation(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text of `new` as it follows `prompt` (both token ids), one leading space dropped and
    no trailing U+FFFD (the first bytes of a character whose last ones were never generated)."""
    context = prompt[-CONTEXT_TOKENS:]
    before = _decode(tokenizer, context)
    whole = _decode(tokenizer, context + new)
    text = whole[len(before):] if whole.startswith(before) else _decode(tokenizer, new)
    text = text.rstrip(REPLACEMENT)
    return text[1:] if text.startswith(" ") else text
