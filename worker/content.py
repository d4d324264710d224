"""Content parts of a message: text, images and documents, in OpenAI's and Anthropic's shapes.

The parts are validated here strictly (known type, https or base64 data, a media type both
providers take, bytes that are what they claim to be); sizes are checked against the
settings and each provider's documented limits before anything is sent. Nothing in an
error quotes a part's data: positions, sizes and media types only.
"""

from __future__ import annotations

import binascii
import io
import re
from typing import Annotated, Literal

import imagesize  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator
from pydantic_core import PydanticCustomError

# The image types OpenAI and Anthropic both document (Gemini takes them too).
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
DOCUMENT_TYPES = ("application/pdf",)
# Enough of the file for any of those formats' width and height (a JPEG's frame header
# may follow its EXIF block, at most 64 KiB).
HEADER_BYTES = 128 * 1024
_DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+;base64,")
_MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "application/pdf": (b"%PDF-",),
}


def content_error(problem: str) -> PydanticCustomError:
    """A content part's error, typed so validation reports InvalidContentError."""
    return PydanticCustomError("llmq_content", problem)


def _check_base64(data: str, media_type: str, *, allowed: tuple[str, ...]) -> str:
    if media_type not in allowed:
        raise content_error(
            f"media type {media_type[:60]!r} is not supported; send one of "
            f"{', '.join(allowed)} (convert the file first)"
        )
    prefix = (HEADER_BYTES // 3) * 4
    try:
        head = binascii.a2b_base64(data[:prefix], strict_mode=True)
        if len(data) > prefix:
            binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        raise content_error(
            "data is not valid base64 (standard alphabet, padded, no whitespace or line breaks)"
        ) from None
    if not data:
        raise content_error("data is empty; send the file's bytes as base64")
    if not _is(media_type, head):
        raise content_error(
            f"data is not a {media_type} file (its first bytes say otherwise); send the "
            "file's real media type"
        )
    return data


def _is(media_type: str, head: bytes) -> bool:
    if media_type == "image/webp":
        return head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    return head.startswith(_MAGIC[media_type])


def _check_https(url: str) -> str:
    if not url.startswith("https://") or len(url) > 8192 or not url.isprintable():
        raise content_error(
            "url must be an https:// URL (at most 8192 characters) or a data: URL with base64 data"
        )
    return url


def decoded_size(data: str) -> int:
    """Bytes that base64 `data` decodes to, without decoding it."""
    return len(data) * 3 // 4 - data[-2:].count("=")


def dimensions(data: str) -> tuple[int, int] | None:
    """Width and height from the header of base64 image `data`, or None if unreadable."""
    head = binascii.a2b_base64(data[: (HEADER_BYTES // 3) * 4])
    try:
        width, height = imagesize.get(io.BytesIO(head))
    except (ValueError, OSError):
        return None
    return (width, height) if width > 0 and height > 0 else None


class TextPart(BaseModel):
    """`{"type": "text", "text": ...}`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["text"]
    text: StrictStr

    @field_validator("text")
    @classmethod
    def _utf8(cls, text: str) -> str:
        from worker.models import valid_text

        return valid_text(text)


class ImageUrl(BaseModel):
    """OpenAI's `image_url`: an https URL or a `data:<type>;base64,` URL, and a detail."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        if url.startswith("data:"):
            if _DATA_URL.match(url[:200]) is None:
                raise content_error(
                    "a data: URL must read data:<media type>;base64,<data>, e.g. "
                    "data:image/png;base64,iVBORw0..."
                )
            media, data = url[5:].split(";base64,", 1)
            _check_base64(data, media, allowed=IMAGE_TYPES)
            return url
        return _check_https(url)

    @property
    def base64(self) -> tuple[str, str] | None:
        """(media type, data) of a data: URL; None for an https URL."""
        if not self.url.startswith("data:"):
            return None
        media, data = self.url[5:].split(";base64,", 1)
        return media, data


class ImageUrlPart(BaseModel):
    """`{"type": "image_url", "image_url": {"url": ..., "detail": ...}}` (OpenAI)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["image_url"]
    image_url: ImageUrl


class Base64Source(BaseModel):
    """`{"type": "base64", "media_type": ..., "data": ...}` (Anthropic)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["base64"]
    media_type: StrictStr
    data: StrictStr


class UrlSource(BaseModel):
    """`{"type": "url", "url": "https://..."}` (Anthropic)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["url"]
    url: StrictStr

    @field_validator("url")
    @classmethod
    def _https(cls, url: str) -> str:
        return _check_https(url)


class TextSource(BaseModel):
    """`{"type": "text", "media_type": "text/plain", "data": ...}`: a plain-text document."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["text"]
    media_type: Literal["text/plain"]
    data: StrictStr


class ImagePart(BaseModel):
    """`{"type": "image", "source": {...}}` (Anthropic)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["image"]
    source: Annotated[Base64Source | UrlSource, Field(discriminator="type")]

    @field_validator("source")
    @classmethod
    def _media(cls, source: Base64Source | UrlSource) -> Base64Source | UrlSource:
        if isinstance(source, Base64Source):
            _check_base64(source.data, source.media_type, allowed=IMAGE_TYPES)
        return source


class DocumentPart(BaseModel):
    """`{"type": "document", "source": {...}}` (Anthropic): a PDF or a plain-text document."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["document"]
    source: Annotated[Base64Source | UrlSource | TextSource, Field(discriminator="type")]
    title: StrictStr | None = Field(None, max_length=500)
    context: StrictStr | None = None

    @field_validator("source")
    @classmethod
    def _media(
        cls, source: Base64Source | UrlSource | TextSource
    ) -> Base64Source | UrlSource | TextSource:
        if isinstance(source, Base64Source):
            _check_base64(source.data, source.media_type, allowed=DOCUMENT_TYPES)
        return source


ContentPart = Annotated[
    TextPart | ImageUrlPart | ImagePart | DocumentPart, Field(discriminator="type")
]
PART_TYPES = ("text", "image_url", "image", "document")


def part_text(part: ContentPart) -> str:
    """The text a part carries (a text document's too); '' for media."""
    if isinstance(part, TextPart):
        return part.text
    if isinstance(part, DocumentPart) and isinstance(part.source, TextSource):
        return part.source.data
    return ""


def media_bytes(part: ContentPart) -> int:
    """Bytes of inline (base64) media in `part`; 0 for text and URLs."""
    if isinstance(part, ImageUrlPart):
        inline = part.image_url.base64
        return decoded_size(inline[1]) if inline else 0
    if isinstance(part, (ImagePart, DocumentPart)) and isinstance(part.source, Base64Source):
        return decoded_size(part.source.data)
    return 0


def is_image(part: ContentPart) -> bool:
    """Whether `part` is an image, in either provider's shape."""
    return isinstance(part, (ImageUrlPart, ImagePart))


def image_data(part: ContentPart) -> tuple[str, str] | None:
    """(media type, base64 data) of an inline image; None for a URL or another part."""
    if isinstance(part, ImageUrlPart):
        return part.image_url.base64
    if isinstance(part, ImagePart) and isinstance(part.source, Base64Source):
        return part.source.media_type, part.source.data
    return None


def image_url(part: ContentPart) -> str | None:
    """The https URL of an image given by URL; None otherwise."""
    if isinstance(part, ImageUrlPart) and part.image_url.base64 is None:
        return part.image_url.url
    if isinstance(part, ImagePart) and isinstance(part.source, UrlSource):
        return part.source.url
    return None
