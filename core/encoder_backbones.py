"""Gemma-3-270M as a generic pretrained backbone for the PEFT studies, beside the packaged MiniLM.

Two derived folders, each built once from the converted Gemma (core/gemma.py) into the model cache and
loadable by plain sentence-transformers, with no code of the toolkit and no `trust_remote_code`:

* bi-encoder, alias ``gemma-3-270m`` or ``gemma-3-270m-L{N}`` (a `--encoder` of `rag train retriever --kind
  dense`, `rag index build --kind dense`, ...): ``SentenceTransformer(path)`` = Gemma-3's text model
  (Gemma3TextModel, causal attention as pre-trained) -> mean pooling over the non-padding tokens (BOS
  included: after Gemma's final norm it does not dominate the mean). Mean pooling, not last-token: under
  a causal mask only the last token sees the whole text, but an untuned last-token state is shaped for
  predicting the next token, while the mean keeps every token's content; it is also the pooling of the
  MiniLM encoder the studies compare against.
* cross-encoder, the same aliases as a re-ranker `--base` (retrievers/rerank.py maps them here):
  ``CrossEncoder(path)`` = transformers' Gemma3TextForSequenceClassification with a new 1-logit scoring head
  (``score``, seeded, initialiser of transformers: N(0, 0.02^2)) read at the LAST non-padding token. The
  pair is ``<bos> question <bos> passage <eos>``: the tokenizer appends ``<eos>`` (kept by truncation), so
  the scored position is always the same token, and under the causal mask it is the one position that
  attends to both the question and the whole passage (a mean would average question tokens that never see
  the passage).

Both tokenizers pad on the RIGHT (Gemma's own default is left, for generation): Gemma computes positions
as 0..n-1 whatever the mask, so left padding would shift a text's positions by its batch's padding and make
its embedding depend on the batch; with right padding real tokens keep their positions and, the mask being
causal, never attend to the pads after them. Pad id 0 (``<pad>``) is distinct from BOS/EOS.

``-L{N}`` keeps the first N of the 18 decoder layers (and their ``layer_types``: sliding-window layers,
every 6th global) and Gemma's final norm, so a study fits 2 CPU cores; the embedding matrix (262,144 x 640,
168M of the 268M parameters) stays whole. Each folder is written atomically and carries ``rag_derived.json``
(what it was derived from: source folder and the sha256 of its weights, layers kept, pooling, padding).
Gemma terms of use apply (https://ai.google.dev/gemma/terms).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from core.errors import RagError

log = logging.getLogger(__name__)

BACKBONE = "gemma-3-270m"
GEMMA_LAYERS = 18
ALIAS_RE = re.compile(r"^gemma-3-270m(?:-L([0-9]+))?$")
MANIFEST = "rag_derived.json"
BI_ENCODER, CROSS_ENCODER = "bi-encoder", "cross-encoder"
MANIFEST_VERSION = 1
MAX_LENGTH = 512  # tokens a text (bi-encoder) or a pair (cross-encoder) is cut to by default


def backbone_layers(name: str) -> tuple[bool, int | None]:
    """(is a Gemma backbone alias, layers kept: None = all). ``gemma-3-270m-L0`` and ``-L19`` are refused."""
    match = ALIAS_RE.match(str(name))
    if not match:
        return False, None
    if match.group(1) is None:
        return True, None
    n = int(match.group(1))
    if not 1 <= n <= GEMMA_LAYERS:
        raise RagError(f"{name}: Gemma-3-270M has {GEMMA_LAYERS} decoder layers; use gemma-3-270m-L1 .. "
                       f"gemma-3-270m-L{GEMMA_LAYERS}")
    return True, n


def is_backbone_alias(name: Any) -> bool:
    return bool(ALIAS_RE.match(str(name)))


def derived_dir(kind: str, layers: int | None) -> Path:
    from core.models import rag_home
    suffix = "" if layers is None else f"-L{layers}"
    return rag_home() / "models" / f"{BACKBONE}{suffix}-{kind}"


def bi_encoder_path(layers: int | None = None) -> str:
    """The bi-encoder folder of Gemma-3-270M (first ``layers`` decoder layers), built on first use."""
    return _materialise(BI_ENCODER, layers)


def cross_encoder_path(layers: int | None = None) -> str:
    """The cross-encoder folder of Gemma-3-270M (first ``layers`` decoder layers), built on first use."""
    return _materialise(CROSS_ENCODER, layers)


def cross_encoder_for(name: str) -> str | None:
    """The cross-encoder folder for a Gemma backbone alias; None for any other name."""
    ok, layers = backbone_layers(name)
    return cross_encoder_path(layers) if ok else None


def _materialise(kind: str, layers: int | None) -> str:
    target = derived_dir(kind, layers)
    if (target / MANIFEST).exists():
        return str(target)
    from core.gemma import gemma_path

    source = gemma_path()
    log.info("deriving the Gemma-3-270M %s%s in %s (once)", kind, "" if layers is None else f" (first {layers} layers)",
             target)
    try:
        build_derived(source, target, kind, layers, alias=BACKBONE + ("" if layers is None else f"-L{layers}"))
    except RagError:
        if (target / MANIFEST).exists():  # another process finished the same folder first
            return str(target)
        raise
    return str(target)


# ------------------------------------------------------------------------------------------------ building

def truncate_layers(model: Any, layers: int | None) -> Any:
    """Keep the first ``layers`` decoder layers of a Llama/Gemma-like model (in place; None: keep all)."""
    import torch

    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    stack = getattr(base, "layers", None)
    if not isinstance(stack, torch.nn.ModuleList):
        raise RagError(f"cannot truncate {type(model).__name__}: no `layers` list of decoder layers")
    if layers is None:
        return model
    if not 1 <= layers <= len(stack):
        raise RagError(f"cannot keep {layers} layers of {type(model).__name__}: it has {len(stack)}")
    base.layers = torch.nn.ModuleList(list(stack)[:layers])
    for config in {id(c): c for c in (model.config, base.config)}.values():
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:layers]
    return model


def _weights_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def build_derived(source: str | Path, out: str | Path, kind: str, layers: int | None = None,
                  alias: str | None = None, seed: int = 0, max_length: int = MAX_LENGTH) -> Path:
    """Write the ``kind`` folder (bi-encoder | cross-encoder) derived from the HF folder ``source`` (a
    Gemma-3 / Llama-like causal LM with its tokenizer) into ``out``, atomically, with its manifest."""
    import torch
    import transformers
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from core.io import atomic_dir

    if kind not in (BI_ENCODER, CROSS_ENCODER):
        raise RagError(f"unknown derived kind {kind!r}; allowed: {BI_ENCODER}, {CROSS_ENCODER}")
    source, out = Path(source), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_length  # Gemma's own is 32k; the trainers' flags override this default
    if tokenizer.pad_token_id is None:
        raise RagError(f"{source}: the tokenizer has no pad token; a batch cannot be padded")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new scoring head is reported as newly initialised: intended
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if kind == BI_ENCODER:
                model = AutoModel.from_pretrained(source, dtype=torch.float32, trust_remote_code=False)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=1, dtype=torch.float32, trust_remote_code=False)
                tokenizer.add_eos_token = True  # <eos> closes every pair: a fixed position to score
    finally:
        hf_logging.set_verbosity(level)
    truncate_layers(model, layers)
    model.config.pad_token_id = tokenizer.pad_token_id
    manifest = {
        "format_version": MANIFEST_VERSION, "kind": kind, "alias": alias, "derived_from": source.name,
        "source_weights_sha256": _weights_sha256(source), "source_layers": None, "layers": model.config.num_hidden_layers,
        "architecture": type(model).__name__, "pooling": "mean" if kind == BI_ENCODER else "last non-padding token",
        "padding_side": "right", "pad_token_id": tokenizer.pad_token_id,
        "appends_eos": kind == CROSS_ENCODER, "max_length": max_length, "seed": seed, "transformers": transformers.__version__,
        "built_by": "core/encoder_backbones.py",
    }
    manifest["source_layers"] = json.loads((source / "config.json").read_text()).get("num_hidden_layers")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".derive-") as tmp, atomic_dir(out, overwrite=True) as staging:
        if kind == BI_ENCODER:
            hf_dir = Path(tmp) / "hf"
            model.save_pretrained(hf_dir)
            tokenizer.save_pretrained(hf_dir)
            del model
            _save_sentence_transformer(hf_dir, staging, max_length)
        else:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def _save_sentence_transformer(hf_dir: Path, out: Path, max_length: int) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    encoder = Transformer(str(hf_dir), transformer_task="feature-extraction", max_seq_length=max_length)
    st = SentenceTransformer(modules=[encoder, Pooling(encoder.get_embedding_dimension(), "mean")], device="cpu")
    st.save(str(out))
