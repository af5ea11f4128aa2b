"""Storage: the title table (all title strings in one UTF-8 blob) and the trie folder on disk.

Persistence: ``.npy`` arrays + ``titles.jsonl`` (one JSON string per line) + ``manifest.json``,
written to a temp folder and renamed into place. No pickle anywhere.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import InputError, ManifestMismatch
from core.io import atomic_dir, atomic_file, read_json, write_json
from index.trie.tokens import tokenizer_info

if TYPE_CHECKING:
    from typing_extensions import Self  # the TitleTrie the mixin ends up in

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "trie"
_ARRAYS = ("tok", "ptr", "term_node", "term_title")
_TITLE_CHUNK = 500_000  # titles encoded/decoded per chunk (bounds peak memory)


# ----------------------------------------------------------------------------- titles

class TitleTable:
    """Title strings stored as one UTF-8 blob (NUL-separated) + start offsets; appended titles in a list."""

    def __init__(self, blob: np.ndarray, starts: np.ndarray) -> None:
        self._blob = blob
        self._starts = starts  # len n+1; title i = blob[starts[i] : starts[i+1]-1]
        self._extra: list[str] = []

    @classmethod
    def from_list(cls, titles: Sequence[str]) -> TitleTable:
        return cls.from_chunks(titles[i:i + _TITLE_CHUNK] for i in range(0, len(titles), _TITLE_CHUNK))

    @classmethod
    def from_chunks(cls, chunks: Iterable[Sequence[str]]) -> TitleTable:
        """Build from successive lists of titles (encoded chunk by chunk to bound peak memory)."""
        parts: list[bytes] = []
        n = 0
        for chunk in chunks:
            for i, t in enumerate(chunk):
                if not isinstance(t, str):
                    raise InputError(f"title {n + i} is {type(t).__name__}, expected str")
            if chunk:
                part = ("\x00".join(chunk) + "\x00").encode("utf-8")
                if part.count(b"\x00") != len(chunk):
                    bad = next(i for i, t in enumerate(chunk) if "\x00" in t)
                    raise InputError(f"title {n + bad} contains a NUL character: {chunk[bad]!r}")
                parts.append(part)
            n += len(chunk)
        blob = np.frombuffer(b"".join(parts), dtype=np.uint8)
        del parts
        ends = np.flatnonzero(blob == 0)
        starts = np.empty(n + 1, dtype=np.int64)
        starts[0] = 0
        starts[1:] = ends + 1
        return cls(blob, starts)

    @property
    def num_base(self) -> int:
        return len(self._starts) - 1

    def __len__(self) -> int:
        return self.num_base + len(self._extra)

    def __getitem__(self, i: int) -> str:
        i = int(i)
        nb = self.num_base
        if 0 <= i < nb:
            a, b = int(self._starts[i]), int(self._starts[i + 1]) - 1
            return self._blob[a:b].tobytes().decode("utf-8")
        if nb <= i < len(self):
            return self._extra[i - nb]
        raise IndexError(f"title id {i} out of range (0..{len(self) - 1})")

    def append(self, title: str) -> int:
        self._extra.append(title)
        return len(self) - 1

    def to_list(self) -> list[str]:
        out: list[str] = []
        for chunk in self.iter_chunks():
            out.extend(chunk)
        return out

    def iter_chunks(self, size: int = _TITLE_CHUNK) -> Iterable[list[str]]:
        """All titles (base then appended) as successive lists of at most ``size``."""
        nb = self.num_base
        for a in range(0, nb, size):
            b = min(nb, a + size)
            raw = self._blob[int(self._starts[a]):int(self._starts[b])].tobytes()
            yield raw.decode("utf-8").split("\x00")[:-1]
        for a in range(0, len(self._extra), size):
            yield self._extra[a:a + size]

    def nbytes(self) -> int:
        return int(self._blob.nbytes + self._starts.nbytes)


def _write_titles(path: Path, table: TitleTable) -> str:
    """titles.jsonl: one JSON string per line. Returns the sha1 of the NUL-joined titles."""
    enc = json.JSONEncoder(ensure_ascii=False).encode
    h = hashlib.sha1()
    first = True
    with atomic_file(path) as fh:
        for chunk in table.iter_chunks():
            if not chunk:
                continue
            fh.write("\n".join(map(enc, chunk)))
            fh.write("\n")
            h.update((("" if first else "\x00") + "\x00".join(chunk)).encode("utf-8"))
            first = False
    return h.hexdigest()


def _read_titles(path: Path) -> TitleTable:
    """Read titles.jsonl chunk by chunk straight into a TitleTable (no list of all titles)."""
    if not path.exists():
        raise InputError("file not found", path)

    def chunks():
        with open(path, "rb") as fh:
            while True:
                lines = fh.readlines(32 << 20)
                if not lines:
                    return
                body = b",".join(x.rstrip(b"\r\n") for x in lines if x.strip())
                if not body:
                    continue
                # JSON strings never hold a raw newline, so the lines join into one JSON array.
                try:
                    chunk = json.loads(b"[" + body + b"]")
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InputError(f"malformed titles file ({exc})", path) from None
                if not all(isinstance(t, str) for t in chunk):
                    raise InputError("titles file must hold one JSON string per line", path)
                yield chunk

    return TitleTable.from_chunks(chunks())


class TrieStorage:
    """TitleTrie's persistence: ``save`` / ``load`` of the trie folder and its manifest."""

    meta: dict[str, Any]  # set by TitleTrie.__init__
    report: Any  # build.BuildReport

    # ------------------------------------------------------------------ persistence
    def save(self, out: str | Path, *, overwrite: bool = False, corpus_checksum: str | None = None) -> Path:
        """Write arrays (.npy), titles.jsonl and manifest.json via a temp folder + rename.
        Pending updates are compacted first (title ids renumbered, see ``compact``)."""
        if self.dirty:
            log.info("compacting pending trie updates before save")
            self.compact()
        if corpus_checksum is not None:
            self.meta["corpus_checksum"] = corpus_checksum
        arrays = {"tok": self._tok, "ptr": self._ptr, "term_node": self._term_node, "term_title": self._term_title}
        out = Path(out)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            files = {}
            for name, arr in arrays.items():
                arr = np.ascontiguousarray(arr)
                np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
                files[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape),
                               "sha1": hashlib.sha1(arr.data).hexdigest()}
            titles_sha1 = None
            if self._titles is not None:
                titles_sha1 = _write_titles(tmp / "titles.jsonl", self._titles)
            write_json(tmp / "manifest.json", self._manifest(files, titles_sha1))
        return out

    def _manifest(self, files: dict[str, Any], titles_sha1: str | None) -> dict[str, Any]:
        versions = {"format": FORMAT_VERSION, "python": platform.python_version(), "numpy": np.__version__}
        try:
            from importlib.metadata import version
            versions["rag-toolkit"] = version("rag-toolkit")
        except Exception:  # noqa: BLE001
            pass
        if "transformers" in sys.modules:
            versions["transformers"] = sys.modules["transformers"].__version__
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "tokenizer": tokenizer_info(self.tokenizer) if self.tokenizer is not None else None,
            "start_token_id": self.start_token_id,
            "eos_token_id": self.eos_token_id,
            "prefix_token_ids": self.meta.get("prefix_token_ids", []),
            "title_context": self.meta.get("title_context"),
            "counts": {"titles": self._num_base_titles, "nodes": self._n, "max_depth": self.max_depth,
                       "duplicates": self.report.num_duplicates, "collisions": len(self.report.collisions),
                       "context_mismatches": len(self.report.context_mismatches)},
            "corpus_checksum": self.meta.get("corpus_checksum"),
            "titles_sha1": titles_sha1,
            "arrays": files,
            "versions": versions,
        }

    @classmethod
    def load(cls, path: str | Path, tokenizer: Any = None, *, corpus_checksum: str | None = None,
             mmap: bool = False, verify: bool = False) -> Self:
        """Load a saved trie. With ``tokenizer``, its vocab size and fingerprint must match the manifest
        (else ManifestMismatch naming each difference); likewise ``corpus_checksum`` when given.
        ``mmap`` maps the arrays read-only; ``verify`` re-hashes them against the manifest."""
        path = Path(path)
        man = read_json(path / "manifest.json")
        if not isinstance(man, dict) or man.get("kind") != KIND:
            raise ManifestMismatch(f"{path}: not a trie (manifest kind {man.get('kind') if isinstance(man, dict) else None!r})")
        if man.get("format_version") != FORMAT_VERSION:
            raise ManifestMismatch(f"{path}: trie format {man.get('format_version')} != supported {FORMAT_VERSION}")
        diffs: list[str] = []
        if tokenizer is not None:
            saved = man.get("tokenizer")
            if saved is None:
                warnings.warn(f"{path}: trie was saved without tokenizer info; cannot check the tokenizer",
                              stacklevel=2)
            else:
                given = tokenizer_info(tokenizer)
                if saved.get("vocab_size") != given["vocab_size"]:
                    diffs.append(f"tokenizer vocab size {saved.get('vocab_size')} (manifest) != {given['vocab_size']} (given)")
                if saved.get("fingerprint") != given["fingerprint"]:
                    diffs.append(f"tokenizer fingerprint {saved.get('fingerprint')} (manifest) != {given['fingerprint']} (given): "
                                 "the tokenizers encode the same text differently")
                if diffs and saved.get("name_or_path") != given["name_or_path"]:
                    diffs.append(f"tokenizer name_or_path {saved.get('name_or_path')!r} (manifest) vs {given['name_or_path']!r} (given)")
        if corpus_checksum is not None and man.get("corpus_checksum") != corpus_checksum:
            diffs.append(f"corpus checksum {man.get('corpus_checksum')!r} (manifest) != {corpus_checksum!r} (given)")
        if diffs:
            raise ManifestMismatch(f"{path}: trie manifest does not match: " + "; ".join(diffs))
        arrays = {}
        for name in _ARRAYS:
            f = path / f"{name}.npy"
            if not f.exists():
                raise InputError("file not found", f)
            arr = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
            spec = man.get("arrays", {}).get(name, {})
            if spec and (str(arr.dtype) != spec.get("dtype") or list(arr.shape) != spec.get("shape")):
                raise ManifestMismatch(f"{f}: dtype/shape {arr.dtype}{list(arr.shape)} != manifest "
                                       f"{spec.get('dtype')}{spec.get('shape')}")
            if verify and spec.get("sha1") and hashlib.sha1(np.ascontiguousarray(arr).data).hexdigest() != spec["sha1"]:
                raise ManifestMismatch(f"{f}: content checksum differs from the manifest")
            arrays[name] = arr
        counts = man.get("counts", {})
        if len(arrays["tok"]) != counts.get("nodes") or len(arrays["term_title"]) != counts.get("titles"):
            raise ManifestMismatch(f"{path}: array sizes do not match the manifest counts {counts}")
        table = None
        tf = path / "titles.jsonl"
        if tf.exists():
            table = _read_titles(tf)
            if len(table) != counts.get("titles"):
                raise ManifestMismatch(f"{tf}: {len(table)} titles != manifest count {counts.get('titles')}")
        meta = {"corpus_checksum": man.get("corpus_checksum"), "prefix_token_ids": man.get("prefix_token_ids", []),
                "title_context": man.get("title_context"), "manifest": man}
        trie = cls(**arrays, titles=table, max_depth=counts.get("max_depth"),
                   start_token_id=man.get("start_token_id"), eos_token_id=man.get("eos_token_id"),
                   tokenizer=tokenizer, meta=meta)
        trie.report = trie._find_duplicates()
        return trie
