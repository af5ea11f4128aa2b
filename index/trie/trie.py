"""The ``TitleTrie`` class: its arrays, constructor and basic facts; the rest of its methods come from
the mixins in ``build``, ``constraints``, ``updates`` and ``storage``.

Layout (all flat NumPy arrays, no per-node Python objects):

* nodes are numbered breadth-first, children of a node sorted by token, so the children of node
  ``v`` are the contiguous node ids ``ptr[v] .. ptr[v+1]-1``;
* ``tok[c]`` is the token on the edge into node ``c`` (uint16 when the vocabulary has < 64k ids, else
  int32; ``tok[0]``, the root's, is unused);
* terminals: ``term_node`` (sorted) and ``term_title`` (the title id ending there, ascending within a
  node). A node may end several titles: duplicates (same string) and tokenizer collisions (different
  strings with the same token ids, e.g. ``Zürich`` / ``Zurich`` under an uncased tokenizer).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from core.errors import RagError
from index.trie.build import BuildReport, TrieBuild
from index.trie.constraints import TrieConstraints
from index.trie.storage import TitleTable, TrieStorage
from index.trie.updates import TrieUpdates


class TitleTrie(TrieBuild, TrieConstraints, TrieUpdates, TrieStorage):
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
