"""foldoc: the Free On-line Dictionary of Computing, from the Debian package `dict-foldoc`.

The package holds a dictd database: `foldoc.index` (lines `headword\\toffset\\tlength`, offset and
length in dictd's base64) and `foldoc.dict.dz` (gzip-compatible). An entry is a header block of
names (the term, then its synonyms), a blank line, and an indented body whose cross-references
look `{like this}`, `{label (target)}` or `{label (http://url)}`.

Several index headwords point at the same entry (synonyms), so one document is made per entry,
not per headword: title = the entry's first name, `aliases` = the others; entries that share a
title (the Debian additions repeat four upstream terms) are merged into one document.
Document: `{"id": "f" + sha1(title)[:10], "title", "text", "domain": "computing", "aliases",
"tags" (the <category> labels), "anchors"}`. The text keeps paragraph breaks, whitespace inside a
paragraph is collapsed, and links keep their text without braces; links to entries become anchors
(`title` = the linked entry's title).

Files are looked for in `source_dir` (the two files, or an unpacked package), else in the cache
`${RAG_HOME:-~/.cache/rag}/raw/foldoc`, else fetched with `apt-get download dict-foldoc` and
unpacked with `dpkg-deb -x` (in a private temporary folder, removed afterwards) into the cache.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputError, RagError
from core.io import read_json, write_json
from rag.data.preparers import file_sha256, progress, stable_id, write_corpus, write_stats

PACKAGE = "dict-foldoc"
INDEX_NAME = "foldoc.index"
DICT_NAMES = ("foldoc.dict.dz", "foldoc.dict")
PACKAGE_DIR = "usr/share/dictd"
SOURCE_INFO = "source.json"
ID_PREFIX = "f"
DOMAIN = "computing"
DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(DICTD_B64)}
_LINK = re.compile(r"\{([^{}]*)\}")
_WRAPPED_LINK = re.compile(r"\{[^{}]{0,300}\}")
_URLISH = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:|www\.|\S+\.html?(?:#\S*)?$)")
_TAG = re.compile(r"^(?:\d+\.\s*)?<([^<>]+)>")


def dictd_b64decode(text: str) -> int:
    """dictd's base64 numbers: most significant digit first, alphabet A-Z a-z 0-9 + /."""
    if not text:
        raise ValueError("empty number")
    value = 0
    for ch in text:
        try:
            value = value * 64 + _B64_VALUE[ch]
        except KeyError:
            raise ValueError(f"bad base64 digit {ch!r}") from None
    return value


def dictd_b64encode(value: int) -> str:
    if value < 0:
        raise ValueError("negative number")
    digits = []
    while True:
        value, rem = divmod(value, 64)
        digits.append(DICTD_B64[rem])
        if not value:
            return "".join(reversed(digits))


def read_index(path: Path) -> list[tuple[str, int, int]]:
    """(headword, offset, length) for each index line; malformed lines raise InputError."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise InputError("expected headword<TAB>offset<TAB>length", path, lineno)
            try:
                rows.append((parts[0], dictd_b64decode(parts[1]), dictd_b64decode(parts[2])))
            except ValueError as exc:
                raise InputError(str(exc), path, lineno) from None
    return rows


def read_dict(path: Path) -> bytes:
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    try:
        return gzip.open(path).read() if gzipped else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot decompress ({exc})", path) from None


# --------------------------------------------------------------------------- entries -> documents

@dataclass(eq=False)
class Entry:
    offset: int
    names: list[str]
    paragraphs: list[str]
    headwords: list[str] = field(default_factory=list)


def parse_entry(raw: str, offset: int = 0) -> Entry:
    """Header block (unindented lines up to the first blank line) and body paragraphs."""
    lines = raw.replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    names: list[str] = []
    while lines and lines[0].strip() and not lines[0][:1].isspace():
        names.append(" ".join(lines.pop(0).split()))
    # a link may be wrapped across a blank line: rejoin short ones so they stay in one paragraph
    body = _WRAPPED_LINK.sub(lambda m: " ".join(m.group(0).split()), "\n".join(lines))
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", body)]
    return Entry(offset, names, [p for p in paragraphs if p])


def _split_link(content: str) -> tuple[str, str | None]:
    """`label (target)` -> (label, target); anything else -> (content, None)."""
    if not content.endswith(")"):
        return content, None
    depth = 0
    for i in range(len(content) - 1, -1, -1):
        if content[i] == ")":
            depth += 1
        elif content[i] == "(":
            depth -= 1
            if depth == 0:
                return content[:i].strip(), content[i + 1:-1].strip()
    return content, None


class Resolver:
    """Link target -> entry title, via the (lower-cased) dictd headwords, with a plural fallback."""

    def __init__(self, entries: list[Entry]) -> None:
        self.by_key: dict[str, list[Entry]] = {}
        for entry in entries:
            for name in {*entry.headwords, *(n.lower() for n in entry.names)}:
                bucket = self.by_key.setdefault(" ".join(name.split()).lower(), [])
                if entry not in bucket:
                    bucket.append(entry)

    def resolve(self, term: str) -> str | None:
        key = " ".join(term.split()).lower()
        candidates = [key]
        if key.endswith("ies"):
            candidates.append(key[:-3] + "y")
        if key.endswith("es"):
            candidates.append(key[:-2])
        if key.endswith("s"):
            candidates.append(key[:-1])
        for cand in candidates:
            entries = self.by_key.get(cand)
            if entries:  # prefer the entry named exactly so (title, then synonyms), then by title
                ranked = sorted(entries, key=lambda e: (e.names[0] != term, term not in e.names,
                                                        e.names[0].lower() != cand))
                return ranked[0].names[0]
        return None


def link_paragraph(paragraph: str, index: int, resolver: Resolver, counts: Counter) -> tuple[str, list[dict]]:
    """Replace `{...}` links with their text; links to entries become anchors with offsets."""
    out: list[str] = []
    anchors: list[dict[str, Any]] = []
    pos = 0
    length = 0
    for m in _LINK.finditer(paragraph):
        before = paragraph[pos:m.start()]
        out.append(before)
        length += len(before)
        pos = m.end()
        content = " ".join(m.group(1).split())
        if not content:
            out.append(m.group(0))
            length += len(m.group(0))
            continue
        counts["links"] += 1
        title = resolver.resolve(content)
        text = content
        if title is None:
            label, target = _split_link(content)
            if target is not None:
                text = label or target
                if _URLISH.match(target):
                    counts["links_external"] += 1
                else:
                    title = resolver.resolve(target)
        if title is not None:
            anchors.append({"text": text, "title": title, "paragraph": index,
                            "start": length, "end": length + len(text)})
            counts["anchors"] += 1
        out.append(text)
        length += len(text)
    out.append(paragraph[pos:])
    return "".join(out), anchors


def build_documents(index_rows: list[tuple[str, int, int]], data: bytes,
                    counts: Counter | None = None) -> list[dict[str, Any]]:
    """Index rows + dict data -> corpus documents (one per entry, same titles merged)."""
    counts = counts if counts is not None else Counter()
    spans: dict[tuple[int, int], list[str]] = {}
    for headword, offset, length in index_rows:
        if headword.startswith("00-database-") or headword.startswith("00database"):
            counts["metadata_entries"] += 1
            continue
        spans.setdefault((offset, length), []).append(headword)
    counts["headwords"] = len({h for hs in spans.values() for h in hs})
    counts["entries"] = len(spans)

    entries: list[Entry] = []
    for (offset, length), headwords in sorted(spans.items()):
        if offset + length > len(data):
            raise RagError(f"dictd index points past the end of the data ({offset}+{length} > {len(data)}); "
                           f"index and dict files do not match")
        try:
            raw = data[offset:offset + length].decode("utf-8")
        except UnicodeDecodeError:
            raise RagError(f"dictd entry at offset {offset} ({headwords[0]!r}) is not UTF-8") from None
        entry = parse_entry(raw, offset)
        entry.headwords = headwords
        if not entry.names:
            entry.names = [headwords[0]]
        if not entry.paragraphs:
            counts["empty_entries"] += 1
            continue
        entries.append(entry)

    resolver = Resolver(entries)
    docs: dict[str, dict[str, Any]] = {}
    for entry in progress(entries, desc="foldoc"):
        title = entry.names[0]
        doc = docs.get(title)
        if doc is None:
            doc = docs[title] = {"id": stable_id(ID_PREFIX, title), "title": title, "paragraphs": [],
                                 "domain": DOMAIN, "aliases": [], "tags": [], "anchors": [], "seen": set()}
        else:
            counts["merged_duplicate_titles"] += 1
        for alias in entry.names[1:]:
            if alias != title and alias not in doc["aliases"]:
                doc["aliases"].append(alias)
        for paragraph in entry.paragraphs:
            local: Counter = Counter()
            text, anchors = link_paragraph(paragraph, len(doc["paragraphs"]), resolver, local)
            if text in doc["seen"]:  # merged entries often repeat each other
                continue
            doc["seen"].add(text)
            counts.update(local)
            tag = _TAG.match(text)
            if tag:
                for t in tag.group(1).split(","):
                    if t.strip() and t.strip() not in doc["tags"]:
                        doc["tags"].append(t.strip())
            doc["paragraphs"].append(text)
            doc["anchors"].extend(anchors)

    out = []
    for doc in docs.values():
        row = {"id": doc["id"], "title": doc["title"], "text": "\n\n".join(doc["paragraphs"]),
               "domain": doc["domain"], "aliases": doc["aliases"], "tags": doc["tags"]}
        if doc["anchors"]:
            row["anchors"] = doc["anchors"]
        out.append(row)
    counts["links_unresolved"] = counts["links"] - counts["anchors"] - counts["links_external"]
    return out


# --------------------------------------------------------------------------- finding the files

def cache_dir() -> Path:
    return Path(os.environ.get("RAG_HOME") or Path.home() / ".cache" / "rag") / "raw" / "foldoc"


def find_files(folder: Path) -> tuple[Path, Path] | None:
    """The index and dict files in `folder` itself or in an unpacked package under it."""
    for base in (folder, folder / PACKAGE_DIR):
        index = base / INDEX_NAME
        for name in DICT_NAMES:
            if index.is_file() and (base / name).is_file():
                return index, base / name
    return None


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RagError(f"`{' '.join(cmd)}` timed out after {timeout}s") from None


def _private_dir() -> Path:
    """A fresh folder only this user can enter or write (mkdtemp: mode 0700, owned by us); checked, not assumed."""
    folder = Path(tempfile.mkdtemp(prefix="rag-foldoc-"))
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_mode & 0o077 or (hasattr(os, "geteuid") and info.st_uid != os.geteuid()):
        shutil.rmtree(folder, ignore_errors=True)
        raise RagError(f"{folder}: the temporary download folder is not private; not fetching {PACKAGE}")
    return folder


def _downloaded_deb(folder: Path, before: set[str]) -> Path:
    """The `dict-foldoc_*.deb` apt-get just wrote into our private folder: a regular file (not a link) that was
    not there before the download; the newest by mtime if apt left more than one."""
    candidates = []
    for path in folder.glob(f"{PACKAGE}_*.deb"):
        info = os.lstat(path)
        if path.name not in before and stat.S_ISREG(info.st_mode):
            candidates.append((info.st_mtime_ns, path.name, path))
    if not candidates:
        raise RagError(f"`apt-get download {PACKAGE}` left no {PACKAGE}_*.deb in {folder}")
    return max(candidates)[2]


def fetch_with_apt(dest: Path) -> dict[str, Any]:
    """apt-get download + dpkg-deb -x in a private temporary folder (0700, removed afterwards); copy the two
    files into `dest`.

    apt-get download needs no root: it runs as the current user into the private folder. As root, apt's
    sandbox user `_apt` cannot enter that folder, so apt downloads unsandboxed (as root) with a warning,
    which is what a root download into a folder nobody else may write means; the folder is never opened to
    other users. Only when the download fails and we are root is `apt-get update` tried (the package lists
    need root); then the download once more.
    """
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise RagError(f"foldoc is optional; fetching it needs {' and '.join(missing)} (Debian/Ubuntu). "
                       f"Elsewhere, unpack the Debian package {PACKAGE} yourself and pass its folder "
                       f"as source_dir (it needs {INDEX_NAME} and {DICT_NAMES[0]}).")
    tmp_path = _private_dir()
    try:
        download = ["apt-get", "download", PACKAGE]
        before = {p.name for p in tmp_path.iterdir()}
        result = _run(download, tmp_path)
        updated = False
        if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            update = _run(["apt-get", "update"], tmp_path)
            updated = update.returncode == 0
            result = _run(download, tmp_path)
        if result.returncode != 0:
            raise RagError(f"foldoc is optional; `apt-get download {PACKAGE}` failed"
                           f"{'' if updated else ' (and apt-get update was not possible or failed)'}: "
                           f"{result.stderr.strip()[-500:]}")
        deb = _downloaded_deb(tmp_path, before)
        root = tmp_path / "root"
        unpack = _run(["dpkg-deb", "-x", str(deb), str(root)], tmp_path)
        if unpack.returncode != 0:
            raise RagError(f"dpkg-deb -x {deb.name} failed: {unpack.stderr.strip()[-500:]}")
        found = find_files(root)
        if found is None:
            raise RagError(f"{deb.name} has no {PACKAGE_DIR}/{INDEX_NAME}")
        dest.mkdir(parents=True, exist_ok=True)
        for src in found:  # copy beside, then rename: the cache never holds half a file
            tmp_copy = dest / f".{src.name}.tmp"
            shutil.copyfile(src, tmp_copy)
            os.replace(tmp_copy, dest / src.name)
        info = {"package": deb.name, "package_sha256": file_sha256(deb), "apt_update": updated}
        write_json(dest / SOURCE_INFO, info)
        return info
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def locate_sources(source_dir: str | Path | None) -> tuple[Path, Path, dict[str, Any]]:
    if source_dir is not None:
        found = find_files(Path(source_dir))
        if found is None:
            raise RagError(f"{source_dir} has no {INDEX_NAME} with {DICT_NAMES[0]} "
                           f"(looked in it and in {PACKAGE_DIR}/ under it)")
        return found[0], found[1], {"source_dir": str(source_dir)}
    cache = cache_dir()
    found = find_files(cache)
    info: dict[str, Any] = {"cache": str(cache)}
    if found is not None and (cache / SOURCE_INFO).is_file():
        info.update(read_json(cache / SOURCE_INFO))
    if found is None:
        info.update(fetch_with_apt(cache))
        found = find_files(cache)
        if found is None:  # pragma: no cover - fetch_with_apt copies both files
            raise RagError(f"no FOLDOC files in {cache} after fetching")
    return found[0], found[1], info


def prepare_foldoc(out_dir: Path, source_dir: str | Path | None = None) -> dict[str, Any]:
    """Write out_dir/corpus.jsonl and out_dir/stats.json from the dictd files (fetched if needed)."""
    out_dir = Path(out_dir)
    index_path, dict_path, source_info = locate_sources(source_dir)
    source_info.update({"index": index_path.name, "index_sha256": file_sha256(index_path),
                        "dict": dict_path.name, "dict_sha256": file_sha256(dict_path)})
    counts: Counter = Counter()
    index_rows = read_index(index_path)
    docs = build_documents(index_rows, read_dict(dict_path), counts)
    n = write_corpus(out_dir, docs)
    stats = {
        "dataset": "foldoc",
        "source": source_info,
        "index_rows": len(index_rows),
        "metadata_entries": counts["metadata_entries"],
        "headwords": counts["headwords"],
        "entries": counts["entries"],
        "empty_entries": counts["empty_entries"],
        "merged_duplicate_titles": counts["merged_duplicate_titles"],
        "docs": n,
        "docs_with_anchors": sum(bool(d.get("anchors")) for d in docs),
        "links": counts["links"],
        "anchors": counts["anchors"],
        "links_external": counts["links_external"],
        "links_unresolved": counts["links_unresolved"],
        "words": sum(len(d["text"].split()) for d in docs),
    }
    return write_stats(out_dir, stats)
