"""A realistic corpus built from what the test environment installs, and nothing else.

Tests that need real documents (varied prose, code, tables, unicode; short ones and ones
long enough to be chunked) must pass on a fresh clone, so they never read files beside
the checkout. Three sources, all present wherever `./run setup` ran:

* the standard library's documentation: each module's docstrings with the signatures
  they document, rendered as plain text in pydoc's layout. Read from the source with
  `ast`, never imported: importing would run code (`antigravity` opens a browser) and
  pydoc's own rendering prints default values such as `<object at 0x7f...>`, which
  change from run to run;
* the language reference topics pydoc ships (`pydoc_data.topics`): long prose;
* the long descriptions (READMEs) of the installed distributions: Markdown and
  reStructuredText from many authors, in several scripts (this project's own excepted:
  it changes with every edit).

The same environment always gives the same documents, in the same order.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Shorter documentation says too little to be worth a call.
MIN_CHARS = 400
SKIPPED_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "pydoc_data",  # read as topics below
    "encodings",  # codec tables, next to no documentation
    "turtledemo",
}
OWN_DISTRIBUTION = "llmq"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class CorpusDocument:
    """One document: its file name in a written corpus, and its text."""

    name: str
    text: str

    @property
    def non_ascii(self) -> bool:
        """Whether the text has any character beyond ASCII."""
        return not self.text.isascii()


def _indent(text: str, depth: int) -> str:
    pad = "    " * depth
    return "\n".join(pad + line if line.strip() else "" for line in text.splitlines())


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}"


def _documented(body: list[ast.stmt], depth: int) -> Iterator[str]:
    """Each public class and function with a docstring, pydoc style, methods nested."""
    for node in body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            bases = ", ".join(ast.unparse(base) for base in node.bases)
            doc = ast.get_docstring(node) or ""
            members = "\n\n".join(_documented(node.body, 1))
            if doc or members:
                header = f"class {node.name}({bases})" if bases else f"class {node.name}"
                parts = [header, _indent(doc, 1), members]
                yield _indent("\n".join(p for p in parts if p), depth)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node)
            if docstring and (not node.name.startswith("_") or node.name == "__init__"):
                yield _indent(f"{_signature(node)}\n{_indent(docstring, 1)}", depth)


def _module_document(path: Path, module: str) -> CorpusDocument | None:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    functions = [n for n in tree.body if not isinstance(n, ast.ClassDef)]
    sections = [("NAME", module), ("DESCRIPTION", ast.get_docstring(tree) or "")]
    sections += [
        ("CLASSES", "\n\n".join(_documented(list(classes), 0))),
        ("FUNCTIONS", "\n\n".join(_documented(functions, 0))),
    ]
    text = "\n\n".join(f"{title}\n{_indent(body, 1)}" for title, body in sections if body)
    if len(text) - len(module) < MIN_CHARS:
        return None
    return CorpusDocument(name=f"stdlib-{_UNSAFE.sub('_', module)}.txt", text=text + "\n")


def _stdlib() -> list[CorpusDocument]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_DIRS & set(relative.parts[:-1]):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if not parts:
            continue
        document = _module_document(path, ".".join(parts))
        if document is not None:
            found.append(document)
    return found


def _topics() -> list[CorpusDocument]:
    from pydoc_data.topics import topics

    return [
        CorpusDocument(name=f"topic-{_UNSAFE.sub('_', name)}.txt", text=text)
        for name, text in sorted(topics.items())
        if len(text) >= MIN_CHARS
    ]


def _descriptions() -> list[CorpusDocument]:
    by_name: dict[str, CorpusDocument] = {}
    for dist in importlib.metadata.distributions():
        name = str(dist.metadata["Name"] or "").strip()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if not key or key == OWN_DISTRIBUTION or key in by_name:
            continue
        text = str(dist.metadata.get_payload() or "").strip()  # type: ignore[attr-defined]
        if not text:
            # Metadata 1.x keeps it in a header, continuation lines indented by 8 and a bar.
            header = str(dist.metadata["Description"] or "")
            text = re.sub(r"\n {7}\|", "\n", header).strip()
        if len(text) < MIN_CHARS:
            continue
        kind = str(dist.metadata["Description-Content-Type"] or "")
        suffix = ".md" if "markdown" in kind else ".rst" if "rst" in kind else ".txt"
        by_name[key] = CorpusDocument(name=f"dist-{_UNSAFE.sub('_', key)}{suffix}", text=text)
    return [by_name[key] for key in sorted(by_name)]


def _build() -> list[CorpusDocument]:
    every = sorted([*_stdlib(), *_topics(), *_descriptions()], key=lambda d: d.name)
    # Some topics share one text ("if" and "else"): a batch would rightly summarize it
    # once, so only the first is kept and every document is distinct.
    seen: set[str] = set()
    distinct = []
    for doc in every:
        if doc.text.strip() not in seen:
            seen.add(doc.text.strip())
            distinct.append(doc)
    return distinct


def _cache_path() -> Path:
    """Where this environment's corpus is cached: named by everything it is built from."""
    inputs = {
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "python": sys.version,
        "stdlib": sysconfig.get_paths()["stdlib"],
        "distributions": sorted(
            f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
        ),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"llmq-test-corpus-{key}.json"


@lru_cache(maxsize=1)
def documents() -> tuple[CorpusDocument, ...]:
    """Every document of the corpus, ordered by name."""
    # Parsing the standard library takes seconds; the same inputs give the same corpus,
    # so it is built once per environment and read back after that.
    cache = _cache_path()
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        return tuple(CorpusDocument(name=d["name"], text=d["text"]) for d in cached)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    built = _build()
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    try:
        partial.write_text(json.dumps([vars(d) for d in built]), encoding="utf-8")
        os.replace(partial, cache)  # readers see the whole file or none
    except OSError:
        partial.unlink(missing_ok=True)  # no cache, only slower
    return tuple(built)


def document(name: str) -> CorpusDocument:
    """The document called `name`."""
    for candidate in documents():
        if candidate.name == name:
            return candidate
    raise KeyError(f"no corpus document {name!r}")


def longest(count: int, *, non_ascii: bool = False) -> list[CorpusDocument]:
    """The `count` longest documents (only those with non-ASCII text, if asked), longest first."""
    pool = [d for d in documents() if d.non_ascii or not non_ascii]
    return sorted(pool, key=lambda d: (-len(d.text), d.name))[:count]


def sample(count: int) -> list[CorpusDocument]:
    """`count` documents spread evenly over the corpus: every source, every length."""
    every = documents()
    step = len(every) / count
    return [every[int(i * step)] for i in range(count)]


def write(directory: Path) -> Path:
    """Write every document into `directory`, one UTF-8 file each; returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for doc in documents():
        (directory / doc.name).write_text(doc.text, encoding="utf-8")
    return directory
