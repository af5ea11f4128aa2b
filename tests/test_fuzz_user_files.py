"""Fuzz every reader of user files: random bytes, random JSON values (nested, wrong types, unicode with lone
surrogates written as escapes such as "\\ud800") and mutations of valid files (valid-looking rows with one field
broken, duplicated or dropped rows, truncated or re-encoded bytes).

The property, for every reader: a RagError whose message names the file, or a valid result; never another
exception. Readers: core.corpus (validate_corpus, Corpus.load), core.tasks.load_queries, eval.kilt.evaluate_kilt
(gold and guess files), index.manifest.read_manifest, core.config.load_config_file (YAML and JSON) and
rag.swap.config.load_swap_config.

Inputs that once broke a reader are kept as explicit @example cases on their tests, so they stay fixed.

The examples are derandomized (the same ones every run, so the suite is not flaky); RAG_FUZZ_RANDOM=1 draws new
ones each run and RAG_FUZZ_EXAMPLES=N draws N per test (e.g. 2000 for a long hunt).
"""
from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from core.errors import RagError
from tests.conftest import SMALL_DOCS, SMALL_QUERIES

FUZZ = settings(max_examples=int(os.environ.get("RAG_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                derandomize=not os.environ.get("RAG_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------- strategies

NASTY_TEXT = ["", " ", "\n", "\t", "\x00", "a\x00b", "\ud800", "\udfff", "x\ud83d", "\ud83d\ude00", "\u2028", "\ufeff",
              "é", "1", "1.0", "-1", "null", "true", "[]", "{}", "id", "\\", '"', "x" * 200]
NASTY_VALUES = [None, True, False, 0, -1, 1, 1.0, 1.5, -0.0, 2 ** 63, 2 ** 64 + 1, float("nan"), float("inf"),
                float("-inf"), [], {}, [None], [[]], {"": None}, {"id": None}, [{"wikipedia_id": None}],
                *NASTY_TEXT]

text = st.one_of(st.text(st.characters(exclude_categories=()), max_size=10), st.sampled_from(NASTY_TEXT))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=12)
nasty = st.one_of(st.sampled_from(NASTY_VALUES), json_values)


def dumps(value: Any, ascii_only: bool = True) -> bytes:
    """JSON as a user's tool writes it: NaN/Infinity allowed; a lone surrogate as an escape ("\\ud800"), or, with
    ascii_only=False, as the invalid UTF-8 bytes a careless encoder produces."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")


def _slots(obj: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) of a row, nested ones included: the places a mutation may break."""
    found: list[tuple[Any, Any]] = []
    stack = [obj]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in list(items):
            found.append((node, key))
            stack.append(value)
    return found


@st.composite
def mutated_rows(draw: Callable[..., Any], bases: list[list[dict[str, Any]]]) -> list[Any]:
    """Valid rows with one (sometimes two) thing broken: a field set to a wrong value, a field dropped or added, a
    row duplicated or replaced by another JSON value."""
    rows: list[Any] = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["set", "set", "set", "set", "delete", "add", "duplicate", "replace"]))
        i = draw(st.integers(0, len(rows) - 1))
        if kind == "duplicate":
            rows.insert(i, copy.deepcopy(rows[i]))
            continue
        if kind == "replace":
            rows[i] = copy.deepcopy(draw(nasty))   # never a shared NASTY_VALUES object: a later mutation would change it
            continue
        slots = _slots(rows[i])
        if not slots:
            continue
        container, key = draw(st.sampled_from(slots))
        if kind == "set":
            container[key] = copy.deepcopy(draw(nasty))
        elif kind == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[draw(text)] = copy.deepcopy(draw(nasty))
        else:
            container.append(copy.deepcopy(draw(nasty)))
    return rows


@st.composite
def jsonl_bytes(draw: Callable[..., Any], rows_strategy: st.SearchStrategy[list[Any]]) -> bytes:
    """Rows as JSONL, sometimes damaged as bytes: truncated, a byte inserted, a BOM, CRLF, blank lines, two rows on
    one line, invalid UTF-8 for a lone surrogate."""
    rows = draw(rows_strategy)
    ascii_only = draw(st.booleans())
    lines = [dumps(r, ascii_only) for r in rows]
    data = b"\n".join(lines) + b"\n"
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "insert", "bom", "crlf", "blank", "join"]))
    if damage == "truncate":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif damage == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=2)) + data[at:]
    elif damage == "bom":
        data = b"\xef\xbb\xbf" + data
    elif damage == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif damage == "blank":
        data = b"\n  \n" + data.replace(b"\n", b"\n\n")
    elif damage == "join" and len(lines) > 1:
        data = lines[0] + b" " + b"\n".join(lines[1:]) + b"\n"
    return data


random_jsonl = st.one_of(st.binary(max_size=300),
                         jsonl_bytes(st.lists(json_values, min_size=1, max_size=4)),
                         st.lists(json_values, max_size=3).map(lambda rows: b"\n".join(dumps(r) for r in rows)))
random_document = st.one_of(st.binary(max_size=300), json_values.map(dumps),
                            st.text(st.sampled_from("{}[]:,-&*!|>'\"#%@ \n\tabxy01.~"), max_size=120)
                            .map(lambda t: t.encode("utf-8")))


# --------------------------------------------------------------------------- valid files to start from

CORPUS_BASES = [
    copy.deepcopy(SMALL_DOCS[:3]),
    [{"id": "a1", "title": "A", "text": "alpha", "domain": "x",
      "anchors": [{"text": "alpha", "title": "B", "paragraph": 0, "start": 0, "end": 5, "wikipedia_id": "b1"}]},
     {"id": 7, "title": "B", "text": "beta"}],
    [{"wikipedia_id": "k1", "wikipedia_title": "Kilt", "text": ["Kilt", "A kilt is a garment.", "More."]},
     {"wikipedia_id": "k2", "wikipedia_title": "Tartan", "text": ["Tartan", "A pattern."]}],
    [{"id": "p1", "contents": "Title line\nbody text"}, {"id": "p2", "contents": "just text"}],
    [{"_id": "b1", "title": "Beir", "text": "beir text"}, {"_id": "b2", "title": "Two", "text": "second"}],
]
TASK_BASES = [copy.deepcopy(SMALL_QUERIES),
              [{"id": 1, "input": "q one", "meta": {"domain": "d"}}, {"id": "2", "input": "q two", "output": []}]]
GUESS_BASES = [[{"id": q["id"], "input": q["input"], "output": [{"answer": "Paris", "provenance": [
    {"wikipedia_id": "d1", "title": "Paris", "score": 2.0, "text": "Paris is"},
    {"wikipedia_id": "d4", "title": "Dog", "score": 1.0}]}]} for q in SMALL_QUERIES],
               [{"id": q["id"], "output": [{"provenance": [{"wikipedia_id": "d5", "score": 1.0}]}]} for q in SMALL_QUERIES]]
MANIFEST_BASE = {"kind": "bm25", "format_version": 1, "config": {"k1": 1.5, "b": 0.75}, "docs": 6, "passages": 6,
                 "corpus": "corpus.jsonl", "checksum": "sha256:00", "versions": {"bm25s": "0.2"},
                 "created": "2025-01-01T00:00:00Z"}
CONFIG_BASE = {"lr": 0.001, "max_steps": 10, "batch_size": 8, "peft": "lora", "ks": [1, 5], "device": "cpu",
               "nested": {"a": [1, 2, {"b": None}]}}


def names_file(exc: RagError, *paths: Path) -> None:
    message = str(exc)
    assert any(str(p) in message for p in paths), f"the error does not name the file: {message!r}"


def _finite_unit(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1


# --------------------------------------------------------------------------- core.corpus

def check_corpus(path: Path, data: bytes) -> None:
    from core.corpus import Corpus, validate_corpus

    path.write_bytes(data)
    try:
        count = validate_corpus(path)
    except RagError as exc:
        names_file(exc, path)
        count = None
    try:
        corpus = Corpus.load(path)
    except RagError as exc:
        names_file(exc, path)
        assert count is None, "validate_corpus accepted a corpus that Corpus.load refuses"
        return
    assert count == len(corpus) >= 1
    ids = [d.id for d in corpus]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) and i.strip() == i and i for i in ids)
    for doc in corpus:
        assert isinstance(doc.title, str) and isinstance(doc.text, str)
        json.dumps(doc.to_json(), ensure_ascii=False).encode("utf-8")   # can be written back


@FUZZ
@given(data=random_jsonl)
def test_corpus_random(work, data):
    check_corpus(work / "corpus.jsonl", data)


@FUZZ
@given(data=jsonl_bytes(mutated_rows(CORPUS_BASES)))
def test_corpus_mutated(work, data):
    check_corpus(work / "corpus.jsonl", data)


# --------------------------------------------------------------------------- core.tasks

def check_queries(path: Path, data: bytes) -> None:
    from core.tasks import load_queries

    path.write_bytes(data)
    try:
        queries = load_queries(path)
    except RagError as exc:
        names_file(exc, path)
        return
    assert len({q.id for q in queries}) == len(queries)   # an empty list: see test_empty_file_is_refused
    for q in queries:
        assert isinstance(q.id, str) and q.id and isinstance(q.text, str) and q.text.strip()
        json.dumps({"id": q.id, "input": q.text}, ensure_ascii=False).encode("utf-8")


@FUZZ
@given(data=random_jsonl)
def test_queries_random(work, data):
    check_queries(work / "queries.jsonl", data)


@FUZZ
@given(data=jsonl_bytes(mutated_rows(TASK_BASES)))
def test_queries_mutated(work, data):
    check_queries(work / "queries.jsonl", data)


@FUZZ
@given(domain=nasty)
@example(domain=True)
def test_queries_domain_is_text_or_refused(work, domain):
    from core.tasks import load_queries

    path = work / "queries-domain.jsonl"
    path.write_bytes(dumps({"id": "q1", "input": "a question", "meta": {"domain": domain}}) + b"\n")
    try:
        queries = load_queries(path)
    except RagError as exc:
        names_file(exc, path)
        return
    assert queries[0].domain is None or isinstance(queries[0].domain, str), f"domain {queries[0].domain!r}"


# --------------------------------------------------------------------------- eval.kilt

def check_kilt(work: Path, gold: bytes, guesses: bytes) -> None:
    from eval.kilt import evaluate_kilt

    gold_path, guess_path = work / "gold.jsonl", work / "guesses.jsonl"
    gold_path.write_bytes(gold)
    guess_path.write_bytes(guesses)
    try:
        result = evaluate_kilt(guess_path, gold_path, ks=(1, 5))
    except RagError as exc:
        names_file(exc, gold_path, guess_path)
        return
    assert isinstance(result["n"], int) and result["n"] >= 1
    for section in ("retrieval", "downstream", "kilt"):
        for name, value in (result.get(section) or {}).items():
            assert _finite_unit(value), f"{section}.{name} = {value!r}"


VALID_GOLD = b"".join(dumps(r) + b"\n" for r in SMALL_QUERIES)
VALID_GUESSES = b"".join(dumps(r) + b"\n" for r in GUESS_BASES[0])


@FUZZ
@given(gold=random_jsonl, guesses=st.one_of(st.just(VALID_GUESSES), random_jsonl))
def test_kilt_random(work, gold, guesses):
    check_kilt(work, gold, guesses)


@FUZZ
@given(which=st.sampled_from(["gold", "guesses"]), gold=jsonl_bytes(mutated_rows(TASK_BASES[:1])),
       guesses=jsonl_bytes(mutated_rows(GUESS_BASES)))
def test_kilt_mutated(work, which, gold, guesses):
    if which == "gold":
        check_kilt(work, gold, VALID_GUESSES)
    else:
        check_kilt(work, VALID_GOLD, guesses)


# --------------------------------------------------------------------------- index.manifest

def check_manifest(work: Path, data: bytes, kind: str | None) -> None:
    from index.manifest import MANIFEST, read_manifest

    folder = work / "index"
    folder.mkdir(exist_ok=True)
    (folder / MANIFEST).write_bytes(data)
    try:
        manifest = read_manifest(folder, kind)
    except RagError as exc:
        names_file(exc, folder)
        return
    assert isinstance(manifest, dict)
    if kind is not None:
        assert manifest.get("kind") == kind


@FUZZ
@given(data=random_document, kind=st.sampled_from([None, "bm25"]))
@example(data=b"null", kind=None)
@example(data=b"[1, 2]", kind="bm25")
@example(data=b"\x80", kind=None)
def test_manifest_random(work, data, kind):
    check_manifest(work, data, kind)


@FUZZ
@given(rows=mutated_rows([[MANIFEST_BASE]]), kind=st.sampled_from([None, "bm25"]))
@example(rows=[{**MANIFEST_BASE, "format_version": None}], kind=None)
@example(rows=[{**MANIFEST_BASE, "format_version": "1"}], kind="bm25")
def test_manifest_mutated(work, rows, kind):
    check_manifest(work, dumps(rows[0] if len(rows) == 1 else rows), kind)


# --------------------------------------------------------------------------- core.config

def check_config_file(path: Path, data: bytes) -> None:
    from core.config import load_config_file

    path.write_bytes(data)
    try:
        config = load_config_file(path)
    except RagError as exc:
        names_file(exc, path)
        return
    assert isinstance(config, dict)


def _as_yaml(value: Any) -> bytes:
    try:
        return yaml.safe_dump(value, allow_unicode=False).encode("utf-8")
    except (yaml.YAMLError, UnicodeError):
        return dumps(value)


@FUZZ
@given(data=random_document, suffix=st.sampled_from([".yaml", ".yml", ".json", ".cfg"]))
def test_config_file_random(work, data, suffix):
    check_config_file(work / f"config{suffix}", data)


@FUZZ
@given(rows=mutated_rows([[CONFIG_BASE]]), suffix=st.sampled_from([".yaml", ".json"]))
def test_config_file_mutated(work, rows, suffix):
    value = rows[0] if len(rows) == 1 else rows
    check_config_file(work / f"config{suffix}", _as_yaml(value) if suffix == ".yaml" else dumps(value))


# --------------------------------------------------------------------------- rag.swap.config (this suite's own)

def _swap_base(work: Path) -> dict[str, Any]:
    corpus = work / "swap-data" / "original" / "corpus.jsonl"
    task = work / "swap-data" / "dev.jsonl"
    if not task.exists():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_bytes(b"".join(dumps(r) + b"\n" for r in SMALL_DOCS))
        task.write_bytes(VALID_GOLD)
    return {
        "name": "fuzz", "k": 5, "ks": [1, 5], "metrics": ["Rprec", "recall@5"], "max_retries": 1, "workers": 0,
        "corpora": {
            "original": {"path": str(corpus.parent), "label": "orig"},
            "perturb": {"derive": {"from": "original", "transform": "perturb", "seed": 0}, "baseline": "original"},
            "sub": {"derive": {"from": "original", "transform": "subsample", "sample": 2, "keep_gold": True},
                    "baseline": "original", "optional": False, "tasks": ["dev"]},
        },
        "tasks": {"dev": {"path": str(task), "corpus": "original", "limit": 2}},
        "models": {"bm25": {"kind": "bm25", "method": "none", "k": 5},
                   "minilm": {"kind": "dense", "encoder": "minilm", "num_cpus": 1, "batch_size": 8, "options": {}}},
    }


def check_swap_config(path: Path, data: bytes) -> None:
    from rag.swap.config import SwapConfig, load_swap_config

    path.write_bytes(data)
    try:
        config = load_swap_config(path)
    except RagError as exc:
        names_file(exc, path)
        assert "\n" not in str(exc), f"not one line: {exc!s}"
        return
    assert isinstance(config, SwapConfig) and config.models and config.k >= 1 and all(k >= 1 for k in config.ks)


@FUZZ
@given(data=random_document, suffix=st.sampled_from([".yaml", ".json"]))
@example(data=b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
              b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
              b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n", suffix=".yaml")
@example(data=b"loop: &l [1, *l]\n", suffix=".yaml")
@example(data=b'name: "\\ud800"\n', suffix=".yaml")
@example(data=b"[" * 50_000, suffix=".json")
@example(data=b'{"\\n"}', suffix=".yaml")
@example(data=b'{"\\ud800\\u2028": 1}', suffix=".json")
def test_swap_config_random(work, data, suffix):
    check_swap_config(work / f"swap{suffix}", data)


@FUZZ
@given(data=st.data(), suffix=st.sampled_from([".yaml", ".json"]))
def test_swap_config_mutated(work, data, suffix):
    base = _swap_base(work)
    rows = data.draw(mutated_rows([[base]]))
    value = rows[0] if len(rows) == 1 else rows
    check_swap_config(work / f"swap{suffix}", _as_yaml(value) if suffix == ".yaml" else dumps(value))


# --------------------------------------------------------------------------- every reader: JSON nested too deeply

def _nested(depth: int, row: bool) -> bytes:
    inner = b"[" * depth + b"]" * depth
    return (b'{"id": "a", "input": "q", "title": "t", "text": ' + inner + b"}\n") if row else inner + b"\n"


def _read_nested(reader: str, work: Path, data: bytes) -> None:
    if reader == "corpus":
        check_corpus(work / "corpus-deep.jsonl", data)
    elif reader == "queries":
        check_queries(work / "queries-deep.jsonl", data)
    elif reader == "kilt-gold":
        check_kilt(work, data, VALID_GUESSES)
    elif reader == "kilt-guesses":
        check_kilt(work, VALID_GOLD, data)
    elif reader == "manifest":
        check_manifest(work, data, None)
    elif reader == "config":   # JSON only: yaml.safe_load takes ~40 s on 200 KB of "[" (see the report)
        check_config_file(work / "config-deep.json", data)
    else:
        check_swap_config(work / "swap-deep.json", data)
        check_swap_config(work / "swap-deep.yaml", data)


NESTED_READERS = [
    "corpus",
    "queries",
    "kilt-gold",
    "kilt-guesses",
    "manifest",
    "config",
    "swap",
]


@pytest.mark.parametrize("reader", NESTED_READERS)
@settings(FUZZ, max_examples=8)
@given(depth=st.integers(1, 400), row=st.booleans())
@example(depth=100_000, row=False)
@example(depth=100_000, row=True)
def test_deeply_nested_json(work, reader, depth, row):
    _read_nested(reader, work, _nested(depth, row))


# --------------------------------------------------------------------------- every reader: an empty file

def _read_empty(reader: str, work: Path, data: bytes) -> None:
    from core.corpus import Corpus
    from core.tasks import load_queries
    from eval.kilt import evaluate_kilt
    from index.manifest import MANIFEST, read_manifest
    from rag.swap.config import load_swap_config

    path = work / f"empty-{reader}.{'yaml' if reader == 'swap' else 'jsonl'}"
    path.write_bytes(data)
    calls: dict[str, Callable[[], Any]] = {
        "corpus": lambda: Corpus.load(path), "queries": lambda: load_queries(path),
        "kilt-gold": lambda: evaluate_kilt(work / "guesses-ok.jsonl", path), "swap": lambda: load_swap_config(path)}
    (work / "guesses-ok.jsonl").write_bytes(VALID_GUESSES)
    if reader == "manifest":
        (work / "empty-index").mkdir(exist_ok=True)
        path = work / "empty-index" / MANIFEST
        path.write_bytes(data)
        calls["manifest"] = lambda: read_manifest(path.parent)
    with pytest.raises(RagError) as info:
        calls[reader]()
    names_file(info.value, path)


EMPTY_READERS = [
    "corpus",
    "queries",
    "kilt-gold", "manifest", "swap",
]


@pytest.mark.parametrize("reader", EMPTY_READERS)
@settings(FUZZ, max_examples=6)
@given(data=st.sampled_from([b"", b"\n", b"  \n\t\n", b"\r\n", b"\xef\xbb\xbf"]))
@example(data=b"")
def test_empty_file_is_refused(work, reader, data):
    _read_empty(reader, work, data)
