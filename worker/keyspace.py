"""Every Redis key llmq uses, in one place.

Keys are grouped by what owns them; the prefixes that are settings (LLM_SPEND_NAMESPACE,
LLM_RATE_LIMIT_PREFIX, LLM_CACHE_VERSION) come from the settings. A job's idempotency
keys share a hash tag (`{...}`), so they stay in one slot wherever that matters; llmq
runs on one Redis (or Sentinel), not on Redis Cluster, so the other groups need none.
Celery's and kombu's own keys (queues, `unacked`, `celery-task-meta-*`) are theirs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

ROOT = "llmq"

# Fixed prefixes (the settings-dependent ones are built by KeySpace below).
JOB = f"{ROOT}:job"
TASK = f"{ROOT}:task"
CACHE = f"{ROOT}:cache"
CIRCUIT = f"{ROOT}:circuit:"
CIRCUITS = f"{ROOT}:circuits"
LATENCY = f"{ROOT}:latency:"
FLEET = f"{ROOT}:fleet"
DEFERRALS = f"{ROOT}:deferrals:"
# The HTTP front's: an API key's record by key id (producer/keys.py), and who (sha256 of
# the user id) posted a job through the front, by task id (producer/web.py).
API_KEY = f"{ROOT}:apikey:"
JOB_POSTER = f"{ROOT}:jobowner:"


def digest(*parts: object) -> str:
    """sha256 of the parts as canonical JSON: stable across processes and machines."""
    canonical = json.dumps(list(parts), ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class JobKeys:
    """The idempotency keys of one (user_id, request_id): one hash tag, one slot."""

    base: str

    @property
    def binding(self) -> str:
        """The fingerprint of the request the id is bound to."""
        return f"{self.base}:request"

    @property
    def result(self) -> str:
        """The job's stored result."""
        return f"{self.base}:result"

    @property
    def lease(self) -> str:
        """Held by the delivery that is running the job (expires with the job deadline)."""
        return f"{self.base}:running"


def job_keys(user_id: str, request_id: str) -> JobKeys:
    """The keys of a request_id, scoped by its user."""
    return JobKeys(base=f"{JOB}:{{{digest(user_id, request_id)}}}")


def task_owner(task_id: str) -> str:
    """Who (sha256 of the user id) first ran a job under this Celery task id."""
    return f"{TASK}:{task_id}:owner"


@dataclass(frozen=True, kw_only=True)
class CacheKeys:
    """The response cache of one LLM_CACHE_VERSION."""

    version: str

    @property
    def prefix(self) -> str:
        """Every key of this version starts with it."""
        return f"{CACHE}:{self.version}"

    def entry(self, request_digest: str) -> str:
        """A stored answer."""
        return f"{self.prefix}:entry:{request_digest}"

    def lease(self, request_digest: str) -> str:
        """Held by the one job calling the provider for identical requests."""
        return f"{self.prefix}:lock:{request_digest}"

    @property
    def stats(self) -> str:
        """Hits, misses and saved USD."""
        return f"{self.prefix}:stats"


@dataclass(frozen=True, kw_only=True)
class SpendKeys:
    """The spend keys of one UTC day."""

    namespace: str
    day: str

    @property
    def prefix(self) -> str:
        """Every key of the day starts with this."""
        return f"{self.namespace}:spend:{self.day}"

    def held(self, user_id: str) -> str:
        """Hash of the user's reservations: id -> "units:expires_at"."""
        return f"{self.prefix}:held:{user_id}"

    def counters(self, dimension: str, name: str) -> str:
        """Hash of spend counters for one user, model or provider."""
        return f"{self.prefix}:{dimension}:{name}"

    @property
    def total(self) -> str:
        """Hash of spend counters for everyone."""
        return f"{self.prefix}:total"

    @property
    def index(self) -> str:
        """Set of "dimension:name" entries that have counters today."""
        return f"{self.prefix}:index"

    @property
    def holders(self) -> str:
        """Set of users who made a reservation today (found before their first settle)."""
        return f"{self.prefix}:holders"

    @property
    def alerted(self) -> str:
        """Set once, by the settle that first crosses the daily alert threshold."""
        return f"{self.prefix}:alerted"


def limit_keys(prefix: str, scope: str) -> tuple[str, str]:
    """A rate limit's reservation log (sorted set) and amounts (hash)."""
    return f"{prefix}:{scope}:log", f"{prefix}:{scope}:amounts"


@dataclass(frozen=True, kw_only=True)
class CircuitKeys:
    """One provider endpoint's circuit."""

    name: str

    @property
    def state(self) -> str:
        """Hash: state, consecutive failures, open_until, last error."""
        return CIRCUIT + self.name

    @property
    def probe(self) -> str:
        """Held by the one half-open probe."""
        return f"{CIRCUIT}{self.name}:probe"

    def window(self, bucket: int) -> str:
        """Calls and failures in one window of the failure rate."""
        return f"{CIRCUIT}{self.name}:window:{bucket}"


def deferrals(user_id: str) -> str:
    """One user's deferred jobs (worker/deferrals.py), by task id."""
    return DEFERRALS + digest(user_id)


def latency(metric: str) -> str:
    """Fleet-wide samples of one latency metric."""
    return LATENCY + metric


# The providers' Batch APIs (worker/batchapi/): runs, provider batches, per-document claims.
BATCH_API = f"{ROOT}:batchapi"


@dataclass(frozen=True, kw_only=True)
class BatchRunKeys:
    """One `llmq summarize --batch-api` run, as the workers drive it."""

    run_id: str

    @property
    def base(self) -> str:
        """Every key of the run starts with this."""
        return f"{BATCH_API}:run:{self.run_id}"

    @property
    def meta(self) -> str:
        """Hash: user, provider, model, words, state, the current round."""
        return self.base

    @property
    def docs(self) -> str:
        """Hash: document key -> where its reduction stands (JSON)."""
        return f"{self.base}:docs"

    @property
    def results(self) -> str:
        """Hash: document key -> its final DocumentSummary (JSON)."""
        return f"{self.base}:results"

    @property
    def answers(self) -> str:
        """Hash: custom_id -> the request's answer or error (JSON)."""
        return f"{self.base}:answers"

    def round(self, number: int) -> str:
        """Hash: custom_id -> the request of that round (JSON), written before any batch."""
        return f"{self.base}:round:{number}"

    def ended(self, number: int) -> str:
        """Set: the round's provider batches whose results are all recorded."""
        return f"{self.base}:round:{number}:ended"

    @property
    def lock(self) -> str:
        """Held by the one task advancing the run to its next round."""
        return f"{self.base}:lock"


@dataclass(frozen=True, kw_only=True)
class ProviderBatchKeys:
    """One provider batch of a run: intent, id, state, counts, cost."""

    local_id: str

    @property
    def state(self) -> str:
        """Hash: the batch's record, written before the provider's batch is created."""
        return f"{BATCH_API}:batch:{self.local_id}"

    @property
    def settled(self) -> str:
        """Set: the custom_ids already charged (a result is never charged twice)."""
        return f"{BATCH_API}:batch:{self.local_id}:settled"

    @property
    def lock(self) -> str:
        """Held by the one task creating or polling the batch."""
        return f"{BATCH_API}:batch:{self.local_id}:lock"


BATCH_INDEX = f"{BATCH_API}:batches"
# Every provider batch id a run has recorded, to tell an unrecorded one apart.
BATCH_PROVIDER_IDS = f"{BATCH_API}:provider-ids"


def batch_doc_claim(document_key: str) -> str:
    """Which run owns a document (its content, options and user), so no run pays twice."""
    return f"{BATCH_API}:doc:{document_key}"
