"""Streaming, resumable dense index build.

The corpus is read once into a passage table; embeddings are computed shard by shard and saved as
`.npy` files in a staging folder beside the output, so memory holds one shard at a time and an
interrupted build resumes from the finished shards. The Faiss index is assembled from memory-mapped
shards, the manifest is written last, and the staging folder is renamed into place only at the end.

Integrity: the config (and what the Faiss factory needs to train, against the passage count) is checked
before anything is encoded; a shard is written under a temporary name, fsynced, renamed and its folder
fsynced, and on resume every finished shard is checked (size = npy header + rows * dim * 4, readable by
a memory map); a torn one is encoded again, with a warning naming it. The build holds the output's lock
(`core.io.output_lock`), so a second build of the same output fails at once.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from core.config import opt
from core.corpus import file_checksum, iter_documents, resolve_corpus_path, split_passages, validate_corpus
from core.errors import RagError
from core.io import move_into_place, output_lock, prepare_output_dir, read_json, write_json
from index.faiss_index import FaissIndex
from index.manifest import write_manifest
from index.passages import PassageStore, write_passage_store
from retrievers.encoders import PASSAGE_PRECISIONS, DenseEncoder, encoder_id, load_encoder, on_gpu

logger = logging.getLogger(__name__)

SHARDS = "embeddings"
BUILD_KEY = "build_key.json"
PASSAGES_DONE = "passages.done"
ENCODING = "encoding.json"  # how the staged shards were encoded (precision, device), across resumed runs
PROGRESS_CHUNK = 1024  # passages per encode call within a shard on a CPU (progress granularity)
# Temporary shard files: ours (".shard-00001.<pid>.tmp") and those of earlier versions ("shard-00001.npy.tmp.npy").
TMP_PATTERNS = (".shard-*.tmp", "shard-*.npy.tmp.npy")


@dataclass
class DenseBuildConfig:
    encoder: str | None = opt(None, "alias, folder, hub id or run folder; None = packaged MiniLM", check="model")
    faiss: str = opt("Flat", "any Faiss index-factory string")
    batch_size: int | None = opt(None, "passages per encode batch (None: 64 on a CPU, 256 on a GPU)", min=1)
    passage_precision: str = opt("auto", "passage encoding precision; 'auto': float32 on a CPU, bfloat16 (float16 "
                                 "before Ampere) on a GPU; on a CPU 'bfloat16' with token_sort is about 2.3x faster "
                                 "(a bf16 copy; queries stay float32)", choices=PASSAGE_PRECISIONS)
    token_sort: bool = opt(False, "batch passages by token count (less padding)")
    nprobe: int | None = opt(None, "IVF: lists searched by default (None: 16, recall@10 0.997 in bench_faiss)", min=1)
    ef_search: int | None = opt(None, "HNSW: search depth by default (None: 128)", min=1)
    shard_size: int = opt(8192, "passages per embedding shard (the unit of resume)", min=1)
    words_per_passage: int = opt(100, "words per passage", min=1)
    stride: int = opt(80, "words between passage starts (< words per passage: overlap)", min=1,
                      at_most="words_per_passage")
    max_train_vectors: int = opt(262_144, "sample size for IVF/PQ training", min=1)
    keep_embeddings: bool = opt(False, "keep the shards next to the index (e.g. to rebuild other indexes)")
    device: str | None = opt(None, "torch device for encoding (auto: cuda if available)", check="device")


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def shard_path(folder: Path, shard: int) -> Path:
    return folder / SHARDS / f"shard-{shard:05d}.npy"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_shard(folder: Path, shard: int, embeddings: np.ndarray) -> None:
    """Write a shard atomically and durably: temp name, fsync, rename, fsync the folder.

    A shard file exists only when it is complete, and survives a power loss once this returns.
    """
    path = shard_path(folder, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(embeddings, dtype=np.float32))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def shard_problem(path: Path, rows: int, dim: int | None = None) -> str | None:
    """Why the file at `path` is not a whole shard of `rows` float32 vectors (of `dim` dimensions when
    given); None when it is. Whole = a C-ordered float32 (rows, dim) array whose file size is exactly the
    npy header plus rows * dim * 4 bytes, and which memory-maps."""
    fmt = np.lib.format
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(fh)
            else:
                return f"unexpected npy format {version}"
            header = fh.tell()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, EOFError) as exc:
        return f"unreadable header ({exc})"
    if dtype != np.float32 or fortran or len(shape) != 2:
        return f"holds a {dtype} array of shape {shape}, expected float32 rows"
    if shape[0] != rows or (dim is not None and shape[1] != dim):
        return f"holds a {shape[0]} x {shape[1]} array, expected {rows} x {dim if dim is not None else shape[1]}"
    expected = header + rows * shape[1] * 4
    if size != expected:
        return f"{size} bytes, expected {expected} ({header} header + {rows} x {shape[1]} x 4)"
    try:
        np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        return f"cannot be memory-mapped ({exc})"
    return None


def remove_torn_shards(staging: Path, n: int, shard_size: int, dim: int | None = None) -> list[int]:
    """Delete every finished shard that is not whole (see `shard_problem`), warning with its name, and
    any temporary shard file left by a killed writer; return the deleted shards (they are encoded again)."""
    remove_tmp_shards(staging)
    torn = []
    for shard, (start, end) in enumerate(shard_ranges(n, shard_size)):
        path = shard_path(staging, shard)
        if not path.exists():
            continue
        problem = shard_problem(path, end - start, dim)
        if problem is not None:
            logger.warning("shard %d (%s) is torn: %s; encoding it again", shard, path, problem)
            path.unlink()
            torn.append(shard)
    return torn


def remove_tmp_shards(staging: Path) -> None:
    folder = staging / SHARDS
    if folder.is_dir():
        for pattern in TMP_PATTERNS:
            for tmp in folder.glob(pattern):
                tmp.unlink(missing_ok=True)


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    if shard_size < 1:
        raise RagError(f"--shard-size must be at least 1, got {shard_size}")
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def _build_key(config: DenseBuildConfig, corpus_checksum: str) -> dict[str, Any]:
    return {"encoder": encoder_id(config.encoder), "corpus_checksum": corpus_checksum,
            "words_per_passage": config.words_per_passage, "stride": config.stride, "shard_size": config.shard_size}


def _staged_passages_ok(staging: Path) -> bool:
    """True when the staging folder's passage table is whole and holds the count its marker records."""
    try:
        counts = read_json(staging / PASSAGES_DONE)
        PassageStore(staging, expected=int(counts["passages"])).close()
    except (RagError, KeyError, TypeError, ValueError) as exc:
        logger.warning("%s: the staged passage table is damaged (%s); splitting the corpus again", staging, exc)
        return False
    return True


def prepare_staging(out: Path, corpus_path: Path, config: DenseBuildConfig,
                    checksum: str | None = None) -> tuple[Path, dict[str, int]]:
    """Create or reuse the staging folder and its passage table; a different build starts afresh."""
    staging = staging_dir(out)
    key = _build_key(config, checksum or file_checksum(corpus_path))
    if staging.exists():
        try:
            same = read_json(staging / BUILD_KEY) == key
        except Exception:
            same = False
        if same and (staging / PASSAGES_DONE).exists() and not _staged_passages_ok(staging):
            same = False  # the shards were encoded from that table: start afresh
        if not same:
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    write_json(staging / BUILD_KEY, key)
    if not (staging / PASSAGES_DONE).exists():
        docs = (doc for _, doc in iter_documents(corpus_path))
        counts = write_passage_store(staging, split_passages(docs, config.words_per_passage, config.stride))
        write_json(staging / PASSAGES_DONE, counts)
    return staging, read_json(staging / PASSAGES_DONE)


@dataclass
class EncodeReport:
    """What one encoding run did: shards encoded, and how (recorded in the manifest as `encoding`)."""
    shards: int
    precisions: set[str] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, shards: int, encoder: Any) -> EncodeReport:
        """A run of `shards` shards by `encoder` (nothing is recorded when it encoded none)."""
        if not shards:
            return cls(0)
        precision = getattr(encoder, "passage_precision", None)
        return cls(shards, {precision} if precision else set(), {str(getattr(encoder, "device", "cpu"))})


def encode_chunk(encoder: Any, shard_rows: int) -> int:
    """Passages per encode call: on a GPU the whole shard (one call keeps the GPU busy, and sentence-transformers
    sorts the whole shard by length); on a CPU chunks of PROGRESS_CHUNK, so progress is shown."""
    return max(1, shard_rows) if on_gpu(str(getattr(encoder, "device", "cpu"))) else PROGRESS_CHUNK


def record_encoding(staging: Path, report: EncodeReport) -> dict[str, str]:
    """Add this run's precisions and devices to the staging folder's record; return the manifest's `encoding`
    (a value joined with '+' when a resumed build encoded its shards in several ways)."""
    path = staging / ENCODING
    seen: dict[str, list[str]] = read_json(path) if path.exists() else {}
    merged = {"passage_precision": sorted(set(seen.get("passage_precision", [])) | report.precisions),
              "device": sorted(set(seen.get("device", [])) | report.devices)}
    write_json(path, merged)
    return {key: "+".join(values) or "unknown" for key, values in merged.items()}


def encode_missing_shards(staging: Path, encoder: DenseEncoder, batch_size: int | None, shard_size: int,
                          on_shard: Callable[[int], None] | None = None) -> int:
    """Encode every shard not yet on disk (single process). Returns how many were encoded now."""
    store = PassageStore(staging)
    ranges = shard_ranges(len(store), shard_size)
    todo = [i for i in range(len(ranges)) if not shard_path(staging, i).exists()]
    done_before = len(ranges) - len(todo)
    pending = set(todo)
    bar = tqdm(total=len(store), initial=sum(e - s for i, (s, e) in enumerate(ranges) if i not in pending),
               unit="passage", desc="encoding", dynamic_ncols=True)
    try:
        for shard in todo:
            start, end = ranges[shard]
            rows = [store.get(pid) for pid in range(start, end)]
            parts, chunk = [], encode_chunk(encoder, len(rows))
            for lo in range(0, len(rows), chunk):  # on a CPU, chunks only to move the progress bar
                parts.append(encode_rows(encoder, rows[lo:lo + chunk], batch_size))
                bar.update(len(parts[-1]))
            emb = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
            if emb.shape != (end - start, encoder.dim):
                raise RagError(f"the encoder returned {emb.shape[0]} x {emb.shape[1] if emb.ndim > 1 else '?'} "
                               f"embeddings for shard {shard}, expected {end - start} x {encoder.dim}")
            save_shard(staging, shard, emb)
            if on_shard is not None:
                on_shard(shard)
    finally:
        bar.close()
        store.close()
    return len(ranges) - done_before


def encode_rows(encoder: DenseEncoder, rows: list[dict], batch_size: int | None) -> np.ndarray:
    """Encode passage rows; a domain-routed encoder (MoE heads) also gets each row's `domain`."""
    texts = [_encode_text(row) for row in rows]
    if getattr(encoder, "wants_domains", False):
        return encoder.encode_passage(texts, batch_size=batch_size, domains=[row.get("domain") for row in rows])
    return encoder.encode_passage(texts, batch_size=batch_size)


def _encode_text(row: dict) -> str:
    return f"{row['title']}: {row['text']}" if row.get("title") else row["text"]


def iter_shards(staging: Path, n: int, shard_size: int):
    for shard, (start, end) in enumerate(shard_ranges(n, shard_size)):
        path = shard_path(staging, shard)
        try:
            emb = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise RagError(f"shard {shard} ({path}) is unreadable ({exc}); rerun the build to encode it "
                           "again") from None
        if len(emb) != end - start:
            raise RagError(f"shard {shard} ({path}) holds {len(emb)} rows, expected {end - start}; rerun the "
                           "build to encode it again")
        yield emb


def search_defaults(factory: str, nprobe: int | None = None, ef_search: int | None = None) -> dict[str, int]:
    """The search parameters an index is opened with unless the caller gives its own.

    Faiss's own defaults (nprobe 1, efSearch 16) lose much recall (IVF4096,Flat: 0.62 recall@10 at nprobe 1,
    0.997 at 16 on 1M vectors, bench/bench_faiss.py), so approximate indexes carry sensible ones.
    """
    out = {}
    if "IVF" in factory:
        out["nprobe"] = nprobe or 16
    if "HNSW" in factory:
        out["ef_search"] = ef_search or 128
    return out


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate_build_config(config: DenseBuildConfig) -> None:
    """Refuse a config the build cannot honour, before any work (one-line RagError naming the flag)."""
    for name in ("batch_size", "shard_size", "words_per_passage", "max_train_vectors"):
        value = getattr(config, name)
        if not _positive_int(value) and not (name == "batch_size" and value is None):
            raise RagError(f"--{name.replace('_', '-')} must be an integer of at least 1, got {value!r}")
    if not _positive_int(config.stride) or config.stride > config.words_per_passage:
        raise RagError(f"--stride must be an integer from 1 to --words-per-passage ({config.words_per_passage}), "
                       f"got {config.stride!r}")
    for name in ("nprobe", "ef_search"):
        value = getattr(config, name)
        if value is not None and not _positive_int(value):
            raise RagError(f"--{name.replace('_', '-')} must be an integer of at least 1, got {value!r}")
    if config.passage_precision not in PASSAGE_PRECISIONS:
        raise RagError(f"passage_precision must be one of {', '.join(PASSAGE_PRECISIONS)}, "
                       f"not {config.passage_precision!r}")
    if not isinstance(config.faiss, str) or not config.faiss.strip():
        raise RagError(f"--faiss must be a Faiss index-factory string, got {config.faiss!r}")


_DIM_ERRORS = ("d % ", "dimension", "multiple of")


def probe_factory(factory: str) -> FaissIndex | None:
    """Fail fast on a bad factory string. Returns a small probe index, or None when the string only fails
    at the probe's dimension (e.g. PQ48 needs a multiple of 48): then it is checked at the encoder's."""
    try:
        return FaissIndex.create(8, factory)
    except RagError as exc:
        if any(marker in str(exc) for marker in _DIM_ERRORS):
            return None
        raise


def check_training_size(index: FaissIndex, n: int, config: DenseBuildConfig) -> None:
    """Refuse, before encoding, a factory that cannot be trained on the sample this corpus gives."""
    need, why = index.training_minimum()
    take = min(n, config.max_train_vectors)
    if take >= need:
        return
    if n < need:
        raise RagError(f"--faiss {config.faiss} needs at least {need} training vectors ({why}), but the corpus "
                       f"gives {n} passages; use fewer lists/centroids (e.g. IVF{max(1, n // 39)},Flat) or Flat")
    raise RagError(f"--faiss {config.faiss} needs at least {need} training vectors ({why}), but "
                   f"--max-train-vectors is {config.max_train_vectors}; raise it")


def assemble_index(staging: Path, n: int, dim: int, config: DenseBuildConfig) -> FaissIndex:
    """Train (if the factory needs it) on a sample, then add shard by shard from memory maps."""
    index = FaissIndex.create(dim, config.faiss)
    if index.needs_training:
        rng = np.random.default_rng(0)
        take = min(n, config.max_train_vectors)
        chosen = np.sort(rng.choice(n, size=take, replace=False))
        sample, offset = [], 0
        for emb in iter_shards(staging, n, config.shard_size):
            local = chosen[(chosen >= offset) & (chosen < offset + len(emb))] - offset
            sample.append(np.asarray(emb[local]))
            offset += len(emb)
        index.train(np.concatenate(sample))
    index.reserve(n)
    for emb in tqdm(iter_shards(staging, n, config.shard_size), desc="indexing", unit="shard",
                    total=len(shard_ranges(n, config.shard_size)), dynamic_ncols=True):
        index.add(np.asarray(emb))
    return index


def driver_encoder(config: DenseBuildConfig, encode_shards: Callable[..., Any] | None) -> DenseEncoder:
    """The build's own encoder: it encodes, or, when `encode_shards` encodes elsewhere (Ray actors), only gives
    the dimension and the fingerprint, so it is loaded on the CPU in float32 and never takes GPU memory."""
    if encode_shards is None:
        return load_encoder(config.encoder, device=config.device, batch_size=config.batch_size,
                            passage_precision=config.passage_precision, token_sort=config.token_sort)
    return load_encoder(config.encoder, device="cpu", passage_precision="float32", query_precision="float32")


def build_dense_index(corpus: str | Path, out: str | Path, config: DenseBuildConfig | None = None,
                      overwrite: bool = False, encoder: DenseEncoder | None = None,
                      encode_shards: Callable[..., int | EncodeReport] | None = None) -> dict[str, Any]:
    """Build `out` from `corpus`. `encode_shards(staging, config)` lets the Ray runtime replace the local encoder
    loop; it returns an EncodeReport, or a bare shard count (then encoded as `encoder` would have)."""
    config = config or DenseBuildConfig()
    validate_build_config(config)
    out = prepare_output_dir(out, overwrite)
    corpus_path = resolve_corpus_path(corpus)
    n_docs = validate_corpus(corpus_path)
    probe = probe_factory(config.faiss)  # fail fast on a bad factory string, before any work
    with output_lock(out):  # one build per output: a second one fails at once
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        checksum = file_checksum(corpus_path)
        staging, counts = prepare_staging(out, corpus_path, config, checksum)
        n = int(counts["passages"])
        timings["passages_s"] = time.perf_counter() - t0
        try:  # everything the passage count and the encoder's dimension decide, checked before encoding
            if n < 1:
                raise RagError(f"{corpus_path}: the corpus gives no passages (every document's text is empty)")
            if probe is not None:
                check_training_size(probe, n, config)  # before loading the encoder: the count alone decides
            encoder = encoder or driver_encoder(config, encode_shards)
            dim = encoder.dim
            try:
                sized = FaissIndex.create(dim, config.faiss)
            except RagError as exc:
                raise RagError(f"--faiss {config.faiss} does not fit the encoder's {dim}-dimensional vectors "
                               f"({str(exc).rsplit(': ', 1)[-1]})") from None
            check_training_size(sized, n, config)
        except RagError:
            if not any((staging / SHARDS).glob("shard-*.npy")):
                shutil.rmtree(staging, ignore_errors=True)  # nothing worth resuming
            raise
        remove_torn_shards(staging, n, config.shard_size, dim)  # a resumed build re-encodes torn shards
        t1 = time.perf_counter()
        if encode_shards is None:
            result: int | EncodeReport = encode_missing_shards(staging, encoder, config.batch_size, config.shard_size)
        else:
            result = encode_shards(staging, config)
        report = result if isinstance(result, EncodeReport) else EncodeReport.of(result, encoder)
        encoded_now, encoding = report.shards, record_encoding(staging, report)
        remove_tmp_shards(staging)
        timings["encode_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        index = assemble_index(staging, n, dim, config)
        index.check_shape(staging, n, dim)
        index.save(staging)
        timings["index_s"] = time.perf_counter() - t2
        if not config.keep_embeddings:
            shutil.rmtree(staging / SHARDS, ignore_errors=True)
        for name in (BUILD_KEY, PASSAGES_DONE, ENCODING):
            (staging / name).unlink(missing_ok=True)
        manifest = write_manifest(
            staging, "dense", encoder=encoder_id(config.encoder), encoder_fingerprint=encoder.fingerprint(),
            dim=dim, faiss=config.faiss, metric="inner_product", normalized=True,
            corpus_path=str(corpus_path), corpus_checksum=checksum,
            counts={"documents": n_docs, "passages": n, "shards_encoded_this_run": encoded_now},
            search_defaults=search_defaults(config.faiss, config.nprobe, config.ef_search),
            config=asdict(config), encoding=encoding, timings={k: round(v, 3) for k, v in timings.items()},
            passages_per_second=round(n / max(timings["encode_s"], 1e-9), 2))
        move_into_place(staging, out, overwrite)
    return manifest
