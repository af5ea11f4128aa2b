"""CIT with the masked-salient-span proxy: what is scored, skipped passages, λ = 0, the reference without a copy."""
from __future__ import annotations

import json

import pytest
import torch

from core.errors import RagError
from readers.base import ReaderConfig
from readers.causal import CausalReader
from readers.cit import CITConfig, CITObjective, ReferenceNLL, cit_penalty
from readers.cloze import salient_spans
from readers.fid import FiDReader
from tests.readers.conftest import build_causal, build_seq2seq, passage

SPANNY = [passage("s1#0", "The treaty was signed in 1648 by Maria Theresa and 312 delegates in the town hall.", "Peace"),
          passage("s2#0", "In 1889 the tower was opened; it is 330 metres tall and was built by Gustave Eiffel.",
                  "Tower")]
NO_SPAN = passage("n1#0", "the cat sat on the mat and looked at the dog for a while.", "cat")


def make(tok, arch="llama", proxy="span", seed=0, **kw):
    return CausalReader(build_causal(arch, tok, seed), tok, ReaderConfig(max_passage_tokens=48, max_answer_tokens=8,
                                                                         cit_proxy=proxy, **kw))


def test_salient_spans_are_ordered_and_disjoint():
    spans = salient_spans(SPANNY[0].text, SPANNY[0].title)
    assert [s[2] for s in spans] == ["1648", "Maria Theresa", "312"]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert salient_spans(NO_SPAN.text) == []
    assert len(salient_spans(SPANNY[0].text, max_spans=2)) == 2


def test_span_proxy_scores_only_span_tokens_averaged_per_span(bert_tokenizer):
    """Hand computation: the blanked passage, then `(i) span` lines; mean over spans of the span tokens' NLL."""
    reader = make(bert_tokenizer)
    p = SPANNY[0]
    spans = ["1648", "Maria Theresa", "312"]
    masked = "The treaty was signed in ____ (1) by ____ (2) and ____ (3) delegates in the town hall."
    row = reader.bos + reader.tokens(f"{p.title}: {masked}", None, None)
    span_positions = []
    for i, s in enumerate(spans, 1):
        row += reader.tokens(f"\n({i})", None, None)
        target = reader.tokens(f" {s}", None, None)
        span_positions.append(list(range(len(row), len(row) + len(target))))
        row += target
    ids, span_of = reader.span_inputs(p)
    assert ids == row
    assert [[t for t, s in enumerate(span_of) if s == i] for i in range(3)] == span_positions
    with torch.no_grad():
        logp = torch.log_softmax(reader.model(input_ids=torch.tensor([row])).logits[0].float(), -1)
        per_span = [-torch.stack([logp[t - 1, row[t]] for t in pos]).mean() for pos in span_positions]
        expected = torch.stack(per_span).mean()
        got = reader.passage_nll([p, SPANNY[1]])  # batched with a second passage (padding)
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got).all()
    assert reader.denoising_objective() == "masked-salient-span"


def test_span_proxy_cut_to_max_passage_tokens(bert_tokenizer):
    reader = make(bert_tokenizer)
    reader.config.max_passage_tokens = 8  # "Peace: The treaty was signed in 1648" at most
    ids, span_of = reader.span_inputs(SPANNY[0])
    assert max(span_of) == 0  # only the first span survives the cut


def test_passage_without_span_is_skipped_and_counted(bert_tokenizer):
    reader = make(bert_tokenizer)
    nll = reader.passage_nll([NO_SPAN, SPANNY[0]])
    assert torch.isnan(nll[0]) and torch.isfinite(nll[1])
    assert reader.stats["cit_no_span_passages"] == 1
    assert torch.isnan(reader.passage_nll([NO_SPAN])).all()  # all skipped: no forward, no crash
    objective = CITObjective(reader, ReferenceNLL(reader), CITConfig(weight=1.0))
    reader.model.train()
    loss, logs = objective(["q?", "r?"], [[NO_SPAN], [SPANNY[0]]], ["a", "b"])
    assert torch.isfinite(loss) and logs["cit_skipped"] == 1.0 and objective.skipped == {NO_SPAN.key}
    loss.backward()
    loss, logs = objective(["q?"], [[NO_SPAN]], ["a"])  # nothing to hold: QA loss only, no crash
    assert torch.isfinite(loss) and logs["loss_cit"] == 0.0 and logs["cit_active"] == 0.0


def test_lambda_zero_computes_and_logs_nothing_of_cit(bert_tokenizer, monkeypatch):
    reader = make(bert_tokenizer)

    def boom(*args, **kwargs):
        raise AssertionError("CIT computed with λ = 0")

    monkeypatch.setattr(ReferenceNLL, "__call__", boom)
    monkeypatch.setattr(CausalReader, "passage_nll", boom)
    objective = CITObjective(reader, None, CITConfig(weight=0.0))
    loss, logs = objective(["q?"], [SPANNY], ["1648"])
    assert set(logs) == {"loss_qa"} and torch.isfinite(loss)
    with pytest.raises(RagError):
        CITObjective(reader, None, CITConfig(weight=1.0))


def test_relative_margin():
    ref = torch.tensor([10.0, 10.0])
    theta = torch.tensor([9.6, 9.0])
    assert float(cit_penalty(theta, ref, 0.0, 0.05)) == pytest.approx((9.5 - 9.0) / 2)
    assert float(cit_penalty(theta, ref, 0.0, 0.0)) == pytest.approx((0.4 + 1.0) / 2)


@pytest.mark.parametrize("method", ["lora", "iaa"])
def test_adapters_off_reference_is_the_base_models_likelihood(bert_tokenizer, method):
    from core.peft import apply_peft

    reader = make(bert_tokenizer)
    with torch.no_grad():
        base = reader.passage_nll(SPANNY)
    reference = ReferenceNLL(reader)  # fingerprint of the base weights; no copy of the model
    reader.model = apply_peft(reader.model, method)
    trainable = {n for n, p in reader.model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in reader.model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        opt.zero_grad()
        reader.passage_nll(SPANNY).mean().backward()
        opt.step()
    with torch.no_grad():
        moved = reader.passage_nll(SPANNY)
    assert (moved - base).abs().max() > 1e-3
    torch.testing.assert_close(reference(SPANNY), base.float(), rtol=1e-5, atol=1e-5)
    assert reference.frozen_calls == 2
    # the adapters are back on, with their trainable flags
    assert {n for n, p in reader.model.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        torch.testing.assert_close(reader.passage_nll(SPANNY), moved)


def test_full_tuning_reference_is_precomputed_then_frozen(bert_tokenizer):
    reader = make(bert_tokenizer)
    with torch.no_grad():
        base = reader.passage_nll(SPANNY)
    reference = ReferenceNLL(reader)
    assert reference.precompute(SPANNY + SPANNY[:1]) == 2
    reference.freeze()
    opt = torch.optim.SGD(reader.model.parameters(), lr=1.0)
    reader.passage_nll(SPANNY).mean().backward()
    opt.step()
    torch.testing.assert_close(reference(SPANNY), base.float())
    with pytest.raises(RagError, match="not precomputed"):
        reference([passage("x#1", "Founded in 1901 by Louis Pasteur.", "X")])


def test_cached_reference_for_another_proxy_or_model_is_refused(tmp_path, bert_tokenizer):
    path = tmp_path / "cit_reference.json"
    reader = make(bert_tokenizer)
    reference = ReferenceNLL(reader, path)
    reference(SPANNY + [NO_SPAN])
    reference.save()
    saved = json.loads(path.read_text())
    assert saved["nll"][NO_SPAN.key] is None and saved["signature"]["proxy"] == "span"
    again = ReferenceNLL(make(bert_tokenizer), path)  # same model, same proxy: reused
    again(SPANNY)
    assert again.frozen_calls == 0
    with pytest.raises(RagError, match=r"proxy span .* proxy passage .*differs in.*proxy"):
        ReferenceNLL(make(bert_tokenizer, proxy="passage"), path)
    with pytest.raises(RagError, match=r"weights sha256:.*weights sha256:"):
        ReferenceNLL(make(bert_tokenizer, seed=1), path)


def test_bad_cit_input_is_one_line(bert_tokenizer):
    from readers.train import ReaderTrainConfig

    with pytest.raises(RagError, match="--cit-weight"):
        CITConfig(weight=-1.0)
    with pytest.raises(RagError, match="--cit-margin: expected a finite number, got 'abc'"):
        CITConfig(weight=1.0, margin="abc")  # type: ignore[arg-type]
    with pytest.raises(RagError, match="--cit-margin-relative"):
        CITConfig(weight=1.0, margin_relative=1.0)
    with pytest.raises(RagError, match="cit-weight"):
        ReaderTrainConfig(cit_weight=-0.5)
    with pytest.raises(RagError, match="cit-proxy"):
        ReaderTrainConfig(cit_proxy="tokens")
    fid = FiDReader(build_seq2seq("bert2bert", bert_tokenizer), bert_tokenizer, ReaderConfig(cit_proxy="span"))
    with pytest.raises(RagError, match="--cit-proxy span: the fid reader implements passage"):
        fid.cit_proxy()
    assert "\n" not in str(pytest.raises(RagError, CITConfig, weight=float("nan")).value)
