"""API keys of the HTTP front: one per user or tenant, stored in Redis only as a sha256."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import redis
from pydantic import ValidationError
from redis.typing import EncodableT, FieldT

from worker.connections import redis_client
from worker.keyspace import API_KEY
from worker.models import CompletionJob
from worker.settings import Settings

# One hash per key: llmq:apikey:<key id> -> digest, user_id, name, created.
PREFIX = API_KEY
# llmq_<key id>_<secret>: the id finds the record without a scan; the secret holds
# 256 random bits, so a plain sha256 of the key is as strong as a slow password hash.
KEY_ID = re.compile(r"[0-9a-f]{16}")
TOKEN = re.compile(r"llmq_(?P<id>[0-9a-f]{16})_[A-Za-z0-9_-]{43}")
MAX_NAME = 100


@dataclass(frozen=True)
class ApiKey:
    """What is known about a key: never the key itself, nor its hash."""

    id: str
    user_id: str
    name: str
    created: str

    def as_dict(self) -> dict[str, str]:
        """Plain JSON values."""
        return asdict(self)


def digest(token: str) -> str:
    """The sha256 stored in place of a key."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_user(user_id: str) -> None:
    """Refuse a user id no job could carry, by the job model's own rules."""
    try:
        CompletionJob.model_validate(
            {"messages": [{"role": "user", "content": "x"}], "user_id": user_id}
        )
    except ValidationError as exc:
        problems = [e["msg"] for e in exc.errors() if e["loc"][:1] == ("user_id",)]
        if problems:
            raise ValueError(f"not a valid user id: {'; '.join(problems)}") from None


class KeyStore:
    """Create, check, list and revoke API keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        """The store in REDIS_URL."""
        return cls(redis_client(settings))

    def create(self, user_id: str, name: str = "") -> tuple[str, ApiKey]:
        """A new key for `user_id`: the key (shown once, never stored) and its record."""
        check_user(user_id)
        if len(name) > MAX_NAME or not name.isprintable():
            raise ValueError(f"a key name must be printable and at most {MAX_NAME} characters")
        while True:
            key_id = secrets.token_hex(8)
            if not self.redis.exists(PREFIX + key_id):
                break
        token = f"llmq_{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(
            id=key_id,
            user_id=user_id,
            name=name,
            created=datetime.now(UTC).isoformat(timespec="milliseconds"),
        )
        stored = {"digest": digest(token), **record.as_dict()}
        # Built field by field: redis-py's hash mapping type takes no dict[str, str].
        fields: dict[FieldT, EncodableT] = {name: value for name, value in stored.items()}
        self.redis.hset(PREFIX + key_id, mapping=fields)
        return token, record

    def authenticate(self, token: str) -> ApiKey | None:
        """The key's record, or None for a malformed, unknown or revoked key."""
        found = TOKEN.fullmatch(token)
        if found is None:
            return None
        stored: dict[str, str] = self.redis.hgetall(PREFIX + found["id"])  # type: ignore[assignment]
        # Constant-time, so response times say nothing about how much of a guess matched.
        if not stored.get("user_id") or not hmac.compare_digest(
            stored.get("digest", ""), digest(token)
        ):
            return None
        return _record(stored)

    def list(self) -> list[ApiKey]:
        """Every key, oldest first."""
        found = []
        for name in self.redis.scan_iter(match=PREFIX + "*", count=500):
            stored: dict[str, str] = self.redis.hgetall(name)  # type: ignore[assignment]
            if stored.get("user_id"):
                found.append(_record(stored))
        return sorted(found, key=lambda key: (key.created, key.id))

    def revoke(self, key_id: str) -> bool:
        """Delete a key at once; False if there is no key with that id."""
        if KEY_ID.fullmatch(key_id) is None:
            return False
        return bool(self.redis.delete(PREFIX + key_id))


def _record(stored: dict[str, str]) -> ApiKey:
    return ApiKey(
        id=stored["id"],
        user_id=stored["user_id"],
        name=stored.get("name", ""),
        created=stored.get("created", ""),
    )
