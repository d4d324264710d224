"""Images and documents in the cost guard: size limits and input tokens by provider formula.

Each provider publishes how it turns an image into input tokens; the guard reads width
and height from the image's header (worker/content.py) and applies that formula, so the
worst case still bounds the bill. An image given by URL cannot be measured before the
call: it is priced at the provider's maximum for one image. A PDF's tokens depend on
its pages' text, which nothing short of parsing it knows: a job with one is priced at
the whole context window left beside max_tokens, the most the provider can bill.
"""

from __future__ import annotations

import math

from worker.content import (
    DocumentPart,
    ImageUrlPart,
    TextSource,
    dimensions,
    image_data,
    is_image,
    media_bytes,
)
from worker.errors import ContentTooLargeError, InvalidContentError
from worker.models import Message

MB = 1024 * 1024
# (bytes per image, bytes of media per request) as each provider documents them:
# OpenAI 20 MB per image and 50 MB per request; Anthropic 5 MB per image (API) and
# 32 MB per request; Gemini 20 MB of inline data per request.
PROVIDER_LIMITS: dict[str, tuple[int, int]] = {
    "openai": (20 * MB, 50 * MB),
    "anthropic": (5 * MB, 32 * MB),
    "gemini": (20 * MB, 20 * MB),
}
# Providers llmq sends documents (PDF, plain-text sources) to: Anthropic's document
# blocks have no Chat Completions equivalent llmq translates to.
TAKES_DOCUMENTS = frozenset({"anthropic"})

# OpenAI's tile formula: (base, per 512 px tile) by model prefix, longest first wins.
OPENAI_TILES: dict[str, tuple[int, int]] = {
    "gpt-4o-mini": (2833, 5667),
    "gpt-5": (70, 140),
    "o1": (75, 150),
    "o3": (75, 150),
}
DEFAULT_TILES = (85, 170)
# OpenAI's patch formula (32 px patches, at most 1536, times a multiplier) by prefix.
OPENAI_PATCHES: dict[str, float] = {
    "gpt-4.1-mini": 1.62,
    "gpt-4.1-nano": 2.46,
    "o4-mini": 1.72,
    "gpt-5-mini": 1.62,
    "gpt-5-nano": 2.46,
}
MAX_PATCHES = 1536
# A high-detail image is cut to at most 2048 x 768 px: 4 x 2 tiles.
MAX_TILES = 8
# Anthropic: width x height / 750 after the long edge is cut to 1568 px.
ANTHROPIC_MAX_EDGE = 1568
ANTHROPIC_MAX_TOKENS = math.ceil(ANTHROPIC_MAX_EDGE * ANTHROPIC_MAX_EDGE / 750)
# Gemini: 258 tokens per 768 px tile (an image up to 384 px is one); a URL image at
# the 3072 px Gemini scales to.
GEMINI_TILE_TOKENS = 258
GEMINI_MAX_TILES = 16


def _prefixed(model: str, table: dict[str, object]) -> str | None:
    matches = [p for p in table if model == p or model.startswith(p + "-")]
    return max(matches, key=len) if matches else None


def openai_image_tokens(size: tuple[int, int] | None, *, detail: str | None, model: str) -> int:
    """OpenAI's published count for one image on `model` (its maximum when `size` is None)."""
    patched = _prefixed(model, OPENAI_PATCHES)  # type: ignore[arg-type]
    if patched is not None:
        multiplier = OPENAI_PATCHES[patched]
        if size is None:
            return math.ceil(MAX_PATCHES * multiplier)
        width, height = size
        # Larger images are scaled down to fit 1536 patches: the cap bounds them.
        patches = math.ceil(width / 32) * math.ceil(height / 32)
        return math.ceil(min(patches, MAX_PATCHES) * multiplier)
    tiled = _prefixed(model, OPENAI_TILES)  # type: ignore[arg-type]
    base, tile = OPENAI_TILES[tiled] if tiled else DEFAULT_TILES
    if detail == "low":
        return base
    if size is None:
        return base + tile * MAX_TILES
    scale = min(1.0, 2048 / max(size))
    scale *= min(1.0, 768 / (min(size) * scale))
    return base + tile * math.ceil(size[0] * scale / 512) * math.ceil(size[1] * scale / 512)


def anthropic_image_tokens(size: tuple[int, int] | None) -> int:
    """Anthropic's published count, width x height / 750 (its maximum when `size` is None)."""
    if size is None:
        return ANTHROPIC_MAX_TOKENS
    width, height = size
    scale = min(1.0, ANTHROPIC_MAX_EDGE / max(width, height))
    return math.ceil(width * scale * height * scale / 750)


def gemini_image_tokens(size: tuple[int, int] | None) -> int:
    """Gemini's published count: 258 per 768 px tile."""
    if size is None:
        return GEMINI_TILE_TOKENS * GEMINI_MAX_TILES
    width, height = size
    if width <= 384 and height <= 384:
        return GEMINI_TILE_TOKENS
    return GEMINI_TILE_TOKENS * math.ceil(width / 768) * math.ceil(height / 768)


def image_tokens(message: Message, *, provider: str, model: str) -> int:
    """Input tokens of the images in `message` on `provider`'s `model`."""
    total = 0
    for part in message.parts:
        if not is_image(part):
            continue
        inline = image_data(part)
        size = dimensions(inline[1]) if inline else None
        if provider == "anthropic":
            total += anthropic_image_tokens(size)
        elif provider == "gemini":
            total += gemini_image_tokens(size)
        else:
            detail = part.image_url.detail if isinstance(part, ImageUrlPart) else None
            total += openai_image_tokens(size, detail=detail, model=model)
    return total


def has_pdf(messages: list[Message]) -> bool:
    """Whether any message carries a document whose tokens cannot be counted beforehand."""
    return any(
        isinstance(p, DocumentPart) and not isinstance(p.source, TextSource)
        for m in messages
        for p in m.parts
    )


def check_sizes(messages: list[Message], *, max_image_bytes: int, max_job_bytes: int) -> None:
    """Nothing, or ContentTooLargeError for a part or a job over the settings' limits."""
    total = 0
    for index, message in enumerate(messages):
        for position, part in enumerate(message.parts):
            size = media_bytes(part)
            total += size
            if is_image(part) and size > max_image_bytes:
                raise ContentTooLargeError(
                    f"messages.{index}.content.{position}: the image is {size} bytes, over "
                    f"the {max_image_bytes}-byte limit (LLM_MAX_IMAGE_BYTES). Fix: resize or "
                    "compress it, or send it by https URL.",
                    {
                        "size_bytes": size,
                        "limit_bytes": max_image_bytes,
                        "setting": "LLM_MAX_IMAGE_BYTES",
                    },
                )
    if total > max_job_bytes:
        raise ContentTooLargeError(
            f"The job's images and documents are {total} bytes together, over the "
            f"{max_job_bytes}-byte limit (LLM_MAX_JOB_MEDIA_BYTES). Fix: send fewer or "
            "smaller files, or some by https URL.",
            {
                "size_bytes": total,
                "limit_bytes": max_job_bytes,
                "setting": "LLM_MAX_JOB_MEDIA_BYTES",
            },
        )


def check_provider(messages: list[Message], *, provider: str) -> None:
    """Nothing, or a typed error when `provider` cannot take the job's media or tool turns."""
    media = [p for m in messages for p in m.parts if is_image(p) or isinstance(p, DocumentPart)]
    tool_turns = any(m.role == "tool" or m.tool_calls for m in messages)
    if provider not in PROVIDER_LIMITS and (media or tool_turns):
        raise InvalidContentError(
            f"{provider} takes text only, not images, documents or tool turns. Fix: send "
            "the job to openai, anthropic or gemini (job `model`, LLM_PROVIDER).",
            {"provider": provider},
        )
    if not media:
        return
    if provider not in TAKES_DOCUMENTS and any(isinstance(p, DocumentPart) for p in media):
        raise InvalidContentError(
            f"{provider} is not sent document parts (llmq sends them to anthropic only). "
            "Fix: send the job to an anthropic model, or the document's text as text.",
            {"provider": provider},
        )
    per_image, per_request = PROVIDER_LIMITS[provider]
    sizes = [media_bytes(p) for p in media]
    largest = max(media_bytes(p) for p in media if is_image(p)) if any(map(is_image, media)) else 0
    limit = per_image if largest > per_image else per_request
    size = largest if largest > per_image else sum(sizes)
    if size > limit:
        raise ContentTooLargeError(
            f"{provider} takes at most {per_image} bytes per image and {per_request} bytes "
            f"of media per request; this job has {size}. Fix: resize or compress the "
            "files, or send the job to another provider.",
            {"size_bytes": size, "limit_bytes": limit, "setting": f"{provider}'s limit"},
        )
