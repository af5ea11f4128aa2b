"""GPU-ready encoding, checked on a CPU machine: precision and batch defaults by device, the driver's CPU-only
encoder, GPU flags refused before any work, and Ray actors given distinct GPUs and asked for `cuda`.

The Ray part starts one local Ray for the module with declared GPUs (`num_gpus=2`) and no real GPU: the
actors load a recording encoder (no torch, no CUDA), which notes the GPU ids Ray gave it and the device
it was asked for. What a real GPU adds (half-precision numbers, speed, memory) needs a GPU to measure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import retrievers  # noqa: F401  (import order: retrievers before retrievers.dense_build)
from core.errors import RagError
from index.manifest import read_manifest
from rag.cli import main
from retrievers import dense_build, encoders, ray_build
from retrievers.dense_build import (
    PROGRESS_CHUNK,
    DenseBuildConfig,
    EncodeReport,
    build_dense_index,
    encode_chunk,
    shard_path,
    staging_dir,
)
from retrievers.encoders import CPU_BATCH_SIZE, GPU_BATCH_SIZE, DenseEncoder
from retrievers.ray_build import check_gpus, cluster_gpus, default_workers, ray_encode_shards, use_cpus
from tests.retrievers.dense_fixtures import StableModel, stable_encoder

SHARD = 8
DOCS = [{"id": f"d{i}", "title": f"Doc {i}", "text": f"passage {i} on topic t{i % 5} with word w{i}"}
        for i in range(40)]  # one passage each: 40 passages, 5 shards


class RecordingLoader:
    """Stands in for load_encoder in an actor: records what Ray gave the actor and what it was asked for."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def __call__(self, name, device=None, batch_size=None, passage_precision=None, token_sort=False, **_):
        import ray

        torch = sys.modules.get("torch")
        record = {"pid": os.getpid(), "gpu_ids": [str(i) for i in ray.get_gpu_ids()], "device": device,
                  "passage_precision": passage_precision, "batch_size": batch_size,
                  "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
                  "cuda_initialized": bool(torch is not None and torch.cuda.is_initialized())}
        Path(self.folder, f"{os.getpid()}.json").write_text(json.dumps(record), encoding="utf-8")
        return stable_encoder()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert lines and "Traceback" not in err, err
    return lines[-1]


# ---------------------------------------------------------------- without Ray

def test_precision_and_batch_follow_the_device(monkeypatch):
    cpu = DenseEncoder(StableModel(), "cpu", None, "auto", query_precision="auto", owns_model=True)
    assert (cpu.passage_precision, cpu.query_precision, cpu.batch_size) == ("float32", "float32", CPU_BATCH_SIZE)
    assert stable_encoder().passage_precision == "float32"  # a caller's encoder keeps today's default
    monkeypatch.setattr(encoders, "half_precision", lambda: "bfloat16")  # what an Ampere GPU answers
    model = StableModel(device="cuda:0")
    expected = stable_encoder().fingerprint()
    gpu = DenseEncoder(model, "gpu", None, "auto", query_precision="auto", owns_model=True)
    assert (gpu.passage_precision, gpu.query_precision, gpu.batch_size) == ("bfloat16", "bfloat16", GPU_BATCH_SIZE)
    assert model.casts == ["torch.bfloat16"] and gpu.model is model  # cast in place: one model in memory
    assert gpu.fingerprint() == expected  # taken in float32 before the cast
    np.testing.assert_allclose(gpu.encode_query(["a b"]), stable_encoder().encode_query(["a b"]), atol=1e-6)
    borrowed = StableModel(device="cuda:0")
    other = DenseEncoder(borrowed, "training", passage_precision="auto", query_precision="float32")
    assert other.passage_precision == "bfloat16" and borrowed.casts == []  # a caller's model is never cast
    monkeypatch.setattr(encoders, "half_precision", lambda: "float16")  # a pre-Ampere GPU
    assert encoders.resolve_precision("auto", "cuda:1") == "float16"
    assert encoders.resolve_precision("auto", "cpu") == "float32"


def test_one_encode_call_per_shard_on_a_gpu():
    gpu = DenseEncoder(StableModel(device="cuda:0"), "gpu")
    assert encode_chunk(gpu, 8192) == 8192 and encode_chunk(stable_encoder(), 8192) == PROGRESS_CHUNK


def test_driver_loads_its_encoder_on_the_cpu_under_ray(corpus, tmp_path, monkeypatch):
    """With encode_shards (the Ray path) the driver's encoder only gives dim and fingerprint: CPU, float32."""
    asked = []

    def fake_load(name, **kwargs):
        asked.append(kwargs)
        return stable_encoder()

    def encode_elsewhere(staging, config):  # as the actors would: half precision on cuda
        n = dense_build.encode_missing_shards(staging, stable_encoder(), None, config.shard_size)
        return EncodeReport(n, {"bfloat16"}, {"cuda:0"})

    monkeypatch.setattr(dense_build, "load_encoder", fake_load)
    manifest = build_dense_index(corpus, tmp_path / "idx", DenseBuildConfig(shard_size=SHARD),
                                 encode_shards=encode_elsewhere)
    assert asked == [{"device": "cpu", "passage_precision": "float32", "query_precision": "float32"}]
    assert manifest["encoding"] == {"passage_precision": "bfloat16", "device": "cuda:0"}
    local = build_dense_index(corpus, tmp_path / "local", DenseBuildConfig(shard_size=SHARD))
    assert asked[-1]["device"] is None and asked[-1]["passage_precision"] == "auto"  # local: config.device
    assert local["encoding"] == {"passage_precision": "float32", "device": "cpu"}


def test_gpus_per_worker_without_any_gpu_is_refused_before_work(corpus, tmp_path, capsys):
    import ray
    import torch

    if torch.cuda.device_count() or ray.is_initialized():
        pytest.skip("needs a machine without GPUs and no Ray running")
    out = tmp_path / "idx"
    argv = ["index", "build", "--corpus", str(corpus), "--out", str(out), "--kind", "dense", "--ray",
            "--gpus-per-worker", "1"]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert line.startswith("rag: error: --gpus-per-worker 1 needs a GPU"), line
    assert not out.exists() and not staging_dir(out).exists() and not ray.is_initialized()


def test_cpus_per_worker_zero_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "idx"
    with pytest.raises(SystemExit) as exc:
        main(["index", "build", "--corpus", str(corpus), "--out", str(out), "--kind", "dense", "--ray",
              "--cpus-per-worker", "0"])
    assert exc.value.code == 2 and "--cpus-per-worker: must be at least 1" in _error_line(capsys)
    assert not out.exists()
    with pytest.raises(RagError, match="--cpus-per-worker"):
        ray_encode_shards(cpus_per_worker=0)
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(out), "--kind", "dense",
                 "--cpus-per-worker", "2"]) == 2
    assert "need --ray" in _error_line(capsys) and not out.exists()


def test_workers_default_to_the_gpus():
    assert default_workers(None, 1, 2) == 2 and default_workers(None, 0.5, 2) == 4
    assert default_workers(None, 0, 8) == ray_build.DEFAULT_WORKERS and default_workers(3, 1, 8) == 3
    check_gpus(0, 0, None)  # CPU actors need no GPU
    with pytest.raises(RagError, match="needs a GPU, but the Ray cluster at h:6379 has none"):
        check_gpus(1, 0, "h:6379")
    with pytest.raises(RagError, match="more than the 1 GPU"):
        check_gpus(2, 1, None)


def test_actor_threads_follow_its_cpus(monkeypatch):
    import torch

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        use_cpus(2)
        assert (os.environ["TOKENIZERS_PARALLELISM"], os.environ["RAYON_NUM_THREADS"]) == ("true", "2")
        assert torch.get_num_threads() == 2
        use_cpus(1)
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- one local Ray with two declared GPUs

@pytest.fixture(scope="module")
def gpu_ray():
    """A local Ray declaring 2 GPUs on this CPU machine, shared by the module's Ray tests (start-up ~10 s)."""
    from ray import cloudpickle

    from core.ray_runtime import ray_session

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests package
    parent = Path(tempfile.mkdtemp(prefix="rg-", dir="/tmp"))
    try:
        with ray_session(num_cpus=2, num_gpus=2, temp_dir=parent) as ray:
            yield ray
        assert list(parent.iterdir()) == [], "Ray session files were left behind"
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        shutil.rmtree(parent, ignore_errors=True)


def test_gpu_actors_get_distinct_gpus_and_are_asked_for_cuda(gpu_ray, corpus, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    config = DenseBuildConfig(shard_size=SHARD, keep_embeddings=True)
    ref = build_dense_index(corpus, tmp_path / "local", config, encoder=stable_encoder())
    out = tmp_path / "ray"
    encode = ray_encode_shards(workers=2, gpus_per_worker=1, encoder_loader=RecordingLoader(records),
                               show_progress=False)
    manifest = build_dense_index(corpus, out, config, encoder=stable_encoder(), encode_shards=encode)
    seen = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(records.glob("*.json"))]
    assert len(seen) == 2 and len({r["pid"] for r in seen}) == 2  # two actors
    assert all(len(r["gpu_ids"]) == 1 for r in seen)
    assert sorted(r["gpu_ids"][0] for r in seen) == ["0", "1"]  # one distinct GPU each
    assert all(r["cuda_visible_devices"] == r["gpu_ids"][0] for r in seen)
    assert all(r["device"] == "cuda" and r["passage_precision"] == "auto" for r in seen)
    assert all(r["batch_size"] is None for r in seen)  # None: the encoder picks the GPU batch size
    assert all(r["tokenizers_parallelism"] == "false" and not r["cuda_initialized"] for r in seen)
    assert manifest["counts"] == {"documents": 40, "passages": 40, "shards_encoded_this_run": 5}
    assert ref["counts"]["passages"] == 40
    ours = np.concatenate([np.load(shard_path(out, i)) for i in range(5)])
    theirs = np.concatenate([np.load(shard_path(tmp_path / "local", i)) for i in range(5)])
    assert ours.shape == (40, 16) and np.abs(ours - theirs).max() <= 1e-5
    assert read_manifest(out, "dense")["encoding"] == {"passage_precision": "float32", "device": "cpu"}  # the fake's


def test_declared_gpus_set_the_default_workers(gpu_ray):
    assert cluster_gpus(None) == 2.0
    assert default_workers(None, 1, cluster_gpus(None)) == 2
    with pytest.raises(RagError, match="more than the 2 GPU"):
        ray_encode_shards(gpus_per_worker=3)
