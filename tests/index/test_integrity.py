"""Index integrity: manifests record every file's size and sha256, opening checks sizes and counts,
verify_index checks checksums, shards are durable and re-encoded when torn, and bad configs are refused
before anything is encoded."""
from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError, ManifestMismatch, RagError
from core.io import output_lock
from index import manifest as manifest_mod
from index.faiss_index import FaissIndex
from index.manifest import read_manifest, verify_index
from retrievers import DenseRetriever, open_retriever
from retrievers.bm25 import BM25Retriever, build_bm25_index
from retrievers.dense_build import (
    DenseBuildConfig,
    build_dense_index,
    encode_missing_shards,
    probe_factory,
    shard_path,
    shard_problem,
    staging_dir,
)
from retrievers.encoders import DenseEncoder
from tests.index.test_dense_index import FakeModel, fake_encoder


@pytest.fixture
def dense(small_corpus, tmp_path) -> Path:
    out = tmp_path / "dense"
    build_dense_index(small_corpus, out, DenseBuildConfig(shard_size=2), encoder=fake_encoder())
    return out


@pytest.fixture
def bm25(small_corpus, tmp_path) -> Path:
    out = tmp_path / "bm25"
    build_bm25_index(small_corpus, out)
    return out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _edit_manifest(folder: Path, **changes) -> None:
    data = _manifest(folder)
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    (folder / "manifest.json").write_text(json.dumps(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------ the manifest records files


def test_manifest_records_size_and_sha256_of_every_file(dense, bm25):
    for folder in (dense, bm25):
        files = _manifest(folder)["files"]
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
        assert set(files) == on_disk
        for name, record in files.items():
            assert record["size"] == (folder / name).stat().st_size
            assert record["sha256"] == manifest_mod.file_sha256(folder / name)
    assert "index.faiss" in _manifest(dense)["files"]
    assert any(name.startswith("bm25s/") for name in _manifest(bm25)["files"])
    assert verify_index(dense)["ok"] and verify_index(bm25)["ok"]


def test_file_sha256_streams_in_blocks(tmp_path):
    import hashlib
    path = tmp_path / "big.bin"
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)
    path.write_bytes(data)
    assert manifest_mod.file_sha256(path) == "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("name", ["index.faiss", "passages.jsonl"])
def test_flipped_byte_caught_by_verify_index(dense, name):
    path = dense / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify_index(dense)
    assert not report["ok"]
    assert report["files"][name] == "checksum"
    assert any(name in problem and "sha256" in problem for problem in report["problems"])
    assert all(status == "ok" for other, status in report["files"].items() if other != name)


def test_verify_index_reports_missing_truncated_and_unrecorded(bm25):
    victim = next(name for name in _manifest(bm25)["files"] if name.startswith("bm25s/"))
    (bm25 / victim).unlink()
    _truncate(bm25 / "passages.jsonl")
    (bm25 / "stray.txt").write_text("x")
    report = verify_index(bm25)
    assert not report["ok"]
    assert report["files"][victim] == "missing" and report["files"]["passages.jsonl"] == "size"
    assert report["unrecorded"] == ["stray.txt"]


# ------------------------------------------------------------------ opening checks sizes and counts


def test_truncated_index_faiss_refused_on_open_naming_it(dense):
    _truncate(dense / "index.faiss")
    with pytest.raises(RagError, match=r"index\.faiss.*bytes, the manifest records") as err:
        DenseRetriever(dense, encoder=fake_encoder())
    _one_line(err)


@pytest.mark.parametrize("name", ["passages.jsonl", "passage_offsets.npy", "passage_docs.npy", "docs.jsonl",
                                  "doc_offsets.npy"])
def test_truncated_passage_files_refused_on_open_naming_them(dense, bm25, name):
    for folder, opener in ((dense, lambda: DenseRetriever(dense, encoder=fake_encoder())),
                           (bm25, lambda: BM25Retriever(bm25))):
        _truncate(folder / name)
        with pytest.raises(RagError, match=name.replace(".", r"\.")) as err:
            opener()
        _one_line(err)


def test_missing_file_refused_on_open(bm25):
    victim = next(name for name in _manifest(bm25)["files"] if name.startswith("bm25s/"))
    (bm25 / victim).unlink()
    with pytest.raises(RagError, match=f"{victim}: missing"):
        open_retriever(bm25)


@pytest.mark.parametrize("name", ["index.faiss", "passages.jsonl", "passage_offsets.npy", "passage_docs.npy",
                                  "docs.jsonl", "doc_offsets.npy"])
def test_old_index_without_files_still_checked_by_content(dense, name, caplog):
    """An index from before `files` opens with one warning; damaged files still give an error naming them."""
    _edit_manifest(dense, files=...)
    manifest_mod._warned.clear()
    with caplog.at_level(logging.WARNING, logger="index.manifest"):
        DenseRetriever(dense, encoder=fake_encoder())
        DenseRetriever(dense, encoder=fake_encoder())
    warnings = [r for r in caplog.records if "records no file sizes" in r.getMessage()]
    assert len(warnings) == 1, "warned once"
    _truncate(dense / name, 0.9)
    with pytest.raises(RagError, match=name.replace(".", r"\.")) as err:
        DenseRetriever(dense, encoder=fake_encoder())
    _one_line(err)
    assert not verify_index(dense)["ok"]


def test_old_bm25_index_with_missing_bm25s_files_names_them(bm25):
    _edit_manifest(bm25, files=...)
    for path in sorted((bm25 / "bm25s").iterdir()):
        path.unlink()
    with pytest.raises(RagError, match="bm25s.*cannot load") as err:
        BM25Retriever(bm25)
    _one_line(err)


def test_manifest_of_another_index_refused(small_corpus, tmp_path, dense):
    other = tmp_path / "other"
    build_dense_index(small_corpus, other, DenseBuildConfig(words_per_passage=20, stride=10), encoder=fake_encoder())
    assert _manifest(other)["counts"]["passages"] != _manifest(dense)["counts"]["passages"]
    shutil.copy(other / "manifest.json", dense / "manifest.json")
    with pytest.raises(RagError, match="bytes, the manifest records"):
        DenseRetriever(dense, encoder=fake_encoder())
    _edit_manifest(dense, files=...)  # even without file records, the counts disagree
    with pytest.raises(RagError, match="manifest counts"):
        DenseRetriever(dense, encoder=fake_encoder())


def test_index_faiss_of_another_dimension_refused(small_corpus, tmp_path, dense):
    other = tmp_path / "other"
    build_dense_index(small_corpus, other, encoder=DenseEncoder(FakeModel(dim=8), "fake8"))
    shutil.copy(other / "index.faiss", dense / "index.faiss")
    with pytest.raises(RagError, match=r"index\.faiss"):
        DenseRetriever(dense, encoder=fake_encoder())
    _edit_manifest(dense, files=...)
    with pytest.raises(RagError, match=r"index\.faiss: holds 8-dimensional vectors, the manifest says 16"):
        DenseRetriever(dense, encoder=fake_encoder())


def test_index_faiss_with_other_count_refused_without_file_records(small_corpus, tmp_path, dense):
    other = tmp_path / "other"
    build_dense_index(small_corpus, other, DenseBuildConfig(words_per_passage=20, stride=10), encoder=fake_encoder())
    shutil.copy(other / "index.faiss", dense / "index.faiss")
    _edit_manifest(dense, files=...)
    with pytest.raises(RagError, match=r"index\.faiss: holds \d+ vectors, the manifest counts \d+ passages"):
        DenseRetriever(dense, encoder=fake_encoder())


# ------------------------------------------------------------------ the manifest's own schema


@pytest.mark.parametrize("change, key", [
    ({"kind": ...}, "kind"),
    ({"format_version": ...}, "format_version"),
    ({"format_version": "1"}, "format_version"),
    ({"format_version": True}, "format_version"),
    ({"format_version": 0}, "format_version"),
    ({"files": ["index.faiss"]}, "files"),
    ({"kind": 3}, "kind"),
])
def test_bad_manifest_schema_refused_in_one_line(dense, change, key):
    _edit_manifest(dense, **change)
    for opener in (lambda: read_manifest(dense), lambda: open_retriever(dense, encoder=fake_encoder())):
        with pytest.raises(InputError) as err:
            opener()
        text = _one_line(err)
        assert str(dense) in text and f"'{key}'" in text


def test_newer_format_refused(dense):
    _edit_manifest(dense, format_version=99)
    with pytest.raises(ManifestMismatch, match="newer toolkit"):
        read_manifest(dense)


def test_bad_file_record_refused(dense):
    data = _manifest(dense)
    data["files"]["index.faiss"]["size"] = "12"
    (dense / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"files\.index\.faiss\.size"):
        read_manifest(dense)
    data["files"] = {"../escape": {"size": 1, "sha256": "sha256:00"}}
    (dense / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="not a relative path"):
        read_manifest(dense)


@pytest.mark.parametrize("missing", ["encoder_fingerprint", "dim", "faiss", "counts"])
def test_dense_manifest_missing_key_refused(dense, missing):
    _edit_manifest(dense, **{missing: ...})
    with pytest.raises(InputError, match=missing) as err:
        DenseRetriever(dense, encoder=fake_encoder())
    _one_line(err)


def test_kind_edited_refused_in_one_line(dense, bm25):
    _edit_manifest(dense, kind="bm25")
    with pytest.raises(InputError, match="config") as err:
        open_retriever(dense)
    _one_line(err)
    _edit_manifest(bm25, kind="dense")
    with pytest.raises(InputError, match="encoder") as err:
        open_retriever(bm25)
    _one_line(err)


def test_bm25_config_with_unknown_option_refused(bm25):
    data = _manifest(bm25)
    data["config"]["k3"] = 1
    (bm25 / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="k3"):
        BM25Retriever(bm25)


def test_version_differences_logged_once(dense, caplog):
    data = _manifest(dense)
    data["versions"]["numpy"] = "0.0.1"
    (dense / "manifest.json").write_text(json.dumps(data))
    manifest_mod._warned.clear()
    with caplog.at_level(logging.WARNING, logger="index.manifest"):
        DenseRetriever(dense, encoder=fake_encoder())
        DenseRetriever(dense, encoder=fake_encoder())
    messages = [r.getMessage() for r in caplog.records if "other package versions" in r.getMessage()]
    assert len(messages) == 1 and "numpy 0.0.1 (index)" in messages[0]


# ------------------------------------------------------------------ shards: durable, checked on resume


def _interrupted_build(corpus: Path, out: Path, config: DenseBuildConfig, encoder: DenseEncoder) -> Path:
    def dying_encode(staging, cfg):
        def on_shard(shard):
            if shard == 1:
                raise KeyboardInterrupt("killed mid-build")
        return encode_missing_shards(staging, encoder, cfg.batch_size, cfg.shard_size, on_shard)

    with pytest.raises(KeyboardInterrupt):
        build_dense_index(corpus, out, config, encoder=encoder, encode_shards=dying_encode)
    return staging_dir(out)


@pytest.mark.parametrize("overwrite", [False, True])
def test_torn_shard_is_reencoded_on_resume_with_a_warning(small_corpus, tmp_path, caplog, overwrite):
    out = tmp_path / "dense"
    config = DenseBuildConfig(shard_size=2, keep_embeddings=True)
    encoder = fake_encoder()
    staging = _interrupted_build(small_corpus, out, config, encoder)
    torn = shard_path(staging, 0)
    assert shard_problem(torn, 2, 16) is None
    _truncate(torn, 0.7)  # a finished shard torn on disk (renamed but lost its tail)
    assert "bytes, expected" in shard_problem(torn, 2, 16)
    (staging / "embeddings" / "shard-00001.npy.tmp.npy").write_bytes(b"half")  # an old-style temp file
    before = encoder.model.calls
    with caplog.at_level(logging.WARNING, logger="retrievers.dense_build"):
        manifest = build_dense_index(small_corpus, out, config, encoder=encoder, overwrite=overwrite)
    warned = [r.getMessage() for r in caplog.records if "torn" in r.getMessage()]
    assert len(warned) == 1 and "shard 0" in warned[0] and str(torn) in warned[0]
    n_shards = -(-manifest["counts"]["passages"] // 2)
    assert manifest["counts"]["shards_encoded_this_run"] == n_shards - 1  # shard 1 kept; 0 and the rest encoded
    assert encoder.model.calls - before == n_shards - 1 + 1  # + the fingerprint probe
    shards = sorted(p.name for p in (out / "embeddings").iterdir())
    assert shards == [f"shard-{i:05d}.npy" for i in range(n_shards)], "no temp files kept"
    fresh = tmp_path / "fresh"
    build_dense_index(small_corpus, fresh, config, encoder=fake_encoder())
    for i in range(n_shards):
        np.testing.assert_array_equal(np.load(shard_path(out, i)), np.load(shard_path(fresh, i)))
    assert verify_index(out)["ok"]


def test_shard_problem_detects_wrong_shape_and_garbage(tmp_path):
    path = tmp_path / "s.npy"
    np.save(path, np.zeros((3, 4), np.float32))
    assert shard_problem(path, 3, 4) is None
    assert "expected 2 x 4" in shard_problem(path, 2, 4)
    assert "expected 3 x 5" in shard_problem(path, 3, 5)
    np.save(path, np.zeros((3, 4), np.float64))
    assert "float64" in shard_problem(path, 3, 4)
    path.write_bytes(b"half a shard")
    assert "unreadable header" in shard_problem(path, 3, 4)
    assert shard_problem(tmp_path / "none.npy", 3) == "missing"


def test_save_shard_leaves_no_temp_file(small_corpus, tmp_path):
    out = tmp_path / "dense"
    build_dense_index(small_corpus, out, DenseBuildConfig(shard_size=2, keep_embeddings=True), encoder=fake_encoder())
    assert all(p.name.startswith("shard-") and p.suffix == ".npy" for p in (out / "embeddings").iterdir())


# ------------------------------------------------------------------ the config is checked before any work


@pytest.mark.parametrize("config, message", [
    (DenseBuildConfig(shard_size=-5), "--shard-size must be an integer of at least 1, got -5"),
    (DenseBuildConfig(shard_size=0), "--shard-size"),
    (DenseBuildConfig(batch_size=0), "--batch-size"),
    (DenseBuildConfig(words_per_passage=0), "--words-per-passage"),
    (DenseBuildConfig(stride=0), "--stride"),
    (DenseBuildConfig(words_per_passage=50, stride=60), "--stride must be an integer from 1 to --words-per-passage"),
    (DenseBuildConfig(max_train_vectors=0), "--max-train-vectors"),
    (DenseBuildConfig(nprobe=0), "--nprobe"),
    (DenseBuildConfig(faiss="IVF4096,Flat"), "needs at least 4096 training vectors .*the corpus gives \\d+ passages"),
    (DenseBuildConfig(faiss="IVF2,PQ4"), "needs at least 256 training vectors"),
    (DenseBuildConfig(faiss="IVF2,Flat", max_train_vectors=1), "--max-train-vectors is 1"),
    (DenseBuildConfig(faiss="PQ48"), "does not fit the encoder's 16-dimensional vectors"),
])
def test_bad_config_refused_before_encoding(small_corpus, tmp_path, config, message):
    encoder = fake_encoder()
    out = tmp_path / "idx"
    with pytest.raises(RagError, match=message) as err:
        build_dense_index(small_corpus, out, config, encoder=encoder)
    _one_line(err)
    assert encoder.model.calls == 0, "nothing was encoded"
    assert not out.exists() and not staging_dir(out).exists()


def test_factory_needing_other_dimension_is_deferred_to_the_encoder():
    assert probe_factory("Flat") is not None
    assert probe_factory("IVF16,PQ48") is None  # 8 is no multiple of 48: checked at the encoder's dimension
    assert FaissIndex.create(384, "IVF16,PQ48").training_minimum() == (256, "256 centroids per PQ subquantizer")
    with pytest.raises(RagError, match="invalid Faiss factory"):
        probe_factory("NoSuchIndex")


@pytest.mark.parametrize("factory, need", [("Flat", 0), ("HNSW32", 0), ("IVF64,Flat", 64), ("IVF4,PQ4x4", 16),
                                           ("OPQ4,IVF4,PQ4", 256), ("PCA8,IVF4,Flat", 8), ("IVF16,PQ4,RFlat", 256),
                                           ("HNSW32_PQ4", 256), ("RQ2x6", 64), ("SQ8", 1)])
def test_training_minimum_is_faiss_rule(factory, need):
    """The minimum agrees with Faiss: one vector fewer fails to train, the minimum trains (k-means of 256
    centroids on 256 points takes Faiss half a minute: those are only counted)."""
    index = FaissIndex.create(16, factory)
    got, _ = index.training_minimum()
    assert got == need
    if 0 < need < 256:
        rng = np.random.default_rng(0)
        with pytest.raises(RagError, match="needs at least"):
            index.train(rng.standard_normal((need - 1, 16)).astype(np.float32))
        FaissIndex.create(16, factory).train(rng.standard_normal((need, 16)).astype(np.float32))


def test_small_ivf_builds(small_corpus, tmp_path):
    out = tmp_path / "ivf"
    build_dense_index(small_corpus, out, DenseBuildConfig(faiss="IVF2,Flat"), encoder=fake_encoder())
    assert DenseRetriever(out, encoder=fake_encoder()).retrieve(["cat pet"], k=1)[0]


def test_second_build_of_the_same_output_fails_at_once(small_corpus, tmp_path):
    out = tmp_path / "dense"
    errors: list[BaseException] = []

    def build():
        try:
            build_dense_index(small_corpus, out, encoder=fake_encoder())
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    with output_lock(out):
        thread = threading.Thread(target=build)
        thread.start()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], RagError) and "being written" in str(errors[0])
    assert not out.exists()


# ------------------------------------------------------------------ encoders are compared by what they compute


def test_alias_of_the_packaged_encoder_accepted(small_corpus, tmp_path, minilm):
    from core.models import resolve_model
    packaged = resolve_model("minilm")
    out = tmp_path / "dense"
    build_dense_index(small_corpus, out, DenseBuildConfig(encoder=packaged), encoder=minilm)
    assert read_manifest(out, "dense")["encoder"] == str(Path(packaged).resolve())
    retriever = DenseRetriever(out, encoder="minilm")  # an alias, not the recorded path: same model
    assert retriever.retrieve(["capital of France"], k=1)[0][0].doc_id == "d1"
    copy = tmp_path / "minilm-copy"
    shutil.copytree(packaged, copy)
    DenseRetriever(out, encoder=str(copy))  # a copy of the same model
    impostor = DenseEncoder(FakeModel(dim=384), str(Path(packaged).resolve()))
    with pytest.raises(ManifestMismatch, match="same name, another model") as err:
        DenseRetriever(out, encoder=impostor)
    assert str(Path(packaged).resolve()) in str(err.value)


def test_other_encoder_refused_naming_both(dense):
    with pytest.raises(ManifestMismatch, match="encoder 'other' embeds differently from 'minilm'") as err:
        DenseRetriever(dense, encoder=DenseEncoder(FakeModel(salt=3), "other"))
    _one_line(err)


# ------------------------------------------------------------------ k


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one_refused(dense, bm25, k):
    for retriever in (DenseRetriever(dense, encoder=fake_encoder()), BM25Retriever(bm25)):
        with pytest.raises(RagError, match="--k must be at least 1"):
            retriever.retrieve(["cat"], k=k)
    with pytest.raises(RagError, match="--k must be at least 1"):
        DenseRetriever(dense, encoder=fake_encoder()).search_passages(["cat"], k)


def test_rag_index_verify_reports_a_flipped_byte(tmp_path, capsys):
    from rag.cli import main
    from tests.conftest import write_jsonl

    corpus = write_jsonl(tmp_path / "c" / "corpus.jsonl",
                         [{"id": f"d{i}", "title": f"T{i}", "text": f"text number {i} about things"} for i in range(5)])
    out = tmp_path / "bm25"
    assert main(["index", "build", "--kind", "bm25", "--corpus", str(corpus), "--out", str(out)]) == 0
    assert main(["index", "verify", str(out)]) == 0
    victim = next(p for p in sorted(out.rglob("*")) if p.is_file() and p.name not in ("manifest.json", "run.json")
                  and p.stat().st_size > 0)
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["index", "verify", str(out)]) == 1
    assert victim.name in capsys.readouterr().out
