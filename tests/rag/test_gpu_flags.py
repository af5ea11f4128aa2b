"""--gpu / --gpu-shard / --gpu-fp16 on `rag retrieve` and `rag answer`, and a dense model's `gpu` swap options:
parsed, passed to the dense retriever, and refused in one line where they cannot apply (issue 13)."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import yaml

from core.errors import RagError
from index import faiss_gpu
from rag import swap as cs
from rag.cli import build_parser, main
from rag.commands.retrieve import gpu_options
from retrievers.dense import DenseRetriever
from retrievers.dense_build import build_dense_index
from tests.conftest import SMALL_DOCS, SMALL_QUERIES, write_jsonl
from tests.index.test_dense_index import fake_encoder
from tests.rag.test_user_errors import build, one_error_line

NO_GPU = not (faiss_gpu.faiss_gpu_build() and faiss_gpu.gpu_count() > 0)


@pytest.fixture
def dense(small_corpus, tmp_path) -> Path:
    out = tmp_path / "dense"
    build_dense_index(small_corpus, out, encoder=fake_encoder())
    return out


@pytest.fixture
def bm25(small_corpus, tmp_path) -> Path:
    out = tmp_path / "bm25"
    assert main(build(small_corpus, out, "--kind", "bm25")) == 0
    return out


@pytest.mark.parametrize("command", ["retrieve", "answer"])
def test_flags_parse(command, tmp_path):
    argv = [command, "--index", "i", "--queries", "q", "--out", str(tmp_path / "o")]
    args = build_parser().parse_args(argv)
    assert (args.gpu, args.gpu_shard, args.gpu_fp16) == (False, False, False)
    args = build_parser().parse_args([*argv, "--gpu", "--gpu-shard", "--gpu-fp16"])
    assert (args.gpu, args.gpu_shard, args.gpu_fp16) == (True, True, True)


def test_gpu_options_go_to_dense_only(dense, bm25):
    ns = argparse.Namespace
    assert gpu_options(ns(index=dense, gpu=False, gpu_shard=False, gpu_fp16=False)) == {}
    assert gpu_options(ns(index=dense, gpu=True, gpu_shard=True, gpu_fp16=False)) == \
        {"gpu": True, "gpu_shard": True, "gpu_fp16": False}
    with pytest.raises(RagError, match="--gpu-shard and --gpu-fp16 need --gpu"):
        gpu_options(ns(index=dense, gpu=False, gpu_shard=False, gpu_fp16=True))
    with pytest.raises(RagError, match=r"is a bm25 index; only dense \(Faiss\) indexes search on a GPU"):
        gpu_options(ns(index=bm25, gpu=True, gpu_shard=False, gpu_fp16=False))


@pytest.mark.skipif(not NO_GPU, reason="faiss sees a GPU here")
@pytest.mark.parametrize("command", ["retrieve", "answer"])
def test_gpu_without_a_faiss_gpu_is_one_line_before_models_load(command, dense, small_queries, tmp_path, capsys,
                                                                monkeypatch):
    import retrievers.dense as dense_module

    def no_load(*args, **kwargs):
        raise AssertionError("the encoder loaded before the GPU check")

    monkeypatch.setattr(dense_module, "load_encoder", no_load)
    out = tmp_path / "out.jsonl"
    assert main([command, "--index", str(dense), "--queries", str(small_queries), "--out", str(out), "--gpu"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("rag: error: --gpu: ") and ("'.[gpu]'" in line or "sees no GPU" in line), line
    assert not out.exists()


def test_dense_retriever_passes_shard_and_fp16(dense, monkeypatch):
    seen = {}

    def to_gpu(self, devices=None, shard=False, fp16=False):
        seen.update(devices=devices, shard=shard, fp16=fp16)
        return self

    monkeypatch.setattr("retrievers.dense.available_gpus", lambda devices=None: [0])
    monkeypatch.setattr("index.faiss_index.FaissIndex.to_gpu", to_gpu)
    DenseRetriever(dense, encoder=fake_encoder(), gpu=True, gpu_shard=True, gpu_fp16=True)
    assert seen == {"devices": None, "shard": True, "fp16": True}
    with pytest.raises(RagError, match="need gpu"):
        DenseRetriever(dense, encoder=fake_encoder(), gpu_fp16=True)


# --------------------------------------------------------------------------- swap config

def _config(root: Path, options: dict, num_gpus: float = 1, kind: str = "dense") -> Path:
    corpus = write_jsonl(root / "data" / "original" / "corpus.jsonl", SMALL_DOCS)
    task = write_jsonl(root / "data" / "dev.jsonl", SMALL_QUERIES)
    config = {"name": "tiny", "k": 5, "ks": [1, 5], "metrics": ["Rprec"], "workers": 0,
              "corpora": {"original": {"path": str(corpus.parent)}},
              "tasks": {"dev": {"path": str(task), "corpus": "original"}},
              "models": {"m": {"kind": kind, "num_gpus": num_gpus, "options": copy.deepcopy(options)}}}
    path = root / "swap.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def test_swap_dense_gpu_option_loads(tmp_path):
    config = cs.load_swap_config(_config(tmp_path, {"gpu": True, "gpu_shard": True, "gpu_fp16": False}, 2))
    assert config.models[0].options == {"gpu": True, "gpu_shard": True, "gpu_fp16": False}


@pytest.mark.parametrize("options,num_gpus,kind,expected", [
    ({"gpu": "yes"}, 1, "dense", "models.m.options.gpu: expected true or false, got 'yes'"),
    ({"gpu": 1}, 1, "dense", "models.m.options.gpu: expected true or false, got 1"),
    ({"gpu": True, "gpu_fp16": "no"}, 1, "dense", "models.m.options.gpu_fp16: expected true or false"),
    ({"gpu": True}, 1, "bm25", "models.m.options.gpu: only dense models search on a GPU (Faiss)"),
    ({"gpu": True}, 0, "dense", "models.m.options.gpu: gpu: true needs num_gpus > 0"),
    ({"gpu_shard": True}, 1, "dense", "models.m.options.gpu_shard: gpu_shard: true needs gpu: true"),
    ({"gpu": False, "gpu_fp16": True}, 1, "dense", "models.m.options.gpu_fp16: gpu_fp16: true needs gpu: true"),
])
def test_swap_gpu_options_are_validated(tmp_path, options, num_gpus, kind, expected):
    path = _config(tmp_path, options, num_gpus, kind)
    with pytest.raises(RagError) as err:
        cs.load_swap_config(path)
    assert str(err.value).startswith(f"{path}: {expected}"), str(err.value)
