"""Providers over real HTTP: the official SDKs against the fake server."""

from __future__ import annotations

import pytest

from tests.fakes import FakeProvider, Fault
from worker import errors
from worker.models import Completion, Message
from worker.providers.anthropic import AnthropicProvider, to_anthropic
from worker.providers.base import ProviderRequest, retry_after_seconds
from worker.providers.extractive import ExtractiveProvider
from worker.providers.openai import OpenAIProvider


def request(**overrides: object) -> ProviderRequest:
    options: dict[str, object] = {
        "messages": [
            Message(role="system", content="Be brief."),
            Message(role="user", content="Hi"),
        ],
        "model": "gpt-4o-mini",
        "max_tokens": 50,
        "temperature": 0.3,
        "timeout": 2.0,
    }
    options.update(overrides)
    return ProviderRequest(**options)  # type: ignore[arg-type]


@pytest.fixture
def openai_provider(fake: FakeProvider) -> OpenAIProvider:
    return OpenAIProvider(name="openai", api_key="sk-x", base_url=f"{fake.url}/v1", timeout=2.0)


@pytest.fixture
def anthropic_provider(fake: FakeProvider) -> AnthropicProvider:
    return AnthropicProvider(api_key="sk-ant-x", base_url=fake.url, timeout=2.0)


def test_openai_normalizes_answer(fake: FakeProvider, openai_provider: OpenAIProvider) -> None:
    fake.usage = {"input_tokens": 40, "output_tokens": 9, "cached_input_tokens": 32}
    completion = openai_provider.complete(request())
    assert completion.text == fake.text and completion.finish_reason == "stop"
    assert completion.usage.model_dump() == {
        "input_tokens": 40,
        "output_tokens": 9,
        "cached_input_tokens": 32,
        "cache_write_input_tokens": 0,
        "reasoning_tokens": 0,
    }
    body = fake.seen[0].body
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (body["max_tokens"], body["temperature"]) == (50, 0.3)


def test_anthropic_normalizes_answer(
    fake: FakeProvider, anthropic_provider: AnthropicProvider
) -> None:
    fake.usage = {"input_tokens": 40, "output_tokens": 9, "cached_input_tokens": 30}
    fake.script("anthropic", Fault(finish_reason="length"))
    completion = anthropic_provider.complete(request(model="claude-haiku-4-5"))
    assert completion.finish_reason == "length"
    assert completion.usage.model_dump() == {
        "input_tokens": 40,
        "output_tokens": 9,
        "cached_input_tokens": 30,
        "cache_write_input_tokens": 0,
        "reasoning_tokens": 0,
    }
    body = fake.seen[0].body
    assert body["system"] == "Be brief." and body["temperature"] == 0.3
    assert body["messages"] == [{"role": "user", "content": "Hi"}]


def test_anthropic_adapter_merges_same_role_turns() -> None:
    system, turns = to_anthropic(
        [
            Message(role="system", content="A"),
            Message(role="user", content="b"),
            Message(role="user", content="c"),
            Message(role="system", content="D"),
            Message(role="assistant", content="e"),
        ]
    )
    assert system == "A\n\nD"
    assert turns == [
        {"role": "user", "content": "b\n\nc"},
        {"role": "assistant", "content": "e"},
    ]


@pytest.mark.parametrize(
    ("fault", "expected", "transient"),
    [
        (Fault(status=429, headers={"Retry-After": "3"}), errors.RateLimitedByProviderError, True),
        (Fault(status=500), errors.ProviderUnavailableError, True),
        (Fault(status=503), errors.ProviderUnavailableError, True),
        (Fault(status=529), errors.ProviderUnavailableError, True),
        (Fault(status=408), errors.ProviderUnavailableError, True),
        (Fault(status=401), errors.AuthenticationError, False),
        (Fault(status=403), errors.AuthenticationError, False),
        (Fault(status=400), errors.ProviderRequestError, False),
        (Fault(status=404), errors.ProviderRequestError, False),
        (Fault(malformed=True), errors.MalformedResponseError, False),
        (Fault(delay=3.0), errors.ProviderTimeoutError, True),
    ],
)
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_errors_are_typed_and_sdk_does_not_retry(
    fake: FakeProvider,
    openai_provider: OpenAIProvider,
    anthropic_provider: AnthropicProvider,
    api: str,
    fault: Fault,
    expected: type[errors.ProviderError],
    transient: bool,
) -> None:
    provider = openai_provider if api == "openai" else anthropic_provider
    fake.script(api, fault)
    with pytest.raises(expected) as raised:
        provider.complete(request(timeout=1.0))
    assert raised.value.transient is transient
    assert raised.value.provider == api
    assert fake.requests(api) == 1  # max_retries=0: no hidden SDK retries
    if fault.status == 429:
        assert raised.value.retry_after == 3.0


def test_empty_content_is_malformed(fake: FakeProvider, openai_provider: OpenAIProvider) -> None:
    fake.text = ""
    with pytest.raises(errors.MalformedResponseError, match="empty content"):
        openai_provider.complete(request())


def test_connection_refused_is_typed() -> None:
    provider = OpenAIProvider(
        name="openai", api_key="k", base_url="http://127.0.0.1:9/v1", timeout=1.0
    )
    with pytest.raises(errors.ProviderConnectionError):
        provider.complete(request())


def test_retry_after_headers() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0


def test_extractive_is_deterministic_and_offline() -> None:
    document = (
        "Redis keeps the queue. Celery workers take jobs from it. "
        "Each job calls a language model. Results go back to Redis. "
        "The weather was nice that day."
    )
    provider = ExtractiveProvider()
    req = request(messages=[Message(role="user", content=document)], model="extractive")
    first, second = provider.complete(req), provider.complete(req)
    assert first == second
    assert first.text and all(s.strip() in document for s in first.text.split(". "))
    assert first.usage.output_tokens > 0 and first.finish_reason == "stop"

    def summary(max_tokens: int) -> Completion:
        messages = [Message(role="user", content=document)]
        return provider.complete(
            request(messages=messages, model="extractive", max_tokens=max_tokens)
        )

    # Fewer whole sentences that fit are a complete summary ...
    fewer = summary(first.usage.output_tokens - 1)
    assert fewer.finish_reason == "stop" and fewer.text in first.text and fewer.text
    # ... a first sentence cut short is not.
    cut = summary(2)
    assert cut.finish_reason == "length" and cut.usage.output_tokens <= 2


def test_gemini_path_gets_its_own_structured_shape() -> None:
    from worker.models import CompletionJob
    from worker.options import RequestOptions
    from worker.providers.openai import request_body

    job = CompletionJob.model_validate(
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "user_id": "u",
            "user": "end-user",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": {"type": "object"}, "strict": True},
            },
        }
    )
    options = RequestOptions.from_job(job)
    gemini = request_body(request(model="gemini-2.5-flash", options=options), provider="gemini")
    openai = request_body(request(options=options), provider="openai")
    assert gemini["response_format"]["json_schema"] == {"name": "a", "schema": {"type": "object"}}
    assert openai["response_format"]["json_schema"]["strict"] is True
    assert "safety_identifier" not in gemini and openai["safety_identifier"] == "end-user"


def test_anthropic_refusal_is_not_text(
    fake: FakeProvider, anthropic_provider: AnthropicProvider
) -> None:
    fake.script("anthropic", Fault(refusal="No."))
    completion = anthropic_provider.complete(request(model="claude-haiku-4-5"))
    assert completion.refusal == "No." and completion.text == ""
    assert completion.finish_reason == "content_filter"
