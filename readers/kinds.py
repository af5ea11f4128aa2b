"""The one registry of reader kinds: kind -> "module:Class", imported only when used.

A reader class (a `readers.base.BaseReader`) names its `default_model` and loads its base with
`load_base(name) -> (model, tokenizer)`: adding a kind is one module plus one line here. This module
imports nothing, so the CLI can list the kinds without loading torch.
"""
from __future__ import annotations

READER_KINDS: dict[str, str] = {"fid": "readers.fid:FiDReader", "causal": "readers.causal:CausalReader"}
