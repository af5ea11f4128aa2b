"""Gemma backbones for the PEFT studies (core/encoder_backbones.py): the aliases resolve offline to derived
folders (a mean-pooled bi-encoder; a last-token cross-encoder), truncated to N layers, which plain
sentence-transformers loads. A tiny random Gemma-3 with the packaged MiniLM tokenizer stands in for the
converted Gemma-3-270M (monkeypatched core.gemma.gemma_path); one slow test derives from the real one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.encoder_backbones import MANIFEST, backbone_layers, build_derived, cross_encoder_path
from core.errors import RagError
from core.models import resolve_model

SOURCE_LAYERS = 3
WIDTH = 32


def _tiny_gemma(folder: Path) -> Path:
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=64,
                           num_hidden_layers=SOURCE_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           max_position_embeddings=128, sliding_window=16, pad_token_id=tok.pad_token_id)
    Gemma3ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    return _tiny_gemma(tmp_path_factory.mktemp("gemma-src") / "gemma-3-270m")


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_source) -> Path:
    import core.gemma

    monkeypatch.setenv("RAG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(core.gemma, "gemma_path", lambda: str(tiny_source))
    return tmp_path / "home"


TEXTS = ["What is the capital of France?", "Paris is the capital and largest city of France, on the Seine.", "cat"]


def test_alias_names():
    assert backbone_layers("gemma-3-270m") == (True, None)
    assert backbone_layers("gemma-3-270m-L6") == (True, 6)
    assert backbone_layers("minilm") == (False, None)
    with pytest.raises(RagError, match="18 decoder layers"):
        backbone_layers("gemma-3-270m-L19")


@pytest.mark.parametrize("alias, layers", [("gemma-3-270m-L2", 2), ("gemma-3-270m", SOURCE_LAYERS)])
def test_bi_encoder_alias_resolves_offline_to_a_truncated_mean_pooled_folder(home, alias, layers):
    from sentence_transformers import SentenceTransformer

    path = Path(resolve_model(alias))
    assert path.parent == home / "models" and path.name == f"{alias}-bi-encoder"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["derived_from"] == "gemma-3-270m" and manifest["layers"] == layers
    assert manifest["source_layers"] == SOURCE_LAYERS and manifest["pooling"] == "mean"
    assert len(manifest["source_weights_sha256"]) == 64
    stamp = (path / MANIFEST).stat().st_mtime_ns
    assert resolve_model(alias) == str(path) and (path / MANIFEST).stat().st_mtime_ns == stamp  # built once
    st = SentenceTransformer(str(path), device="cpu")
    model = st[0].auto_model
    assert type(model).__name__ == "Gemma3TextModel" and len(model.layers) == layers
    assert model.config.num_hidden_layers == layers and len(model.config.layer_types) == layers
    vectors = st.encode(TEXTS, convert_to_numpy=True)
    assert vectors.shape == (3, WIDTH) and np.isfinite(vectors).all()
    # right padding: a text's vector does not depend on the longer texts of its batch
    alone = st.encode(TEXTS[2:], convert_to_numpy=True)
    np.testing.assert_allclose(alone[0], vectors[2], atol=1e-5)


def test_truncation_keeps_the_first_layers_exactly(home, tiny_source):
    """The L2 model is the source's first two layers then Gemma's final norm: its output is the final norm of
    the full model's hidden state after layer 2."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    st = SentenceTransformer(resolve_model("gemma-3-270m-L2"), device="cpu")
    batch = st[0].tokenizer(TEXTS[:1], return_tensors="pt")
    full = AutoModel.from_pretrained(tiny_source).eval()
    with torch.no_grad():
        ours = st[0].auto_model(**batch).last_hidden_state
        theirs = full.norm(full(**batch, output_hidden_states=True).hidden_states[2])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_cross_encoder_folder_scores_the_last_token(home):
    from sentence_transformers import CrossEncoder

    path = Path(cross_encoder_path(1))
    assert path.name == "gemma-3-270m-L1-cross-encoder"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["kind"] == "cross-encoder" and manifest["layers"] == 1 and manifest["padding_side"] == "right"
    ce = CrossEncoder(str(path), device="cpu")
    model = ce[0].model
    assert type(model).__name__ == "Gemma3TextForSequenceClassification" and len(model.model.layers) == 1
    assert model.score.out_features == 1 and model.config.pad_token_id is not None
    pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[0], TEXTS[2])]
    scores = ce.predict(pairs, convert_to_numpy=True, activation_fn=torch.nn.Identity())
    assert scores.shape == (2,) and np.isfinite(scores).all()
    alone = ce.predict(pairs[1:], convert_to_numpy=True, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(alone[0], scores[1], atol=1e-5)


def test_derived_folders_load_in_plain_sentence_transformers(home):
    """A fresh interpreter that imports only sentence-transformers loads both folders; no toolkit module."""
    bi, ce = resolve_model("gemma-3-270m-L1"), cross_encoder_path(1)
    code = ("import json, sys; from sentence_transformers import SentenceTransformer, CrossEncoder; "
            f"v = SentenceTransformer({bi!r}, device='cpu').encode(['a cat'], convert_to_numpy=True); "
            f"s = CrossEncoder({ce!r}, device='cpu').predict([('q', 'a cat')]); "
            "own = sorted({m.split('.')[0] for m in sys.modules} & {'core', 'retrievers', 'readers', 'rag', 'index', 'eval'}); "
            "print(json.dumps([list(v.shape), bool((v == v).all()), float(s[0]), own]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/",
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    shape, finite, score, own = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shape == [1, WIDTH] and finite and np.isfinite(score) and own == []


def test_build_refuses_an_unknown_kind(tmp_path, tiny_source):
    with pytest.raises(RagError, match="unknown derived kind"):
        build_derived(tiny_source, tmp_path / "x", "poly-encoder")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("placement, adapters", [("block", 2), ("houlsby", 4)])
def test_iaa_adapts_the_gemma_bi_encoder(home, placement, adapters):
    """sentence-transformers calls the saved folder's model `forward` directly (past the owner's hooks): the
    chain is still bounded by the first and last layers' hooks, and a trained chain changes the vectors."""
    from sentence_transformers import SentenceTransformer

    from core.peft import apply_peft, count_parameters

    st = SentenceTransformer(resolve_model("gemma-3-270m-L2"), device="cpu")
    with torch.no_grad():
        base = st.encode(TEXTS, convert_to_tensor=True)
    st = apply_peft(st, "iaa", r=4, placement=placement)
    assert count_parameters(st)["trainable_params"] == adapters * 2 * WIDTH * 4 + (adapters - 1) * 4 * 4
    with torch.no_grad():
        torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), base, rtol=0, atol=1e-6)
        for p in st.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
        first = st.encode(TEXTS, convert_to_tensor=True)
        assert not torch.allclose(first, base, atol=1e-4)
        torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), first, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_real_gemma_l1_backbone(tmp_path, monkeypatch):
    """The packaged Gemma-3-270M (converted folder of this machine's model cache), its first layer only."""
    from sentence_transformers import SentenceTransformer

    from core.gemma import gemma_cache_dir

    source = gemma_cache_dir()
    if not (source / "config.json").exists():
        pytest.skip("the packaged Gemma-3-270M is not converted on this machine (run a Gemma command once)")
    import core.gemma

    monkeypatch.setenv("RAG_HOME", str(tmp_path))
    monkeypatch.setattr(core.gemma, "gemma_path", lambda: str(source))
    st = SentenceTransformer(resolve_model("gemma-3-270m-L1"), device="cpu")
    assert len(st[0].auto_model.layers) == 1
    vectors = st.encode(TEXTS, convert_to_numpy=True)
    assert vectors.shape == (3, 640) and np.isfinite(vectors).all()
