"""The decoder-only reader on tiny GPT-2 / Llama: answer-only loss, prompts that fit, bad input."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from readers.base import ReaderConfig
from readers.causal import CausalReader
from tests.readers.conftest import PASSAGES, build_causal, passage


@pytest.fixture(params=["gpt2", "llama"])
def reader(request, bert_tokenizer, small_config):
    return CausalReader(build_causal(request.param, bert_tokenizer), bert_tokenizer, small_config)


def test_loss_counts_only_answer_tokens(reader):
    q, ps = "capital of France?", PASSAGES[:2]
    prompt, target = reader._prompt(q, ps), reader._answer_ids("Paris")
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logp = torch.log_softmax(reader.model(input_ids=ids).logits[0].float(), -1)
        expected = -torch.stack([logp[len(prompt) + i - 1, t] for i, t in enumerate(target)]).mean()
        loss = reader.qa_loss([q], [ps], ["Paris"])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)


def test_answers_with_left_padding(reader):
    answers = reader.answer(["capital of France?", "q"], [PASSAGES[:2], PASSAGES[2:]])
    assert len(answers) == 2 and all("\n" not in a for a in answers)


def test_passage_nll_is_next_token_nll(reader):
    p = PASSAGES[0]
    ids = reader.tokens(f"{p.title}: {p.text}", None, None)
    row = reader.bos + ids
    with torch.no_grad():
        logp = torch.log_softmax(reader.model(input_ids=torch.tensor([row])).logits[0].float(), -1)
        nll = reader.next_token_nll([p])[0]
    start = len(reader.bos) or 1
    expected = -torch.stack([logp[i - 1, row[i]] for i in range(start, len(row))]).mean()
    torch.testing.assert_close(nll, expected, rtol=1e-4, atol=1e-4)


def test_missing_pad_token_uses_eos_with_warning(bert_tokenizer, small_config, caplog):
    tok = copy.deepcopy(bert_tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    with caplog.at_level(logging.WARNING):
        r = CausalReader(build_causal("gpt2", tok), tok, small_config)
    assert "no pad token" in caplog.text and r.pad_id == r.eos_id == tok.sep_token_id
    assert len(r.answer(["a?", "longer question here?"], [PASSAGES[:1], PASSAGES[:2]])) == 2


def test_prompt_fits_the_model_positions(bert_tokenizer):
    r = CausalReader(build_causal("gpt2", bert_tokenizer, positions=96), bert_tokenizer,
                     ReaderConfig(max_passage_tokens=200, max_answer_tokens=8))
    long = [passage(f"l#{i}", " ".join(["token"] * 500)) for i in range(3)]
    assert len(r._prompt("q?", long)) + 8 <= 96
    assert r.stats["truncated_passages"] == 3
    assert torch.isfinite(r.qa_loss(["q?"], [long], ["yes"]))
    assert len(r.answer(["q?"], [long])) == 1


def test_no_passages_flagged(reader):
    out = reader.answer_with_meta(["q?"], [[]])
    assert out[0][1]["no_passages"] is True


def test_batched_loss_with_kept_logits_equals_full_logits(reader):
    """Logits only at answer positions (logits_to_keep) give the same loss as the full logits, padded batch."""
    qs, pss, answers = ["capital of France?", "a much longer question about the city of Berlin?"], \
        [PASSAGES[:2], PASSAGES[1:]], ["Paris", "Berlin the capital"]
    total, count = 0.0, 0
    with torch.no_grad():
        for q, ps, a in zip(qs, pss, answers):
            prompt, target = reader._prompt(q, ps), reader._answer_ids(a)
            logp = torch.log_softmax(reader.model(input_ids=torch.tensor([prompt + target])).logits[0].float(), -1)
            total -= sum(float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(target))
            count += len(target)
        kept = reader.qa_loss(qs, pss, answers)
        reader._keeps_logits = False
        full = reader.qa_loss(qs, pss, answers)
    torch.testing.assert_close(kept, torch.tensor(total / count), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full, kept, rtol=1e-5, atol=1e-5)
