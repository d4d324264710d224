"""Images and documents in messages: validation, translation, size limits and pricing."""

from __future__ import annotations

import base64
import struct
import zlib
from decimal import Decimal
from typing import Any

import pytest

from producer import submit
from tests.conftest import MakePipeline
from tests.fakes import FakeProvider
from tests.harness import Worker
from worker import tokens
from worker.content import dimensions
from worker.errors import ContentTooLargeError, InvalidContentError, InvalidJobError
from worker.media import anthropic_image_tokens, openai_image_tokens
from worker.models import CompletionJob
from worker.pipeline import validate
from worker.providers.anthropic import to_anthropic
from worker.providers.base import ProviderRequest
from worker.providers.openai import request_body

MB = 1024 * 1024


def png(width: int, height: int, *, pad: int = 0) -> bytes:
    """A real PNG of `width` x `height` black pixels (plus `pad` trailing bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + bytes(3 * width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
        + bytes(pad)
    )


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_job(url: str, *, detail: str | None = None, **options: Any) -> dict[str, Any]:
    image: dict[str, Any] = {"url": url, **({"detail": detail} if detail else {})}
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": image},
                ],
            }
        ],
        "user_id": "u",
        **options,
    }


def content(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look:"}, *parts]}]


@pytest.mark.parametrize(
    ("part", "problem"),
    [
        ({"type": "MARKERTYPE", "text": "x"}, "unknown type"),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!notb64"}},
            "not valid base64",
        ),
        (
            {"type": "image_url", "image_url": {"url": data_url(b"II*\x00rest", "image/tiff")}},
            "image/tiff' is not supported",
        ),
        (
            {"type": "image_url", "image_url": {"url": data_url(png(4, 4), "image/jpeg")}},
            "not a image/jpeg file",
        ),
        ({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}, "https://"),
        (
            {
                "type": "image",
                "source": {
                    "type": "base64",
                    "media_type": "image/bmp",
                    "data": base64.b64encode(b"BM..").decode(),
                },
            },
            "not supported",
        ),
        (
            {
                "type": "document",
                "source": {
                    "type": "base64",
                    "media_type": "application/pdf",
                    "data": base64.b64encode(png(2, 2)).decode(),
                },
            },
            "not a application/pdf file",
        ),
    ],
)
def test_malformed_parts_fail_typed_and_quote_nothing(part: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidContentError, match=problem) as raised:
        validate({"messages": content(part), "user_id": "u"})
    assert "MARKERTYPE" not in str(raised.value)


def test_images_only_in_user_messages() -> None:
    image = {"type": "image_url", "image_url": {"url": data_url(png(2, 2))}}
    with pytest.raises(InvalidContentError, match="text parts only"):
        validate({"messages": [{"role": "system", "content": [image]}, *content()], "user_id": "u"})


def test_an_image_alone_is_a_user_turn() -> None:
    image = {"type": "image_url", "image_url": {"url": data_url(png(2, 2))}}
    job = validate({"messages": [{"role": "user", "content": [image]}], "user_id": "u"})
    assert job.messages[0].text == ""
    with pytest.raises(InvalidJobError):
        validate({"messages": [{"role": "user", "content": []}], "user_id": "u"})


def test_dimensions_come_from_the_header() -> None:
    assert dimensions(base64.b64encode(png(640, 480, pad=2 * MB)).decode()) == (640, 480)


def test_openai_and_anthropic_formulas() -> None:
    # 1024 x 1024, high detail: cut to 768 x 768, 2 x 2 tiles of 512 px.
    assert openai_image_tokens((1024, 1024), detail="high", model="gpt-4o") == 85 + 4 * 170
    assert openai_image_tokens((1024, 1024), detail="low", model="gpt-4o") == 85
    assert openai_image_tokens((1024, 1024), detail=None, model="gpt-4o-mini") == 2833 + 4 * 5667
    # 4096 x 1024: to 2048 x 512, 4 x 1 tiles.
    assert openai_image_tokens((4096, 1024), detail="auto", model="gpt-4o") == 85 + 4 * 170
    # Patch models: 32 px patches times the model's multiplier, at most 1536 patches.
    assert openai_image_tokens((320, 320), detail=None, model="gpt-4.1-mini") == 162
    assert openai_image_tokens(None, detail=None, model="gpt-4o") == 85 + 8 * 170
    assert anthropic_image_tokens((1000, 750)) == 1000
    assert anthropic_image_tokens((3136, 3136)) == anthropic_image_tokens(None) == 3279


def test_image_job_is_priced_by_each_providers_formula(make_pipeline: MakePipeline) -> None:
    pipeline = make_pipeline(LLM_OPENAI_MODEL="gpt-4o", LLM_ANTHROPIC_MODEL="claude-haiku-4-5")
    job = validate(image_job(data_url(png(1024, 1024)), detail="high"))
    text = validate(
        {"messages": [{"role": "user", "content": "What is in this image?"}], "user_id": "u"}
    )
    plan, bare = pipeline.plan(job), pipeline.plan(text)
    openai, anthropic = plan.candidates
    assert openai.estimate.media_tokens == 85 + 4 * 170
    assert anthropic.estimate.media_tokens == 1024 * 1024 // 750 + 1
    for with_image, without in zip(plan.candidates, bare.candidates, strict=True):
        added = with_image.estimate.input_tokens - without.estimate.input_tokens
        assert added == with_image.estimate.media_tokens


def test_url_image_is_priced_at_the_providers_maximum(make_pipeline: MakePipeline) -> None:
    plan = make_pipeline().plan(validate(image_job("https://example.com/cat.png")))
    openai, anthropic = plan.candidates
    assert openai.estimate.media_tokens == 2833 + 8 * 5667  # gpt-4o-mini's tiles
    assert anthropic.estimate.media_tokens == 3279


def test_fallback_that_cannot_take_the_image_is_skipped(make_pipeline: MakePipeline) -> None:
    # 6 MB: under OpenAI's 20 MB per image, over Anthropic's 5 MB.
    job = validate(image_job(data_url(png(8, 8, pad=6 * MB))))
    plan = make_pipeline().plan(job)
    assert [c.provider for c in plan.candidates] == ["openai"]
    with pytest.raises(ContentTooLargeError) as raised:
        make_pipeline(LLM_PROVIDER="anthropic", LLM_FALLBACKS="").plan(job)
    assert raised.value.limit_bytes == 5 * MB


def test_documents_go_to_anthropic_priced_at_the_window(make_pipeline: MakePipeline) -> None:
    pdf = {
        "type": "document",
        "source": {
            "type": "base64",
            "media_type": "application/pdf",
            "data": base64.b64encode(b"%PDF-1.4 ...").decode(),
        },
    }
    job = validate({"messages": content(pdf), "user_id": "u", "max_tokens": 100})
    plan = make_pipeline(
        LLM_PROVIDER="anthropic", LLM_FALLBACKS="openai", LLM_MAX_COST_PER_REQUEST=1
    ).plan(job)
    [anthropic] = plan.candidates
    window = anthropic.estimate.price.context_window
    assert anthropic.estimate.input_tokens == window - 100
    with pytest.raises(InvalidContentError, match="document"):
        make_pipeline(LLM_FALLBACKS="").plan(job)


def test_images_translate_between_the_providers_shapes() -> None:
    data = base64.b64encode(png(2, 2)).decode()
    job = CompletionJob.model_validate(
        {
            "messages": content(
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": data},
                },
            ),
            "user_id": "u",
        }
    )
    _, [turn] = to_anthropic(job.messages)
    assert turn["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
    ]
    request = ProviderRequest(
        messages=job.messages, model="gpt-4o", max_tokens=10, temperature=0, timeout=5
    )
    [message] = request_body(request, provider="openai")["messages"]
    assert message["content"][3] == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{data}"},
    }


# --- through real workers -------------------------------------------------------------


def test_image_job_reservation_bounds_the_reported_usage(
    worker: Worker, fake: FakeProvider, make_pipeline: MakePipeline, user_id: str
) -> None:
    job = image_job(data_url(png(1024, 1024)), detail="high", max_tokens=50)
    job["user_id"] = user_id
    estimate = make_pipeline().plan(validate(job)).primary.estimate
    text = tokens.count_messages(validate(job).messages)
    assert estimate.input_tokens == text + 2833 + 4 * 5667  # gpt-4o-mini, exact
    # The fake bills what OpenAI would: the text, the image by formula, all max_tokens.
    fake.usage["input_tokens"], fake.usage["output_tokens"] = estimate.input_tokens, 50
    result = submit(job["messages"], user_id, max_tokens=50).get(timeout=30)
    assert result["input_tokens"] == estimate.input_tokens
    assert Decimal(str(result["cost_usd"])) == pytest.approx(
        estimate.cost_usd, abs=Decimal("1e-10")
    )
    assert Decimal(str(result["cost_usd"])) <= estimate.cost_usd + Decimal("1e-10")
    sent = fake.seen[0].body["messages"][0]["content"][1]
    assert sent["image_url"]["detail"] == "high"


def test_anthropic_image_job_reservation_bounds_the_reported_usage(
    worker: Worker, fake: FakeProvider, make_pipeline: MakePipeline, user_id: str
) -> None:
    job = image_job(data_url(png(1000, 750)), max_tokens=50, model="claude-haiku-4-5")
    job["user_id"] = user_id
    estimate = make_pipeline().plan(validate(job)).primary.estimate
    assert estimate.media_tokens == 1000  # 1000 x 750 / 750
    # Anthropic bills the image by its formula and the text by its own tokenizer,
    # which the guard's margin covers: bill the text at the o200k count itself.
    text = tokens.count_messages(validate(job).messages)
    fake.usage["input_tokens"], fake.usage["output_tokens"] = text + 1000, 50
    result = submit(job["messages"], user_id, max_tokens=50, model="claude-haiku-4-5").get(
        timeout=30
    )
    assert result["provider"] == "anthropic" and result["input_tokens"] == text + 1000
    assert Decimal(str(result["cost_usd"])) < estimate.cost_usd
    sent = fake.seen[0].body["messages"][0]["content"][1]
    assert sent["type"] == "image" and sent["source"]["media_type"] == "image/png"


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        (data_url(png(8, 8, pad=30 * MB)), ContentTooLargeError),
        (data_url(b"II*\x00" + bytes(64), "image/tiff"), InvalidContentError),
    ],
)
def test_oversize_or_tiff_image_fails_with_no_provider_call(
    worker: Worker, fake: FakeProvider, user_id: str, url: str, kind: type[Exception]
) -> None:
    job = image_job(url)
    with pytest.raises(kind) as raised:
        submit(job["messages"], user_id).get(timeout=60)
    if isinstance(raised.value, ContentTooLargeError):
        assert raised.value.size_bytes is not None and raised.value.size_bytes > 30 * MB
        assert raised.value.limit_bytes == 20 * MB
    assert fake.requests() == 0
    assert "base64," not in str(raised.value)


def test_size_limits_are_settings(make_pipeline: MakePipeline) -> None:
    image = {"type": "image_url", "image_url": {"url": data_url(png(8, 8, pad=4000))}}
    job = validate({"messages": content(image, image), "user_id": "u"})
    with pytest.raises(ContentTooLargeError) as per_image:
        make_pipeline(LLM_MAX_IMAGE_BYTES=4000).plan(job)
    assert per_image.value.setting == "LLM_MAX_IMAGE_BYTES" and per_image.value.limit_bytes == 4000
    with pytest.raises(ContentTooLargeError) as per_job:
        make_pipeline(LLM_MAX_JOB_MEDIA_BYTES=6000).plan(job)
    assert per_job.value.setting == "LLM_MAX_JOB_MEDIA_BYTES"
    assert per_job.value.size_bytes == 2 * len(png(8, 8, pad=4000))
    assert make_pipeline(LLM_MAX_IMAGE_BYTES=5000).plan(job).candidates
