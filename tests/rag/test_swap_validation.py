"""Swap configs are validated whole when they are read: every mistake is one line naming the file and the key path,
before any cell runs; YAML alias bombs and recursive aliases are refused at once."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.errors import InputError, RagError
from rag import swap as cs
from tests.conftest import SMALL_DOCS, SMALL_QUERIES, write_jsonl


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    corpus = write_jsonl(tmp_path / "data" / "original" / "corpus.jsonl", SMALL_DOCS)
    task = write_jsonl(tmp_path / "data" / "dev.jsonl", SMALL_QUERIES)
    return {"root": tmp_path, "corpus_dir": corpus.parent, "task": task}


def _valid(data: dict[str, Path]) -> dict[str, Any]:
    return {
        "name": "tiny", "k": 5, "ks": [1, 5], "metrics": ["Rprec", "recall@5"], "max_retries": 1, "workers": 0,
        "corpora": {
            "original": {"path": str(data["corpus_dir"])},
            "perturb": {"derive": {"from": "original", "transform": "perturb", "seed": 0}, "baseline": "original"},
        },
        "tasks": {"dev": {"path": str(data["task"]), "corpus": "original"}},
        "models": {"bm25": {"kind": "bm25", "method": "none"}},
    }


def _write(path: Path, config: Any) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _error(path: Path) -> RagError:
    with pytest.raises(RagError) as info:
        cs.load_swap_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return info.value


def _set(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    config = copy.deepcopy(config)
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[last] = value
    return config


def test_valid_config_and_shipped_configs_load(data):
    config = cs.load_swap_config(_write(data["root"] / "swap.yaml", _valid(data)))
    assert [c.name for c in config.corpora] == ["original", "perturb"] and config.k == 5
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("swap-demo.yaml", "swap-full.yaml"):   # aliases (*holdout) within the limit are fine
        assert cs.load_swap_config(root / name).models


BAD_VALUES = [
    # (key path, value, the message after "FILE: key.path: ")
    ("k", 0, "k: must be >= 1, got 0"),
    ("k", -3, "k: must be >= 1"),
    ("k", 2.5, "k: expected an integer >= 1, got 2.5"),
    ("k", True, "k: expected an integer >= 1, got true"),
    ("k", "100", "k: expected an integer >= 1, got '100'"),
    ("ks", [1, 0], "ks[1]: expected an integer >= 1, got 0"),
    ("ks", [1, "5"], "ks[1]: expected an integer >= 1, got '5'"),
    ("ks", [], "ks: expected a non-empty list"),
    ("ks", "1,5", "ks: expected a non-empty list"),
    ("max_retries", -1, "max_retries: must be >= 0, got -1"),
    ("workers", -1, "workers: must be >= 0, got -1"),
    ("workers", 1.5, "workers: expected an integer >= 0, got 1.5"),
    ("metrics", ["Rprec", "recal@5"], "metrics[1]: unknown metric 'recal@5'"),
    ("metrics", ["rprec"], "metrics[0]: unknown metric 'rprec' (did you mean 'Rprec'?)"),
    ("metrics", ["recall@20"], "metrics[0]: 'recall@20' is not computed: 20 is not in ks [1, 5]"),
    ("metrics", ["recall@1"], "metrics[0]: 'recall@1' is not a KILT metric"),
    ("metrics", ["precision@x"], "metrics[0]: 'precision@x': the cut-off after @ must be a positive integer"),
    ("metrics", ["em"], "metrics[0]: 'em' scores answers, and no model of this config answers"),
    ("metrics", [], "metrics: expected a non-empty list"),
    ("metrics", [3], "metrics[0]: expected a metric name, got 3"),
    ("name", "", "name: empty"),
    ("description", ["a"], "description: expected a string"),
    ("corpora", "original", "corpora: expected a mapping name -> settings"),
    ("corpora.original", ["path", "x"], "corpora.original: expected a mapping of settings, got a list"),
    ("corpora.original", "data/x", "corpora.original: expected a mapping of settings, got 'data/x'"),
    ("corpora.original.path", "no/such/folder", "corpora.original.path: not found: no/such/folder"),
    ("corpora.original.pth", "x", "corpora.original.pth: unknown option; allowed:"),
    ("corpora.original.evaluate", "yes", "corpora.original.evaluate: expected true or false, got 'yes'"),
    ("corpora.original.prepare", "vital", "corpora.original: give exactly one of path, prepare, derive"),
    ("corpora.perturb.baseline", "nope", "corpora.perturb.baseline: unknown corpus 'nope'"),
    ("corpora.perturb.baseline", "perturb", "corpora.perturb.baseline: a corpus is not its own baseline"),
    ("corpora.perturb.tasks", "dev", "corpora.perturb.tasks: expected a list of task names"),
    ("corpora.perturb.derive", ["original"], "corpora.perturb.derive: expected a mapping"),
    ("corpora.perturb.derive.from", "nope", "corpora.perturb.derive.from: unknown corpus 'nope'"),
    ("corpora.perturb.derive.from", "perturb",
     "corpora.perturb.derive.from: corpora derive from each other in a cycle: perturb -> perturb"),
    ("corpora.perturb.derive.transform", "perturbb", "corpora.perturb.derive.transform: unknown transform 'perturbb'"),
    ("corpora.perturb.derive.rate", 0.5,
     "corpora.perturb.derive.rate: unknown option of transform 'perturb'; its options: doc_order, paragraph_order, "
     "regroup, seed, sentence_order"),
    ("corpora.perturb.derive.doc_order", "no", "corpora.perturb.derive.doc_order: expected bool, got 'no'"),
    ("corpora.perturb.derive.seed", 1.5, "corpora.perturb.derive.seed: expected int, got 1.5"),
    ("corpora.perturb.derive.overwrite", True, "corpora.perturb.derive.overwrite: set by the harness"),
    ("corpora.perturb.derive.tasks", ["x"], "corpora.perturb.derive.tasks: set by the harness"),
    ("tasks.dev", None, "tasks.dev: missing required option `corpus`"),
    ("tasks.dev.path", "no/such.jsonl", "tasks.dev.path: not found: no/such.jsonl"),
    ("tasks.dev.corpus", "nope", "tasks.dev.corpus: unknown corpus 'nope'"),
    ("tasks.dev.limit", 0, "tasks.dev.limit: must be >= 1, got 0"),
    ("tasks.dev.prepare", "fanoutqa", "tasks.dev: give exactly one of path, prepare"),
    ("models.bm25.kind", "bm26", "models.bm25.kind: unknown kind 'bm26'"),
    ("models.bm25.k", 0, "models.bm25.k: must be >= 1, got 0"),
    ("models.bm25.batch_size", 0, "models.bm25.batch_size: must be >= 1, got 0"),
    ("models.bm25.num_cpus", -1, "models.bm25.num_cpus: must be >= 0"),
    ("models.bm25.num_gpus", ".nan", "models.bm25.num_gpus: expected a number >= 0"),
    ("models.bm25.options", [1], "models.bm25.options: expected a mapping"),
    ("models.bm25.retriever", "nope", "models.bm25.retriever: unknown model 'nope'"),
    ("models.bm25", [], "models.bm25: expected a mapping of settings, got a list"),
    ("models", {}, "models: needs at least one model"),
]


@pytest.mark.parametrize("key,value,expected", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_file_and_key(data, key, value, expected):
    path = _write(data["root"] / "swap.yaml", _set(_valid(data), key, value))
    if value == ".nan":   # YAML's not-a-number
        path.write_text(path.read_text(encoding="utf-8").replace("'.nan'", ".nan"), encoding="utf-8")
    error = _error(path)
    assert str(error).startswith(f"{path}: {expected}"), str(error)
    assert isinstance(error, InputError) and error.path == path


def test_task_path_that_is_a_folder(data):
    config = _set(_valid(data), "tasks.dev.path", str(data["corpus_dir"]))
    assert "tasks.dev.path: " in str(_error(_write(data["root"] / "swap.yaml", config)))
    assert "is a folder" in str(_error(_write(data["root"] / "swap.yaml", config)))


def test_corpus_folder_without_corpus_file(data):
    empty = data["root"] / "empty"
    empty.mkdir()
    error = _error(_write(data["root"] / "swap.yaml", _set(_valid(data), "corpora.original.path", str(empty))))
    assert "corpora.original.path: " in str(error) and "holds no corpus.jsonl" in str(error)


def test_paths_a_step_of_the_config_writes_may_be_missing(data):
    """A path under data_dir may not exist yet: a prepare/derive step of the config writes it."""
    config = _valid(data)
    config["data_dir"] = str(data["root"] / "swapdata")
    config["corpora"]["mine"] = {"path": str(data["root"] / "swapdata" / "corpora" / "mine"), "evaluate": False}
    config["tasks"]["later"] = {"path": str(data["root"] / "swapdata" / "tasks" / "later" / "dev.jsonl"),
                                "corpus": "original"}
    assert cs.load_swap_config(_write(data["root"] / "swap.yaml", config)).data_dir


def test_unknown_transform_is_allowed_only_when_optional(data):
    config = _set(_valid(data), "corpora.perturb.derive.transform", "no-such")
    assert "known: " in str(_error(_write(data["root"] / "swap.yaml", config)))
    config = _set(config, "corpora.perturb.optional", True)   # reported "unavailable" when the run starts
    assert cs.load_swap_config(_write(data["root"] / "swap.yaml", config)).corpora[1].optional


def test_transform_options_are_checked_against_the_signature(data):
    config = _set(_valid(data), "corpora.perturb.derive", {"from": "original", "transform": "subsample",
                                                           "sample": 10, "keep_gold": True, "seed": 3})
    assert cs.load_swap_config(_write(data["root"] / "swap.yaml", config))
    for option, value, expected in (("sample", "ten", "expected int"), ("sample", -5, "must be >= 0"),
                                    ("keep_gold", 1, "expected bool")):
        bad = _set(config, f"corpora.perturb.derive.{option}", value)
        message = str(_error(_write(data["root"] / "swap.yaml", bad)))
        assert f"corpora.perturb.derive.{option}: {expected}" in message
    holdout = _set(config, "corpora.perturb.derive", {"from": "original", "transform": "topic-holdout",
                                                      "held_out": ["Geography"], "fraction": 0.5})
    holdout["corpora"]["perturb"]["part"] = "held-in"
    assert cs.load_swap_config(_write(data["root"] / "swap.yaml", holdout))
    bad = _set(holdout, "corpora.perturb.derive.held_out", [1, 2])
    assert "corpora.perturb.derive.held_out: expected" in str(_error(_write(data["root"] / "swap.yaml", bad)))
    # a row-level transform (counterfactual) takes seed only
    bad = _set(config, "corpora.perturb.derive", {"from": "original", "transform": "counterfactual", "rate": 1})
    assert "its options: seed" in str(_error(_write(data["root"] / "swap.yaml", bad)))


def test_model_references(data):
    base = _valid(data)
    cases = [
        ({"r": {"kind": "reader", "reader": "runs/r"}}, "models.r: a reader model needs retriever"),
        ({"r": {"kind": "reader", "retriever": "bm25"}}, "models.r: a reader model needs reader: RUN_DIR"),
        ({"r": {"kind": "reader", "reader": "x", "retriever": "r"}}, "models.r.retriever: retriever models refer "
                                                                     "to each other in a cycle: r -> r"),
        ({"a": {"kind": "reader", "reader": "x", "retriever": "b"}, "b": {"kind": "reader", "reader": "y",
                                                                          "retriever": "a"}}, "cycle: a -> b -> a"),
        ({"g": {"kind": "generative"}}, "models.g: a generative model needs run: RUN_DIR"),
        ({"r": {"kind": "reader", "reader": "x", "retriever": "bm25", "options": {"passages": 0}}},
         "models.r.options.passages: expected an integer >= 1, got 0"),
        ({"r": {"kind": "reader", "reader": "x", "retriever": "bm25", "options": {"kind": "t5"}}},
         "models.r.options.kind: unknown reader kind 't5'"),
        ({"a b": {"kind": "bm25"}, "a-b": {"kind": "bm25"}}, "models.a-b: its folder name 'a-b' is the same as"),
        ({"a|b": {"kind": "bm25"}}, "models.a|b: the name 'a|b' may not hold `|`"),
    ]
    for models, expected in cases:
        config = {**base, "models": {**base["models"], **models}}
        message = str(_error(_write(data["root"] / "swap.yaml", config)))
        assert expected in message, message
    # a reader makes the answer metrics available
    config = {**base, "metrics": ["Rprec", "em", "KILT-f1"],
              "models": {**base["models"], "r": {"kind": "reader", "reader": "x", "retriever": "bm25"}}}
    assert cs.load_swap_config(_write(data["root"] / "swap.yaml", config)).metrics == ["Rprec", "em", "KILT-f1"]


def test_baseline_must_be_evaluated(data):
    config = _set(_valid(data), "corpora.original.evaluate", False)
    assert "corpora.perturb.baseline: 'original' is not evaluated" in str(
        _error(_write(data["root"] / "swap.yaml", config)))


def test_keys_in_both_spellings_and_non_string_keys(data):
    path = data["root"] / "swap.yaml"
    text = yaml.safe_dump(_valid(data), sort_keys=False)
    path.write_text(text + "max-retries: 2\n", encoding="utf-8")
    assert "max_retries: given twice" in str(_error(path))
    path.write_text(text + "? [1, 2]\n: x\n", encoding="utf-8")
    assert "cannot parse YAML" in str(_error(path))   # an unhashable key
    path.write_text(text.replace("models:\n  bm25:", "models:\n  2020-01-01:"), encoding="utf-8")
    assert "models: the key a date is not a name" in str(_error(path))


def test_unreadable_files(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert str(_error(missing)) == f"{missing}: swap config not found"
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert "is a folder" in str(_error(folder))
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"k: 1\nname: \xff\n")
    assert str(_error(bad)) == f"{bad}: invalid UTF-8 at byte 11"
    bad.write_text("k: [1,\n", encoding="utf-8")
    assert "cannot parse YAML" in str(_error(bad))
    bad.write_text("- 1\n- 2\n", encoding="utf-8")
    assert "must hold a mapping, got a list" in str(_error(bad))
    bad.write_text('name: "\\ud800"\n', encoding="utf-8")      # a lone surrogate, written as an escape
    assert f"{bad}: name: invalid Unicode: a lone surrogate" == str(_error(bad)).split(";")[0]
    as_json = tmp_path / "bad.json"
    as_json.write_text('{"k": 1,}', encoding="utf-8")
    assert "cannot parse JSON" in str(_error(as_json))
    as_json.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    assert str(_error(as_json)).startswith(f"{as_json}: cannot parse")


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_fails_fast(data):
    """9 levels of 9 aliases expand to 387 million values: refused from the composed nodes, before anything is
    built or hashed (a config this small never needs more than MAX_YAML_NODES values)."""
    path = data["root"] / "swap.yaml"
    valid = yaml.safe_dump(_valid(data), sort_keys=False)
    path.write_text(_bomb().replace("l0:", "x_l0:", 1) + valid, encoding="utf-8")
    assert "values once YAML anchors and aliases are expanded" in str(_error(path))
    # anchored under an unused key, used in a derive option (where it would be hashed)
    path.write_text("anchors:\n" + "".join(f"  {line}\n" for line in _bomb().splitlines())
                    + valid.replace("seed: 0", "seed: 0\n      held: *l8"), encoding="utf-8")
    assert "once YAML anchors and aliases are expanded" in str(_error(path))
    # merge keys that copy a mapping over and over
    merges = ["m0: &m0 {" + ", ".join(f"k{i}: {i}" for i in range(30)) + "}"]
    for i in range(1, 8):
        merges.append(f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}]}}")
    path.write_text("\n".join(merges) + "\n" + valid, encoding="utf-8")
    assert "once YAML anchors and aliases are expanded" in str(_error(path))


def test_recursive_alias_is_refused(data):
    path = data["root"] / "swap.yaml"
    path.write_text(yaml.safe_dump(_valid(data), sort_keys=False) + "loop: &loop [1, *loop]\n", encoding="utf-8")
    assert "refers to a node that contains it" in str(_error(path))


def test_python_dicts_are_held_to_the_same_rules(data):
    config = _valid(data)
    shared: list[Any] = ["x"] * 10
    for _ in range(6):
        shared = [shared] * 10
    config["corpora"]["perturb"]["derive"]["held"] = shared
    with pytest.raises(RagError, match="expands to more than"):
        cs.swap_config_from_dict(config)
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(RagError, match="refers to itself"):
        cs.swap_config_from_dict({**_valid(data), "description": loop})
    with pytest.raises(RagError, match=r"^swap config: k: must be >= 1"):
        cs.swap_config_from_dict({**_valid(data), "k": 0})


def test_a_config_object_is_validated_before_any_cell_runs(data):
    config = cs.swap_config_from_dict(_valid(data))
    config.k = 0                                     # changed after loading
    out = data["root"] / "out"
    with pytest.raises(RagError, match="k: must be >= 1"):
        cs.run_swap(config, out, workers=0)
    assert not (out / cs.RESULTS).exists()
    config.k = 5
    with pytest.raises(RagError, match="workers must be an integer >= 0"):
        cs.run_swap(config, out, workers=-1)


def test_cli_prints_one_error_line(data, capsys):
    from rag.cli import main
    path = _write(data["root"] / "swap.yaml", _set(_valid(data), "corpora.perturb.derive.rate", 0.5))
    assert main(["eval", "corpus-swap", "--config", str(path), "--out", str(data["root"] / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rag: error: {path}: corpora.perturb.derive.rate: unknown option of transform 'perturb'; "
                   "its options: doc_order, paragraph_order, regroup, seed, sentence_order"]
    assert not (data["root"] / "out").exists()


def test_json_configs_too(data):
    path = data["root"] / "swap.json"
    path.write_text(json.dumps(_set(_valid(data), "models.bm25.k", 0)), encoding="utf-8")
    assert f"{path}: models.bm25.k: must be >= 1, got 0" == str(_error(path))


def test_deep_nesting_is_refused_early(data):
    """PyYAML's scanner is quadratic in flow nesting: a deep file is refused after MAX_DEPTH levels, not parsed."""
    path = data["root"] / "swap.yaml"
    for text in ("[" * 100_000 + "]" * 100_000, "a: " + "{b: " * 100 + "1" + "}" * 100):
        path.write_text(text, encoding="utf-8")
        assert str(_error(path)) == f"{path}: nested more than 64 levels deep"
    config = _valid(data)
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    config["corpora"]["perturb"]["derive"]["held"] = deep
    with pytest.raises(RagError, match="nested more than 64 levels deep"):
        cs.swap_config_from_dict(config)
