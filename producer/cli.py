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
    for name in ("model", "temperature", "max_tokens", "request_id"):
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


def _health(args: argparse.Namespace) -> int:
    from worker.health import report
    from worker.settings import get_settings

    data = report(get_settings())
    print(json.dumps(data, indent=2))
    return 0 if data["status"] == "ok" else 1


def _cache_stats(args: argparse.Namespace) -> int:
    from worker.cache import ResponseCache
    from worker.settings import get_settings

    cache = ResponseCache.from_settings(get_settings())
    stats = cache.stats(None if args.all else args.version or cache.version).as_dict()
    if args.json:
        print(json.dumps(stats))
    else:
        for name, value in stats.items():
            print(f"{name:>9}: {'all' if value is None else value}")
    return 0


def _cache_clear(args: argparse.Namespace) -> int:
    from worker.cache import ResponseCache
    from worker.settings import get_settings

    deleted = ResponseCache.from_settings(get_settings()).clear(args.version)
    if args.json:
        print(json.dumps({"version": args.version, "deleted": deleted}))
    else:
        scope = f"version {args.version}" if args.version else "every version"
        print(f"deleted {deleted} cached answers ({scope})")
    return 0


def _cost(args: argparse.Namespace) -> int:
    from rich.console import Console

    from producer import costs

    if args.today or args.day:
        from worker.settings import get_settings
        from worker.spend import SpendTracker

        totals = SpendTracker.from_settings(get_settings()).totals(args.day)
        report = costs.from_spend_totals(totals)
    else:
        try:
            report = costs.from_log_files(args.logfiles or ["-"], stdin=sys.stdin)
        except OSError as exc:
            print(f"llmq cost: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        # Piped output keeps whole rows instead of rich's 80-column default.
        costs.render(report, Console(width=None if sys.stdout.isatty() else 160))
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
    cost = commands.add_parser(
        "cost", help="spend totals from llm_job JSON logs (stdin by default) or from Redis"
    )
    cost.add_argument("logfiles", nargs="*", help="worker log files; '-' or none: stdin")
    cost.add_argument("--today", action="store_true", help="today's live Redis counters (UTC)")
    cost.add_argument("--day", help="one UTC day's Redis counters, YYYY-MM-DD")
    cost.add_argument("--json", action="store_true", help="machine-readable output")
    cost.set_defaults(run=_cost)

    # limits (rate-limit issue)

    # cache (cache issue)
    cache = commands.add_parser("cache", help="response cache statistics and clearing")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    stats = cache_commands.add_parser("stats", help="entries, bytes, hit rate, savings")
    which = stats.add_mutually_exclusive_group()
    which.add_argument("--version", help="a cache version (default: LLM_CACHE_VERSION)")
    which.add_argument("--all", action="store_true", help="every cache version together")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=_cache_stats)
    clear = cache_commands.add_parser("clear", help="delete cached answers (SCAN, not KEYS)")
    clear.add_argument("--version", help="only this cache version (default: every version)")
    clear.add_argument("--json", action="store_true")
    clear.set_defaults(run=_cache_clear)

    # health (observability issue)
    health = commands.add_parser("health", help="fleet latency, circuits, queues (JSON)")
    health.set_defaults(run=_health)

    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llmq` console script."""
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
