"""`llmq`: the command line. Thin: each command parses, calls, prints."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def _complete(args: argparse.Namespace) -> int:
    from producer import submit

    options: dict[str, Any] = {}
    for name in ("model", "temperature", "max_tokens", "request_id", "on_truncation"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    result = submit([{"role": "user", "content": args.prompt}], args.user, **options)
    try:
        value = result.get(timeout=args.timeout)
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), file=sys.stderr)
        return 1
    print(json.dumps(value, indent=2))
    return 0


def _documents(paths: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES))
        else:
            found.append(path)
    return found


def _summarize(args: argparse.Namespace) -> int:
    from producer import submit

    documents = _documents(args.paths)
    pending = []
    for path in documents:
        text = path.read_text(encoding="utf-8", errors="replace")
        messages = [
            {"role": "system", "content": f"Summarize the document in about {args.words} words."},
            {"role": "user", "content": text},
        ]
        options = {"model": args.model} if args.model else {}
        pending.append((path, submit(messages, args.user, max_tokens=args.words * 2, **options)))
    failed = 0
    for path, result in pending:
        try:
            value = result.get(timeout=args.timeout)
        except Exception as exc:
            failed += 1
            print(f"\n{path}: FAILED {type(exc).__name__}: {exc}")
            continue
        print(
            f"\n{path}\n  provider={value['provider']} model={value['model']} "
            f"tokens={value['input_tokens']}+{value['output_tokens']} "
            f"cost=${value['cost_usd']:.6f} latency={value['latency_ms']:.0f}ms\n  {value['text']}"
        )
    print(f"\n{len(documents) - failed} summarized, {failed} failed")
    return 1 if failed else 0


def _circuits(args: argparse.Namespace) -> int:
    from worker.breaker import open_circuits
    from worker.connections import redis_client
    from worker.settings import get_settings

    print(json.dumps(open_circuits(redis_client(get_settings())), indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    """The `llmq` argument parser."""
    root = argparse.ArgumentParser(prog="llmq", description="LLM completion jobs on Celery.")
    commands = root.add_subparsers(dest="command", required=True)

    complete = commands.add_parser("complete", help="enqueue one prompt and print the result")
    complete.add_argument("prompt")
    complete.add_argument("--user", default="cli")
    complete.add_argument("--model")
    complete.add_argument("--temperature", type=float)
    complete.add_argument("--max-tokens", type=int)
    complete.add_argument("--request-id")
    complete.add_argument(
        "--on-truncation",
        choices=["fail", "retry_larger", "accept"],
        help="when the answer hits max_tokens (default: LLM_ON_TRUNCATION)",
    )
    complete.add_argument("--timeout", type=float, default=120.0)
    complete.set_defaults(run=_complete)

    summarize = commands.add_parser("summarize", help="summarize documents, one job each")
    summarize.add_argument("paths", nargs="+")
    summarize.add_argument("--user", default="batch")
    summarize.add_argument("--model")
    summarize.add_argument("--words", type=int, default=60)
    summarize.add_argument("--timeout", type=float, default=300.0)
    summarize.set_defaults(run=_summarize)

    # cost (cost issue)

    # limits (rate-limit issue)

    # cache (cache issue)

    # health (observability issue)

    # circuits (resilience issue)
    circuits = commands.add_parser(
        "circuits", help="print the providers whose circuit is open or half-open, as JSON"
    )
    circuits.set_defaults(run=_circuits)

    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llmq` console script."""
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
