"""enwiki-mini: about 100 real Wikipedia articles from a MediaWiki XML export, wikitext cleaned.

Source: `gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`
in the PyPI package `gensim` (read by path, never imported). Pages are streamed with
`xml.etree.ElementTree.iterparse` (namespace-aware) from the bz2 file; redirects and pages outside
the main namespace are skipped.

`wikitext_to_text` is a small, careful cleaner, not a MediaWiki renderer. It removes HTML comments,
`<ref>` footnotes and other non-prose tags (math, gallery, ...), templates `{{...}}` (nested),
tables `{| ... |}` (nested), file/image/category and interlanguage links, external-link URLs,
bold/italic quotes, list markers and magic words; headings become paragraph boundaries and the
sections that are only references or link lists ("References", "External links", "See also", ...)
are dropped. Links `[[Target|label]]` keep their label in the text and become anchors
`{"text": label, "title": Target (first letter upper-cased, underscores -> spaces), "paragraph",
"start", "end"}`.
Document: `{"id": "e" + page id, "title", "text", "domain": "wikipedia", "anchors"}`.
"""
from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import InputError
from rag.data.preparers import package_source, progress, write_corpus, write_stats

DISTRIBUTION = "gensim"
DATA_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
ID_PREFIX = "e"
DOMAIN = "wikipedia"

# Namespaces (and their aliases) whose links are not article links; the dump's own siteinfo
# namespaces are added when known.
DEFAULT_NAMESPACES = frozenset({
    "media", "special", "talk", "user", "user talk", "wikipedia", "wikipedia talk", "wp", "project",
    "file", "file talk", "image", "image talk", "mediawiki", "mediawiki talk", "template",
    "template talk", "help", "help talk", "category", "category talk", "portal", "portal talk",
    "book", "book talk", "draft", "draft talk", "timedtext", "timedtext talk", "module",
    "module talk", "education program", "gadget", "gadget definition", "topic",
})
DROP_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})  # removed with their caption
INTERWIKI = frozenset({
    "wikt", "wiktionary", "w", "wikipedia", "s", "wikisource", "q", "wikiquote", "b", "wikibooks",
    "n", "wikinews", "v", "wikiversity", "voy", "wikivoyage", "species", "wikispecies", "d",
    "wikidata", "c", "commons", "m", "meta", "mw", "metawikipedia", "foundation", "wmf", "phab",
    "google", "imdbtitle", "imdbname",
})
_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(?:-[a-z]{2,8})*$")  # interlanguage links: [[de:...]]
DROP_SECTIONS = frozenset({
    "see also", "references", "external links", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "notes and citations", "works cited", "external link", "reference", "note",
})
DROP_TAGS = ("ref", "references", "gallery", "math", "timeline", "imagemap", "score", "chem", "ce",
             "hiero", "graph", "mapframe", "maplink", "templatedata", "syntaxhighlight", "source",
             "noinclude", "includeonly", "categorytree", "inputbox")

# Markers that carry a link through the text clean-up (private-use characters, never in text).
_A_OPEN, _A_MID, _A_CLOSE = "\ue000", "\ue001", "\ue002"
_MARKED = re.compile(f"{_A_OPEN}(\\d+){_A_MID}([^{_A_OPEN}{_A_MID}{_A_CLOSE}]*){_A_CLOSE}")
_STRAY_MARK = re.compile(f"{_A_OPEN}\\d*{_A_MID}?|{_A_MID}|{_A_CLOSE}")

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_SELF_CLOSING = re.compile(r"<(?:" + "|".join(DROP_TAGS) + r")\b[^<>]*/\s*>", re.I)
_PAIRED = re.compile(r"<(" + "|".join(DROP_TAGS) + r")\b[^<>]*>.*?</\1\s*>", re.I | re.S)
_BR = re.compile(r"<br\s*/?\s*>", re.I)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
_EXT_LINK = re.compile(r"\[(?:(?:https?|ftp|ftps|irc|ircs|gopher|news|mms|svn|git|sftp):)?//[^\s\]]*(?:\s+([^\]]*))?\]"
                       r"|\[mailto:[^\s\]]*(?:\s+([^\]]*))?\]", re.I)
_BOLD_ITALIC = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_LIST = re.compile(r"^[*#:;]+\s*")
_TABLE_TOKEN = re.compile(r"^[ \t]*(\{\||\|\})", re.M)
_EMPTY_PARENS = re.compile(r"\(\s*(?:[,;:]\s*)*\)")
_SPACE_PUNCT = re.compile(r"[ \t]+([,.;:!?)])")
_WS_AFTER_OPEN = re.compile(f"({_A_OPEN}\\d+{_A_MID})(\\s+)")
_WS_BEFORE_CLOSE = re.compile(f"(\\s+)({_A_CLOSE})")
_EMPTY_MARK = re.compile(f"{_A_OPEN}\\d+{_A_MID}{_A_CLOSE}")
_TRAILING_LETTERS = re.compile(r"[a-z]+")
_BRACKETS = re.compile(r"\[\[|\]\]")


def _remove_nested(text: str, open_tok: str, close_tok: str) -> str:
    """Drop balanced `open_tok ... close_tok` spans (nested); an unclosed one runs to the blank line."""
    out: list[str] = []
    depth, pos, start = 0, 0, 0
    token = re.compile(re.escape(open_tok) + "|" + re.escape(close_tok))
    for m in token.finditer(text):
        if m.group() == open_tok:
            if depth == 0:
                out.append(text[pos:m.start()])
                start = m.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                pos = m.end()
    if depth > 0:
        end = text.find("\n\n", start)
        pos = len(text) if end < 0 else end
    out.append(text[pos:])
    return "".join(out)


_INNER_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_RANGE_WORDS = frozenset({"-", "–", "to", "and", "or", "by", "x", "×", "+", "to(-)", "and(-)"})


def _template_args(inner: str) -> tuple[str, list[str]]:
    """Template name and positional arguments (a `|` inside a [[link]] does not split)."""
    parts, depth, start = [], 0, 0
    i = 0
    while i < len(inner):
        two = inner[i:i + 2]
        if two in ("[[", "]]"):
            depth += 1 if two == "[[" else -1
            i += 2
            continue
        if inner[i] == "|" and depth <= 0:
            parts.append(inner[start:i])
            start = i + 1
        i += 1
    parts.append(inner[start:])
    name = " ".join(parts[0].replace("_", " ").split()).lower()
    positional = [p.strip() for p in parts[1:] if not re.match(r"^\s*[\w ]+\s*=", p)]
    return name, positional


def _template_text(inner: str) -> str:
    """The visible text of a few inline templates (lang, convert, nowrap, dashes); "" for all others."""
    name, args = _template_args(inner)
    if name.startswith("lang-") and args:
        return args[0]
    if name in ("lang", "transl", "transliteration") and len(args) >= 2:
        return args[-1]
    if name in ("nowrap", "nobr", "small", "smaller", "big", "nowrap begin") and args:
        return args[0]
    if name in ("convert", "cvt") and len(args) >= 2:
        if args[1] in _RANGE_WORDS and len(args) >= 4:
            return f"{args[0]} {args[1]} {args[2]} {args[3]}"
        return f"{args[0]} {args[1]}"
    if name in ("ndash", "snd", "spaced ndash", "spnd"):
        return " – " if name != "ndash" else "–"
    if name in ("mdash", "spaced mdash"):
        return "—"
    return ""


def _expand_templates(text: str, max_depth: int = 20) -> str:
    """Replace templates innermost first: most by nothing, a few inline ones by their text."""
    for _ in range(max_depth):
        new = _INNER_TEMPLATE.sub(lambda m: _template_text(m.group(1)), text)
        if new == text:
            break
        text = new
    return text


def _remove_tables(text: str) -> str:
    """Drop `{| ... |}` tables (tokens at line starts, nested) through the end of the closing line."""
    out: list[str] = []
    depth, pos = 0, 0
    for m in _TABLE_TOKEN.finditer(text):
        if m.group(1) == "{|":
            if depth == 0:
                out.append(text[pos:m.start()])
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                end = text.find("\n", m.end())
                pos = len(text) if end < 0 else end
    if depth > 0:
        return "".join(out)
    out.append(text[pos:])
    return "".join(out)


def normalize_target(target: str) -> str:
    """Link target -> article title: entities decoded, no #fragment, underscores -> spaces, first letter upper."""
    title = html.unescape(target).split("#", 1)[0].replace("_", " ")
    title = " ".join(title.split()).lstrip(":").strip()
    return title[:1].upper() + title[1:]


class _Linker:
    """Rewrites `[[...]]` links, collecting anchors and leaving markers in the text."""

    def __init__(self, namespaces: frozenset[str]) -> None:
        self.namespaces = namespaces
        self.targets: list[str] = []

    def classify(self, target: str) -> str:
        """'article', 'drop' (files, categories, interlanguage), or 'text' (other namespaces, interwiki)."""
        raw = target.strip()
        leading_colon = raw.startswith(":")
        raw = raw.lstrip(":").strip()
        if raw.startswith("#") or not raw:
            return "text"
        if ":" in raw:
            prefix = raw.split(":", 1)[0].strip()
            low = " ".join(prefix.replace("_", " ").split()).lower()
            if low in DROP_LINK_NAMESPACES:
                return "text" if leading_colon else "drop"
            if low in self.namespaces or low in INTERWIKI:
                return "text"
            if _LANG_PREFIX.match(prefix):
                return "text" if leading_colon else "drop"
        return "article"

    def rewrite(self, text: str, keep_anchors: bool = True) -> str:
        out: list[str] = []
        pos = 0
        while True:
            i = text.find("[[", pos)
            if i < 0:
                out.append(text[pos:])
                return "".join(out)
            j = self._close(text, i)
            if j < 0:  # unbalanced: drop the brackets, keep the text
                out.append(text[pos:i])
                pos = i + 2
                continue
            out.append(text[pos:i])
            inner = text[i + 2:j]
            pos = j + 2
            target, sep, label = inner.partition("|")
            kind = self.classify(target)
            if kind == "drop":
                continue
            if not sep:
                label = target.lstrip(":")
            elif not label.strip():  # pipe trick: [[Foo (bar)|]] shows "Foo"
                label = re.sub(r"\s*\([^()]*\)\s*$", "", target.split(":")[-1])
            trail = _TRAILING_LETTERS.match(text, pos)
            if trail:  # [[bus]]es -> buses
                label += trail.group()
                pos = trail.end()
            label = self.rewrite(label, keep_anchors=False)
            title = normalize_target(target) if kind == "article" else ""
            if keep_anchors and kind == "article" and title and label.strip():
                out.append(f"{_A_OPEN}{len(self.targets)}{_A_MID}{label}{_A_CLOSE}")
                self.targets.append(title)
            else:
                out.append(label)

    @staticmethod
    def _close(text: str, i: int) -> int:
        depth, k = 0, i
        while True:
            m = _BRACKETS.search(text, k)
            if m is None:
                return -1
            depth += 1 if m.group() == "[[" else -1
            if depth == 0:
                return m.start()
            k = m.end()


def _finish_paragraph(lines: list[tuple[str, bool]]) -> str:
    parts: list[str] = []
    for line, is_item in lines:
        if parts:
            parts.append("\n" if is_item or parts[-1].endswith("\n") else " ")
        parts.append(line)
    return "".join(parts)


def _extract_anchors(paragraph: str, index: int, targets: list[str]) -> tuple[str, list[dict[str, Any]]]:
    out: list[str] = []
    anchors: list[dict[str, Any]] = []
    pos, length = 0, 0
    for m in _MARKED.finditer(paragraph):
        before = _STRAY_MARK.sub("", paragraph[pos:m.start()])
        out.append(before)
        length += len(before)
        label = _STRAY_MARK.sub("", m.group(2))
        stripped = label.strip()
        if stripped:
            start = length + (len(label) - len(label.lstrip()))
            anchors.append({"text": stripped, "title": targets[int(m.group(1))], "paragraph": index,
                            "start": start, "end": start + len(stripped)})
        out.append(label)
        length += len(label)
        pos = m.end()
    out.append(_STRAY_MARK.sub("", paragraph[pos:]))
    return "".join(out), anchors


def wikitext_to_text(wikitext: str, namespaces: frozenset[str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Wikitext -> (plain text with paragraphs separated by a blank line, anchors)."""
    text = wikitext.replace("\r\n", "\n").replace(_A_OPEN, "").replace(_A_MID, "").replace(_A_CLOSE, "")
    text = _COMMENT.sub("", text)
    text = _SELF_CLOSING.sub("", text)
    text = _PAIRED.sub("", text)
    text = _expand_templates(text)
    text = _remove_nested(text, "{{", "}}")  # whatever is left unbalanced
    text = _remove_tables(text)
    linker = _Linker(DEFAULT_NAMESPACES | (namespaces or frozenset()))
    text = linker.rewrite(text)
    text = _EXT_LINK.sub(lambda m: m.group(1) or m.group(2) or "", text)
    text = _BR.sub(" ", text)
    text = _HTML_TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text)
    # leftovers of unbalanced markup
    text = text.replace("{{", "").replace("}}", "").replace("[[", "").replace("]]", "")

    paragraphs: list[str] = []
    current: list[tuple[str, bool]] = []
    skip_level = 0  # inside a dropped section of this heading level

    def flush() -> None:
        if current:
            paragraphs.append(_finish_paragraph(current))
            current.clear()

    for line in text.split("\n"):
        heading = _HEADING.match(line.strip())
        if heading:
            flush()
            level = len(heading.group(1))
            name = " ".join(_STRAY_MARK.sub("", _MARKED.sub(r"\2", heading.group(2))).split()).lower()
            if skip_level and level > skip_level:
                continue
            skip_level = level if name in DROP_SECTIONS else 0
            continue
        if skip_level:
            continue
        stripped = line.strip()
        if not stripped or set(stripped) <= {"-"}:
            flush()
            continue
        is_item = bool(_LIST.match(stripped))
        content = " ".join(_LIST.sub("", stripped).split())
        if content:
            current.append((content, is_item))
    flush()

    out_paragraphs: list[str] = []
    anchors: list[dict[str, Any]] = []
    for paragraph in paragraphs:
        # whitespace at a label's edges moves outside its markers, so collapsing it is offset-safe
        paragraph = _WS_AFTER_OPEN.sub(r"\2\1", paragraph)
        paragraph = _WS_BEFORE_CLOSE.sub(r"\2\1", paragraph)
        paragraph = _EMPTY_MARK.sub("", paragraph)
        paragraph = _EMPTY_PARENS.sub("", _collapse(paragraph))
        paragraph = _collapse(_SPACE_PUNCT.sub(r"\1", paragraph))
        plain, found = _extract_anchors(paragraph, len(out_paragraphs), linker.targets)
        if not any(ch.isalnum() for ch in plain):
            continue
        out_paragraphs.append(plain)
        anchors.extend(found)
    return "\n\n".join(out_paragraphs), anchors


def _collapse(paragraph: str) -> str:
    """Single spaces inside lines; no blank lines (a line of bare markers counts as blank)."""
    lines = (" ".join(line.split()) for line in paragraph.split("\n"))
    return "\n".join(line for line in lines if _STRAY_MARK.sub("", _MARKED.sub(r"\2", line)).strip())


# --------------------------------------------------------------------------- the XML dump

def iter_pages(path: Path) -> Iterator[dict[str, Any]]:
    """Yield {"id", "title", "ns", "redirect", "text", "namespaces"} for each <page>."""
    ns_uri = ""
    namespaces: set[str] = set()

    def q(tag: str) -> str:
        return f"{{{ns_uri}}}{tag}" if ns_uri else tag

    try:
        with bz2.open(path, "rb") as fh:
            context = ET.iterparse(fh, events=("start", "end"))
            for event, elem in context:
                if event == "start":
                    if not ns_uri and elem.tag.startswith("{"):
                        ns_uri = elem.tag[1:].split("}", 1)[0]
                    continue
                if elem.tag == q("namespace") and elem.get("key") not in (None, "0") and elem.text:
                    namespaces.add(" ".join(elem.text.split()).lower())
                elif elem.tag == q("page"):
                    revision = elem.find(q("revision"))
                    text_el = revision.find(q("text")) if revision is not None else None
                    yield {
                        "id": (elem.findtext(q("id")) or "").strip(),
                        "title": (elem.findtext(q("title")) or "").strip(),
                        "ns": (elem.findtext(q("ns")) or "0").strip(),
                        "redirect": elem.find(q("redirect")) is not None,
                        "text": (text_el.text or "") if text_el is not None else "",
                        "namespaces": frozenset(namespaces),
                    }
                    elem.clear()
    except (ET.ParseError, OSError, EOFError) as exc:
        raise InputError(f"cannot read the MediaWiki XML dump ({exc})", path) from None


_REDIRECT_TEXT = re.compile(r"^\s*#redirect\b", re.I)


def prepare_enwiki_mini(out_dir: Path, source: str | Path | None = None) -> dict[str, Any]:
    """Write out_dir/corpus.jsonl and out_dir/stats.json from the packaged (or given) bz2 dump."""
    out_dir = Path(out_dir)
    if source is None:
        path, source_info = package_source(DISTRIBUTION, DATA_FILE)
    else:
        path, source_info = Path(source), {"file": str(source)}
    counts: Counter = Counter()
    docs: list[dict[str, Any]] = []
    for page in progress(iter_pages(path), desc="enwiki-mini", unit="page"):
        counts["pages"] += 1
        if page["ns"] != "0":
            counts["skipped_namespace"] += 1
            continue
        if page["redirect"] or _REDIRECT_TEXT.match(page["text"]):
            counts["skipped_redirect"] += 1
            continue
        if not page["id"].isdigit():
            raise InputError(f"page {page['title']!r} has no numeric id", path)
        text, anchors = wikitext_to_text(page["text"], page["namespaces"])
        if not text:
            counts["skipped_empty"] += 1
            continue
        doc: dict[str, Any] = {"id": ID_PREFIX + page["id"], "title": page["title"], "text": text,
                               "domain": DOMAIN}
        if anchors:
            doc["anchors"] = anchors
        docs.append(doc)
    n = write_corpus(out_dir, docs)
    stats = {
        "dataset": "enwiki-mini",
        "source": source_info,
        **{k: counts[k] for k in ("pages", "skipped_redirect", "skipped_namespace", "skipped_empty")},
        "docs": n,
        "docs_with_anchors": sum(bool(d.get("anchors")) for d in docs),
        "anchors": sum(len(d.get("anchors", ())) for d in docs),
        "paragraphs": sum(d["text"].count("\n\n") + 1 for d in docs),
        "words": sum(len(d["text"].split()) for d in docs),
    }
    return write_stats(out_dir, stats)
