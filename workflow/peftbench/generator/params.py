"""Parameter tokenisation: a peft LoRA state dict <-> a ``(T, D)`` token matrix, exactly invertible.

The mapping (:class:`ParamLayout`) is fixed by the first checkpoint of a dataset and checked
against every other one. The LoRA tensors of the state dict (peft names
``…<module>.lora_A.<adapter>.weight``, ``A ∈ R^{r×d_in}``, and ``…lora_B.<adapter>.weight``,
``B ∈ R^{d_out×r}``; Hu et al. 2021, arXiv:2106.09685, Eq. 3: ``ΔW = (α / r) B A``) are taken in
a fixed order — encoder layer, then the target kinds of :data:`peftbench.vocab.TARGET_KINDS`
(query, key, value, attention output, intermediate, output), then the module name; A before B —
and every *rank-one factor* becomes one token:

- the ``r`` rows of ``A`` (each of length ``d_in``),
- the ``r`` columns of ``B`` (rows of ``Bᵀ``, each of length ``d_out``),

so the ``i``-th tokens of A and of B of a matrix are the two halves of its ``i``-th rank-one
term ``b_i a_iᵀ``. Each token is zero-padded on the right to the token width ``D`` and the
sequence is zero-padded at the end to ``T`` tokens; ``mask`` (``(T, D)`` bool) marks the real
entries. :meth:`ParamLayout.detokenize` reads the same positions back: the round trip is exact
(bit for bit in float32). The task head (``modules_to_save``) is not tokenised: the generator makes
adapters, the head comes from the trained run (:mod:`peftbench.generator.evaluate`).

Per-token normalisation (:func:`token_stats`, :func:`normalise`): ``x̂_t = (x_t − μ_t) / σ_t`` on
the real entries of token ``t``, with ``μ_t`` and ``σ_t`` the mean and standard deviation of the
real entries of token ``t`` over a set of checkpoints (the generator's training checkpoints of one
split); padding stays 0.

This tokenisation follows the prompt-to-weights setting of Liang et al. 2025, "Drag-and-Drop LLMs:
Zero-Shot Prompt-to-Weights" (arXiv:2506.16406), which also generates tokenised LoRA matrices.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..models import target_kind

#: peft's LoRA tensor names: ``<prefix><module>.lora_A.<adapter>.weight``.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.(?P<adapter>[^.]+)\.weight$")
#: peft's prefix of a wrapped model's module names.
_PEFT_PREFIX = "base_model.model."


class ParamTokenError(ValueError):
    """A checkpoint that cannot be tokenised with the dataset's layout (names the file)."""


@dataclass(frozen=True)
class Entry:
    """One LoRA factor of one adapted matrix in the token sequence.

    Attributes:
        key: the state-dict key (peft name).
        module: the backbone module name (``bert.encoder.layer.0.attention.self.query``).
        layer: encoder layer. kind: target kind (:data:`peftbench.vocab.TARGET_KINDS`).
        factor: ``A`` (tokens = rows, length ``d_in``) or ``B`` (tokens = columns, length ``d_out``).
        start: index of its first token. rank: ``r`` (its number of tokens).
        length: real entries per token (``d_in`` for A, ``d_out`` for B).
        shape: the tensor's shape (``(r, d_in)`` or ``(d_out, r)``).
    """

    key: str
    module: str
    layer: int
    kind: str
    factor: str
    start: int
    rank: int
    length: int
    shape: tuple[int, int]


@dataclass(frozen=True)
class ParamLayout:
    """The token layout of a LoRA state dict (see the module docstring).

    Attributes:
        entries: every factor, in token order.
        token_width: ``D``, entries per token. max_tokens: ``T``, tokens per sequence (padded).
    """

    entries: tuple[Entry, ...]
    token_width: int
    max_tokens: int

    @property
    def used_tokens(self) -> int:
        """Tokens holding parameters (the rest of the ``T`` are padding)."""
        return sum(e.rank for e in self.entries)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], token_width: int, max_tokens: int,
                   source: str = "state dict") -> "ParamLayout":
        """The layout of ``state``'s LoRA tensors.

        Raises:
            ParamTokenError: no LoRA tensors; a module with only A or only B, or whose A and B ranks
                differ; a row longer than ``token_width`` (``token width D smaller than a LoRA row``);
                more tokens than ``max_tokens``; a module whose kind is unknown. The message names
                ``source`` and the fix.
        """
        found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        for k, t in state.items():
            m = _LORA_KEY.match(k)
            if m:
                found.setdefault(m["module"], {})[m["factor"]] = (k, t)
        if not found:
            raise ParamTokenError(f"{source}: no LoRA tensors (…lora_A.<adapter>.weight / …lora_B.…); the generator "
                                  f"needs checkpoints of a LoRA method (generator.method)")
        rows = []
        for module, fs in found.items():
            if set(fs) != {"A", "B"}:
                raise ParamTokenError(f"{source}: module {module} has lora_{''.join(fs)} only; a LoRA checkpoint "
                                      f"holds both A and B of every adapted matrix")
            name = module[len(_PEFT_PREFIX):] if module.startswith(_PEFT_PREFIX) else module
            lk = target_kind(name)
            if lk is None:
                raise ParamTokenError(f"{source}: module {name} is not a known target matrix "
                                      f"(peftbench.models target patterns)")
            (ka, a), (kb, b) = fs["A"], fs["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ParamTokenError(f"{source}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                                      f"make a rank-r pair (A: r×d_in, B: d_out×r)")
            rows.append((lk[0], lk[1], name, ka, a, kb, b))
        from ..vocab import TARGET_KINDS

        rows.sort(key=lambda r: (r[0], TARGET_KINDS.index(r[1]), r[2]))
        entries, start = [], 0
        for layer, kind, name, ka, a, kb, b in rows:
            r = int(a.shape[0])
            for key, factor, t, length in ((ka, "A", a, int(a.shape[1])), (kb, "B", b, int(b.shape[0]))):
                if length > token_width:
                    raise ParamTokenError(
                        f"{source}: {name} lora_{factor} has rows of {length} entries, more than the token width "
                        f"generator.token_width = {token_width}; set generator.token_width >= {length} or adapt only "
                        f"matrices whose rows fit (generator.method: lora_attn)")
                entries.append(Entry(key, name, layer, kind, factor, start, r, length, tuple(int(s) for s in t.shape)))
                start += r
        if start > max_tokens:
            raise ParamTokenError(f"{source}: the adapter needs {start} tokens (2 × rank per matrix), more than "
                                  f"generator.max_tokens = {max_tokens}; raise generator.max_tokens or lower the budget")
        return cls(tuple(entries), int(token_width), int(max_tokens))

    def check(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Check that ``state`` has this layout's LoRA tensors, with the same shapes.

        Raises:
            ParamTokenError: a missing or extra LoRA tensor, or one whose shape (rank) differs;
                names ``source`` and the tensor.
        """
        keys = {k for k in state if _LORA_KEY.match(k)}
        want = {e.key for e in self.entries}
        if keys != want:
            extra, missing = sorted(keys - want)[:3], sorted(want - keys)[:3]
            raise ParamTokenError(f"{source}: its LoRA tensors differ from the dataset's first checkpoint (extra "
                                  f"{extra}, missing {missing}); every checkpoint must come from the same model, "
                                  f"method and budget")
        for e in self.entries:
            if tuple(state[e.key].shape) != e.shape:
                raise ParamTokenError(f"{source}: {e.key} has shape {tuple(state[e.key].shape)}, the dataset's "
                                      f"layout {e.shape} (mismatched rank or model); every checkpoint must come from "
                                      f"the same model, method and budget")

    def mask(self) -> torch.Tensor:
        """``(T, D)`` bool: True on real parameter entries."""
        m = torch.zeros(self.max_tokens, self.token_width, dtype=torch.bool)
        for e in self.entries:
            m[e.start:e.start + e.rank, :e.length] = True
        return m

    def tokenize(self, state: dict[str, torch.Tensor], source: str = "state dict") -> torch.Tensor:
        """``(T, D)`` float32 tokens of ``state`` (padding 0).

        Raises:
            ParamTokenError: ``state`` does not have this layout (:meth:`check`).
        """
        self.check(state, source)
        out = torch.zeros(self.max_tokens, self.token_width, dtype=torch.float32)
        for e in self.entries:
            t = state[e.key].detach().to("cpu", torch.float32)
            rows = t if e.factor == "A" else t.T           # A: (r, d_in); B: (d_out, r) -> (r, d_out)
            out[e.start:e.start + e.rank, :e.length] = rows
        return out

    def detokenize(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The LoRA state dict of ``(T, D)`` tokens (the inverse of :meth:`tokenize`; padding ignored).

        Raises:
            ValueError: ``tokens`` is not ``(T, D)``.
        """
        if tuple(tokens.shape) != (self.max_tokens, self.token_width):
            raise ValueError(f"tokens of shape {tuple(tokens.shape)}; the layout has (T, D) = "
                             f"({self.max_tokens}, {self.token_width})")
        out = {}
        for e in self.entries:
            rows = tokens[e.start:e.start + e.rank, :e.length].to(torch.float32)
            out[e.key] = (rows if e.factor == "A" else rows.T).contiguous()
        return out

    def token_frame(self):
        """One row per real token: ``token``, ``module``, ``layer``, ``kind``, ``factor``, ``index``
        (row of A / column of B), ``length`` — the ``layout.parquet`` of a dataset."""
        import pandas as pd

        rows = [{"token": e.start + i, "key": e.key, "module": e.module, "layer": e.layer, "kind": e.kind,
                 "factor": e.factor, "index": i, "length": e.length} for e in self.entries for i in range(e.rank)]
        return pd.DataFrame(rows)

    def to_json(self) -> str:
        """The layout as JSON (stored in the dataset's safetensors metadata)."""
        return json.dumps({"token_width": self.token_width, "max_tokens": self.max_tokens,
                           "entries": [asdict(e) for e in self.entries]})

    @classmethod
    def from_json(cls, text: str) -> "ParamLayout":
        d = json.loads(text)
        return cls(tuple(Entry(**{**e, "shape": tuple(e["shape"])}) for e in d["entries"]), d["token_width"],
                   d["max_tokens"])


def token_stats(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean and standard deviation over the real entries of a set of checkpoints.

    Args:
        tokens: ``(N, T, D)``. mask: ``(T, D)`` bool.

    Returns:
        ``(mean, std)``, each ``(T,)`` float32: over the ``N × (real entries of token t)`` values;
        padding tokens get mean 0, std 1; a std below 1e-8 (a constant token, e.g. zero-initialised
        B in a single checkpoint) is set to 1.

    Raises:
        ValueError: no checkpoints (``N = 0``).
    """
    if tokens.shape[0] == 0:
        raise ValueError("no checkpoints to compute the normalisation statistics from")
    m = mask.to(tokens.dtype)[None]                                   # (1, T, D)
    count = (m.sum(dim=(0, 2)) * tokens.shape[0]).clamp_min(1)        # (T,)
    mean = (tokens * m).sum(dim=(0, 2)) / count
    var = (((tokens - mean[None, :, None]) * m) ** 2).sum(dim=(0, 2)) / count
    std = var.sqrt()
    real = mask.any(dim=1)
    mean = torch.where(real, mean, torch.zeros_like(mean))
    std = torch.where(real & (std > 1e-8), std, torch.ones_like(std))
    return mean.float(), std.float()


def normalise(tokens: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x − μ_t) / σ_t`` on the real entries, 0 on padding. tokens: ``(…, T, D)``; mean, std: ``(T,)``."""
    return (tokens - mean[:, None]) / std[:, None] * mask.to(tokens.dtype)


def denormalise(tokens: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`normalise` on the real entries (``x̂ σ_t + μ_t``), 0 on padding."""
    return (tokens * std[:, None] + mean[:, None]) * mask.to(tokens.dtype)


def load_lora_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an ``adapter.safetensors`` / snapshot file.

    Raises:
        FileNotFoundError: no such file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return load_file(str(path))
