"""The prompt-to-LoRA generator: a frozen sentence encoder and a hyper-convolutional decoder.

Liang et al. 2025, "Drag-and-Drop LLMs: Zero-Shot Prompt-to-Weights" (arXiv:2506.16406), §2.4–2.5
and Fig. 3: a batch of ``S`` prompt sentences is embedded by a frozen Sentence-BERT encoder
(all-MiniLM-L6-v2; Reimers & Gurevych 2019, arXiv:1908.10084: mean pooling over tokens, then
L2-normalised), and a cascade of hyper-convolutional blocks turns the embeddings into the
tokenised LoRA parameters (:mod:`peftbench.generator.params`):

``(B, S, E)`` embeddings → input projection (Linear ``E → W₀``) → ``(B, S, W₀)`` → sequence expander
(Linear over the sequence axis, ``S → L₀·H₀``) → ``(B, L₀, H₀, W₀)`` → HyperConv blocks → ``(B, L_K,
H_K, W_K)`` → reshape ``(B, L_K·H_K, W_K)`` → output projection (Linear ``W_K → D``) → ``(B, T, D)``
with ``T = L_K·H_K``.

A HyperConv block (:class:`HyperConvBlock`) maps a latent ``(B, L, H, W)`` ("layer", height,
width) to ``(B, L', H', W')`` with three convolutions in sequence, each a 2-D convolution whose
*channels* are one axis (so it changes that axis's size) and whose kernel slides over the two
others: ConvW (width ``W → W'``), ConvH (height ``H → H'``), ConvL (layer ``L → L'``); LayerNorm
over ``(H, W)`` before, GELU after, and a residual connection where the shapes agree.

The encoder is frozen, so its sentence embeddings are computed once per prompt sentence
(:func:`embed_sentences`) and the decoder trains on them: the same result as running the frozen
encoder in every step.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class HyperConvBlock(nn.Module):
    """One hyper-convolutional block: ``(B, L, H, W) -> (B, L', H', W')`` (see module docstring).

    Args:
        in_shape: ``(L, H, W)``; out_shape: ``(L', H', W')``; kernel: odd kernel size of the three
            convolutions (``"same"`` padding).
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], kernel: int):
        super().__init__()
        (l_in, h_in, w_in), (l_out, h_out, w_out) = in_shape, out_shape
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.norm = nn.LayerNorm([h_in, w_in])
        self.conv_w = nn.Conv2d(w_in, w_out, kernel, padding="same")   # channels: width; slides over (L, H)
        self.conv_h = nn.Conv2d(h_in, h_out, kernel, padding="same")   # channels: height; slides over (L, W')
        self.conv_l = nn.Conv2d(l_in, l_out, kernel, padding="same")   # channels: layer; slides over (H', W')
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)                                                  # (B, L, H, W)
        y = self.conv_w(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)        # (B, W, L, H) -> (B, L, H, W')
        y = self.conv_h(y.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)        # (B, H, L, W') -> (B, L, H', W')
        y = self.act(self.conv_l(y))                                      # (B, L', H', W')
        return x + y if y.shape == x.shape else y


class PromptToLoRA(nn.Module):
    """The decoder from prompt embeddings to tokenised LoRA parameters (see module docstring).

    Args:
        embed_dim: ``E``, the encoder's sentence-embedding size. samples: ``S``, sentences per prompt.
        latent: ``(L₀, H₀, W₀)``, the expander's output shape.
        blocks: ``[((L, H, W), kernel), …]``, each block's output shape and kernel size.
        token_width: ``D``.

    Raises:
        ValueError: an empty block list, or a kernel size below 1.
    """

    def __init__(self, embed_dim: int, samples: int, latent: Sequence[int],
                 blocks: Sequence[tuple[Sequence[int], int]], token_width: int):
        super().__init__()
        if not blocks:
            raise ValueError("the generator needs at least one HyperConv block (generator.blocks)")
        l0, h0, w0 = latent
        self.latent = (l0, h0, w0)
        self.input_proj = nn.Linear(embed_dim, w0)              # (B, S, E) -> (B, S, W0)
        self.expander = nn.Linear(samples, l0 * h0)             # (B, W0, S) -> (B, W0, L0*H0)
        shapes = [tuple(latent)] + [tuple(s) for s, _ in blocks]
        self.blocks = nn.ModuleList(HyperConvBlock(a, b, k) for a, b, (_, k) in zip(shapes, shapes[1:], blocks))
        self.output_proj = nn.Linear(shapes[-1][2], token_width)  # (B, T, W_K) -> (B, T, D)
        self.tokens = shapes[-1][0] * shapes[-1][1]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """``(B, S, E)`` prompt embeddings -> ``(B, T, D)`` normalised parameter tokens."""
        b = emb.shape[0]
        x = self.input_proj(emb)                                            # (B, S, W0)
        x = self.expander(x.transpose(1, 2))                                # (B, W0, L0*H0)
        x = x.transpose(1, 2).reshape(b, *self.latent)                      # (B, L0, H0, W0)
        for block in self.blocks:
            x = block(x)                                                    # (B, L, H, W) per block
        x = x.reshape(b, -1, x.shape[-1])                                   # (B, T, W_K)
        return self.output_proj(x)                                          # (B, T, D)


@torch.no_grad()
def embed_sentences(encoder: nn.Module, tokenizer, texts: list[str], max_length: int = 128,
                    batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings of ``texts`` by the frozen encoder: mean of the last hidden states over
    the non-padding tokens, L2-normalised (Sentence-BERT, arXiv:1908.10084; all-MiniLM-L6-v2's
    pooling). Returns ``(n, E)`` float32 on the CPU."""
    dev = next(encoder.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(dev)
        h = encoder(**enc).last_hidden_state                               # (b, n_tok, E)
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)                # (b, n_tok, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)                  # (b, E)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)
