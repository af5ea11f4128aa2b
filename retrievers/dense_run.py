"""The run folder of a tuned dense retriever: what `rag train retriever --kind dense` writes, and loading it.

A run folder holds `dense_run.json` (base model, method, max sequence length, MoE config, the base's
embedding fingerprint) and the trained model: `model/`, a sentence-transformers folder (full, bitfit, lora:
retrievers/dense_export.py), or `peft/` (the trained parameters of the other methods) and, with MoE heads,
`moe.safetensors`.
Every encoder argument accepts such a folder (retrievers/encoders.py dispatches on `is_dense_run`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core.errors import RagError
from retrievers.fingerprint import embedding_fingerprint

RUN_META = "dense_run.json"
PEFT_DIR = "peft"
MOE_WEIGHTS = "moe.safetensors"
FORMAT_VERSION = 1  # base + peft/ (+ moe.safetensors): what the MoE loop writes
FORMAT_VERSIONS = (1, 2)  # 2: also "model", a sentence-transformers folder inside the run (full, bitfit, lora)


def load_base(encoder: str, device: str | None, max_seq_length: int | None):
    from sentence_transformers import SentenceTransformer

    from core.models import resolve_model

    st = SentenceTransformer(resolve_model(encoder), device=device, trust_remote_code=False)
    if max_seq_length:
        st.max_seq_length = max_seq_length
    return st


def load_dense_run(path: str | Path, device: str | None = None, **_: Any):
    """Base model + trained parts of a run folder: a SentenceTransformer, or a MoEEncoder."""
    from safetensors.torch import load_file

    from core.io import read_json
    from core.peft import load_peft
    from retrievers.moe import MoEConfig, MoEEncoder

    path = Path(path)
    meta = read_json(path / RUN_META)
    if meta.get("format_version") not in FORMAT_VERSIONS:
        raise RagError(f"{path / RUN_META}: unsupported format_version {meta.get('format_version')!r}")
    if meta.get("model"):  # a sentence-transformers folder (retrievers/dense_export.py)
        return _load_exported(path / meta["model"], device)
    if not (path / PEFT_DIR).exists():
        raise RagError(f"{path}: the run has no trained weights yet ({PEFT_DIR}/ is missing); did training finish?")
    st = load_base(meta["base_model"], device, meta.get("max_seq_length"))
    expected = meta.get("base_fingerprint")
    if expected is not None:
        got = embedding_fingerprint(st)
        if not np.allclose(got, expected, atol=2e-3):
            raise RagError(f"{path}: the base model {meta['base_model']!r} now embeds differently from the one this "
                           f"run was trained on (fingerprint {got[:3]} vs {expected[:3]}); point the run at its base")
    st = load_peft(st, path / PEFT_DIR)
    model = st
    if meta.get("moe"):
        model = MoEEncoder(st, MoEConfig(**meta["moe"])).to(st.device)
        model.load_moe_state_dict(load_file(str(path / MOE_WEIGHTS)))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _load_exported(folder: Path, device: str | None):
    from sentence_transformers import SentenceTransformer

    if not (folder / "modules.json").is_file():
        raise RagError(f"{folder}: the run's sentence-transformers folder is missing or incomplete (no modules.json)"
                       "; did training finish?")
    st = SentenceTransformer(str(folder), device=device, trust_remote_code=False)
    for p in st.parameters():
        p.requires_grad_(False)
    return st.eval()


def is_dense_run(path: str) -> bool:
    return (Path(path) / RUN_META).is_file()
