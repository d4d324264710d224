"""An asynchronous fake provider for benchmarks: OpenAI and Anthropic shapes, fixed delay.

Starlette on uvicorn (uvloop + httptools): one event loop holds thousands of
connections, each sleeping `delay` seconds without a thread, so the fake is never
the bottleneck of what it measures. Run: python -m bench.fakeserver --port P.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

STATE: dict[str, Any] = {"delay": 0.0, "requests": 0, "in_flight": 0, "peak_in_flight": 0}
TEXT = "A fake summary of the document, for benchmarks."


async def openai_chat(request: Request) -> Response:
    """Chat Completions after the configured delay."""
    body = await _enter(request)
    try:
        await _wait()
        return JSONResponse(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "unknown"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": TEXT},
                    }
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 12, "total_tokens": 112},
            }
        )
    finally:
        STATE["in_flight"] -= 1


async def anthropic_messages(request: Request) -> Response:
    """Messages after the configured delay."""
    body = await _enter(request)
    try:
        await _wait()
        return JSONResponse(
            {
                "id": "msg_bench",
                "type": "message",
                "role": "assistant",
                "model": body.get("model", "unknown"),
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "content": [{"type": "text", "text": TEXT}],
                "usage": {"input_tokens": 100, "output_tokens": 12},
            }
        )
    finally:
        STATE["in_flight"] -= 1


async def control(request: Request) -> Response:
    """GET: counters. POST {"delay": s, "reset": true}: change the delay, reset counters."""
    if request.method == "POST":
        change = await request.json()
        if "delay" in change:
            STATE["delay"] = float(change["delay"])
        if change.get("reset"):
            STATE.update(requests=0, peak_in_flight=0)
    return JSONResponse(STATE)


async def _enter(request: Request) -> dict[str, Any]:
    STATE["requests"] += 1
    STATE["in_flight"] += 1
    STATE["peak_in_flight"] = max(STATE["peak_in_flight"], STATE["in_flight"])
    raw = await request.body()
    try:
        parsed: dict[str, Any] = json.loads(raw) if raw else {}
    except ValueError:
        parsed = {}
    return parsed


async def _wait() -> None:
    if STATE["delay"] > 0:
        await asyncio.sleep(STATE["delay"])


app = Starlette(
    routes=[
        Route("/v1/chat/completions", openai_chat, methods=["POST"]),
        Route("/chat/completions", openai_chat, methods=["POST"]),
        Route("/v1/messages", anthropic_messages, methods=["POST"]),
        Route("/_control", control, methods=["GET", "POST"]),
    ]
)


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    STATE["delay"] = args.delay
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        backlog=4096,
        limit_concurrency=None,
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()
