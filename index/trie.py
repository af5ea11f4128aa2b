"""Compact prefix trie over token-id sequences, for trie-constrained generative retrieval.

Layout (all flat NumPy arrays, no per-node Python objects):

* nodes are numbered breadth-first, children of a node sorted by token, so the children of node
  ``v`` are the contiguous node ids ``ptr[v] .. ptr[v+1]-1``;
* ``tok[c]`` is the token on the edge into node ``c`` (uint16 when the vocabulary has < 64k ids, else
  int32; ``tok[0]``, the root's, is unused);
* terminals: ``term_node`` (sorted) and ``term_title`` (the title id ending there, ascending within a
  node). A node may end several titles: duplicates (same string) and tokenizer collisions (different
  strings with the same token ids, e.g. ``Zürich`` / ``Zurich`` under an uncased tokenizer).

Build is level by level: at depth ``d`` every sequence still running has a parent node; the pairs
``(parent, token)`` are made unique (one sort per level) and become the nodes of depth ``d+1``.
That is O(total tokens * log) and needs a few int64 arrays the size of the corpus.

Updates without a full rebuild: the CSR base is immutable; ``add`` goes into a small dict overlay
(overlay node ids start at ``num_base_nodes``; each overlay node knows its "twin" base node at the
same prefix), ``remove`` marks title ids dead and hides base nodes whose subtree no longer ends any
live title. Queries consult both; ``compact()`` folds everything into a fresh CSR base.

Persistence: ``.npy`` arrays + ``titles.jsonl`` (one JSON string per line) + ``manifest.json``,
written to a temp folder and renamed into place. No pickle anywhere.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import platform
import sys
import warnings
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError, ManifestMismatch, RagError
from core.io import atomic_dir, atomic_file, read_json, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "trie"
# Strings whose encodings fingerprint a tokenizer (vocab, normalisation: case, accents, punctuation, digits).
_FINGERPRINT_SAMPLES = (
    "Paris Hilton",
    "Zürich",
    "C++ (programming language)",
    "2001: A Space Odyssey",
    "Ærøskøbing — Ōsaka, naïve café",
    " |",
    "The QUICK brown fox's 3.14 jumps!",
)
_ARRAYS = ("tok", "ptr", "term_node", "term_title")
_CHUNK = 65536
_TITLE_CHUNK = 500_000  # titles encoded/decoded per chunk (bounds peak memory)
_WIDE = 512  # allowed() keeps the Python list of nodes with at least this many children


# ----------------------------------------------------------------------------- tokenizer helpers

def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """What the manifest records about a tokenizer."""
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "class": type(tokenizer).__name__,
        "vocab_size": int(len(tokenizer)),
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha1 of the vocab size and the encodings of a few fixed strings (no special tokens)."""
    enc = encode_titles(tokenizer, list(_FINGERPRINT_SAMPLES))
    payload = json.dumps({"vocab_size": int(len(tokenizer)), "samples": enc}, sort_keys=True)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def encode_titles(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    return [list(x) for x in out]


def _fast_encoder(tokenizer: Any, probe: Sequence[str]):
    """The Rust backend's batch encoder when it gives the same ids as the Python wrapper, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:  # a private copy without the padding/truncation the wrapper may have left configured
        from tokenizers import Tokenizer
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
    except Exception:  # noqa: BLE001
        return None
    fn = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if fn is None:
        return None

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in fn(list(texts), add_special_tokens=False)]

    try:
        sample = list(probe[:64]) + list(_FINGERPRINT_SAMPLES)
        if encode(sample) != encode_titles(tokenizer, sample):
            return None
    except Exception:  # noqa: BLE001 - any backend quirk: fall back to the wrapper
        return None
    return encode


def _lists_to_arrays(chunk: list[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, chunk), dtype=np.int64, count=len(chunk))
    flat = np.fromiter(itertools.chain.from_iterable(chunk), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _check_tokens(flat: np.ndarray) -> None:
    if flat.size and (flat.min() < 0 or flat.max() >= 2**31 - 1):
        raise InputError(f"token ids must be in [0, 2**31-1), got range [{flat.min()}, {flat.max()}]")


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


# ----------------------------------------------------------------------------- reports

@dataclass
class BuildReport:
    """What ``from_titles`` / ``add`` found: duplicates are kept as separate title ids, never merged."""

    num_titles: int = 0
    duplicates: list[tuple[str, list[int]]] = field(default_factory=list)  # same string, several ids
    collisions: list[list[int]] = field(default_factory=list)  # different strings, same token ids

    @property
    def num_duplicates(self) -> int:
        """Extra copies: a title present k times counts k-1."""
        return sum(len(ids) - 1 for _, ids in self.duplicates)


@dataclass
class UpdateReport:
    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    duplicates: list[tuple[str, list[int]]] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- build core

def _build_arrays(flat: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
    """CSR trie arrays from sequences given as flat tokens + offsets (row i = title i)."""
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    if n == 0:
        return {"tok": np.zeros(1, np.uint16), "ptr": np.array([1, 1], np.int32),
                "term_node": np.zeros(0, np.int32), "term_title": np.zeros(0, np.int32), "max_depth": 0}
    if lengths.min() <= 0:
        bad = int(np.flatnonzero(lengths <= 0)[0])
        raise InputError(f"sequence {bad} is empty")
    if n >= 2**31 - 1:
        raise InputError("too many sequences (max 2**31-2)")
    vocab = int(flat.max()) + 1
    # Rows sorted by length, longest first: at depth d the running rows are a prefix of `order`.
    order = np.argsort(-lengths, kind="stable")
    pos = offsets[:-1][order]  # start of each row in `flat`, in `order`
    sorted_len = lengths[order]
    max_depth = int(sorted_len[0])
    # n_running[d] = number of rows with length > d
    counts = np.bincount(lengths, minlength=max_depth + 1)
    n_running = n - np.cumsum(counts)  # index d -> rows with length > d
    # node ids < total tokens + 1: int32 halves the per-node bookkeeping whenever that fits
    nid_dtype = np.int32 if len(flat) < 2**31 - 2 else np.int64
    cur = np.zeros(n, dtype=nid_dtype)  # node id of each row's prefix (in `order`)
    term_node_ord = np.empty(n, dtype=nid_dtype)
    tok_dtype = np.uint16 if vocab <= 65535 else np.int32  # edge tokens: 2 bytes for vocabularies < 64k
    toks: list[np.ndarray] = [np.zeros(1, tok_dtype)]  # the root has no incoming edge (value unused)
    parents: list[np.ndarray] = [np.array([-1], nid_dtype)]
    next_id = 1
    for d in range(max_depth):
        a = int(n_running[d])
        tok_d = flat[pos[:a] + d].astype(np.int64)
        key = cur[:a].astype(np.int64) * vocab + tok_d
        del tok_d
        uniq, inv = np.unique(key, return_inverse=True)
        del key
        cur[:a] = next_id + inv.reshape(-1)
        del inv
        toks.append((uniq % vocab).astype(tok_dtype))
        parents.append((uniq // vocab).astype(nid_dtype))
        next_id += len(uniq)
        del uniq
        b = int(n_running[d + 1]) if d + 1 <= max_depth else 0
        term_node_ord[b:a] = cur[b:a]  # rows of length d+1 end here
    del cur, pos
    num_nodes = next_id
    idx_dtype = np.int32 if num_nodes < 2**31 - 1 else np.int64
    tok = np.concatenate(toks)
    del toks
    parent = np.concatenate(parents)
    del parents
    child_count = np.bincount(parent[1:], minlength=num_nodes)
    del parent
    ptr = np.empty(num_nodes + 1, dtype=np.int64)
    ptr[0] = 1
    np.cumsum(child_count, out=ptr[1:])
    ptr[1:] += 1
    del child_count
    term_node = np.empty(n, dtype=nid_dtype)
    term_node[order] = term_node_ord
    del term_node_ord, order
    perm = np.argsort(term_node, kind="stable")
    return {
        "tok": tok,
        "ptr": ptr.astype(idx_dtype),
        "term_node": term_node[perm].astype(idx_dtype),
        "term_title": perm.astype(np.int32),
        "max_depth": max_depth,
    }


# ----------------------------------------------------------------------------- the trie

class TitleTrie:
    """Compact prefix trie over token-id sequences with title ids at the terminals.

    Node ids are ints; ``-1`` means "no such node". ``root`` is the node of the empty prefix.
    """

    def __init__(self, tok: np.ndarray, ptr: np.ndarray, term_node: np.ndarray, term_title: np.ndarray, *,
                 titles: TitleTable | None = None, max_depth: int | None = None,
                 start_token_id: int | None = None, eos_token_id: int | None = None,
                 tokenizer: Any = None, meta: dict[str, Any] | None = None) -> None:
        self._tok = tok
        self._ptr = ptr
        self._term_node = term_node
        self._term_title = term_title
        self._bind()
        self._titles = titles
        self.max_depth = int(max_depth) if max_depth is not None else None
        self.start_token_id = start_token_id
        self.eos_token_id = eos_token_id
        self.tokenizer = tokenizer
        self.meta: dict[str, Any] = dict(meta or {})
        self.report = BuildReport(num_titles=self._num_base_titles)
        self._reset_updates()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, sequences: Iterable[Sequence[int]] | tuple[np.ndarray, np.ndarray], titles: Sequence[str] | None = None,
              *, start_token_id: int | None = None, eos_token_id: int | None = None, tokenizer: Any = None,
              corpus_checksum: str | None = None) -> TitleTrie:
        """Build from token-id sequences (title id = position). ``sequences`` may also be a
        ``(flat_tokens, offsets)`` pair of arrays (offsets of length n+1), the zero-copy fast path."""
        if isinstance(sequences, tuple) and len(sequences) == 2 and isinstance(sequences[0], np.ndarray):
            flat, offsets = np.asarray(sequences[0]), np.asarray(sequences[1], dtype=np.int64)
        else:
            flats, lens = [], []
            it = iter(sequences)
            while True:
                chunk = list(itertools.islice(it, _CHUNK))
                if not chunk:
                    break
                f, l = _lists_to_arrays(chunk)
                _check_tokens(f)
                flats.append(f.astype(np.int32))
                lens.append(l)
            flat = np.concatenate(flats) if flats else np.zeros(0, np.int32)
            lengths = np.concatenate(lens) if lens else np.zeros(0, np.int64)
            offsets = np.zeros(len(lengths) + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
        _check_tokens(flat)
        if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(flat):
            raise InputError("offsets must start at 0 and end at len(flat)")
        n = len(offsets) - 1
        table = None
        if titles is not None:
            if len(titles) != n:
                raise InputError(f"{len(titles)} titles for {n} sequences")
            table = titles if isinstance(titles, TitleTable) else TitleTable.from_list(titles)
        arrays = _build_arrays(flat, offsets)
        max_depth = arrays.pop("max_depth")
        meta = {"corpus_checksum": corpus_checksum}
        trie = cls(**arrays, titles=table, max_depth=max_depth, start_token_id=start_token_id,
                   eos_token_id=eos_token_id, tokenizer=tokenizer, meta=meta)
        trie.report = trie._find_duplicates()
        return trie

    @classmethod
    def from_titles(cls, titles: Sequence[str], tokenizer: Any, start_token_id: int, eos_token_id: int, *,
                    prefix_token_ids: Sequence[int] = (), corpus_checksum: str | None = None,
                    batch_size: int = _CHUNK, show_progress: bool = False) -> TitleTrie:
        """Tokenise each title (no special tokens); sequence = [start] + prefix_token_ids + ids + [eos].

        ``prefix_token_ids`` is for models trained to emit a BOS first (BART: ``[0]``).
        Empty titles raise InputError; duplicate titles are kept, reported in ``trie.report`` and warned.
        """
        titles = list(titles) if not isinstance(titles, list) else titles
        for i, t in enumerate(titles):
            if not isinstance(t, str):
                raise InputError(f"title {i} is {type(t).__name__}, expected str")
            if not t.strip():
                raise InputError(f"title {i} is empty")
        head = [int(start_token_id), *map(int, prefix_token_ids)]
        eos = int(eos_token_id)
        encode = _fast_encoder(tokenizer, titles) or (lambda texts: encode_titles(tokenizer, texts))
        flats: list[np.ndarray] = []
        lens: list[np.ndarray] = []
        steps = range(0, len(titles), batch_size)
        if show_progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="tokenise titles", unit="batch")
        for s in steps:
            chunk = titles[s:s + batch_size]
            ids = encode(chunk)
            f, l = _lists_to_arrays(ids)
            del ids
            if l.size and l.min() == 0:
                bad = s + int(np.flatnonzero(l == 0)[0])
                raise InputError(f"title {bad} ({titles[bad]!r}) tokenises to no tokens")
            if f.size and (f == eos).any():
                row = int(np.searchsorted(np.cumsum(l), int(np.flatnonzero(f == eos)[0]), side="right"))
                raise InputError(f"title {s + row} ({titles[s + row]!r}) contains the EOS token id {eos}")
            _check_tokens(f)
            # insert head and eos around each title: vectorised scatter
            k = len(head)
            n_chunk = len(l)
            new_len = l + k + 1
            new_off = np.zeros(n_chunk + 1, np.int64)
            np.cumsum(new_len, out=new_off[1:])
            out = np.empty(int(new_off[-1]), np.int32)
            for j, h in enumerate(head):
                out[new_off[:-1] + j] = h
            out[new_off[1:] - 1] = eos
            # token p of title i moves right by i*(k+1) + k
            out[np.arange(len(f)) + np.repeat(np.arange(n_chunk, dtype=np.int64) * (k + 1) + k, l)] = f
            flats.append(out)
            lens.append(new_len)
            del f, l
        flat = np.concatenate(flats) if flats else np.zeros(0, np.int32)
        del flats
        lengths = np.concatenate(lens) if lens else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        del lengths
        table = TitleTable.from_list(titles)
        trie = cls.build((flat, offsets), table, start_token_id=int(start_token_id), eos_token_id=eos,
                         tokenizer=tokenizer, corpus_checksum=corpus_checksum)
        trie.meta["prefix_token_ids"] = [int(x) for x in prefix_token_ids]
        rep = trie.report
        if rep.duplicates:
            ex = ", ".join(repr(t) for t, _ in rep.duplicates[:5])
            warnings.warn(f"{len(rep.duplicates)} titles occur more than once ({rep.num_duplicates} extra copies), "
                          f"kept as separate title ids, e.g. {ex}", stacklevel=2)
        if rep.collisions:
            log.info("%d groups of distinct titles share a token sequence", len(rep.collisions))
        return trie

    def _find_duplicates(self) -> BuildReport:
        rep = BuildReport(num_titles=self._num_base_titles)
        tn = self._term_node
        if len(tn) < 2:
            return rep
        same = tn[1:] == tn[:-1]
        if not same.any():
            return rep
        # runs of equal terminal nodes
        starts = np.flatnonzero(np.concatenate([[True], ~same]))
        ends = np.concatenate([starts[1:], [len(tn)]])
        multi = np.flatnonzero(ends - starts > 1)
        for r in multi.tolist():
            ids = self._term_title[starts[r]:ends[r]].tolist()
            if self._titles is None:
                rep.duplicates.append(("", ids))  # unknown strings: identical sequences
                continue
            by_str: dict[str, list[int]] = {}
            for i in ids:
                by_str.setdefault(self._titles[i], []).append(i)
            for t, group in by_str.items():
                if len(group) > 1:
                    rep.duplicates.append((t, group))
            if len(by_str) > 1:
                rep.collisions.append(ids)
        return rep

    # ------------------------------------------------------------------ basic facts
    @property
    def num_nodes(self) -> int:
        """Nodes in the compact base (the overlay excluded)."""
        return self._n

    @property
    def num_titles(self) -> int:
        """Title ids ever assigned (dead ones included); ``len(trie)`` counts live ones."""
        return self._num_base_titles + len(self._added_seqs_all)

    def __len__(self) -> int:
        return self.num_titles - len(self._removed)

    @property
    def root(self) -> int:
        return self._ov_root if self._ov_root >= 0 else 0

    @property
    def dirty(self) -> bool:
        """True when updates are pending in the overlay / removed set (``compact()`` folds them in)."""
        return self._ov_root >= 0 or bool(self._removed)

    def nbytes(self) -> int:
        n = sum(int(a.nbytes) for a in (self._tok, self._ptr, self._term_node, self._term_title))
        return n + (self._titles.nbytes() if self._titles is not None else 0)

    @property
    def has_titles(self) -> bool:
        return self._titles is not None

    def title(self, title_id: int) -> str:
        if self._titles is None:
            raise RagError("this trie has no title table (built from sequences only)")
        return self._titles[title_id]

    def is_live(self, title_id: int) -> bool:
        return 0 <= title_id < self.num_titles and title_id not in self._removed

    # ------------------------------------------------------------------ base (CSR) primitives
    def _bind(self) -> None:
        """Memoryviews over the arrays: bisect on them returns Python ints without NumPy call overhead."""
        self._n = int(len(self._tok))
        self._tok_mv = memoryview(np.ascontiguousarray(self._tok))
        self._ptr_mv = memoryview(np.ascontiguousarray(self._ptr))
        self._term_node_mv = memoryview(np.ascontiguousarray(self._term_node))
        self._num_base_titles = int(len(self._term_title))

    def _base_step(self, v: int, t: int) -> int:
        pm = self._ptr_mv
        lo = pm[v]
        hi = pm[v + 1]
        if lo == hi:
            return -1
        tm = self._tok_mv
        i = bisect_left(tm, t, lo, hi)
        if i < hi and tm[i] == t:
            return i  # children are numbered like their edges
        return -1

    def _base_terms(self, v: int) -> np.ndarray:
        tm = self._term_node_mv
        i = bisect_left(tm, v)
        if i == len(tm) or tm[i] != v:
            return _EMPTY
        return self._term_title[i:bisect_right(tm, v, i)]

    def _base_parent(self, v: int) -> int:
        return bisect_right(self._ptr_mv, v) - 1

    # ------------------------------------------------------------------ queries
    def step(self, node: int, token: int) -> int:
        """Child of ``node`` along ``token``, or -1."""
        if node < 0:
            return -1
        if node >= self._n:
            k = node - self._n
            ch = self._ov_children[k].get(token)
            if ch is not None:
                return ch
            twin = self._ov_twin[k]
            if twin < 0:
                return -1
            node = twin
        c = self._base_step(node, token)
        if c >= 0 and self._hidden and c in self._hidden:
            return -1
        return c

    def children(self, node: int) -> np.ndarray:
        """Sorted tokens that may follow ``node`` (a read-only view into the trie when nothing is pending)."""
        if node < 0:
            return _EMPTY
        if node >= self._n:
            k = node - self._n
            twin = self._ov_twin[k]
            base = self.children(twin) if twin >= 0 else _EMPTY
            extra = self._ov_children[k]
            if not extra:
                return base
            return np.union1d(base, np.fromiter(extra.keys(), np.int64, len(extra))).astype(np.int32)
        lo = self._ptr_mv[node]
        hi = self._ptr_mv[node + 1]
        toks = self._tok[lo:hi]
        if self._hidden and lo < hi:
            h = self._hidden_array()
            a, b = int(h.searchsorted(lo)), int(h.searchsorted(hi))
            if a < b:  # some children are hidden
                keep = np.ones(hi - lo, bool)
                keep[h[a:b] - lo] = False
                return toks[keep]
        return toks

    def walk(self, prefix: Iterable[int], node: int | None = None) -> int:
        """Node reached from ``node`` (default root) along ``prefix``, or -1."""
        v = self.root if node is None else node
        for t in prefix:
            v = self.step(v, int(t))
            if v < 0:
                return -1
        return v

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens allowed after ``prefix`` (empty list when the prefix is not in the trie)."""
        v = self.walk(prefix)
        if v < 0:
            return []
        ch = self.children(v)
        if len(ch) < _WIDE:
            return ch.tolist()
        hit = self._wide_cache.get(v)  # wide nodes (the first title token...): keep the Python ints
        if hit is None:
            hit = tuple(ch.tolist())
            if len(self._wide_cache) < 4096:
                self._wide_cache[v] = hit
        return list(hit)

    next_tokens = allowed

    def titles_at(self, node: int) -> list[int]:
        """Live title ids ending exactly at ``node``."""
        if node < 0:
            return []
        out: list[int] = []
        if node >= self._n:
            k = node - self._n
            out.extend(i for i in self._ov_terms[k] if i not in self._removed)
            node = self._ov_twin[k]
            if node < 0:
                return sorted(out)
        ids = self._base_terms(node).tolist()
        if self._removed:
            ids = [i for i in ids if i not in self._removed]
        return sorted(out + ids) if out else ids

    def is_terminal(self, node: int) -> bool:
        return bool(self.titles_at(node))

    def lookup(self, sequence: Sequence[int]) -> list[int]:
        """Live title ids whose full sequence is ``sequence``."""
        return self.titles_at(self.walk(sequence))

    def __contains__(self, sequence: Sequence[int]) -> bool:
        return bool(self.lookup(sequence))

    def encode(self, title: str) -> list[int]:
        """The trie sequence for a title string (needs the tokenizer)."""
        if self.tokenizer is None:
            raise RagError("this trie has no tokenizer: pass sequences explicitly or load(tokenizer=...)")
        if self.start_token_id is None or self.eos_token_id is None:
            raise RagError("this trie has no start/eos token ids")
        ids = encode_titles(self.tokenizer, [title])[0]
        return [self.start_token_id, *self.meta.get("prefix_token_ids", []), *ids, self.eos_token_id]

    # ------------------------------------------------------------------ sequences (for compact/tests)
    def live_title_ids(self) -> np.ndarray:
        ids = np.arange(self.num_titles, dtype=np.int64)
        if self._removed:
            ids = ids[~np.isin(ids, np.fromiter(self._removed, np.int64, len(self._removed)))]
        return ids

    def base_sequences(self, title_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(flat, offsets) of the base sequences of ``title_ids`` (default all base ids), vectorised
        walk up the parent links."""
        if title_ids is None:
            title_ids = np.arange(self._num_base_titles)
        title_ids = np.asarray(title_ids, np.int64)
        inv = self._title_pos()
        nodes = self._term_node[inv[title_ids]].astype(np.int64)
        idx = self._ptr.dtype
        parent = np.empty(self._n, idx)
        parent[0] = -1
        parent[1:] = np.repeat(np.arange(self._n, dtype=idx), np.diff(self._ptr))
        depth = np.zeros(len(nodes), np.int64)
        cur = nodes.copy()
        active = cur > 0
        while active.any():
            depth[active] += 1
            cur[active] = parent[cur[active]]
            active = cur > 0
        offsets = np.zeros(len(nodes) + 1, np.int64)
        np.cumsum(depth, out=offsets[1:])
        flat = np.empty(int(offsets[-1]), np.int32)
        cur = nodes.copy()
        k = depth.copy()  # next position to fill, from the end
        active = cur > 0
        while active.any():
            k[active] -= 1
            flat[offsets[:-1][active] + k[active]] = self._tok[cur[active]]
            cur[active] = parent[cur[active]]
            active = cur > 0
        return flat, offsets

    def sequence_of(self, title_id: int) -> list[int]:
        if title_id >= self._num_base_titles:
            return list(self._added_seqs_all[title_id])
        flat, off = self.base_sequences(np.array([title_id]))
        return flat.tolist()

    # ------------------------------------------------------------------ updates
    def _reset_updates(self) -> None:
        self._wide_cache: dict[int, tuple[int, ...]] = {}
        self._removed: set[int] = set()
        self._hidden: set[int] = set()
        self._hidden_arr: np.ndarray | None = None
        self._ov_children: list[dict[int, int]] = []
        self._ov_twin: list[int] = []
        self._ov_terms: list[list[int]] = []
        self._ov_parent: list[int] = []
        self._ov_token: list[int] = []
        self._ov_root = -1
        self._added_seqs_all: dict[int, tuple[int, ...]] = {}
        self._added_node: dict[int, int] = {}
        self._title_pos_cache: np.ndarray | None = None

    def _hidden_array(self) -> np.ndarray:
        if self._hidden_arr is None:
            self._hidden_arr = np.fromiter(self._hidden, np.int64, len(self._hidden))
            self._hidden_arr.sort()
        return self._hidden_arr

    def _title_pos(self) -> np.ndarray:
        if self._title_pos_cache is None:
            inv = np.empty(self._num_base_titles, np.int64)
            inv[self._term_title] = np.arange(self._num_base_titles)
            self._title_pos_cache = inv
        return self._title_pos_cache

    def _new_ov_node(self, twin: int, parent: int, token: int) -> int:
        self._ov_children.append({})
        self._ov_twin.append(twin)
        self._ov_terms.append([])
        self._ov_parent.append(parent)
        self._ov_token.append(token)
        return self._n + len(self._ov_twin) - 1

    def _sequences_for(self, titles: Sequence[str], sequences: Sequence[Sequence[int]] | None) -> list[list[int]]:
        if sequences is not None:
            if len(sequences) != len(titles):
                raise InputError(f"{len(titles)} titles for {len(sequences)} sequences")
            seqs = [list(map(int, s)) for s in sequences]
            for i, s in enumerate(seqs):
                if not s:
                    raise InputError(f"sequence {i} is empty")
            return seqs
        for i, t in enumerate(titles):
            if not isinstance(t, str) or not t.strip():
                raise InputError(f"title {i} is empty")
        if self.tokenizer is None or self.start_token_id is None or self.eos_token_id is None:
            raise RagError("add/remove by title needs the tokenizer and start/eos ids: "
                           "pass sequences=..., or load(dir, tokenizer=...)")
        head = [self.start_token_id, *self.meta.get("prefix_token_ids", [])]
        out = []
        for i, ids in enumerate(encode_titles(self.tokenizer, titles)):
            if not ids:
                raise InputError(f"title {i} ({titles[i]!r}) tokenises to no tokens")
            if self.eos_token_id in ids:
                raise InputError(f"title {i} ({titles[i]!r}) contains the EOS token id {self.eos_token_id}")
            out.append(head + ids + [self.eos_token_id])
        return out

    def add(self, titles: Sequence[str], sequences: Sequence[Sequence[int]] | None = None) -> UpdateReport:
        """Add titles (tokenised with the trie's tokenizer unless ``sequences`` is given) to the overlay.

        A title already present (live, same string) is added again as a new id and reported."""
        if self._titles is None:
            raise RagError("this trie has no title table; rebuild it with titles")
        titles = list(titles)
        seqs = self._sequences_for(titles, sequences)
        rep = UpdateReport()
        self._wide_cache.clear()
        if self._ov_root < 0:
            self._ov_root = self._new_ov_node(0, -1, -1)
        for title, seq in zip(titles, seqs):
            v = self._ov_root
            for t in seq:
                k = v - self._n
                nxt = self._ov_children[k].get(t)
                if nxt is None:
                    twin = self._ov_twin[k]
                    base_child = self._base_step(twin, t) if twin >= 0 else -1
                    nxt = self._new_ov_node(base_child, v, t)
                    self._ov_children[k][t] = nxt
                v = nxt
            same = [i for i in self.titles_at(v) if self._titles[i] == title]
            tid = self._titles.append(title)
            self._ov_terms[v - self._n].append(tid)
            self._added_seqs_all[tid] = tuple(seq)
            self.max_depth = max(self.max_depth or 0, len(seq))
            self._added_node[tid] = v
            rep.added.append(tid)
            if same:
                rep.duplicates.append((title, same + [tid]))
        if rep.duplicates:
            warnings.warn(f"{len(rep.duplicates)} added titles were already present; kept as separate ids",
                          stacklevel=2)
        return rep

    def remove(self, titles: Sequence[str], sequences: Sequence[Sequence[int]] | None = None) -> UpdateReport:
        """Remove every live id of each title string. Titles not present are listed in ``not_found``."""
        titles = list(titles)
        rep = UpdateReport()
        if self._titles is None:
            raise RagError("this trie has no title table; use remove_ids")
        if sequences is None and self.tokenizer is None:
            # no tokenizer: find ids by string (one pass over the table)
            wanted = set(titles)
            found: dict[str, list[int]] = {}
            for i, t in enumerate(self._titles.to_list()):
                if t in wanted and i not in self._removed:
                    found.setdefault(t, []).append(i)
            ids = [i for t in dict.fromkeys(titles) for i in found.get(t, [])]
            rep.not_found = [t for t in titles if t not in found]
        else:
            seqs = self._sequences_for(titles, sequences)
            ids = []
            for title, seq in zip(titles, seqs):
                hit = [i for i in self.lookup(seq) if self._titles[i] == title]
                if not hit:
                    rep.not_found.append(title)
                ids.extend(hit)
        rep.removed = self.remove_ids(ids)
        return rep

    def remove_ids(self, title_ids: Iterable[int]) -> list[int]:
        """Mark title ids dead and hide the branches that no longer end a live title."""
        done = []
        self._wide_cache.clear()
        for tid in dict.fromkeys(int(i) for i in title_ids):
            if not self.is_live(tid):
                continue
            self._removed.add(tid)
            done.append(tid)
            if tid >= self._num_base_titles:
                self._remove_overlay(tid)
            else:
                self._hide_up(int(self._term_node[self._title_pos()[tid]]))
        return done

    def _remove_overlay(self, tid: int) -> None:
        v = self._added_node.pop(tid)
        k = v - self._n
        self._ov_terms[k].remove(tid)
        # prune overlay nodes that end nothing and lead nowhere
        while v != self._ov_root:
            k = v - self._n
            if self._ov_terms[k] or self._ov_children[k]:
                break
            p = self._ov_parent[k]
            del self._ov_children[p - self._n][self._ov_token[k]]
            v = p

    def _hide_up(self, v: int) -> None:
        changed = False
        while v > 0:
            if any(i not in self._removed for i in self._base_terms(v).tolist()):
                break
            lo, hi = int(self._ptr[v]), int(self._ptr[v + 1])
            if any(c not in self._hidden for c in range(lo, hi)):
                break
            self._hidden.add(v)
            changed = True
            v = self._base_parent(v)
        if changed:
            self._hidden_arr = None

    def compact(self) -> np.ndarray:
        """Fold the overlay and removals into a fresh CSR base. Title ids are renumbered (live ids in
        increasing old-id order); returns ``old_to_new`` (int64, -1 for removed ids)."""
        old_num = self.num_titles
        live = self.live_title_ids()
        base_live = live[live < self._num_base_titles]
        added_live = live[live >= self._num_base_titles].tolist()
        flat_b, off_b = self.base_sequences(base_live)
        add_seqs = [self._added_seqs_all[i] for i in added_live]
        flat_a, len_a = _lists_to_arrays(add_seqs) if add_seqs else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        flat = np.concatenate([flat_b, flat_a.astype(np.int32)])
        offsets = np.concatenate([off_b, off_b[-1] + np.cumsum(len_a)])
        titles = None
        if self._titles is not None:
            all_titles = self._titles.to_list()
            titles = TitleTable.from_list([all_titles[i] for i in live.tolist()])
        arrays = _build_arrays(flat, offsets)
        self.max_depth = arrays.pop("max_depth")
        self._tok, self._ptr = arrays["tok"], arrays["ptr"]
        self._term_node, self._term_title = arrays["term_node"], arrays["term_title"]
        self._bind()
        self._titles = titles
        self._reset_updates()
        self.report = self._find_duplicates()
        old_to_new = np.full(old_num, -1, np.int64)
        old_to_new[live] = np.arange(len(live))
        return old_to_new

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
            "counts": {"titles": self._num_base_titles, "nodes": self._n, "max_depth": self.max_depth,
                       "duplicates": self.report.num_duplicates, "collisions": len(self.report.collisions)},
            "corpus_checksum": self.meta.get("corpus_checksum"),
            "titles_sha1": titles_sha1,
            "arrays": files,
            "versions": versions,
        }

    @classmethod
    def load(cls, path: str | Path, tokenizer: Any = None, *, corpus_checksum: str | None = None,
             mmap: bool = False, verify: bool = False) -> TitleTrie:
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
                "manifest": man}
        trie = cls(**arrays, titles=table, max_depth=counts.get("max_depth"),
                   start_token_id=man.get("start_token_id"), eos_token_id=man.get("eos_token_id"),
                   tokenizer=tokenizer, meta=meta)
        trie.report = trie._find_duplicates()
        return trie


_EMPTY = np.zeros(0, np.int32)
_EMPTY.setflags(write=False)
