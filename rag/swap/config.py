"""Swap config: the dataclasses a swap config file fills (corpora, tasks, models and the top-level settings),
loading and validation.

A config is checked whole when it is read, before any cell runs: every field's type and range, every name it
refers to (corpora, tasks, models, preparers, transforms and their options, metrics), and every input path.
Each mistake is one line naming the file and the key path: `swap.yaml: corpora.perturb.derive.rate: ...`.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputError, RagError
from rag.swap.kinds import CELL_KINDS

DEFAULT_METRICS = ("Rprec", "precision@1", "recall@5", "recall@20")

# The metrics eval/kilt.py's evaluate_kilt reports (the cells report exactly these, plus "n").
RETRIEVAL_METRICS = ("Rprec", "entity_in_input")
CUTOFF_METRICS = ("precision", "answer_in_context", "answer_and_ent_in_context", "entity_in_context")
CUTOFF_METRICS_ABOVE_1 = ("recall", "success_rate")   # official KILT: no recall@1 / success_rate@1
ANSWER_METRICS = ("accuracy", "em", "f1", "rougel", "KILT-accuracy", "KILT-em", "KILT-f1", "KILT-rougel")

MAX_YAML_NODES = 10_000     # YAML nodes once every alias is expanded: more is refused (an alias bomb)
MAX_DEPTH = 64              # nesting levels (PyYAML's scanner is quadratic in flow nesting: a deep file would hang)
GPU_OPTIONS = ("gpu", "gpu_shard", "gpu_fp16")   # dense: search the Faiss index on GPUs (retrievers/dense.py)
RESERVED_DERIVE_OPTIONS = ("corpus", "out_dir", "tasks", "overwrite")   # set by the harness, not by a config


@dataclass
class ModelSpec:
    """One model variant (a row group of the table)."""
    name: str
    kind: str                              # a CELL_KINDS key: bm25 | dense | generative | rerank | reader
    method: str = ""                       # how it was trained: none, untuned, full, iaa, lora, cit λ=0.1 ...
    encoder: str | None = None             # dense: alias, folder, or run folder of `rag train retriever --kind dense`
    run: str | None = None                 # generative / rerank: run folder (reader: same as `reader`)
    reader: str | None = None              # reader: run folder of `rag train reader` / `rag experiment cit`
    retriever: str | None = None           # reader / rerank: the model (name) whose rankings feed it
    k: int | None = None                   # documents retrieved (default: the config's k)
    num_cpus: float = 1.0
    num_gpus: float = 0.0                  # used only where the cluster has GPUs
    batch_size: int = 64
    options: dict[str, Any] = field(default_factory=dict)   # passed to the kind's loader


@dataclass
class TaskSpec:
    """KILT task data: prepared with a preparer (fanoutqa) or given by path, tied to a corpus."""
    name: str
    corpus: str                            # the corpus (name) its gold provenance refers to
    path: str | None = None
    prepare: str | None = None             # a PREPARERS name, e.g. fanoutqa
    split: str = "dev"                     # prepared: which file (dev, train)
    limit: int | None = None               # first N questions only
    evaluate: bool = True                  # False: carried through derivations (e.g. train data), no cells


@dataclass
class CorpusSpec:
    """A corpus variant. Exactly one of path, prepare, derive."""
    name: str
    label: str = ""
    path: str | None = None                # corpus folder/file, or a derived folder (with derive.json)
    prepare: str | None = None             # a PREPARERS name: vital10k, foldoc, enwiki-mini
    derive: dict[str, Any] | None = None   # {from: CORPUS, transform: NAME, ...transform options}
    part: str | None = None                # which part of a multi-part derivation (topic-holdout: held-in/held-out)
    baseline: str | None = None            # the corpus this one is compared against (CRP); None: an original
    evaluate: bool = True                  # False: a source for derivations only
    optional: bool = False                 # a transform missing from this build: cells "unavailable", not an error
    tasks: list[str] | None = None         # restrict the evaluated tasks


@dataclass
class SwapConfig:
    name: str = "corpus-swap"
    corpora: list[CorpusSpec] = field(default_factory=list)
    tasks: list[TaskSpec] = field(default_factory=list)
    models: list[ModelSpec] = field(default_factory=list)
    k: int = 100
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 100])
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    max_retries: int = 1                   # retries per cell (and per index build) after the first attempt
    workers: int = 2                       # local Ray CPUs; 0 = no Ray, cells one by one in this process
    data_dir: str | None = None            # prepared/derived data (default OUT/data)
    index_dir: str | None = None           # index cache (default OUT/indexes)
    description: str = ""


class SwapConfigError(InputError):
    """One mistake in a swap config, on one line: `FILE: key.path: message` (`swap config` when not from a file)."""

    def __init__(self, message: str, path: str | Path | None = None, key: str | None = None) -> None:
        self.path, self.line, self.field, self.message = path, None, key, message
        where = [str(path) if path is not None else "swap config"]
        if key:
            where.append(_printable(key))
        RagError.__init__(self, f"{': '.join(where)}: {_printable(' '.join(str(message).split()))}")


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _printable(text: str) -> str:
    """One printable line: control characters, line separators and lone surrogates (from keys or values the user
    wrote) shown as escapes."""
    return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}" if ord(m.group()) > 0xFF
                            else f"\\x{ord(m.group()):02x}", text)


class _Where:
    """Where errors point: the config file (or "swap config") plus a key path."""

    def __init__(self, source: str | Path | None) -> None:
        self.source = source

    def fail(self, key: str | None, message: str) -> SwapConfigError:
        return SwapConfigError(message, self.source, key)


# --------------------------------------------------------------------------- reading the file

def _yaml_load(text: str, where: _Where) -> Any:
    """yaml's SafeLoader, but the composed node graph is measured before anything is constructed: a document
    whose aliases expand to more than MAX_YAML_NODES nodes, or refer to themselves, is refused at once."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):   # streamed: stops at the first level too deep
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise where.fail(None, f"nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        _check_node_expansion(node, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_node_expansion(root: Any, where: _Where) -> None:
    """Count the nodes of the document with every alias expanded (memoised per node, so an alias bomb is
    measured in linear time); refuse recursive aliases."""
    import yaml

    size: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children: list[Any] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            active.discard(key)
            total = 1 + sum(size[id(c)] for c in children)
            size[key] = total
            if total > MAX_YAML_NODES:
                raise where.fail(None, f"holds more than {MAX_YAML_NODES} values once YAML anchors and aliases "
                                       "are expanded (an alias bomb?); a swap config needs far fewer")
            continue
        if key in size:
            continue
        if key in active:
            raise where.fail(None, "a YAML alias refers to a node that contains it (a recursive structure)")
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def read_swap_file(path: str | Path) -> Any:
    """The parsed content of a swap config file (YAML for .yaml/.yml, JSON otherwise); SwapConfigError naming
    the file for a missing file, a folder, bad UTF-8, a parse error or an alias bomb."""
    path = Path(path)
    where = _Where(path)
    if not path.exists():
        raise where.fail(None, "swap config not found")
    if path.is_dir():
        raise where.fail(None, "is a folder; expected a YAML or JSON swap config")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise where.fail(None, f"cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise where.fail(None, f"invalid UTF-8 at byte {exc.start}") from None
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        return _yaml_load(text, where) if yaml_file else json.loads(text)
    except SwapConfigError:
        raise
    except RecursionError:
        raise where.fail(None, "cannot parse: nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - yaml's and json's errors become one line naming the file
        raise where.fail(None, f"cannot parse {'YAML' if yaml_file else 'JSON'}: {exc}") from None


def load_swap_config(path: str | Path) -> SwapConfig:
    """Read and validate a swap config file (every check of `validate_config`)."""
    return swap_config_from_dict(read_swap_file(path), source=path)


# --------------------------------------------------------------------------- dicts -> dataclasses

def _describe(value: Any) -> str:
    """A value as the user wrote it, for messages: `null`, `true`, `a list`, `3.5`, `'abc'`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (Mapping, list, tuple)):
        what = "a mapping" if isinstance(value, Mapping) else "a list"
        try:
            shown = json.dumps(value, ensure_ascii=True, default=str)
        except (ValueError, TypeError, RecursionError):
            return what
        return f"{what} {shown[:60]}{'...' if len(shown) > 60 else ''}"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    return f"a {type(value).__name__}"


def _check_plain(value: Any, where: _Where, key: str, limit: int = MAX_YAML_NODES) -> None:
    """The config holds plain data: no cycles, no structure that expands past `limit` values (shared objects
    count once per reference) or nests deeper than MAX_DEPTH, no text that cannot be written as UTF-8 (a lone
    surrogate such as "\\ud800")."""
    size: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, str, bool, int]] = [(value, key, False, 0)]
    while stack:
        obj, at, done, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise where.fail(None, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(obj, str):
            if any(0xD800 <= ord(ch) <= 0xDFFF for ch in obj):
                raise where.fail(at or None, "invalid Unicode: a lone surrogate; every text must be valid UTF-8")
            continue
        if not isinstance(obj, (Mapping, list, tuple)):
            continue
        ident = id(obj)
        items: list[tuple[Any, str]] = []
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                sub = f"{at}.{k}" if at else str(k)
                items += [(k, at), (v, sub)]
        else:
            items = [(v, f"{at}[{i}]") for i, v in enumerate(obj)]
        if done:
            active.discard(ident)
            size[ident] = 1 + sum(size.get(id(v), 1) for v, _ in items)
            if size[ident] > limit:
                raise where.fail(at or None, f"expands to more than {limit} values (shared or aliased values "
                                             "count once per use)")
            continue
        if ident in size:
            continue
        if ident in active:
            raise where.fail(at or None, "refers to itself (a recursive structure)")
        active.add(ident)
        stack.append((obj, at, True, depth))
        stack.extend((v, sub, False, depth + 1) for v, sub in items)


def _key_name(key: Any, where: _Where, at: str) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    raise where.fail(at or None, f"the key {_describe(key)} is not a name; write it as a string")


def _normalized(raw: Mapping[Any, Any], where: _Where, at: str) -> dict[str, Any]:
    """Keys with `-` read as `_`; a key given in both spellings is refused."""
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = _key_name(key, where, at).replace("-", "_")
        if name in data:
            raise where.fail(_join(at, name), "given twice (keys may be written with - or _, not both)")
        data[name] = value
    return data


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def _named_list(value: Any, group: str, where: _Where) -> list[tuple[str, dict[str, Any]]]:
    """`{name: {...}}` or `[{name: ..., ...}]` -> [(key path, settings with a name)]."""
    if value is None:
        return []
    items: list[tuple[str, dict[str, Any]]] = []
    if isinstance(value, Mapping):
        for key, body in value.items():
            name = _key_name(key, where, group)
            at = f"{group}.{name}"
            if body is None:
                body = {}
            if not isinstance(body, Mapping):
                raise where.fail(at, f"expected a mapping of settings, got {_describe(body)}")
            body = _normalized(body, where, at)
            if "name" in body and body["name"] != name:
                raise where.fail(f"{at}.name", f"{_describe(body['name'])} differs from the key {name!r}")
            items.append((at, {**body, "name": name}))
        return items
    if isinstance(value, list):
        for i, body in enumerate(value):
            at = f"{group}[{i}]"
            if not isinstance(body, Mapping):
                raise where.fail(at, f"expected a mapping of settings with a name, got {_describe(body)}")
            body = _normalized(body, where, at)
            if "name" not in body:
                raise where.fail(at, "needs a name")
            if isinstance(body["name"], int) and not isinstance(body["name"], bool):
                body["name"] = str(body["name"])
            if not isinstance(body["name"], str):
                raise where.fail(f"{at}.name", f"expected a string, got {_describe(body['name'])}")
            items.append((f"{group}.{body['name']}", body))
        return items
    raise where.fail(group, f"expected a mapping name -> settings (or a list of mappings with a name), "
                            f"got {_describe(value)}")


def _build(cls: type, data: dict[str, Any], where: _Where, at: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise where.fail(_join(at, unknown[0]), f"unknown option; allowed: {', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise where.fail(at or None, f"missing required option `{missing[0]}`")
    return cls(**data)


def swap_config_from_dict(data: Mapping[str, Any], source: str | Path | None = None) -> SwapConfig:
    """Build and validate a SwapConfig from the content of a config file (`source`: the file, for messages)."""
    where = _Where(source)
    if not isinstance(data, Mapping):
        raise where.fail(None, f"a swap config must hold a mapping, got {_describe(data)}")
    _check_plain(data, where, "")
    data = _normalized(data, where, "")
    groups = {}
    for group, cls in (("corpora", CorpusSpec), ("tasks", TaskSpec), ("models", ModelSpec)):
        groups[group] = [(at, _build(cls, body, where, at)) for at, body in _named_list(data.pop(group, None),
                                                                                          group, where)]
    if data.get("description", "") is None:
        data["description"] = ""
    config = _build(SwapConfig, {**data, **{g: [spec for _, spec in items] for g, items in groups.items()}},
                    where, "")
    validate_config(config, source=source)
    return config


# --------------------------------------------------------------------------- validation

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


class _Checks:
    """Type and range checks of one dataclass instance; every failure names its key path."""

    def __init__(self, where: _Where, at: str, spec: Any) -> None:
        self.where, self.at, self.spec = where, at, spec

    def key(self, name: str) -> str:
        return _join(self.at, name)

    def fail(self, name: str, message: str) -> SwapConfigError:
        return self.where.fail(self.key(name), message)

    def text(self, name: str, optional: bool = False, empty: bool = False) -> None:
        value = getattr(self.spec, name)
        if value is None and optional:
            return
        if not isinstance(value, str):
            raise self.fail(name, f"expected a string, got {_describe(value)}")
        if not empty and not value.strip():
            raise self.fail(name, "empty")

    def integer(self, name: str, minimum: int, optional: bool = False) -> None:
        value = getattr(self.spec, name)
        if value is None and optional:
            return
        if not _is_int(value):
            raise self.fail(name, f"expected an integer >= {minimum}, got {_describe(value)}")
        if value < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {value}")

    def number(self, name: str, minimum: float) -> None:
        value = getattr(self.spec, name)
        if not _is_number(value):
            raise self.fail(name, f"expected a number >= {minimum}, got {_describe(value)}")
        if value < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {value}")

    def flag(self, name: str) -> None:
        value = getattr(self.spec, name)
        if not isinstance(value, bool):
            raise self.fail(name, f"expected true or false, got {_describe(value)}")

    def name(self) -> None:
        value = self.spec.name
        if not isinstance(value, str) or not value.strip():
            raise self.where.fail(self.at, f"a name must be a non-empty string, got {_describe(value)}")
        if "|" in value or any(ord(ch) < 32 for ch in value):
            raise self.where.fail(self.at, f"the name {value!r} may not hold `|` or control characters")


def _slug(text: str) -> str:   # as rag/swap/cells.py names the folders
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


def producible_metrics(ks: Sequence[int]) -> list[str]:
    """Every metric name a cell can report for these cut-offs (retrieval; answers only come from readers)."""
    names = ["n", *RETRIEVAL_METRICS]
    for k in sorted(set(ks)):
        names += [f"{m}@{k}" for m in CUTOFF_METRICS]
        if k > 1:
            names += [f"{m}@{k}" for m in CUTOFF_METRICS_ABOVE_1]
    return names + list(ANSWER_METRICS)


def _check_metric(metric: str, ks: Sequence[int], answers: bool) -> str | None:
    """None, or why `metric` would be an empty column."""
    if metric in ANSWER_METRICS:
        return None if answers else (f"{metric!r} scores answers, and no model of this config answers "
                                     f"(kinds that answer: {', '.join(sorted(k for k, v in CELL_KINDS.items() if v.answers))})")
    if metric in ("n", *RETRIEVAL_METRICS):
        return None
    base, at, cutoff = metric.partition("@")
    if at and base in CUTOFF_METRICS + CUTOFF_METRICS_ABOVE_1:
        if not re.fullmatch(r"[1-9][0-9]*", cutoff):
            return f"{metric!r}: the cut-off after @ must be a positive integer"
        k = int(cutoff)
        if k not in ks:
            return f"{metric!r} is not computed: {k} is not in ks {list(ks)}"
        if k == 1 and base in CUTOFF_METRICS_ABOVE_1:
            return f"{metric!r} is not a KILT metric (KILT has no {base}@1; precision@1 is the same number)"
        return None
    hint = ("Rprec", "precision@K", "recall@K", "success_rate@K", "answer_in_context@K", "entity_in_context@K",
            "answer_and_ent_in_context@K", "entity_in_input", *ANSWER_METRICS)
    near = [m for m in (*RETRIEVAL_METRICS, *ANSWER_METRICS) if m.lower() == metric.lower()]
    return (f"unknown metric {metric!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
            + f"; KILT metrics: {', '.join(hint)} (K in ks)")


def _transform_entry(name: str) -> Any:
    from eval.transforms import TRANSFORMS
    return TRANSFORMS.get(name)


def _transform_options(entry: Any) -> tuple[dict[str, inspect.Parameter], bool, Callable[..., Any]]:
    """(options a derive may set -> their parameters, whether any option is accepted, the function)."""
    if entry.derive is not None:
        fn, skip = entry.derive, 2            # derive(corpus, out_dir, *, tasks, seed, overwrite, **options)
    else:
        fn, skip = entry.fn, 2                # fn(corpus_rows, qa_rows, seed=0, **options)
    params = list(inspect.signature(fn).parameters.values())[skip:]
    any_option = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = {p.name: p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
             and p.name not in RESERVED_DERIVE_OPTIONS}
    if "seed" not in named:   # every transform takes seed (derive_from_rows passes it to row-level ones)
        named["seed"] = inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0, annotation=int)
    return named, any_option, fn


def _type_matches(value: Any, annotation: Any) -> bool | None:
    """Whether `value` fits a (resolved) annotation; None where the annotation is not simple enough to say."""
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return None
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        answers = [_type_matches(value, a) for a in typing.get_args(annotation)]
        return True if any(a is True for a in answers) else (None if any(a is None for a in answers) else False)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return _is_number(value)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return isinstance(value, str)
    base = origin or annotation
    if base in (list, tuple, Sequence, typing.Sequence) or (isinstance(base, type) and base in (list, tuple)):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if not args:
            return True
        inner = [_type_matches(v, args[0]) for v in value]
        return False if any(r is False for r in inner) else (None if any(r is None for r in inner) else True)
    if base in (dict, Mapping, typing.Mapping):
        return isinstance(value, Mapping) or False
    return None


def _annotation_text(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "").replace("collections.abc.", "")


def _check_derive(c: CorpusSpec, at: str, corpora: Mapping[str, CorpusSpec], where: _Where) -> None:
    key = f"{at}.derive"
    if not isinstance(c.derive, Mapping):
        raise where.fail(key, f"expected a mapping {{from: CORPUS, transform: NAME, ...options}}, got "
                              f"{_describe(c.derive)}")
    for k in c.derive:
        if not isinstance(k, str):
            raise where.fail(key, f"the key {_describe(k)} is not a name; write it as a string")
    for required in ("from", "transform"):
        if required not in c.derive:
            raise where.fail(key, f"needs `{required}` (derive: {{from: CORPUS, transform: NAME, ...options}})")
        if not isinstance(c.derive[required], str) or not c.derive[required].strip():
            raise where.fail(f"{key}.{required}", f"expected a name, got {_describe(c.derive[required])}")
    if c.derive["from"] not in corpora:
        raise where.fail(f"{key}.from", f"unknown corpus {c.derive['from']!r}; corpora: {', '.join(corpora)}")
    name = c.derive["transform"]
    try:
        entry = _transform_entry(name)
    except ImportError as exc:   # pragma: no cover - eval.transforms is part of the toolkit
        entry, reason = None, f"eval/transforms.py cannot be imported ({exc})"
    else:
        reason = "not in this build (eval/transforms.py TRANSFORMS)"
    if entry is None:
        if c.optional:   # reported "unavailable" at run time, never a made-up score
            return
        from eval.transforms import TRANSFORMS
        raise where.fail(f"{key}.transform", f"unknown transform {name!r}: {reason}; known: "
                                             f"{', '.join(sorted(TRANSFORMS))} (or set optional: true)")
    params, any_option, fn = _transform_options(entry)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: names are still checked
        hints = {}
    for option, value in c.derive.items():
        if option in ("from", "transform"):
            continue
        okey = f"{key}.{option}"
        if option in RESERVED_DERIVE_OPTIONS:
            raise where.fail(okey, "set by the harness, not by the config")
        if option not in params:
            if any_option:
                continue
            raise where.fail(okey, f"unknown option of transform {name!r}; its options: {', '.join(sorted(params))}")
        annotation = hints.get(option, params[option].annotation)
        if option == "seed":
            annotation = int
        if _type_matches(value, annotation) is False:
            raise where.fail(okey, f"expected {_annotation_text(annotation)}, got {_describe(value)}")
        if _is_number(value) and not isinstance(value, bool) and value < 0 and option != "seed":
            raise where.fail(okey, f"must be >= 0, got {value}")


def _under(path: Path, folder: str | None) -> bool:
    if not folder:
        return False
    try:
        return path.resolve().is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def _check_corpus_path(c: CorpusSpec, at: str, data_dir: str | None, where: _Where) -> None:
    path = Path(str(c.path))
    if not path.exists():
        if _under(path, data_dir):   # written by a prepare/derive step of this config (data_dir)
            return
        raise where.fail(f"{at}.path", f"not found: {c.path}")
    if path.is_dir():
        from eval.corpus_variants import CORPUS_FILE, DERIVE_MANIFEST
        if (path / DERIVE_MANIFEST).is_file():
            return   # its parts are read (and `part` checked) when the run starts
        base = path / c.part if c.part else path
        if not (base / CORPUS_FILE).is_file():
            raise where.fail(f"{at}.path", f"{base} holds no {CORPUS_FILE} (and no {DERIVE_MANIFEST})")


def _check_task_path(t: TaskSpec, at: str, data_dir: str | None, where: _Where) -> None:
    path = Path(str(t.path))
    if not path.exists():
        if _under(path, data_dir):
            return
        raise where.fail(f"{at}.path", f"not found: {t.path}")
    if path.is_dir():
        raise where.fail(f"{at}.path", f"{t.path} is a folder; expected a KILT JSONL file")


def _check_model_options(m: ModelSpec, at: str, where: _Where) -> None:
    key = f"{at}.options"
    if not isinstance(m.options, Mapping):
        raise where.fail(key, f"expected a mapping, got {_describe(m.options)}")
    for k in m.options:
        if not isinstance(k, str):
            raise where.fail(key, f"the key {_describe(k)} is not a name; write it as a string")
    _check_gpu_options(m, key, where)
    counts = {"rerank": ("depth", "batch_size"), "reader": ("passages", "batch_size")}.get(m.kind, ())
    for option in counts:
        value = m.options.get(option)
        if value is not None and (not _is_int(value) or value < 1):
            raise where.fail(f"{key}.{option}", f"expected an integer >= 1, got {_describe(value)}")
    if m.kind != "reader":
        return
    kind = m.options.get("kind")
    if kind is not None:
        from readers.kinds import READER_KINDS
        if kind not in READER_KINDS:
            raise where.fail(f"{key}.kind", f"unknown reader kind {_describe(kind)}; known: "
                                            f"{', '.join(sorted(READER_KINDS))}")


def _check_gpu_options(m: ModelSpec, key: str, where: _Where) -> None:
    """options.gpu / gpu_shard / gpu_fp16: booleans, dense models only, and a GPU for the cell to search on."""
    given = [o for o in GPU_OPTIONS if o in m.options]
    if not given:
        return
    if m.kind != "dense":
        raise where.fail(f"{key}.{given[0]}", f"only dense models search on a GPU (Faiss); this model is kind {m.kind!r}")
    for option in given:
        if not isinstance(m.options[option], bool):
            raise where.fail(f"{key}.{option}", f"expected true or false, got {_describe(m.options[option])}")
    if not m.options.get("gpu"):
        extra = [o for o in ("gpu_shard", "gpu_fp16") if m.options.get(o)]
        if extra:
            raise where.fail(f"{key}.{extra[0]}", f"{extra[0]}: true needs gpu: true")
        return
    if not m.num_gpus:
        raise where.fail(f"{key}.gpu", "gpu: true needs num_gpus > 0 (Ray hides the GPUs from a cell that asks for none)")


def _retriever_source(m: ModelSpec, models: Mapping[str, ModelSpec], where: _Where, at: str) -> ModelSpec:
    """The model whose index feeds `m` (following retriever: through models that read no index of their own)."""
    chain, current = [m.name], models[str(m.retriever)]
    while CELL_KINDS[current.kind].index is None and current.retriever is not None:
        if current.name in chain:
            raise where.fail(f"{at}.retriever", "retriever models refer to each other in a cycle: "
                                                + " -> ".join([*chain, current.name]))
        chain.append(current.name)
        if current.retriever not in models:
            break
        current = models[current.retriever]
    return current


def validate_config(config: SwapConfig, source: str | Path | None = None) -> None:
    """Check a whole SwapConfig (types, ranges, references, transforms and their options, metrics, paths);
    raises SwapConfigError naming the file and the key path of the first mistake."""
    where = _Where(source)
    top = _Checks(where, "", config)
    top.text("name")
    top.text("description", empty=True)
    top.integer("k", 1)
    top.integer("max_retries", 0)
    top.integer("workers", 0)
    top.text("data_dir", optional=True)
    top.text("index_dir", optional=True)
    for group, cls in (("corpora", CorpusSpec), ("tasks", TaskSpec), ("models", ModelSpec)):
        items = getattr(config, group)
        if not isinstance(items, list) or not all(isinstance(s, cls) for s in items):
            raise where.fail(group, f"expected a list of {cls.__name__}")
    if not isinstance(config.ks, list) or not config.ks:
        raise where.fail("ks", f"expected a non-empty list of integers >= 1, got {_describe(config.ks)}")
    for i, k in enumerate(config.ks):
        if not _is_int(k) or k < 1:
            raise where.fail(f"ks[{i}]", f"expected an integer >= 1, got {_describe(k)}")
    if not isinstance(config.metrics, list) or not config.metrics:
        raise where.fail("metrics", f"expected a non-empty list of metric names, got {_describe(config.metrics)}")

    corpora = {c.name: c for c in config.corpora}
    models = {m.name: m for m in config.models}
    for group, specs in (("corpora", config.corpora), ("tasks", config.tasks), ("models", config.models)):
        seen: dict[str, str] = {}
        for spec in specs:
            _Checks(where, f"{group}.{spec.name}", spec).name()
            if spec.name in seen:
                raise where.fail(f"{group}.{spec.name}", "duplicate name")
            slug = _slug(spec.name)
            if slug in seen.values():
                other = next(n for n, s in seen.items() if s == slug)
                raise where.fail(f"{group}.{spec.name}", f"its folder name {slug!r} is the same as {other!r}'s; "
                                                         "rename one")
            seen[spec.name] = slug
    if not config.models:
        raise where.fail("models", "needs at least one model")
    if not any(c.evaluate is True for c in config.corpora):
        raise where.fail("corpora", "needs at least one evaluated corpus")

    from rag.data.preparers import PREPARERS

    for c in config.corpora:
        at = f"corpora.{c.name}"
        check = _Checks(where, at, c)
        check.text("label", empty=True)
        for name in ("path", "prepare", "part", "baseline"):
            check.text(name, optional=True)
        check.flag("evaluate")
        check.flag("optional")
        sources = [s for s in ("path", "prepare", "derive") if getattr(c, s) is not None]
        if len(sources) != 1:
            raise where.fail(at, f"give exactly one of path, prepare, derive (got {', '.join(sources) or 'none'})")
        if c.prepare is not None and c.prepare not in PREPARERS:
            raise where.fail(f"{at}.prepare", f"unknown preparer {c.prepare!r}; known: {', '.join(sorted(PREPARERS))}")
        if c.derive is not None:
            _check_derive(c, at, corpora, where)
        if c.path is not None:
            _check_corpus_path(c, at, config.data_dir, where)
        if c.baseline is not None:
            if c.baseline not in corpora:
                raise where.fail(f"{at}.baseline", f"unknown corpus {c.baseline!r}; corpora: {', '.join(corpora)}")
            if c.baseline == c.name:
                raise where.fail(f"{at}.baseline", "a corpus is not its own baseline")
            if corpora[c.baseline].evaluate is not True:
                raise where.fail(f"{at}.baseline", f"{c.baseline!r} is not evaluated (evaluate: false), so it has "
                                                   "no scores to compare with")
        if c.tasks is not None:
            if not isinstance(c.tasks, list):
                raise where.fail(f"{at}.tasks", f"expected a list of task names, got {_describe(c.tasks)}")
            for i, task_name in enumerate(c.tasks):
                if not isinstance(task_name, str) or not task_name.strip():
                    raise where.fail(f"{at}.tasks[{i}]", f"expected a task name, got {_describe(task_name)}")
    for t in config.tasks:
        at = f"tasks.{t.name}"
        check = _Checks(where, at, t)
        check.text("corpus")
        check.text("path", optional=True)
        check.text("prepare", optional=True)
        check.text("split")
        check.integer("limit", 1, optional=True)
        check.flag("evaluate")
        if t.corpus not in corpora:
            raise where.fail(f"{at}.corpus", f"unknown corpus {t.corpus!r}; corpora: {', '.join(corpora)}")
        if (t.path is None) == (t.prepare is None):
            raise where.fail(at, "give exactly one of path, prepare")
        if t.prepare is not None and t.prepare not in PREPARERS:
            raise where.fail(f"{at}.prepare", f"unknown preparer {t.prepare!r}; known: {', '.join(sorted(PREPARERS))}")
        if t.path is not None:
            _check_task_path(t, at, config.data_dir, where)
    for m in config.models:
        at = f"models.{m.name}"
        check = _Checks(where, at, m)
        check.text("kind")
        check.text("method", empty=True)
        for name in ("encoder", "run", "reader", "retriever"):
            check.text(name, optional=True)
        check.integer("k", 1, optional=True)
        check.number("num_cpus", 0)
        check.number("num_gpus", 0)
        check.integer("batch_size", 1)
        if m.kind not in CELL_KINDS:
            raise where.fail(f"{at}.kind", f"unknown kind {m.kind!r}; known: {', '.join(sorted(CELL_KINDS))}")
    for m in config.models:
        at = f"models.{m.name}"
        _check_model_options(m, at, where)
        if m.retriever is not None:
            if m.retriever not in models:
                raise where.fail(f"{at}.retriever", f"unknown model {m.retriever!r}; models: {', '.join(models)}")
            feeder = _retriever_source(m, models, where, at)
            if m.kind in ("reader", "rerank") and CELL_KINDS[feeder.kind].index is None:
                raise where.fail(f"{at}.retriever", f"{feeder.name!r} ranks nothing (kind {feeder.kind!r} reads no "
                                                    "index); name a bm25, dense or generative model")
        if m.kind == "reader":
            if not (m.reader or m.run):
                raise where.fail(at, "a reader model needs reader: RUN_DIR")
            if m.retriever is None:
                raise where.fail(at, "a reader model needs retriever: MODEL (a bm25, dense or generative model "
                                     "of this config)")
        if m.kind == "rerank":
            if not m.run:
                raise where.fail(at, "a rerank model needs run: RUN_DIR (a `rag train reranker` run or a CrossEncoder "
                                     "folder)")
            if m.retriever is None:
                raise where.fail(at, "a rerank model needs retriever: MODEL (a bm25, dense or generative model of "
                                     "this config)")
        if m.kind == "generative" and not m.run:
            raise where.fail(at, "a generative model needs run: RUN_DIR (a CorpusBrain run folder)")
    answers = any(CELL_KINDS[m.kind].answers for m in config.models)
    for i, metric in enumerate(config.metrics):
        if not isinstance(metric, str):
            raise where.fail(f"metrics[{i}]", f"expected a metric name, got {_describe(metric)}")
        problem = _check_metric(metric, config.ks, answers)
        if problem:
            raise where.fail(f"metrics[{i}]", problem)
    _derive_order(config, where)  # raises on cycles


def _derive_order(config: SwapConfig, where: _Where | None = None) -> list[CorpusSpec]:
    by_name = {c.name: c for c in config.corpora}
    order: list[CorpusSpec] = []
    state: dict[str, int] = {}
    where = where or _Where(None)

    for start in config.corpora:    # iterative: a long derive chain is no recursion limit
        stack: list[tuple[str, tuple[str, ...], bool]] = [(start.name, (), False)]
        while stack:
            name, chain, done = stack.pop()
            if done:
                state[name] = 2
                order.append(by_name[name])
                continue
            if state.get(name) == 2:
                continue
            if state.get(name) == 1:
                raise where.fail(f"corpora.{name}.derive.from", "corpora derive from each other in a cycle: "
                                 + " -> ".join(chain + (name,)))
            state[name] = 1
            stack.append((name, chain, True))
            spec = by_name[name]
            if spec.derive is not None:
                stack.append((spec.derive["from"], chain + (name,), False))
    return order
