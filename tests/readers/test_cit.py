"""CIT: λ = 0 is plain training, the hinge and its gradient, the ℓ0 cache, and the toy task."""
from __future__ import annotations

import json

import pytest
import torch

from core.errors import RagError
from readers.base import ReaderConfig
from readers.causal import CausalReader
from readers.cit import CITConfig, CITObjective, ReferenceNLL, cit_penalty
from readers.fid import FiDReader
from tests.readers.conftest import PASSAGES, build_causal, build_seq2seq

QS = ["capital of France?", "capital of Germany?"]
PS = [PASSAGES[:2], PASSAGES[1:]]
ANS = ["Paris", "Berlin"]


def make(kind, tok, seed=0, dropout=True):
    cfg = ReaderConfig(max_passage_tokens=40, max_answer_tokens=8, cit_proxy="passage")  # whole-passage proxy
    if kind == "fid":
        return FiDReader(build_seq2seq("bert2bert", tok, seed), tok, cfg)
    return CausalReader(build_causal("gpt2", tok, seed), tok, cfg)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["fid", "causal"])
def test_lambda_zero_gradients_equal_plain_training(kind, bert_tokenizer):
    plain, cit = make(kind, bert_tokenizer), make(kind, bert_tokenizer)
    plain.model.train(), cit.model.train()
    objective = CITObjective(cit, ReferenceNLL(cit), CITConfig(weight=0.0, margin=0.0))
    torch.manual_seed(7)
    plain.qa_loss(QS, PS, ANS).backward()
    torch.manual_seed(7)
    loss, logs = objective(QS, PS, ANS)
    loss.backward()
    g_plain, g_cit = grads(plain.model), grads(cit.model)
    assert g_plain.keys() == g_cit.keys()
    for name in g_plain:
        torch.testing.assert_close(g_cit[name], g_plain[name], rtol=0, atol=0)
    assert set(logs) == {"loss_qa"}  # nothing of CIT is computed or logged with λ = 0


def test_penalty_zero_then_positive_with_gradient():
    ref = torch.tensor([5.0, 5.0])
    theta = torch.tensor([4.8, 6.0], requires_grad=True)  # 4.8 ≥ 5 - 0.5: inside the margin
    pen = cit_penalty(theta, ref, margin=0.5)
    pen.backward()
    assert float(pen.detach()) == 0.0 and torch.all(theta.grad == 0)
    theta = torch.tensor([4.0, 6.0], requires_grad=True)  # 4.0 < 4.5: penalised
    pen = cit_penalty(theta, ref, margin=0.5)
    pen.backward()
    assert float(pen.detach()) == pytest.approx(0.25) and theta.grad.tolist() == [-0.5, 0.0]


def test_reader_term_zero_until_the_reader_beats_the_reference(bert_tokenizer):
    reader = make("fid", bert_tokenizer)
    objective = CITObjective(reader, ReferenceNLL(reader), CITConfig(weight=1.0, margin=0.1))
    reader.model.train()
    loss, logs = objective(QS, PS, ANS)
    assert logs["loss_cit"] == 0.0 and logs["nll_theta"] == pytest.approx(logs["nll_ref"], rel=1e-5)
    # train on the passages themselves until ℓθ < ℓ0 - m
    opt = torch.optim.Adam(reader.model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        reader.passage_nll(PASSAGES).mean().backward()
        opt.step()
    reader.model.zero_grad()
    loss, logs = objective(QS, PS, ANS)
    assert logs["loss_cit"] > 0 and logs["nll_theta"] < logs["nll_ref"] - 0.1
    theta, ref = objective.passage_terms(PASSAGES)
    cit_penalty(theta, ref, 0.1).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in reader.model.parameters())


def test_reference_is_computed_once_per_passage_and_cached(tmp_path, bert_tokenizer):
    reader = make("fid", bert_tokenizer)
    path = tmp_path / "cit_reference.json"
    reference = ReferenceNLL(reader, path)
    first = reference(PASSAGES[:2])
    again = reference(PASSAGES)
    assert reference.frozen_calls == 3
    torch.testing.assert_close(again[:2], first)
    # the reference stays the initial reader's even after the reader trains
    opt = torch.optim.SGD(reader.model.parameters(), lr=1.0)
    reader.passage_nll(PASSAGES).mean().backward()
    opt.step()
    torch.testing.assert_close(reference(PASSAGES), again)
    reference.save()
    saved = json.loads(path.read_text())
    assert set(saved["nll"]) == {p.key for p in PASSAGES}
    reloaded = ReferenceNLL(make("fid", bert_tokenizer), path)
    torch.testing.assert_close(reloaded(PASSAGES), again)
    assert reloaded.frozen_calls == 0
    other = make("fid", bert_tokenizer)
    other.config.noise_density = 0.3  # another objective: the cache is refused, naming what differs
    with pytest.raises(RagError, match="differs in noise_density"):
        ReferenceNLL(other, path)


@pytest.mark.parametrize("kind", ["fid", "causal"])
def test_toy_task_cit_holds_passage_nll_near_reference(kind, bert_tokenizer):
    """Answers copied from the passages: plain QA training lowers the passage NLL; CIT holds it at ℓ0 - m."""
    margin, steps = 0.3, 30
    questions = ["what does it say?", "and this one?"]
    passages = [[PASSAGES[0]], [PASSAGES[1]]]
    answers = [PASSAGES[0].text, PASSAGES[1].text]
    results = {}
    for weight in (0.0, 20.0):
        reader = make(kind, bert_tokenizer)
        reader.config.max_answer_tokens = 24
        objective = CITObjective(reader, ReferenceNLL(reader), CITConfig(weight=weight, margin=margin))
        objective.reference(passages[0] + passages[1])  # ℓ0 before training (full tuning: no adapter to switch off)
        opt = torch.optim.Adam(reader.model.parameters(), lr=3e-3)
        reader.model.train()
        torch.manual_seed(0)
        for _ in range(steps):
            opt.zero_grad()
            loss, logs = objective(questions, passages, answers)
            loss.backward()
            opt.step()
        _, logs = CITObjective(reader, objective.reference, CITConfig(1.0, margin))(questions, passages, answers)
        results[weight] = logs
    plain, cit = results[0.0], results[20.0]
    assert plain["nll_theta"] < plain["nll_ref"] - 3 * margin          # plain training falls well below
    assert cit["nll_theta"] > cit["nll_ref"] - margin - 0.25           # CIT stays near ℓ0 - m
    assert cit["nll_theta"] > plain["nll_theta"] + margin
