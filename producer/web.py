"""The HTTP front a web app puts before the queue: enqueue, poll, health.

Run it with `uvicorn producer.web:app`. It imports no provider SDK. Every request names
its user by an API key (`Authorization: Bearer <key>`, made with `llmq keys create USER`),
unless LLM_HTTP_AUTH=false; a job can be read only with a key of the user who posted it.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import quote

from celery.result import AsyncResult
from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from producer import app as celery_app
from producer import submit
from producer.keys import KeyStore
from worker.connections import redis_client
from worker.errors import InvalidJobError
from worker.keyspace import JOB_POSTER
from worker.models import CompletionJob, Message
from worker.settings import Settings, get_settings

log = logging.getLogger("llmq.web")

# llmq:jobowner:<task id> -> sha256 of the user id that posted the job.
OWNER_PREFIX = JOB_POSTER
# Names of fields a 422 may repeat; anything else a client sent as a key is not quoted.
_FIELDS = {"body", *CompletionJob.model_fields, *Message.model_fields}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `llmq keys create USER`; the jobs it posts are USER's.",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

router = APIRouter()


class Accepted(BaseModel):
    """A job was enqueued."""

    id: str
    status_url: str


class JobStatus(BaseModel):
    """A job's state, and its result or error once it has one."""

    id: str
    state: str
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _key_user(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is None:
        return None
    key = KeyStore.from_settings(settings).authenticate(credentials.credentials)
    return None if key is None else key.user_id


def caller(request: Request, credentials: Credentials) -> str | None:
    """The user id of the request's API key (401 without a valid one); None with auth off."""
    settings = _settings(request)
    if not settings.http_auth:
        return None
    user_id = _key_user(settings, credentials)
    if user_id is None:
        # RFC 6750: say which scheme, and whether the key sent was refused.
        challenge = "Bearer" if credentials is None else 'Bearer error="invalid_token"'
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="a valid API key is required: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": challenge},
        )
    return user_id


User = Annotated[str | None, Depends(caller)]


def _owner(user_id: str) -> str:
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()


def _owner_ttl(settings: Settings) -> int:
    # The result's own TTL starts when the job ends: after any deferral and a redelivery.
    return int(
        settings.result_expires + settings.defer_max_wait_seconds + settings.visibility_timeout
    )


def status_url(job_id: str) -> str:
    """Where a job is polled; the id percent-encoded, whatever characters it holds."""
    return f"/v1/jobs/{quote(job_id, safe='')}"


def _request_schema() -> dict[str, Any]:
    """The job's JSON schema without user_id, `$defs` inlined (OpenAPI resolves no `$defs`)."""
    schema = CompletionJob.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    inlined["properties"].pop("user_id", None)
    inlined["required"] = [name for name in inlined.get("required", []) if name != "user_id"]
    return inlined


@router.post(
    "/v1/completions",
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _request_schema()}},
        }
    },
)
def create_completion(
    body: Annotated[dict[str, Any], Body()], request: Request, user: User
) -> Accepted:
    """Validate and enqueue a completion job for the key's user; poll `status_url`."""
    settings = _settings(request)
    if user is not None:
        if "user_id" in body:
            # Refused, not ignored: a client that means another user should hear it cannot.
            raise RequestValidationError(
                [
                    {
                        "type": "user_from_key",
                        "loc": ("body", "user_id"),
                        "msg": "the user comes from the API key: remove user_id from the body",
                    }
                ]
            )
        body = {**body, "user_id": user}
    try:
        # The worker's own model: the front accepts exactly what a worker would.
        job = CompletionJob.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from None
    options = job.model_dump(exclude={"messages", "user_id"}, exclude_unset=True)
    messages = [m.wire() for m in job.messages]
    handle = submit(messages, job.user_id, **{k: v for k, v in options.items() if v is not None})
    if user is not None:
        # NX: a job id never changes hands, whoever posts a colliding request_id later.
        redis_client(settings).set(
            OWNER_PREFIX + handle.id, _owner(user), ex=_owner_ttl(settings), nx=True
        )
    return Accepted(id=handle.id, status_url=status_url(handle.id))


@router.get("/v1/jobs/{job_id:path}")
def get_job(job_id: str, request: Request, user: User) -> JobStatus:
    """The job's state and its result or error; 403 unless the key's user posted it."""
    if user is not None:
        owner = redis_client(_settings(request)).get(OWNER_PREFIX + job_id)
        # One answer for another user's job and for no job: ids reveal nothing.
        if owner != _owner(user):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, detail="this API key may not read a job with that id"
            )
    elif not job_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no job id")
    handle = AsyncResult(job_id, app=celery_app)
    state = handle.state
    if state == "SUCCESS":
        return JobStatus(id=job_id, state=state, result=handle.result)
    if state == "FAILURE":
        error = handle.result
        return JobStatus(
            id=job_id, state=state, error={"type": type(error).__name__, "message": str(error)}
        )
    return JobStatus(id=job_id, state=state)


@router.get("/health")
def health(request: Request, response: Response, credentials: Credentials) -> dict[str, Any]:
    """200 when ok, 503 when degraded; the full `llmq health` report only with a valid key."""
    from worker.health import report

    settings = _settings(request)
    data = report(settings)
    if data["status"] != "ok":
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    # A load balancer needs only the status; circuits and queues are for key holders.
    if settings.http_auth and _key_user(settings, credentials) is None:
        return {"status": data["status"]}
    return data


def _safe_loc(part: Any) -> str | int:
    if isinstance(part, int):
        return part
    text = str(part)
    # A client's own key (prose, a lone surrogate) is not repeated, only named as a field.
    return text if text in _FIELDS or _IDENTIFIER.fullmatch(text) else "<field>"


def _safe_error(error: dict[str, Any]) -> dict[str, Any]:
    message = str(error.get("msg", "invalid"))
    value = error.get("input")
    if isinstance(value, str) and len(value) >= 3 and value in message:
        message = "invalid value"
    return {
        "loc": [_safe_loc(part) for part in error.get("loc", ())],
        # Encodable whatever a validator put in it: the answer must never turn into a 500.
        "msg": message.encode("utf-8", "backslashreplace").decode("utf-8"),
        "type": str(error.get("type", "invalid")),
    }


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """422 with each error's location and message: never its input (prompts, inf, NaN)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": [_safe_error(dict(error)) for error in errors]},
    )


async def _invalid_job(request: Request, exc: Exception) -> JSONResponse:
    """422 for a job llmq itself rejects; its messages say what is wrong, not the content."""
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": [{"loc": ["body"], "msg": str(exc), "type": type(exc).__name__}]},
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The front for `settings` (default: the process's settings)."""
    # Jobs are sent and read through the process's Celery app (producer.app, REDIS_URL of
    # the environment): `settings` must name the same Redis for keys and owners to match.
    settings = settings or get_settings()
    if "max_body_size" not in inspect.signature(FastAPI).parameters:
        # Older FastAPI takes the keyword silently (into `extra`): there would be no limit.
        raise RuntimeError(
            "producer.web needs a FastAPI with max_body_size (fastapi>=0.165, see pyproject)"
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not settings.http_auth:
            log.warning(
                "LLM_HTTP_AUTH=false: the HTTP front accepts requests WITHOUT an API key; "
                "any caller may spend any user's budget and read any job. "
                "Run it like this only on a trusted network."
            )
        yield

    front = FastAPI(
        title="llmq",
        summary="LLM completion jobs on Celery.",
        lifespan=lifespan,
        # Starlette's limit: 413 on a larger Content-Length before reading, and on a
        # chunked body as soon as it grows past it, always before parsing.
        max_body_size=settings.http_max_body_bytes,
    )
    front.state.settings = settings
    front.add_exception_handler(RequestValidationError, _invalid_request)
    front.add_exception_handler(InvalidJobError, _invalid_job)
    front.include_router(router)
    return front


app = create_app()
