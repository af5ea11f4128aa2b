"""PEFT on a tiny sentence-transformers encoder (written to a temp dir, no downloads)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from core.peft import apply_peft, count_parameters, load_peft, save_peft
from tests.core.peft.conftest import WIDTH, build_bert

TEXTS = ["w1 w2 w3 w4", "w5 w6"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import BertTokenizer
    out = tmp_path_factory.mktemp("tiny_st")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(out / "vocab.txt")).save_pretrained(out)
    build_bert().save_pretrained(out)
    return out


def load_st(model_dir: Path):
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    return SentenceTransformer(modules=[Transformer(str(model_dir)), Pooling(WIDTH)], device="cpu").eval()


def embed(model) -> torch.Tensor:
    return model(model.preprocess(TEXTS))["sentence_embedding"]


def test_iaa_on_sentence_transformer_starts_at_base_and_round_trips(model_dir, tmp_path):
    with torch.no_grad():
        base = embed(load_st(model_dir))
    model = apply_peft(load_st(model_dir), "iaa", r=4)
    with torch.no_grad():
        assert torch.equal(embed(model), base)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".peft_adapter." in n for n in names)
    assert count_parameters(model)["trainable_fraction"] < 1
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (embed(model) * torch.linspace(-1, 1, WIDTH)).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        trained = embed(model)
    save_peft(model, tmp_path)
    loaded = load_peft(load_st(model_dir), tmp_path)
    with torch.no_grad():
        assert torch.allclose(embed(loaded), trained, atol=1e-6)
        assert not torch.allclose(trained, base, atol=1e-6)


def test_prefix_on_sentence_transformer_runs_and_trains(model_dir):
    # Prefix tuning changes attention from the start, so only "runs and trains" is checked.
    model = apply_peft(load_st(model_dir), "prefix", num_virtual_tokens=3)
    assert isinstance(model[0].auto_model, PeftModel)
    emb = embed(model)
    assert emb.shape == (len(TEXTS), WIDTH)
    (emb * torch.linspace(-1, 1, WIDTH)).pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert len(grads) == 1 and grads[0].abs().sum() > 0
