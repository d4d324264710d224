"""worker/plaintext.py: prose without front matter or markup, for extractive summaries."""

from __future__ import annotations

import re

import pytest

from tests import corpus
from worker.models import Message
from worker.plaintext import prose, strip_front_matter
from worker.providers.base import ProviderRequest
from worker.providers.extractive import ExtractiveProvider

BODY = (
    "Loop counters are a common need in Python programs. Writers often reach for an "
    "index variable that they increment by hand inside the loop. This proposal adds a "
    "built-in that yields the index together with each element of the sequence. The "
    "change makes the common case shorter and removes a class of off-by-one errors. "
    "Existing code keeps working because the new built-in is purely additive."
)
RST = f"""PEP: 212
Title: Loop Counter Iteration
Author: Peter Schneider-Kamp <nowonder@example.org>
Status: Rejected
Type: Standards Track
Created: 22-Aug-2000
Post-History:


Introduction
============

{BODY}

.. note:: Enumerating a generator consumes it.

========  =========
Field     Value
========  =========
Owner     owner@example.org
========  =========

::

    for i, item in enumerate(items): print(i)

See :pep:`279` and the `tutorial`_ [1]_.
"""
RST_FIELDS = f""":Author: Jane Roe <jane@example.org>
:Status: Draft
:Version: 3

{BODY}
"""
MARKDOWN = f"""---
title: Loop Counter Iteration
author: Jane Roe <jane@example.org>
status: Draft
---

# Loop counters

{BODY}

| Field  | Value             |
|--------|-------------------|
| Owner  | owner@example.org |

```python
for i, item in enumerate(items): print(i)
```
"""
MARKDOWN_HEADER = f"""Title: Loop Counter Iteration
Author: Jane Roe <jane@example.org>
Status: Draft

## Loop counters

{BODY} See [the docs](https://example.org/docs).
"""
FIELD_NAMES = ("PEP", "Title", "Author", "Status", "Type", "Created", "Post-History", "Version")
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")


def summarize(text: str) -> str:
    request = ProviderRequest(
        messages=[Message(role="system", content="Summarize."), Message(role="user", content=text)],
        model="extractive",
        max_tokens=400,
        temperature=0,
        timeout=10,
    )
    return ExtractiveProvider().complete(request).text


@pytest.mark.parametrize(
    "document",
    [RST, RST_FIELDS, MARKDOWN, MARKDOWN_HEADER],
    ids=["rst-pep-header", "rst-field-list", "markdown-yaml", "markdown-header-block"],
)
def test_summary_has_no_front_matter_markup_or_email(document: str) -> None:
    summary = summarize(document)
    assert "Loop counters are a common need" in summary
    for name in FIELD_NAMES:
        assert f"{name}:" not in summary and f"{name.lower()}:" not in summary
    assert not EMAIL.search(summary), summary
    assert "Rejected" not in summary and "Schneider-Kamp" not in summary
    for markup in ("::", "===", "```", "| ", "](", ":pep:", "[1]_", "`"):
        assert markup not in summary, (markup, summary)


def test_prose_keeps_paragraphs_and_drops_tables_code_and_notes() -> None:
    text = prose(RST)
    assert BODY in text
    assert "See 279 and the tutorial." in text
    assert "Enumerating a generator consumes it." in text  # a note is prose
    assert "enumerate(" not in text and "owner@" not in text


def test_one_field_like_line_is_prose_not_a_header() -> None:
    text = "Note: this is the first sentence of a plain document.\n\nMore prose."
    assert strip_front_matter(text) == text
    assert "Note: this is the first sentence" in prose(text)


def test_plain_text_without_markup_is_kept() -> None:
    assert prose(BODY) == BODY


def test_no_corpus_document_summary_starts_with_its_metadata() -> None:
    # The installed distributions' READMEs: Markdown and reST from many authors.
    for document in corpus.sample(40):
        summary = summarize(document.text)
        assert summary.strip(), document.name
        assert not re.match(r"(Metadata-Version|Name|Version|Author|Title):", summary)
