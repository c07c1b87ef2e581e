"""Batched greedy generation for the causal-LM track (seed 003) and verbaliser scoring.

Evaluation prompts are **left**-padded (:meth:`peftbench.batches.TokenizedSplit.prompt_batch`), so
every prompt ends at the last column and the first generated token of every row is predicted from
its own last prompt token; the attention mask hides the padding and transformers' ``generate``
derives the position ids from it (``cumsum(mask) − 1``), so a left-padded row sees the same
positions as the unpadded prompt. Decoding is greedy (``do_sample=False``: argmax at every step)
for at most ``max_new_tokens`` tokens and stops at the end-of-sequence token.
"""
from __future__ import annotations

import re

import torch

_WORD = re.compile(r"[a-z0-9]+")


@torch.no_grad()
def greedy_generate(model, batch: dict[str, torch.Tensor], max_new_tokens: int, eos_token_id: int,
                    pad_token_id: int) -> list[list[int]]:
    """Greedy continuations of a left-padded prompt batch.

    Args:
        model: a causal LM (or a peft model wrapping one) with ``generate``.
        batch: ``input_ids`` / ``attention_mask`` ``(B, P)``, left-padded.
        max_new_tokens: cap on generated tokens.
        eos_token_id, pad_token_id: end-of-sequence and padding token ids.

    Returns:
        ``B`` lists of generated token ids, the end-of-sequence token and what follows it removed.
    """
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         temperature=None, top_p=None, top_k=None)  # (B, P + T)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    return [row[:row.index(eos_token_id)] if eos_token_id in row else row for row in new]


def verbalise(text: str, verbaliser: tuple[str, ...]) -> int:
    """The class id a generated answer names: its first word (lower-cased, punctuation dropped)
    equal to a verbaliser word; -1 when it names none (scored as wrong)."""
    m = _WORD.search(text.lower())
    return verbaliser.index(m.group(0)) if m and m.group(0) in verbaliser else -1
