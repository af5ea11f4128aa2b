"""Decoding constraints: the walks constrained beam search asks of the trie (the tokens allowed after a
prefix, the children of a node, the titles ending at a node), over the CSR base plus the update overlay.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from core.errors import RagError
from index.trie.tokens import encode_titles

_WIDE = 512  # allowed() keeps the Python list of nodes with at least this many children
_EMPTY = np.zeros(0, np.int32)
_EMPTY.setflags(write=False)


class TrieConstraints:
    """TitleTrie's lookups: base (CSR) primitives and the queries built on them."""

    meta: dict[str, Any]  # set by TitleTrie.__init__

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
        ids = encode_titles(self.tokenizer, [title], context=self.meta.get("title_context"))[0]
        return [self.start_token_id, *self.meta.get("prefix_token_ids", []), *ids, self.eos_token_id]
