"""Loading and saving generative-retriever models: plain seq2seq models and generative run folders.

``load_generative(spec)`` accepts

* ``None`` / ``"minilm-bert2bert"``: the default encoder-decoder warm-started from the packaged MiniLM.
  Its cross-attention starts random, so it is materialised ONCE (seed 0) into
  ``$RAG_HOME/models/minilm-bert2bert-seed0`` and read from there afterwards: a PEFT run that names
  it as its base gets back exactly the base it was trained on;
* any HF seq2seq folder or hub id (BART, T5, an EncoderDecoderModel folder);
* a generative run folder (``generative_run.json``): a full run (``model/``: save_pretrained, safetensors)
  or a PEFT run (``peft/``: core.peft's config + only the trained parameters, on top of the base named
  in the run's meta, whose fingerprint is checked).

A run folder also holds ``tokenizer/`` so the trie can be built from it without loading weights.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from core.errors import ManifestMismatch, RagError
from core.io import read_json, write_json

logger = logging.getLogger(__name__)

RUN_META = "generative_run.json"
MODEL_DIR = "model"
PEFT_DIR = "peft"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
DEFAULT_MODEL = "minilm-bert2bert"
_WARM_START_SEED = 0


# ---------------------------------------------------------------------------------------------- bases

def is_generative_run(spec: str | Path | None) -> bool:
    return spec is not None and (Path(spec) / RUN_META).is_file()


def default_base_path() -> Path:
    """The warm-started MiniLM bert2bert, materialised once with a fixed seed (see the module doc)."""
    from core.io import atomic_dir
    from core.models import _minilm_path, rag_home, warm_start_bert2bert

    path = rag_home() / "models" / f"{DEFAULT_MODEL}-seed{_WARM_START_SEED}"
    if (path / "config.json").exists():
        return path
    logger.info("materialising the warm-started MiniLM encoder-decoder in %s", path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WARM_START_SEED)
        model, tokenizer = warm_start_bert2bert(_minilm_path())
    try:
        with atomic_dir(path, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (path / "config.json").exists():  # another process may have won the rename
            raise
    return path


def resolve_base(spec: str | Path | None) -> str:
    """A loadable model folder / hub id for a base spec (the default alias -> its materialised folder)."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return str(default_base_path())
    return str(spec)


def decoder_ids(model: Any, tokenizer: Any = None) -> tuple[int, int]:
    """(decoder start token id, eos token id) of a seq2seq model."""
    start = eos = None
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        if cfg is None:
            continue
        start = start if start is not None else getattr(cfg, "decoder_start_token_id", None)
        eos = eos if eos is not None else getattr(cfg, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if start is None or eos is None:
        raise RagError(f"{type(model).__name__}: the model config names no decoder_start_token_id/eos_token_id")
    return int(start), int(eos)


def fingerprint(model: torch.nn.Module) -> str:
    """sha1 over a strided sample of every parameter (cheap; tells two bases apart)."""
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        if not torch.is_tensor(p) or not p.is_floating_point():
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 512)].float().cpu().contiguous()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def load_base(spec: str | Path | None):
    """(model, tokenizer) of a plain seq2seq model (default: the warm-started MiniLM bert2bert)."""
    from core.models import load_seq2seq
    return load_seq2seq(resolve_base(spec))


def prepare_for_generation(model: Any) -> Any:
    """The trie decides the first and last tokens: drop forced BOS/EOS tokens some configs carry."""
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        for attr in ("forced_bos_token_id", "forced_eos_token_id"):
            if getattr(gc, attr, None) is not None:
                setattr(gc, attr, None)
    return model


# ---------------------------------------------------------------------------------------------- run folders

def read_run_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / RUN_META).exists():
        raise RagError(f"{path} is not a generative run folder (no {RUN_META}); did training finish?")
    meta = read_json(path / RUN_META)
    if meta.get("format_version") != FORMAT_VERSION:
        raise RagError(f"{path / RUN_META}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def load_run(path: str | Path, trainable: bool = False):
    """(model, tokenizer) of a run folder; with ``trainable`` the run's trained parameters keep
    requires_grad (to continue training them), else everything is frozen."""
    from core.models import load_seq2seq
    from core.peft import load_peft

    path = Path(path)
    meta = read_run_meta(path)
    if meta["weights"] == "full":
        if not (path / MODEL_DIR / "config.json").exists():
            raise RagError(f"{path}: the run has no {MODEL_DIR}/ folder")
        model, tokenizer = load_seq2seq(str(path / MODEL_DIR))
        if trainable:
            for p in model.parameters():
                p.requires_grad_(True)
    elif meta["weights"] == "peft":
        if not (path / PEFT_DIR).exists():
            raise RagError(f"{path}: the run has no {PEFT_DIR}/ folder")
        model, tokenizer = load_generative(meta["base"])
        got = fingerprint(model)
        if meta.get("base_fingerprint") and got != meta["base_fingerprint"]:
            raise ManifestMismatch(f"{path}: its base model {meta['base']!r} is not the one it was trained on "
                                   f"(fingerprint {got[:12]} != {meta['base_fingerprint'][:12]})")
        model = load_peft(model, path / PEFT_DIR)
    else:
        raise RagError(f"{path / RUN_META}: unknown weights kind {meta['weights']!r}")
    if (path / TOKENIZER_DIR).exists():
        tokenizer = _load_tokenizer(path / TOKENIZER_DIR)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model, tokenizer


def load_generative(spec: str | Path | None = None, device: str | None = None, trainable: bool = False):
    """(model, tokenizer): a plain model id/path, the default warm-started MiniLM, or a run folder."""
    if is_generative_run(spec):
        model, tokenizer = load_run(spec, trainable=trainable)
    else:
        if spec is not None and str(spec).startswith((".", "/", "~")) and not Path(str(spec)).expanduser().exists():
            raise RagError(f"model folder not found: {spec}")
        model, tokenizer = load_base(spec)
        if not trainable:
            for p in model.parameters():
                p.requires_grad_(False)
    if device:
        model.to(device)
    return model.eval(), tokenizer


def load_tokenizer_and_ids(spec: str | Path | None) -> tuple[Any, int, int]:
    """(tokenizer, decoder start id, eos id) of a model or run; a run folder is read without its weights."""
    if is_generative_run(spec):
        meta = read_run_meta(spec)
        tok_dir = Path(spec) / TOKENIZER_DIR
        if tok_dir.exists() and meta.get("decoder_start_token_id") is not None:
            return _load_tokenizer(tok_dir), int(meta["decoder_start_token_id"]), int(meta["eos_token_id"])
    if spec is None or str(spec) == DEFAULT_MODEL:
        from core.models import _minilm_path
        tokenizer = _load_tokenizer(Path(_minilm_path()))
        return tokenizer, int(tokenizer.cls_token_id), int(tokenizer.sep_token_id)
    model, tokenizer = load_generative(spec)
    start, eos = decoder_ids(model, tokenizer)
    return tokenizer, start, eos


def base_reference(spec: str | Path | None) -> str:
    """What a PEFT run records as its base: the alias, a hub id, or an absolute folder path."""
    if spec is None:
        return DEFAULT_MODEL
    path = Path(str(spec)).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def save_run_model(model: Any, tokenizer: Any, out: str | Path, *, method: str, base: str | None,
                   base_fingerprint: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the weights (full: ``model/``; PEFT: ``peft/``), ``tokenizer/`` and ``generative_run.json``."""
    from core.peft import save_peft
    from index.trie import tokenizer_info

    out = Path(out)
    if method == "full":
        model.save_pretrained(str(out / MODEL_DIR))
        tokenizer.save_pretrained(str(out / MODEL_DIR))
        weights, base, base_fingerprint = "full", None, None
    else:
        save_peft(model, out / PEFT_DIR)
        weights = "peft"
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    start, eos = decoder_ids(model, tokenizer)
    meta = {"format_version": FORMAT_VERSION, "weights": weights, "peft": method, "base": base,
            "base_fingerprint": base_fingerprint, "decoder_start_token_id": start, "eos_token_id": eos,
            "model_class": type(model).__name__, "tokenizer": tokenizer_info(tokenizer), **(extra or {})}
    write_json(out / RUN_META, meta)
    return meta
