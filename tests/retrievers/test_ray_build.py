"""Ray-distributed dense encoding: same embeddings as the local build, survives a dying worker, resumes.

Each Ray build starts a local Ray with 2 encoder actors (about 20 s on a small machine, most of it Ray
start-up), so the encoder is a cheap deterministic fake; the MiniLM path is the same code with
`load_encoder` in the actor. Each test checks that Ray is shut down and its session folder removed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import retrievers  # noqa: F401  (import order: retrievers before retrievers.dense_build)
from core.errors import RagError
from core.ray_runtime import make_temp_root
from index.manifest import read_manifest
from retrievers.dense_build import DenseBuildConfig, build_dense_index, shard_path, shard_ranges, staging_dir
from retrievers.encoders import DenseEncoder
from retrievers.ray_build import ray_encode_shards
from tests.retrievers.dense_fixtures import StableModel, stable_encoder

SHARD = 8
DOCS = [{"id": f"d{i}", "title": f"Doc {i}", "text": f"passage number {i} about topic t{i % 7} with word w{i} "
         f"and some shared filler text"} for i in range(40)]  # one passage each: 40 passages, 5 shards


class DyingEncoder(DenseEncoder):
    """Kills its process (as an OOM kill or a lost node would) the first time it meets `trigger`."""

    def __init__(self, marker: str, trigger: str, partial: str) -> None:
        super().__init__(StableModel(), "fake")
        self.marker, self.trigger, self.partial = Path(marker), trigger, Path(partial)

    def encode_passage(self, texts, **kwargs):
        if not self.marker.exists() and any(self.trigger in t.split() for t in texts):
            self.marker.write_text(str(os.getpid()))
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.partial.write_bytes(b"half a shard")  # as if killed while writing the shard
            os._exit(1)
        return super().encode_passage(texts, **kwargs)


class DyingFactory:
    def __init__(self, marker: Path, trigger: str, partial: Path) -> None:
        self.args = (str(marker), trigger, str(partial))

    def __call__(self) -> DenseEncoder:
        return DyingEncoder(*self.args)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


@pytest.fixture
def ray_tmp():
    """A short folder for Ray's session files (unix socket paths!); must be empty again afterwards."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests package
    parent = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    try:
        yield parent
        assert not ray.is_initialized(), "Ray was left running"
        assert list(parent.iterdir()) == [], "Ray session files were left behind"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        shutil.rmtree(parent, ignore_errors=True)


def _embeddings(out: Path) -> np.ndarray:
    files = sorted((out / "embeddings").glob("*.npy"))
    assert [f.name for f in files] == [shard_path(out, i).name for i in range(len(files))]  # no tmp leftovers
    return np.concatenate([np.load(f) for f in files])


def _pids(out: Path) -> list[tuple]:
    return [(r["pid"], r["doc_id"]) for r in map(json.loads, (out / "passages.jsonl").read_text().splitlines())]


def _reference(corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "local"
    build_dense_index(corpus, out, DenseBuildConfig(shard_size=SHARD, keep_embeddings=True), encoder=stable_encoder())
    return out


def test_ray_build_equals_local_build(corpus, tmp_path, ray_tmp):
    ref = _reference(corpus, tmp_path)
    out = tmp_path / "ray"
    manifest = build_dense_index(corpus, out, DenseBuildConfig(shard_size=SHARD, keep_embeddings=True),
                                 encoder=stable_encoder(),
                                 encode_shards=ray_encode_shards(workers=2, encoder_factory=stable_encoder,
                                                                 temp_dir=ray_tmp, show_progress=False))
    assert manifest["counts"] == {"documents": 40, "passages": 40, "shards_encoded_this_run": 5}
    assert _pids(out) == _pids(ref) and len(_pids(out)) == 40
    a, b = _embeddings(ref), _embeddings(out)
    assert a.shape == b.shape == (40, 16)
    assert np.abs(a - b).max() <= 1e-5
    assert read_manifest(out, "dense")["dim"] == 16 and not staging_dir(out).exists()


def test_worker_dying_mid_shard_is_replaced(corpus, tmp_path, ray_tmp):
    ref = _reference(corpus, tmp_path)
    out = tmp_path / "ray"
    marker = tmp_path / "died"
    dying_shard = 20 // SHARD
    partial = shard_path(staging_dir(out), dying_shard).with_suffix(".npy.tmp.npy")
    factory = DyingFactory(marker, "w20", partial)
    manifest = build_dense_index(corpus, out, DenseBuildConfig(shard_size=SHARD, keep_embeddings=True),
                                 encoder=stable_encoder(),
                                 encode_shards=ray_encode_shards(workers=2, encoder_factory=factory, temp_dir=ray_tmp,
                                                                 show_progress=False))
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # an actor really died
    assert manifest["counts"]["passages"] == 40 and manifest["counts"]["shards_encoded_this_run"] == 5
    emb = _embeddings(out)  # also: the half-written tmp file was replaced, not left beside the shards
    assert emb.shape == (40, 16) and _pids(out) == _pids(ref)
    assert np.abs(emb - _embeddings(ref)).max() <= 1e-5


def test_interrupted_build_resumes_from_finished_shards(corpus, tmp_path, ray_tmp):
    ref = _reference(corpus, tmp_path)
    out = tmp_path / "ray"
    config = DenseBuildConfig(shard_size=SHARD, keep_embeddings=True)
    encoder = stable_encoder()

    def dies_after_two(staging, cfg):  # the local loop, killed after two shards
        from retrievers.dense_build import encode_missing_shards

        def on_shard(shard):
            if shard == 1:
                raise KeyboardInterrupt("killed mid-build")
        return encode_missing_shards(staging, encoder, cfg.batch_size, cfg.shard_size, on_shard)

    with pytest.raises(KeyboardInterrupt):
        build_dense_index(corpus, out, config, encoder=encoder, encode_shards=dies_after_two)
    staging = staging_dir(out)
    done = {i: os.stat(shard_path(staging, i)) for i in (0, 1)}
    assert not shard_path(staging, 2).exists()
    manifest = build_dense_index(corpus, out, config, encoder=encoder,
                                 encode_shards=ray_encode_shards(workers=2, encoder_factory=stable_encoder,
                                                                 temp_dir=ray_tmp, show_progress=False))
    assert manifest["counts"]["shards_encoded_this_run"] == 3
    for i, before in done.items():  # finished shards were kept, not re-encoded
        after = os.stat(shard_path(out, i))
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _pids(out) == _pids(ref)
    assert np.abs(_embeddings(out) - _embeddings(ref)).max() <= 1e-5


class FailingFactory:
    """An encoder that raises (a bug, not a crash) on one shard: the build must stop, not loop."""

    def __call__(self) -> DenseEncoder:
        enc = stable_encoder()
        plain = enc.encode_passage

        def encode_passage(texts, **kwargs):
            if any("w20" in t.split() for t in texts):
                raise ValueError("bad passage")
            return plain(texts, **kwargs)
        enc.encode_passage = encode_passage
        return enc


def test_failing_shard_stops_the_build_and_keeps_finished_shards(corpus, tmp_path, ray_tmp):
    out = tmp_path / "ray"
    with pytest.raises(RagError, match="ValueError.*rerun the same build to resume"):
        build_dense_index(corpus, out, DenseBuildConfig(shard_size=SHARD), encoder=stable_encoder(),
                          encode_shards=ray_encode_shards(workers=2, encoder_factory=FailingFactory(),
                                                          temp_dir=ray_tmp, show_progress=False))
    assert not out.exists() and staging_dir(out).exists()
    assert not shard_path(staging_dir(out), 20 // SHARD).exists()


def test_nothing_missing_starts_no_ray(corpus, tmp_path):
    import ray

    config = DenseBuildConfig(shard_size=SHARD)
    from retrievers.dense_build import encode_missing_shards, prepare_staging
    staging, counts = prepare_staging(tmp_path / "idx", corpus, config)
    encode_missing_shards(staging, stable_encoder(), 32, SHARD)
    assert ray_encode_shards(workers=2, encoder_factory=stable_encoder)(staging, config).shards == 0
    assert len(shard_ranges(counts["passages"], SHARD)) == 5 and not ray.is_initialized()


def test_bad_arguments_and_long_temp_dir_are_clear_errors(tmp_path):
    with pytest.raises(RagError, match="--workers"):
        ray_encode_shards(workers=0)
    with pytest.raises(RagError, match="too long"):
        make_temp_root(tmp_path / ("x" * 40))
