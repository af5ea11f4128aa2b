"""Building the trie: the CSR arrays from token-id sequences and the constructors ``build`` /
``from_titles``.

Build is level by level: at depth ``d`` every sequence still running has a parent node; the pairs
``(parent, token)`` are made unique (one sort per level) and become the nodes of depth ``d+1``.
That is O(total tokens * log) and needs a few int64 arrays the size of the corpus.
"""
from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import InputError
from index.trie.storage import TitleTable
from index.trie.tokens import (
    CONTINUATION_SPACE,
    _check_tokens,
    _fast_encoder,
    _lists_to_arrays,
    encode_continuations,
    encode_titles,
)

if TYPE_CHECKING:
    from typing_extensions import Self  # the TitleTrie the mixin ends up in

log = logging.getLogger(__name__)

_CHUNK = 65536


# ----------------------------------------------------------------------------- reports

@dataclass
class BuildReport:
    """What ``from_titles`` / ``add`` found: duplicates are kept as separate title ids, never merged."""

    num_titles: int = 0
    duplicates: list[tuple[str, list[int]]] = field(default_factory=list)  # same string, several ids
    collisions: list[list[int]] = field(default_factory=list)  # different strings, same token ids
    # with a context: title ids whose tokens merge with the context's (encoded alone instead, see encode_continuations)
    context_mismatches: list[int] = field(default_factory=list)

    @property
    def num_duplicates(self) -> int:
        """Extra copies: a title present k times counts k-1."""
        return sum(len(ids) - 1 for _, ids in self.duplicates)


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


class TrieBuild:
    """TitleTrie's constructors from sequences or titles, and the duplicate/collision report."""

    meta: dict[str, Any]  # set by TitleTrie.__init__
    report: BuildReport

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, sequences: Iterable[Sequence[int]] | tuple[np.ndarray, np.ndarray], titles: Sequence[str] | None = None,
              *, start_token_id: int | None = None, eos_token_id: int | None = None, tokenizer: Any = None,
              corpus_checksum: str | None = None) -> Self:
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
                    batch_size: int = _CHUNK, show_progress: bool = False, context: str | None = None) -> Self:
        """Tokenise each title (no special tokens); sequence = [start] + prefix_token_ids + ids + [eos].

        ``prefix_token_ids`` is for models trained to emit a BOS first (BART: ``[0]``).
        ``context`` (decoder-only models): titles are tokenised as they continue this text after one space
        (``tokens.encode_continuations``); ``start_token_id`` is then the context's last token. It is kept in
        the manifest (``title_context``) so ``add`` / ``remove`` / ``encode`` tokenise the same way; titles whose
        tokens merge with the context's are listed in ``trie.report.context_mismatches`` and warned.
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
        mismatches: list[int] = []
        if context is None:
            encode = _fast_encoder(tokenizer, titles) or (lambda texts: encode_titles(tokenizer, texts))
        else:
            probe = [context + CONTINUATION_SPACE + t for t in titles[:64]]
            base = _fast_encoder(tokenizer, probe) or (lambda texts: encode_titles(tokenizer, texts))
            offset = [0]

            def encode(texts, base=base, offset=offset):
                ids, bad = encode_continuations(tokenizer, context, texts, encode=base)
                mismatches.extend(offset[0] + i for i in bad)
                offset[0] += len(texts)
                return ids
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
        trie.meta["title_context"] = context
        rep = trie.report
        rep.context_mismatches = mismatches
        if mismatches:
            ex = ", ".join(f"{i} ({titles[i]!r})" for i in mismatches[:5])
            warnings.warn(f"{len(mismatches)} titles merge with the end of the context {context!r} when tokenised "
                          f"after it; encoded on their own instead (not the model's canonical tokens), e.g. {ex}",
                          stacklevel=2)
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
