"""Loading and saving generative-retriever models: plain seq2seq models and generative run folders.

``load_generative(spec)`` accepts

* ``None`` / ``"gemma-3-270m"``: the default, the packaged Gemma-3-270M, a decoder-only LM (core/gemma.py
  converts it once);
* ``"minilm-bert2bert"``: an encoder-decoder warm-started from the packaged MiniLM, a smoke-test model only
  (its decoder never learned to generate and its cross-attention starts random). It is materialised ONCE
  (seed 0) into ``$RAG_HOME/models/minilm-bert2bert-seed0`` and read from there afterwards: a PEFT run that
  names it as its base gets back exactly the base it was trained on;
* any HF seq2seq or causal-LM folder or hub id (BART, T5, an EncoderDecoderModel folder; Llama, Qwen, GPT-2):
  the model config tells them apart (``is_encoder_decoder``; a causal LM has a ``*ForCausalLM`` /
  ``*LMHeadModel`` architecture); a model with neither head is refused in one line. Remote code is never run;
* a generative run folder (``generative_run.json``): a full run (``model/``: save_pretrained, safetensors)
  or a PEFT run (``peft/``: core.peft's config + only the trained parameters, on top of the base named
  in the run's meta, whose fingerprint is checked).

A run folder also holds ``tokenizer/`` so the trie can be built from it without loading weights.

``TitleSpec`` says how a model writes titles: seq2seq models start the decoder at the decoder start token;
causal LMs continue a prompt (retrievers/generative/prompt.py), the trie starting at the prompt's last token.
Both end titles with EOS (causal: the tokenizer's ``eos_token_id``). Run folders record it
(``model_kind``, ``prompt``, ``decoder_start_token_id``, ``eos_token_id``).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import ManifestMismatch, RagError
from core.io import read_json, write_json

logger = logging.getLogger(__name__)

RUN_META = "generative_run.json"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
PEFT_DIR = "peft"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
DEFAULT_MODEL = "gemma-3-270m"  # core.gemma.GEMMA_ALIAS: the only pretrained generative LM installable offline
SEQ2SEQ_FALLBACK = "minilm-bert2bert"  # warm-started encoder-decoder: for smoke tests, never a measure of a method
_WARM_START_SEED = 0
SEQ2SEQ, CAUSAL = "seq2seq", "causal"
# What ends a causal LM's title: its EOS (the default; what fine-tuning teaches), or the newline a pretrained LM
# writes after "Title: X" (zero-shot: a model never trained to stop with EOS gives it a very low probability).
TITLE_ENDS = ("eos", "newline")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "WithLMHead")


# ---------------------------------------------------------------------------------------------- bases

def is_generative_run(spec: str | Path | None) -> bool:
    return spec is not None and (Path(spec) / RUN_META).is_file()


def default_base_path() -> Path:
    """The warm-started MiniLM bert2bert, materialised once with a fixed seed (see the module doc)."""
    from core.io import atomic_dir
    from core.models import _minilm_path, rag_home, warm_start_bert2bert

    path = rag_home() / "models" / f"{SEQ2SEQ_FALLBACK}-seed{_WARM_START_SEED}"
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
    """A loadable model folder / hub id for a base spec (the default alias -> its materialised folder,
    ``gemma-3-270m`` -> the converted Gemma folder; hub ids and folders through core.models)."""
    from core.gemma import GEMMA_ALIAS, gemma_path
    from core.models import resolve_model

    if str(spec) == SEQ2SEQ_FALLBACK:
        return str(default_base_path())
    if spec is None or str(spec) == GEMMA_ALIAS:
        return gemma_path()
    return resolve_model(str(spec))


def kind_of_config(config: Any, name: str = "model") -> str:
    """``seq2seq`` or ``causal`` from a model config; a one-line RagError for a model with neither head."""
    if getattr(config, "is_encoder_decoder", False):
        return SEQ2SEQ
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        return CAUSAL
    model_type = getattr(config, "model_type", "")
    if not architectures:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
        encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder:
            return CAUSAL
    shown = ", ".join(architectures) or model_type or type(config).__name__
    raise RagError(f"model {name}: {shown} has neither a causal-LM nor a seq2seq head; the generative retriever "
                   "needs a decoder-only LM (default gemma-3-270m) or a seq2seq LM (BART, T5)")


def model_kind(model: Any) -> str:
    return kind_of_config(model.config, type(model).__name__)


def causal_eos(tokenizer: Any, config: Any = None) -> int:
    """The EOS a causal LM ends titles with: the tokenizer's, else the model config's (first of a list)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and config is not None:
        eos = getattr(config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if eos is None:
        raise RagError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: no EOS token (tokenizer and model "
                       "config name none); a causal generative retriever ends every title with EOS")
    return int(eos)


def ensure_pad(model: Any, tokenizer: Any) -> None:
    """A causal LM without a pad token pads with its EOS (the attention mask hides it)."""
    if tokenizer.pad_token_id is None:
        eos = causal_eos(tokenizer, getattr(model, "config", None))
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos)
        logger.info("%s has no pad token: padding with its EOS token (id %d)", type(model).__name__, eos)
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tokenizer.pad_token_id


@dataclass(frozen=True)
class TitleSpec:
    """How a model writes titles: the trie's start and EOS ids, and (causal) the prompt template."""

    kind: str
    start_token_id: int
    eos_token_id: int
    prompt: str | None = None
    title_end: str = "eos"  # causal: "eos" or "newline" (eos_token_id is then the newline token)

    @property
    def context(self) -> str | None:
        """Causal: the text the titles are tokenised after (the template's fixed end); seq2seq: None."""
        if self.kind != CAUSAL:
            return None
        from retrievers.generative.prompt import template_suffix
        return template_suffix(self.prompt or "")

    def to_json(self) -> dict[str, Any]:
        return {"model_kind": self.kind, "prompt": self.prompt, "decoder_start_token_id": self.start_token_id,
                "eos_token_id": self.eos_token_id, **({"title_end": self.title_end} if self.kind == CAUSAL else {})}


def newline_id(tokenizer: Any, context: str) -> int:
    """The token a newline adds after a title (which must be one token of its own)."""
    from index.trie import encode_titles

    plain, ended = encode_titles(tokenizer, [context + " Paris", context + " Paris\n"])
    if ended[:len(plain)] != plain or len(ended) != len(plain) + 1:
        raise RagError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')} has no newline token of its own after a "
                       "title (it drops or merges newlines); use title_end eos")
    return int(ended[-1])


def causal_spec(tokenizer: Any, prompt: str | None = None, config: Any = None, title_end: str | None = None) -> TitleSpec:
    from retrievers.generative.prompt import DEFAULT_PROMPT, PromptEncoder

    prompt = prompt or DEFAULT_PROMPT
    encoder = PromptEncoder(tokenizer, prompt)
    if title_end is None:
        # Auto: a newline where the tokenizer writes one after a title (what a pretrained LM puts there, so
        # zero-shot decoding and fine-tuning share one trie), else EOS (e.g. WordPiece drops newlines).
        try:
            return TitleSpec(CAUSAL, encoder.start_token_id, newline_id(tokenizer, encoder.suffix), prompt, "newline")
        except RagError:
            title_end = "eos"
    if title_end not in TITLE_ENDS:
        raise RagError(f"title end must be one of {', '.join(TITLE_ENDS)}, not {title_end!r}")
    end = causal_eos(tokenizer, config) if title_end == "eos" else newline_id(tokenizer, encoder.suffix)
    return TitleSpec(CAUSAL, encoder.start_token_id, end, prompt, title_end)


def title_spec(model: Any, tokenizer: Any, prompt: str | None = None, title_end: str | None = None) -> TitleSpec:
    """The TitleSpec of a loaded model (``prompt`` and ``title_end`` are used by causal LMs only; defaults:
    DEFAULT_PROMPT, and a newline where the tokenizer has one after a title, else EOS)."""
    if model_kind(model) == CAUSAL:
        return causal_spec(tokenizer, prompt, model.config, title_end)
    start, eos = decoder_ids(model, tokenizer)
    return TitleSpec(SEQ2SEQ, start, eos)


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


def load_pretrained(path: str, name: str | None = None):
    """(model, tokenizer) of a HF folder / hub id: seq2seq or causal LM, told apart by its config."""
    from transformers import AutoConfig

    from core.models import load_seq2seq

    if kind_of_config(AutoConfig.from_pretrained(path), name or path) == SEQ2SEQ:
        return load_seq2seq(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ensure_pad(model, tokenizer)
    return model, tokenizer


def load_base(spec: str | Path | None):
    """(model, tokenizer) of a plain model (default: Gemma-3-270M)."""
    return load_pretrained(resolve_base(spec), str(spec) if spec is not None else DEFAULT_MODEL)


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


def _load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def load_run(path: str | Path, trainable: bool = False):
    """(model, tokenizer) of a run folder; with ``trainable`` the run's trained parameters keep
    requires_grad (to continue training them), else everything is frozen."""
    from core.peft import load_peft

    path = Path(path)
    meta = read_run_meta(path)
    if meta["weights"] == "full":
        if not (path / MODEL_DIR / "config.json").exists():
            raise RagError(f"{path}: the run has no {MODEL_DIR}/ folder")
        model, tokenizer = load_pretrained(str(path / MODEL_DIR))
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
    if meta.get("model_kind") == CAUSAL:
        ensure_pad(model, tokenizer)
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


def load_tokenizer_and_spec(spec: str | Path | None, prompt: str | None = None,
                            title_end: str | None = None) -> tuple[Any, TitleSpec]:
    """(tokenizer, TitleSpec) of a model or run, without loading weights where it can (run folders, causal
    LMs). ``prompt`` / ``title_end``: the causal template and title end (default: the run's, else DEFAULT_PROMPT
    and eos); seq2seq models ignore them."""
    if is_generative_run(spec):
        meta = read_run_meta(spec)
        tok_dir = Path(spec) / TOKENIZER_DIR
        if tok_dir.exists() and meta.get("decoder_start_token_id") is not None:
            tokenizer = _load_tokenizer(tok_dir)
            if meta.get("model_kind") == CAUSAL:
                if prompt and prompt != meta.get("prompt"):
                    raise RagError(f"{spec} was trained with the prompt {meta.get('prompt')!r}, not {prompt!r}: "
                                   "leave --prompt out to use the run's")
                run_end = meta.get("title_end", "eos")
                if title_end and title_end != run_end:
                    raise RagError(f"{spec} was trained to end titles with {run_end}, not {title_end}: "
                                   "leave --title-end out to use the run's")
                return tokenizer, causal_spec(tokenizer, meta.get("prompt"), title_end=run_end)
            _ignore_prompt(prompt)
            return tokenizer, TitleSpec(SEQ2SEQ, int(meta["decoder_start_token_id"]), int(meta["eos_token_id"]))
    if str(spec) == SEQ2SEQ_FALLBACK:
        from core.models import _minilm_path
        _ignore_prompt(prompt)
        tokenizer = _load_tokenizer(Path(_minilm_path()))
        return tokenizer, TitleSpec(SEQ2SEQ, int(tokenizer.cls_token_id), int(tokenizer.sep_token_id))
    if not is_generative_run(spec):
        from transformers import AutoConfig

        path = resolve_base(spec)
        config = AutoConfig.from_pretrained(path)
        if kind_of_config(config, str(spec)) == CAUSAL:
            tokenizer = _load_tokenizer(path)
            return tokenizer, causal_spec(tokenizer, prompt, config, title_end)
    model, tokenizer = load_generative(spec)
    if model_kind(model) == SEQ2SEQ:
        _ignore_prompt(prompt)
    return tokenizer, title_spec(model, tokenizer, prompt, title_end)


def _ignore_prompt(prompt: str | None) -> None:
    if prompt:
        logger.warning("--prompt is ignored: seq2seq models read the question alone")


def load_tokenizer_and_ids(spec: str | Path | None) -> tuple[Any, int, int]:
    """(tokenizer, trie start id, eos id) of a model or run (see load_tokenizer_and_spec)."""
    tokenizer, ts = load_tokenizer_and_spec(spec)
    return tokenizer, ts.start_token_id, ts.eos_token_id


def base_reference(spec: str | Path | None) -> str:
    """What a PEFT run records as its base: the alias, a hub id, or an absolute folder path."""
    if spec is None:
        return DEFAULT_MODEL
    path = Path(str(spec)).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def save_run_model(model: Any, tokenizer: Any, out: str | Path, *, method: str, base: str | None,
                   base_fingerprint: str | None, extra: dict[str, Any] | None = None,
                   spec: TitleSpec | None = None) -> dict[str, Any]:
    """Write the weights (full: ``model/``, save_pretrained: config, weights, generation config, tokenizer;
    PEFT: ``peft/``, and for LoRA PEFT's own adapter in ``adapter/``), ``tokenizer/`` and ``generative_run.json`` (with the TitleSpec: kind, prompt, ids)."""
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
        from core.peft.export import has_lora, save_lora_adapter
        if method == "lora" and has_lora(model):  # also PEFT's own adapter: `PeftModel.from_pretrained(base, ...)`
            origin = getattr(model.config, "_name_or_path", "") or ""
            save_lora_adapter(model, origin if origin and Path(origin).exists() else str(base), out / ADAPTER_DIR)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    spec = spec or title_spec(model, tokenizer)
    meta = {"format_version": FORMAT_VERSION, "weights": weights, "peft": method, "base": base,
            "base_fingerprint": base_fingerprint, **spec.to_json(),
            "model_class": type(model).__name__, "tokenizer": tokenizer_info(tokenizer), **(extra or {})}
    write_json(out / RUN_META, meta)
    return meta
