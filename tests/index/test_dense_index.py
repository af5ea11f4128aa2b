"""Dense indexes: exact search equals brute force, resumable shards, manifests, no half-built folders."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import InputError, ManifestMismatch, RagError
from index.faiss_index import FaissIndex
from index.manifest import read_manifest
from retrievers import DenseRetriever, open_retriever
from retrievers.dense_build import DenseBuildConfig, build_dense_index, shard_path, staging_dir
from retrievers.encoders import DenseEncoder
from tests.conftest import SMALL_DOCS, write_jsonl


class FakeModel:
    """Deterministic hashed bag-of-words embeddings: fast, and different texts get different vectors."""

    def __init__(self, dim: int = 16, salt: int = 0) -> None:
        self.dim, self.salt, self.calls = dim, salt, 0

    def get_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, batch_size=32, normalize_embeddings=True, **_):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                rng = np.random.default_rng(abs(hash((word, self.salt))) % (2**32))
                out[i] += rng.standard_normal(self.dim)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def fake_encoder(salt: int = 0) -> DenseEncoder:
    return DenseEncoder(FakeModel(salt=salt), "fake")


def test_flat_equals_bruteforce_numpy():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((500, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = rng.standard_normal((20, 32)).astype(np.float32)
    index = FaissIndex.create(32, "Flat")
    index.add(base)
    scores, ids = index.search(queries, 10)
    brute = queries @ base.T
    expected_ids = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected_ids, axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory", ["HNSW32", "IVF4,Flat"])
def test_other_factories_build_and_search(factory):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((400, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)  # inner product on normalised vectors: self is best
    index = FaissIndex.create(16, factory)
    if index.needs_training:
        index.train(base)
    index.add(base)
    scores, ids = index.search(base[:5], 1, nprobe=4, ef_search=64)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_bad_factory_string_is_a_clear_error(small_corpus, tmp_path):
    with pytest.raises(RagError, match="invalid Faiss factory"):
        build_dense_index(small_corpus, tmp_path / "idx", DenseBuildConfig(faiss="NoSuchIndex"), encoder=fake_encoder())
    assert not (tmp_path / "idx").exists()


def test_real_minilm_index_matches_bruteforce(small_corpus, tmp_path, minilm):
    out = tmp_path / "dense"
    build_dense_index(small_corpus, out, DenseBuildConfig(shard_size=2, keep_embeddings=True), encoder=minilm)
    manifest = read_manifest(out, "dense")
    assert manifest["dim"] == 384 and manifest["counts"]["documents"] == len(SMALL_DOCS)
    emb = np.concatenate([np.load(p) for p in sorted((out / "embeddings").glob("shard-*.npy"))])
    assert emb.shape == (manifest["counts"]["passages"], 384)
    retriever = DenseRetriever(out, encoder=minilm)
    q = minilm.encode_query(["capital of France"])
    pids, scores = retriever.search_passages(["capital of France"], 3)
    np.testing.assert_array_equal(pids[0], np.argsort(-(q @ emb.T)[0])[:3])
    hits = retriever.retrieve(["capital of France"], k=2)[0]
    assert hits[0].doc_id == "d1" and hits[0].title == "Paris" and "Seine" in hits[0].text


def test_long_documents_give_best_passage_per_document(small_corpus, tmp_path):
    out = tmp_path / "dense"
    build_dense_index(small_corpus, out, DenseBuildConfig(words_per_passage=30, stride=20), encoder=fake_encoder())
    manifest = read_manifest(out)
    assert manifest["counts"]["passages"] > len(SMALL_DOCS)
    hits = DenseRetriever(out, encoder=fake_encoder()).retrieve(["photosynthesis filler3 filler100"], k=len(SMALL_DOCS))[0]
    ids = [h.doc_id for h in hits]
    assert len(ids) == len(set(ids))  # one entry per document


def test_resume_reuses_finished_shards(small_corpus, tmp_path):
    out = tmp_path / "dense"
    config = DenseBuildConfig(shard_size=2)
    encoder = fake_encoder()
    calls = {"n": 0}

    def dying_encode(staging, cfg):
        from retrievers.dense_build import encode_missing_shards

        def on_shard(shard):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("killed mid-build")
        return encode_missing_shards(staging, encoder, cfg.batch_size, cfg.shard_size, on_shard)

    with pytest.raises(KeyboardInterrupt):
        build_dense_index(small_corpus, out, config, encoder=encoder, encode_shards=dying_encode)
    assert not out.exists()  # a killed build never leaves a folder at the output path
    staging = staging_dir(out)
    assert shard_path(staging, 0).exists() and shard_path(staging, 1).exists() and not shard_path(staging, 2).exists()
    with pytest.raises(RagError, match="no manifest.json"):
        open_retriever(staging)
    before = encoder.model.calls
    manifest = build_dense_index(small_corpus, out, config, encoder=encoder)
    n_shards = -(-manifest["counts"]["passages"] // 2)
    assert manifest["counts"]["shards_encoded_this_run"] == n_shards - 2
    assert encoder.model.calls - before == n_shards - 2 + 1  # the missing shards + the fingerprint probe
    assert not staging.exists()
    fresh = tmp_path / "fresh"
    build_dense_index(small_corpus, fresh, config, encoder=fake_encoder())
    a = DenseRetriever(out, encoder=fake_encoder()).search_passages(["cat pet"], 5)
    b = DenseRetriever(fresh, encoder=fake_encoder()).search_passages(["cat pet"], 5)
    np.testing.assert_array_equal(a[0], b[0])


def test_existing_output_refused_without_overwrite(small_corpus, tmp_path):
    out = tmp_path / "dense"
    build_dense_index(small_corpus, out, encoder=fake_encoder())
    with pytest.raises(RagError, match="--overwrite"):
        build_dense_index(small_corpus, out, encoder=fake_encoder())
    build_dense_index(small_corpus, out, encoder=fake_encoder(), overwrite=True)


def test_manifest_mismatch_refused(small_corpus, tmp_path, minilm):
    out = tmp_path / "dense"
    build_dense_index(small_corpus, out, encoder=fake_encoder())
    with pytest.raises(ManifestMismatch, match="dim"):
        DenseRetriever(out, encoder=minilm)
    with pytest.raises(ManifestMismatch, match="fingerprint"):
        DenseRetriever(out, encoder=fake_encoder(salt=1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpus_checksum"].startswith("sha256:") and "versions" in manifest


@pytest.mark.parametrize("rows, field", [
    ([{"id": "a", "title": "A", "text": "x"}, {"id": "a", "title": "B", "text": "y"}], "id"),
    ([{"id": "a", "title": "A"}], "text"),
])
def test_bad_corpus_leaves_no_index(tmp_path, rows, field):
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(InputError) as err:
        build_dense_index(corpus, tmp_path / "idx", encoder=fake_encoder())
    assert err.value.field == field
    assert not (tmp_path / "idx").exists() and not staging_dir(tmp_path / "idx").exists()


def test_refine_index_with_k_factor_matches_flat_top1():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((2000, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    index = FaissIndex.create(32, "IVF16,PQ8,RFlat")
    index.train(base)
    index.add(base)
    _, ids = index.search(base[:20], 1, nprobe=16, k_factor=16)
    assert ids[:, 0].tolist() == list(range(20))  # exact re-ranking recovers each vector itself


def test_bf16_token_sorted_passages_match_float32(small_corpus, tmp_path, minilm):
    """The fast passage path keeps every vector's place and direction; queries and fingerprint stay float32."""
    from retrievers.encoders import DenseEncoder
    fast = DenseEncoder(minilm.model, "minilm", passage_precision="bfloat16", token_sort=True, batch_size=2)
    texts = [f"{d['title']} {d['text']}" for d in SMALL_DOCS] + ["a short one", "another text about Paris and Berlin"]
    ref, got = minilm.encode_passage(texts), fast.encode_passage(texts)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = (ref * got).sum(axis=1)
    assert cosine.min() > 0.99, cosine  # bf16 noise, not a permutation (a misplaced row would score ~0.2)
    assert fast.fingerprint() == minilm.fingerprint()
    np.testing.assert_array_equal(fast.encode_query(["capital of France"]), minilm.encode_query(["capital of France"]))
    out = tmp_path / "dense-bf16"
    build_dense_index(small_corpus, out, DenseBuildConfig(passage_precision="bfloat16", token_sort=True), encoder=fast)
    assert read_manifest(out, "dense")["config"]["passage_precision"] == "bfloat16"
    hits = DenseRetriever(out, encoder=minilm).retrieve(["capital of France"], k=1)[0]
    assert hits[0].doc_id == "d1"


def test_bad_passage_precision_is_a_clear_error(small_corpus, tmp_path):
    with pytest.raises(RagError, match="passage_precision must be one of"):
        build_dense_index(small_corpus, tmp_path / "x", DenseBuildConfig(passage_precision="int4"), encoder=fake_encoder())
    assert not (tmp_path / "x").exists()


def test_reserve_presizes_flat_codes_without_changing_results():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((500, 32)).astype(np.float32)
    plain, reserved = FaissIndex.create(32, "Flat"), FaissIndex.create(32, "Flat")
    assert reserved.reserve(len(data))
    for part in np.array_split(data, 5):
        plain.add(part)
        reserved.add(part)
    q = rng.standard_normal((3, 32)).astype(np.float32)
    for a, b in zip(plain.search(q, 5), reserved.search(q, 5)):
        np.testing.assert_array_equal(a, b)
    assert not FaissIndex.create(32, "HNSW8").reserve(10)
    assert not reserved.reserve(10), "only an empty index is presized"


def test_approximate_indexes_carry_search_defaults(small_corpus, tmp_path):
    out = tmp_path / "ivf"
    build_dense_index(small_corpus, out, DenseBuildConfig(faiss="IVF2,Flat"), encoder=fake_encoder())
    assert read_manifest(out, "dense")["search_defaults"] == {"nprobe": 16}
    assert DenseRetriever(out, encoder=fake_encoder()).nprobe == 16
    assert DenseRetriever(out, encoder=fake_encoder(), nprobe=1).nprobe == 1, "the caller's value wins"
    build_dense_index(small_corpus, out, DenseBuildConfig(faiss="HNSW8", ef_search=40), encoder=fake_encoder(),
                      overwrite=True)
    assert read_manifest(out, "dense")["search_defaults"] == {"ef_search": 40}
    flat = tmp_path / "flat"
    build_dense_index(small_corpus, flat, encoder=fake_encoder())
    assert read_manifest(flat, "dense")["search_defaults"] == {}


def test_token_sort_keeps_rows_in_place_for_any_encoder():
    """Token-count batching with a model that returns numpy and has no tokenizer (character-length order)."""
    model = FakeModel()
    texts = ["a b c d e f", "x", "p q r", "long " * 30, "m n"]
    sorted_enc = DenseEncoder(model, "fake", batch_size=2, token_sort=True)
    np.testing.assert_allclose(sorted_enc.encode_passage(texts), DenseEncoder(model, "fake").encode_passage(texts),
                               atol=1e-6)
