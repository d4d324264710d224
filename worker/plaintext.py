"""A document's prose, without its front matter and markup, for the extractive summarizer.

A summary that starts `Title: ... Author: ... <email> Status: ...` is the front matter
read as prose. This drops it (YAML/TOML front matter, an RFC 822 header block as PEPs and
MultiMarkdown have) and keeps only paragraphs: Markdown through markdown-it-py,
everything else through docutils' reStructuredText parser (plain text parses as
paragraphs too). Headings, field lists, tables, code and comments are not prose.
"""

from __future__ import annotations

import io
import re
from typing import Any

from docutils import nodes
from docutils.core import publish_doctree
from markdown_it import MarkdownIt

_FENCED_FRONT_MATTER = re.compile(
    r"\A(?:---|\+\+\+)[ \t]*\n.*?\n(?:---|\+\+\+|\.\.\.)[ \t]*(?:\n|\Z)", re.S
)
# `Field: value` lines (values may continue on indented lines), up to the first blank line.
_HEADER_FIELD = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*(?: [A-Za-z0-9_-]+){0,3}:(?:[ \t]+\S|[ \t]*$)")
_MARKDOWN = re.compile(r"^#{1,6}\s|^```|\[[^\]\n]+\]\([^)\n]+\)|^\s*\|.*\|\s*$", re.M)
# Directives, literal-block markers, section underlines, `link`_ references.
_RST = re.compile(r"^\.\. |::\s*$|^([=\-~^\"'`#*+])\1{2,}\s*$|`_", re.M)
# Parents whose paragraphs are metadata, notes on the side, or not text at all.
_NOT_PROSE = (
    nodes.docinfo,
    nodes.field_list,
    nodes.table,
    nodes.comment,
    nodes.system_message,
    nodes.substitution_definition,
    nodes.footnote,
    nodes.citation,
    nodes.literal_block,
    nodes.raw,
)
# Sphinx-style roles docutils does not know (`:pep:`, `:func:`) would come back as
# markup; their text is what a reader sees. Footnote marks are not prose either.
_ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]*)`")
_LINK = re.compile(r"`([^`<]+?)(?:\s*<[^<>`]*>)?`__?")
_TARGET = re.compile(r"\s*<[^<>]*>\s*$")
_FOOTNOTE_MARK = re.compile(r"\s*\[[^\]\s]+\]_")
_DOCUTILS_SETTINGS = {
    # Never read other files or pass raw HTML through: the text is a user's document.
    "file_insertion_enabled": False,
    "raw_enabled": False,
    "report_level": 5,
    "halt_level": 5,
    "warning_stream": io.StringIO(),
    "input_encoding": "unicode",
    "doctitle_xform": True,
    "docinfo_xform": True,
}
_markdown = MarkdownIt("commonmark").enable("table")


def strip_front_matter(text: str) -> str:
    """The text without a leading YAML/TOML block or an RFC 822 style header block."""
    text = _FENCED_FRONT_MATTER.sub("", text.lstrip("\ufeff"), count=1)
    lines = text.splitlines()
    start = 0
    while start < len(lines) and not lines[start].strip():
        start += 1
    end, fields = start, 0
    while end < len(lines) and lines[end].strip():
        if _HEADER_FIELD.match(lines[end]):
            fields += 1
        elif not (lines[end][:1].isspace() and fields):
            return text  # a line that is neither a field nor a continuation: not a header
        end += 1
    # One `Note: ...` line is prose; two fields or more are a header block.
    return "\n".join(lines[end:]) if fields >= 2 else text


def prose(text: str) -> str:
    """The document's paragraphs as plain text, one per line group; "" when it has none."""
    body = strip_front_matter(text)
    markdown = len(_MARKDOWN.findall(body)) > len(_RST.findall(body))
    paragraphs = _markdown_paragraphs(body) if markdown else _rst_paragraphs(body)
    return "\n\n".join(p for p in paragraphs if p)


def _rst_paragraphs(text: str) -> list[str]:
    """Paragraphs of reStructuredText (or plain text), outside metadata, tables and code."""
    text = _ROLE.sub(lambda m: _TARGET.sub("", m.group(1)).lstrip("~!"), text)
    text = _LINK.sub(lambda m: m.group(1), text)
    try:
        tree = publish_doctree(text, settings_overrides=dict(_DOCUTILS_SETTINGS))
    except Exception:
        return [text]
    found: list[str] = []
    for paragraph in tree.findall(nodes.paragraph):
        if _inside(paragraph, _NOT_PROSE):
            continue
        found.append(_FOOTNOTE_MARK.sub("", " ".join(paragraph.astext().split())))
    return found


def _inside(node: nodes.Node, kinds: tuple[type[Any], ...]) -> bool:
    parent = node.parent
    while parent is not None:
        if isinstance(parent, kinds):
            return True
        parent = parent.parent
    return False


def _markdown_paragraphs(text: str) -> list[str]:
    """Paragraphs of Markdown (list items included), outside headings, tables and HTML."""
    found: list[str] = []
    depth = {"table": 0, "heading": 0}
    for token in _markdown.parse(text):
        kind = token.type
        if kind in ("table_open", "table_close"):
            depth["table"] += 1 if kind == "table_open" else -1
        elif kind in ("heading_open", "heading_close"):
            depth["heading"] += 1 if kind == "heading_open" else -1
        elif kind == "inline" and not any(depth.values()):
            words = [
                child.content
                for child in token.children or []
                if child.type in ("text", "code_inline")
            ]
            found.append(" ".join(" ".join(words).split()))
    return found
