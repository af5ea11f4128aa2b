"""Updating the trie: adding and removing titles, and ``compact``.

Updates without a full rebuild: the CSR base is immutable; ``add`` goes into a small dict overlay
(overlay node ids start at ``num_base_nodes``; each overlay node knows its "twin" base node at the
same prefix), ``remove`` marks title ids dead and hides base nodes whose subtree no longer ends any
live title. Queries consult both; ``compact()`` folds everything into a fresh CSR base.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import InputError, RagError
from index.trie.build import _build_arrays
from index.trie.storage import TitleTable
from index.trie.tokens import _lists_to_arrays, encode_titles


@dataclass
class UpdateReport:
    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    duplicates: list[tuple[str, list[int]]] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


class TrieUpdates:
    """TitleTrie's update overlay: ``add``, ``remove``, ``remove_ids``, ``compact``, and reading the
    sequences back out of the base."""

    meta: dict[str, Any]  # set by TitleTrie.__init__

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
        for i, ids in enumerate(encode_titles(self.tokenizer, titles, context=self.meta.get("title_context"))):
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
