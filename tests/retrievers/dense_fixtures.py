"""Tiny sentence-transformers encoders, a stable fake embedding model and a toy corpus with domains, shared by the
dense-training and dense-build tests."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

TOPICS = {
    "Animals": ["lion", "tiger", "eagle", "shark", "wolf", "horse", "whale", "snake"],
    "Cities": ["paris", "london", "tokyo", "berlin", "madrid", "rome", "cairo", "lima"],
    "Sports": ["football", "tennis", "golf", "boxing", "rugby", "cricket", "hockey", "skiing"],
}
FACTS = ["is known for", "was described by", "appears in", "is related to", "is studied in"]


def toy_corpus_rows() -> list[dict]:
    rows = []
    for t, (topic, names) in enumerate(TOPICS.items()):
        for i, name in enumerate(names):
            other = names[(i + 3) % len(names)]
            text = (f"The {name} is a famous subject of {topic.lower()}. The {name} {FACTS[i % 5]} many old books "
                    f"about {topic.lower()}. People compare the {name} with the {other}. Number {t}{i} marks it.")
            rows.append({"id": f"{topic[:2].lower()}{i}", "title": name.capitalize(), "text": text, "domain": topic})
    return rows


def toy_questions(split: str) -> list[dict]:
    rows = []
    for topic, names in TOPICS.items():
        for i, name in enumerate(names):
            if (split == "dev") != (i % 4 == 3):
                continue
            rows.append({"id": f"{split}-{topic}-{i}", "input": f"what is the {name} known for in {topic.lower()}?",
                         "output": [{"answer": name, "provenance": [{"wikipedia_id": f"{topic[:2].lower()}{i}",
                                                                     "title": name.capitalize()}]}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_toy_data(folder: Path) -> dict[str, Path]:
    return {"corpus": write_jsonl(folder / "corpus" / "corpus.jsonl", toy_corpus_rows()),
            "train": write_jsonl(folder / "train.jsonl", toy_questions("train")),
            "dev": write_jsonl(folder / "dev.jsonl", toy_questions("dev"))}


def build_tiny_st(out: Path, hidden: int = 32, layers: int = 2, seed: int = 0, dropout: float = 0.1) -> Path:
    """A randomly initialised 2-layer BERT with the packaged MiniLM tokenizer, saved as an ST folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from core.models import resolve_model

    torch.manual_seed(seed)
    hf = out.parent / (out.name + "-hf")
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    BertModel(cfg).save_pretrained(hf)
    tok.save_pretrained(hf)
    st = SentenceTransformer(modules=[Transformer(str(hf), max_seq_length=64), Pooling(hidden), Normalize()],
                             device="cpu")
    st.save(str(out))
    return out


class StableModel:
    """Hashed bag-of-words embeddings seeded by crc32 (not `hash`), so every Ray worker agrees; `device` as asked."""

    def __init__(self, dim: int = 16, device: str = "cpu") -> None:
        self.dim, self.device, self.casts = dim, device, []

    def get_embedding_dimension(self) -> int:
        return self.dim

    def to(self, dtype):  # what a cast in place does to a torch module: returns itself
        self.casts.append(str(dtype))
        return self

    def encode(self, texts, batch_size=32, normalize_embeddings=True, **_):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i] += np.random.default_rng(zlib.crc32(word.encode())).standard_normal(self.dim)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def stable_encoder():
    from retrievers.encoders import DenseEncoder
    return DenseEncoder(StableModel(), "fake")
