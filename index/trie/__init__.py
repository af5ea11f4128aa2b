"""Compact prefix trie over token-id sequences, for trie-constrained generative retrieval.

Submodules (imports run one way: ``tokens`` <- ``storage`` <- ``build`` <- ``updates``; ``trie`` puts the
class together):

* ``tokens``: tokenising titles (``encode_titles``, ``tokenizer_info`` / ``tokenizer_fingerprint``, the fast
  Rust-backend encoder) and the list -> flat-array helpers;
* ``storage``: ``TitleTable`` (the title strings), ``titles.jsonl``, ``save`` / ``load`` of the trie folder
  and its manifest, ``FORMAT_VERSION`` / ``KIND``;
* ``build``: ``BuildReport``, the level-by-level CSR build and the constructors ``build`` / ``from_titles``;
* ``updates``: ``UpdateReport``, ``add`` / ``remove`` / ``remove_ids`` through the overlay, ``compact``;
* ``constraints``: the decoding side: ``step``, ``children``, ``walk``, ``allowed`` (``next_tokens``),
  ``titles_at``, ``lookup``;
* ``trie``: ``TitleTrie`` (constructor and basic facts) on top of the mixins of the four above.
"""
from index.trie.build import BuildReport
from index.trie.storage import FORMAT_VERSION, KIND, TitleTable
from index.trie.tokens import (
    _fast_encoder,  # noqa: F401  (private; tests import it from here)
    encode_titles,
    tokenizer_fingerprint,
    tokenizer_info,
)
from index.trie.trie import TitleTrie
from index.trie.updates import UpdateReport

__all__ = [
    "FORMAT_VERSION",
    "KIND",
    "BuildReport",
    "TitleTable",
    "TitleTrie",
    "UpdateReport",
    "encode_titles",
    "tokenizer_fingerprint",
    "tokenizer_info",
]
