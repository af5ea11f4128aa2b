"""The passage store (index/passages.py): format-2 round trip, random access, documents seen again, one-line
errors for damaged files, format-1 stores (docs.json) still read, and opening that reads nothing whole."""
from __future__ import annotations

import json
import logging
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from core.corpus import Passage
from core.errors import RagError
from index import passages as P
from index.manifest import FORMAT_VERSION, describe_files, read_manifest, verify_index
from index.passages import PassageStore, PassageStoreWriter, write_passage_store
from retrievers.bm25 import BM25Retriever, build_bm25_index


def _passages(n: int, per_doc: int = 3, domain: bool = True) -> list[Passage]:
    return [Passage(i, f"doc-{i // per_doc}", f"Titel {i // per_doc} é\u2028", f"text of passage {i} ü \"q\" {'x' * (i % 7)}",
                    f"dom{i % 2}" if domain else None) for i in range(n)]


def _as_row(p: Passage) -> dict:
    return {"pid": p.pid, "doc_id": p.doc_id, "title": p.title, "text": p.text, "domain": p.domain}


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks and merge buffers of a few entries, so small tests cross every buffer boundary."""
    monkeypatch.setattr(P, "CHUNK", 5)
    monkeypatch.setattr(P, "DOC_ROWS_BUFFER", 3)


@pytest.fixture
def store_dir(tmp_path) -> Path:
    folder = tmp_path / "store"
    write_passage_store(folder, _passages(40))
    return folder


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("chunked", [False, True])
def test_round_trip(tmp_path, chunked, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    written = _passages(23)
    counts = write_passage_store(tmp_path, written)
    assert counts == {"passages": 23, "documents": 8}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(P.STORE_FILES)
    with PassageStore(tmp_path, expected=23) as store:
        assert len(store) == 23 and store.n_docs == 8 and len(store.docs) == 8
        assert [store.get(i) for i in range(23)] == [_as_row(p) for p in written]
        assert list(store) == [_as_row(p) for p in written]
        docs = [{"id": f"doc-{d}", "title": f"Titel {d} é\u2028", "domain": f"dom{(3 * d) % 2}"} for d in range(8)]
        assert list(store.docs) == docs and store.docs[-1] == docs[-1] and store.docs[2:4] == docs[2:4]
        assert [store.doc_of(i) for i in range(23)] == [docs[i // 3] for i in range(23)]
        assert store.doc_rows(np.array([5, -1, 22])).tolist() == [1, -1, 7]
        assert store.get(-1) == _as_row(written[-1])
        with pytest.raises(IndexError):
            store.get(23)
        with pytest.raises(IndexError):
            store.docs[8]
        store.verify()
    # the arrays are plain .npy files of the right length and type
    assert np.load(tmp_path / P.OFFSETS).dtype == np.int64 and len(np.load(tmp_path / P.OFFSETS)) == 23
    assert np.load(tmp_path / P.PASSAGE_DOCS).tolist() == [i // 3 for i in range(23)]
    assert len(np.load(tmp_path / P.DOC_OFFSETS)) == 8


def test_empty_store(tmp_path):
    assert write_passage_store(tmp_path, []) == {"passages": 0, "documents": 0}
    with PassageStore(tmp_path, expected=0) as store:
        assert len(store) == 0 and len(store.docs) == 0 and list(store) == [] and list(store.docs) == []
        store.verify()


def test_random_access_equals_written(tmp_path, small_chunks):
    rng = np.random.default_rng(0)
    written = _passages(500, per_doc=7)
    write_passage_store(tmp_path, iter(written))
    store = PassageStore(tmp_path)
    order = rng.permutation(len(written))
    assert all(store.get(int(i)) == _as_row(written[i]) for i in order)
    assert all(store.doc_of(int(i))["id"] == written[i].doc_id for i in order)
    results: list[bool] = []

    def read(seed: int) -> None:  # pread: threads sharing one store do not disturb each other's reads
        ids = np.random.default_rng(seed).integers(0, len(written), 300)
        results.append(all(store.get(int(i)) == _as_row(written[i]) and store.doc_of(int(i))["id"] ==
                           written[i].doc_id for i in ids))

    threads = [threading.Thread(target=read, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4
    store.close()


def test_document_seen_again_keeps_its_row(tmp_path, small_chunks, monkeypatch):
    """Passages usually come grouped by document; a document that comes back after others keeps its first row
    (first title and domain), across the writer's buffers and with every id hashing alike."""
    ids = ["a", "b", "a", "c", "d", "e", "b", "f", "g", "a", "h", "c"]
    written = [Passage(i, doc, f"T-{doc}-{i}", f"t{i}") for i, doc in enumerate(ids)]
    assert write_passage_store(tmp_path / "s", written) == {"passages": 12, "documents": 8}
    with PassageStore(tmp_path / "s") as store:
        assert [d["id"] for d in store.docs] == ["a", "b", "c", "d", "e", "f", "g", "h"]
        assert [store.doc_of(i)["id"] for i in range(12)] == ids
        assert store.doc_of(9)["title"] == "T-a-0"
        assert store.get(9)["title"] == "T-a-9"  # the passage line keeps what it was given
    monkeypatch.setattr(P._DocRows, "key", staticmethod(lambda doc_id: 7))  # every id collides
    assert write_passage_store(tmp_path / "c", written) == {"passages": 12, "documents": 8}
    with PassageStore(tmp_path / "c") as store:
        assert [store.doc_of(i)["id"] for i in range(12)] == ids


def test_writer_holds_no_list_per_passage_or_document(tmp_path):
    writer = PassageStoreWriter(tmp_path)
    for p in _passages(3000, per_doc=2):
        writer.add(p)

    def sizes(obj, depth=0):
        for value in vars(obj).values():
            if isinstance(value, (list, dict, set, tuple)):
                yield len(value)
            elif depth < 1 and hasattr(value, "__dict__") and not isinstance(value, type):
                yield from sizes(value, depth + 1)

    assert max(sizes(writer)) < 100
    merged = 1500 // P.DOC_ROWS_BUFFER * P.DOC_ROWS_BUFFER  # 8 bytes per document, and the buffer
    assert writer._doc_rows.nbytes() == 8 * merged + 8 * P.DOC_ROWS_BUFFER
    assert writer.close() == {"passages": 3000, "documents": 1500}


def test_failed_write_leaves_nothing(tmp_path):
    def broken():
        yield from _passages(5)
        raise ValueError("corpus went away")

    with pytest.raises(ValueError, match="went away"):
        write_passage_store(tmp_path, broken())
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ opening reads nothing whole


def test_open_reads_no_file_whole(tmp_path, monkeypatch):
    folder = tmp_path / "big"
    write_passage_store(folder, _passages(12000, per_doc=1))
    assert (folder / P.DOCS).stat().st_size > 600_000 and (folder / P.PASSAGES).stat().st_size > 900_000

    def no_whole_reads(*_a, **_k):
        raise AssertionError("read whole")

    monkeypatch.setattr(P, "read_json", no_whole_reads)
    monkeypatch.setattr(Path, "read_text", no_whole_reads)
    monkeypatch.setattr(Path, "read_bytes", no_whole_reads)
    monkeypatch.setattr(json, "load", no_whole_reads)
    io_before = _rchar()
    tracemalloc.start()
    store = PassageStore(folder, expected=12000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    read = _rchar() - io_before if io_before is not None else None
    assert peak < 200_000, f"opening allocated {peak} bytes"
    if read is not None:
        assert read < 100_000, f"opening read {read} bytes"
    assert not any(isinstance(v, (list, dict)) and len(v) > 100 for v in vars(store).values())
    assert isinstance(store.offsets, np.memmap) and isinstance(store.doc_offsets, np.memmap)
    assert store.doc_of(11999)["id"] == "doc-11999"
    store.close()


def _rchar() -> int | None:
    try:
        for line in Path("/proc/self/io").open():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ------------------------------------------------------------------ damaged files: one-line errors naming them


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # np.save(path) would add .npy to a name without it
        np.save(fh, array)


@pytest.mark.parametrize("damage, file, message", [
    (lambda f: (f / P.DOCS).unlink(), P.DOCS, "missing"),
    (lambda f: (f / P.DOC_OFFSETS).unlink(), P.DOC_OFFSETS, "missing"),
    (lambda f: (f / P.PASSAGE_DOCS).unlink(), P.PASSAGE_DOCS, "missing"),
    (lambda f: _save(f / P.PASSAGE_DOCS, np.zeros(39, np.int32)), P.PASSAGE_DOCS, "39 rows for 40"),
    (lambda f: _save(f / P.PASSAGE_DOCS, np.full(40, 99, np.int32)), P.PASSAGE_DOCS, "row 99.*14 documents"),
    (lambda f: _save(f / P.PASSAGE_DOCS, np.zeros((40, 2), np.int32)), P.PASSAGE_DOCS, "shape"),
    (lambda f: _save(f / P.DOC_OFFSETS, np.arange(14) * 10**6), P.DOCS, "truncated"),
    (lambda f: _save(f / P.DOC_OFFSETS, np.arange(1, 15)), P.DOC_OFFSETS, "not 0"),
    (lambda f: _save(f / P.OFFSETS, np.arange(40, dtype=np.float32)), P.OFFSETS, "float32"),
    (lambda f: (f / P.DOCS).write_bytes((f / P.DOCS).read_bytes()[:-5]), P.DOCS, "truncated|cut off"),
    (lambda f: (f / P.DOC_OFFSETS).write_bytes((f / P.DOC_OFFSETS).read_bytes()[:-20]), P.DOC_OFFSETS,
     "unreadable"),
    (lambda f: (f / P.PASSAGES).write_bytes((f / P.PASSAGES).read_bytes()[:-1]), P.PASSAGES, "cut off"),
])
def test_damaged_store_refused_on_open(store_dir, damage, file, message):
    damage(store_dir)
    with pytest.raises(RagError, match=message) as err:
        PassageStore(store_dir)
    text = _one_line(err)
    assert str(store_dir / file) in text and "rebuild the index" in text


def test_bad_row_inside_is_caught_on_use_and_by_verify(store_dir):
    rows = np.load(store_dir / P.PASSAGE_DOCS)
    rows[17] = 1000
    _save(store_dir / P.PASSAGE_DOCS, rows)
    store = PassageStore(store_dir)  # open checks only the first and last rows
    with pytest.raises(RagError, match="passage 17 refers to document row 1000") as err:
        store.doc_of(17)
    assert str(store_dir / P.PASSAGE_DOCS) in _one_line(err)
    with pytest.raises(RagError, match="passage 17"):
        store.doc_rows(np.array([3, 17]))
    with pytest.raises(RagError, match="passage 17"):
        store.verify()


def test_garbled_lines_and_offsets_give_one_line_errors(store_dir):
    data = bytearray((store_dir / P.DOCS).read_bytes())
    data[1] = ord("#")
    (store_dir / P.DOCS).write_bytes(bytes(data))
    store = PassageStore(store_dir)
    with pytest.raises(RagError, match="document 0 .* not a JSON line") as err:
        store.doc(0)
    assert str(store_dir / P.DOCS) in _one_line(err)
    offsets = np.load(store_dir / P.OFFSETS)
    offsets[5] = offsets[4]
    _save(store_dir / P.OFFSETS, offsets)
    with pytest.raises(RagError, match="passage 5 does not start after") as err:
        PassageStore(store_dir).verify()
    assert str(store_dir / P.OFFSETS) in _one_line(err)


# ------------------------------------------------------------------ format 1 (docs.json) still reads


def _to_format_1(folder: Path) -> list[dict]:
    with PassageStore(folder) as store:
        docs = list(store.docs)
    (folder / P.LEGACY_DOCS).write_text(json.dumps(docs, indent=2))
    (folder / P.DOCS).unlink()
    (folder / P.DOC_OFFSETS).unlink()
    return docs


def test_format_1_store_still_opens_with_a_warning(store_dir, caplog):
    docs = _to_format_1(store_dir)
    P._warned.clear()
    with caplog.at_level(logging.WARNING, logger="index.passages"):
        stores = [PassageStore(store_dir, expected=40) for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records if "format 1" in r.getMessage()]
    assert len(warnings) == 1 and "rebuild the index" in warnings[0]
    store = stores[0]
    assert store.legacy and list(store.docs) == docs and len(store.docs) == 14
    assert store.doc_of(39) == docs[13] and store.doc_rows([0, 39]).tolist() == [0, 13]
    store.verify()
    (store_dir / P.LEGACY_DOCS).write_text("{}")
    with pytest.raises(RagError, match="expected a JSON list") as err:
        PassageStore(store_dir)
    _one_line(err)
    (store_dir / P.LEGACY_DOCS).write_text(json.dumps(docs[:5]))
    with pytest.raises(RagError, match="refers to document row 13, but docs.json holds 5") as err:
        PassageStore(store_dir)
    _one_line(err)


def test_format_1_bm25_index_still_retrieves(small_corpus, tmp_path):
    out = tmp_path / "bm25"
    manifest = build_bm25_index(small_corpus, out)
    assert manifest["format_version"] == FORMAT_VERSION == 2
    assert {P.DOCS, P.DOC_OFFSETS} <= set(manifest["files"]) and P.LEGACY_DOCS not in manifest["files"]
    queries = ["capital of France", "photosynthesis in plants", "cat pet"]
    before = BM25Retriever(out).retrieve(queries, k=3)
    _to_format_1(out)
    old = json.loads((out / "manifest.json").read_text())
    old["format_version"] = 1
    old["files"] = describe_files(out)
    (out / "manifest.json").write_text(json.dumps(old))
    assert read_manifest(out)["format_version"] == 1
    assert BM25Retriever(out).retrieve(queries, k=3) == before
    assert verify_index(out)["ok"]


def test_verify_index_scans_the_rows(small_corpus, tmp_path):
    out = tmp_path / "bm25"
    build_bm25_index(small_corpus, out)
    rows = np.load(out / P.PASSAGE_DOCS)
    assert len(rows) > 2
    rows[1] = 10**6
    _save(out / P.PASSAGE_DOCS, rows)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"] = describe_files(out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    BM25Retriever(out)  # opening checks only the first and last rows
    report = verify_index(out)
    assert not report["ok"] and any("passage 1 refers to document row 1000000" in p for p in report["problems"])


def test_stores_dropped_or_closed_release_their_files(store_dir):
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc")
    before = len(list(fd_dir.iterdir()))
    for _ in range(20):
        PassageStore(store_dir).get(3)  # dropped without close()
    assert len(list(fd_dir.iterdir())) == before
    store = PassageStore(store_dir)
    store.close()
    store.close()
    with pytest.raises(RagError, match="closed") as err:
        store.get(0)
    _one_line(err)
