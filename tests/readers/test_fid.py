"""FiD over tiny bert2bert / T5 / BART: fusion, loss, answering, bad input, the denoising objective."""
from __future__ import annotations

import logging

import pytest
import torch

from readers.base import ReaderConfig, random_spans_mask
from readers.fid import FiDReader, pick_sentinels
from tests.readers.conftest import PASSAGES, build_seq2seq, passage

ARCHS = ["bert2bert", "t5", "bart"]


@pytest.fixture(params=ARCHS)
def reader(request, bert_tokenizer, small_config):
    return FiDReader(build_seq2seq(request.param, bert_tokenizer), bert_tokenizer, small_config)


def test_fusion_concatenates_separately_encoded_passages(reader):
    outputs, mask = reader.encode(["capital of France?"], [PASSAGES[:2]])
    singles = [reader.encode(["capital of France?"], [[p]]) for p in PASSAGES[:2]]
    expected = torch.cat([o.last_hidden_state[0, m[0].bool()] for o, m in singles])
    torch.testing.assert_close(outputs.last_hidden_state[0, mask[0].bool()], expected)
    assert int(mask.sum()) == sum(int(m.sum()) for _, m in singles)


def test_loss_backward_and_answers(reader):
    loss = reader.qa_loss(["capital of France?", "capital of Germany?"], [PASSAGES[:2], PASSAGES[1:]],
                          ["Paris", "Berlin"])
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in reader.model.parameters())
    answers = reader.answer(["capital of France?", "capital of Germany?"], [PASSAGES[:2], PASSAGES[1:3]])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_bert2bert_labels_drop_cls_and_end_with_sep(bert_tokenizer, small_config):
    r = FiDReader(build_seq2seq("bert2bert", bert_tokenizer), bert_tokenizer, small_config)
    ids = r.label_ids("Paris")
    assert ids[0] != bert_tokenizer.cls_token_id and ids[-1] == bert_tokenizer.sep_token_id
    assert r.decoder_start == bert_tokenizer.cls_token_id


def test_question_without_passages_is_answered_and_flagged(reader):
    out = reader.answer_with_meta(["capital of France?", "anything"], [PASSAGES[:1], []])
    assert out[1][1].get("no_passages") is True and "no_passages" not in out[0][1]
    assert isinstance(out[1][0], str)


def test_long_passages_are_truncated_and_counted(reader):
    long = passage("long#0", " ".join(["word"] * 2000))
    loss = reader.qa_loss(["q?"], [[long, PASSAGES[0]]], ["a"])
    assert torch.isfinite(loss)
    assert reader.stats["truncated_passages"] >= 1
    ids, _ = reader.denoising_pair(long)
    assert len(ids) <= reader.max_input


def test_missing_decoder_start_is_set_with_warning(bert_tokenizer, small_config, caplog):
    model = build_seq2seq("t5", bert_tokenizer)
    model.config.decoder_start_token_id = None
    model.generation_config.decoder_start_token_id = None
    with caplog.at_level(logging.WARNING):
        r = FiDReader(model, bert_tokenizer, small_config)
    assert "decoder start" in caplog.text and model.config.decoder_start_token_id is not None
    assert len(r.answer(["q?"], [PASSAGES[:1]])) == 1


def test_span_corruption_is_seeded_by_passage_key(bert_tokenizer, small_config):
    r = FiDReader(build_seq2seq("bert2bert", bert_tokenizer), bert_tokenizer, small_config)
    p = passage("k#1", "one two three four five six seven eight nine ten eleven twelve thirteen fourteen")
    assert r.denoising_pair(p) == r.denoising_pair(p)
    variants = {tuple(r.denoising_pair(passage(f"k#{i}", p.text))[0]) for i in range(8)}
    assert len(variants) > 1
    source, target = r.denoising_pair(p)
    mask_id = bert_tokenizer.mask_token_id
    assert mask_id in source and bert_tokenizer.convert_tokens_to_ids("[unused0]") == target[0]
    assert target[-1] == bert_tokenizer.sep_token_id


def test_sentinel_styles(bert_tokenizer):
    assert pick_sentinels(bert_tokenizer)[0] == "spans"

    class T5Like:
        mask_token, mask_token_id, unk_token_id = None, None, 2

        def get_vocab(self):
            return {f"<extra_id_{i}>": 100 + i for i in range(5)}

    class BartLike:
        mask_token, mask_token_id = "<mask>", 7

        def get_vocab(self):
            return {"<mask>": 7}

    style, inp, out = pick_sentinels(T5Like())
    assert style == "spans" and inp == out == [100, 101, 102, 103, 104]
    assert pick_sentinels(BartLike())[:2] == ("infill", [7])


@pytest.mark.parametrize("n", [1, 2, 5, 40, 128])
def test_random_spans_mask_density(n):
    import numpy as np
    mask = random_spans_mask(n, 0.15, 3.0, np.random.default_rng(0))
    assert mask.shape == (n,) and mask.sum() >= 1
    if n > 1:
        assert not mask.all() and not mask[0]


def test_passage_nll_per_passage(reader):
    nll = reader.passage_nll(PASSAGES)
    assert nll.shape == (3,) and torch.all(nll > 0)
    torch.testing.assert_close(reader.passage_nll(PASSAGES[1:2])[0], nll[1], rtol=1e-4, atol=1e-4)


def test_a_tiny_fid_reader_learns_to_copy(bert_tokenizer):
    torch.manual_seed(0)
    r = FiDReader(build_seq2seq("t5", bert_tokenizer), bert_tokenizer, ReaderConfig(max_passage_tokens=32,
                                                                                   max_answer_tokens=4))
    opt = torch.optim.Adam(r.model.parameters(), lr=1e-2)
    r.model.train()
    for _ in range(40):
        opt.zero_grad()
        r.qa_loss(["capital?"], [PASSAGES[:1]], ["paris"]).backward()
        opt.step()
    assert r.answer(["capital?"], [PASSAGES[:1]]) == ["paris"]
