"""A Gemma backbone as the re-ranker's base (`--base gemma-3-270m-L{N}`): the alias gives the last-token
cross-encoder folder (core/encoder_backbones.py), its `score` head trains beside a PEFT method and is saved
with it, and the run reloads to the same scores. A tiny random Gemma-3 stands in for the converted model."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from retrievers.rerank import RerankerTrainConfig, load_base_cross_encoder, load_reranker, train_reranker
from tests.core.test_encoder_backbones import _tiny_gemma
from tests.retrievers.dense_fixtures import write_toy_data


@pytest.fixture
def gemma_home(tmp_path, monkeypatch):
    import core.gemma

    source = _tiny_gemma(tmp_path / "src" / "gemma-3-270m")
    monkeypatch.setenv("RAG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(core.gemma, "gemma_path", lambda: str(source))
    return tmp_path / "home"


def test_gemma_alias_is_the_cross_encoder_folder(gemma_home):
    ce = load_base_cross_encoder("gemma-3-270m-L1", max_length=32, device="cpu")
    assert type(ce[0].model).__name__ == "Gemma3TextForSequenceClassification"
    assert len(ce[0].model.model.layers) == 1
    assert (gemma_home / "models" / "gemma-3-270m-L1-cross-encoder").is_dir()
    assert not (gemma_home / "models" / "gemma-3-270m-L1-bi-encoder").exists()  # the check builds nothing


def test_iaa_reranker_on_gemma_trains_its_head_and_reloads(gemma_home, tmp_path):
    data = write_toy_data(tmp_path / "data")
    config = RerankerTrainConfig(corpus=str(data["corpus"]), train=str(data["train"]), dev=None,
                                 base="gemma-3-270m-L1", peft="iaa", rank=4, max_steps=3, batch_size=2, lr=1e-2,
                                 negatives=2, negative_depth=10, max_length=48, words_per_passage=20, device="cpu")
    out = tmp_path / "run"
    metrics = train_reranker(config, out)
    start = load_base_cross_encoder("gemma-3-270m-L1", max_length=48, device="cpu")[0].model.score.weight
    head = load_file(str(out / "head.safetensors"))
    assert set(head) == {"hf.score.weight"} and not np.allclose(head["hf.score.weight"], start.detach())
    peft = load_file(str(out / "peft" / "peft_weights.safetensors"))
    assert peft and all(".peft_adapter." in n for n in peft)
    # trainable: D, U per layer-1 adapter (no C: first_c=drop) and the 32-wide 1-logit head
    assert metrics["trainable_params"] == 2 * 32 * 4 + 32
    pairs = [["what is the lion known for?", "Lion: The lion is a famous subject of animals."]]
    first = load_reranker(out).predict(pairs, convert_to_numpy=True)
    np.testing.assert_allclose(load_reranker(out).predict(pairs, convert_to_numpy=True), first, atol=1e-6)
    assert np.isfinite(first).all()
