"""`--peft-options KEY=VALUE,...`: typed, checked before any model loads, and reaching the method."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from core.peft import PeftError, peft_config
from core.peft.api import method_overrides, parse_peft_options


def test_values_are_typed_by_the_field():
    opts = parse_peft_options("iaa", " placement=houlsby , init=small,init_std=0.01, r=8,first_c=use")
    assert opts == {"placement": "houlsby", "init": "small", "init_std": 0.01, "r": 8, "first_c": "use"}
    cfg = peft_config("iaa", **opts)
    assert (cfg.placement, cfg.init, cfg.init_std, cfg.r, cfg.first_c) == ("houlsby", "small", 0.01, 8, "use")


@pytest.mark.parametrize("text, message", [
    ("placement", "is not KEY=VALUE"),
    ("colour=red", "iaa has no option 'colour'"),
    ("r=eight", "r='eight' is not a int"),
    ("placement=middle", "placement must be one of block, houlsby"),
])
def test_bad_options_name_the_problem(text, message):
    with pytest.raises(PeftError, match=message):
        parse_peft_options("iaa", text)


def test_rank_and_options_merge_and_empty_is_nothing():
    cfg = SimpleNamespace(peft="adapter", rank=4, peft_options="init=small")
    assert method_overrides(cfg) == {"rank": 4, "init": "small"}
    assert method_overrides(SimpleNamespace(peft="lora", rank=None, peft_options="")) == {}
    with pytest.raises(PeftError, match="first_c"):  # the scattered adapter has no chain, so no first C
        method_overrides(SimpleNamespace(peft="adapter", rank=None, peft_options="first_c=use"))


def test_cli_refuses_a_bad_option_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rag.cli", "train", "retriever", "--kind", "dense", "--corpus",
                           str(tmp_path / "missing.jsonl"), "--train", str(tmp_path / "t.jsonl"), "--peft", "iaa",
                           "--peft-options", "placement=middle", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "placement must be one of" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
