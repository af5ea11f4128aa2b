"""Shared fixtures: offline hub, small real corpora, and the packaged MiniLM."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")

import pytest  # noqa: E402

SMALL_DOCS = [
    {"id": "d1", "title": "Paris", "text": "Paris is the capital and largest city of France, on the Seine.", "domain": "Geography"},
    {"id": "d2", "title": "Berlin", "text": "Berlin is the capital of Germany and its most populous city.", "domain": "Geography"},
    {"id": "d3", "title": "Cat", "text": "The cat is a small domesticated carnivorous mammal kept as a pet.", "domain": "Biology"},
    {"id": "d4", "title": "Dog", "text": "The dog is a domesticated descendant of the wolf, bred by humans.", "domain": "Biology"},
    {"id": "d5", "title": "Python (programming language)", "text": "Python is a high-level programming language "
     "emphasising code readability, created by Guido van Rossum.", "domain": "Technology"},
    {"id": "d6", "title": "Photosynthesis", "text": "Photosynthesis converts light energy into chemical energy "
     "in plants, algae and some bacteria. " + " ".join(f"filler{i}" for i in range(150)), "domain": "Biology"},
]

SMALL_QUERIES = [
    {"id": "q1", "input": "What is the capital of France?", "output": [{"answer": "Paris",
     "provenance": [{"wikipedia_id": "d1", "title": "Paris"}]}]},
    {"id": "q2", "input": "Which language did Guido van Rossum create?", "output": [{"answer": "Python",
     "provenance": [{"wikipedia_id": "d5", "title": "Python (programming language)"}]}]},
    {"id": "q3", "input": "domesticated wolf descendant", "output": [{"answer": "dog",
     "provenance": [{"wikipedia_id": "d4", "title": "Dog"}]}]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "corpus" / "corpus.jsonl", SMALL_DOCS)


@pytest.fixture
def small_queries(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "queries.jsonl", SMALL_QUERIES)


@pytest.fixture(scope="session")
def minilm():
    from retrievers.encoders import load_encoder
    return load_encoder("minilm", device="cpu")
