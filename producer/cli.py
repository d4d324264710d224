"""`llmq`: the command line. Thin: each command parses, calls, prints."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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


def _summarize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from producer.batch import BatchOptions, BatchRun, find_documents, stop_on_signals
    from producer.progress import ProgressView, report_table
    from worker.settings import get_settings

    console = Console()
    view = ProgressView(console)
    run = BatchRun(
        documents=find_documents(args.paths),
        options=BatchOptions(
            words=args.words,
            model=args.model,
            user_id=args.user,
            concurrency=args.concurrency or get_settings().batch_concurrency,
            chunk_tokens=args.chunk_tokens,
            cache=False if args.no_cache else None,
            timeout=args.timeout,
            batch_api=get_settings().batch_api if args.batch_api is None else args.batch_api,
        ),
        out=Path(args.out) if args.out else None,
        listener=view,
    )
    from worker.errors import LLMQError

    try:
        with stop_on_signals(run, on_stop=view.stopping), view:
            report = run.run()
    except LLMQError as exc:
        # A run the workers refused as a whole (the Batch API mode's model, key, input).
        print(f"llmq summarize: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from rich.text import Text

        saved = f" in {args.out}" if args.out else ""
        # Text, not markup: a path such as "out[1].jsonl" prints as it is.
        console.print(Text(f"interrupted: the documents finished so far are saved{saved}"))
        return 130
    console.print(report_table(report))
    if report.interrupted and run.options.batch_api:
        console.print(
            "the provider batches keep running: run the same command again to collect "
            "their results (`llmq batches` shows them)"
        )
    if report.interrupted:
        return 130
    return 1 if report.failed else 0


def _batches(args: argparse.Namespace) -> int:
    from worker.batchapi.listing import listing
    from worker.connections import redis_client
    from worker.settings import get_settings

    rows = listing(redis_client(get_settings()))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no Batch API batches on record")
    for row in rows:
        eta = row["eta_seconds"]
        print(
            f"{row['batch']}  {row['provider']}:{row['provider_batch_id'] or '-'}  "
            f"{row['state']}/{row['provider_state'] or '-'}  "
            f"{row['done']}+{row['failed']} failed of {row['requests']}  "
            f"cost ${row['cost_usd']:.6f} (real time ${row['realtime_cost_usd']:.6f}, "
            f"reserved up to ${row['worst_case_usd']:.6f})  "
            f"ETA {'-' if eta is None else f'{eta:,.0f}s'}"
            + (f"  error: {row['error']}" if row["error"] else "")
        )
    return 0


def _batches_cancel(args: argparse.Namespace) -> int:
    from worker.app import app

    try:
        answer = app.send_task(
            "llm.batchapi.cancel", kwargs={"batch": args.batch_id}, queue="batch"
        ).get(timeout=args.timeout)
    except Exception as exc:
        print(f"llmq batches cancel: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(
        f"cancelling {answer['batch']} (provider state {answer['provider_state']}); its results "
        "so far are still collected"
    )
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _cache_version(value: str) -> str:
    from worker.settings import CACHE_VERSION_PATTERN

    # The version becomes part of a SCAN pattern: '*' or '?' would match other versions.
    if re.fullmatch(CACHE_VERSION_PATTERN, value) is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a cache version: use 1 to 64 letters, digits, '.', '_' or '-' "
            "(no glob characters), as in LLM_CACHE_VERSION"
        )
    return value


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


def _limits(args: argparse.Namespace) -> int:
    from worker.limits import user_usage
    from worker.settings import get_settings

    rows = [usage.as_dict() for usage in user_usage(get_settings(), args.user)]
    if args.json:
        print(json.dumps({"user_id": args.user, "limits": rows}, indent=2))
        return 0
    if not rows:
        print(f"no rate limits apply to {args.user!r}")
    for row in rows:
        print(
            f"{row['limit']:<28} {row['usage']:>10} / {row['limit_value']:<10} {row['unit']:<8} "
            f"per {row['window_seconds']:g}s  ({row['remaining']} left; oldest leaves in "
            f"{row['oldest_leaves_in_seconds']:g}s)"
        )
    return 0


def _circuits(args: argparse.Namespace) -> int:
    from worker.breaker import open_circuits
    from worker.connections import redis_client
    from worker.settings import get_settings

    print(json.dumps(open_circuits(redis_client(get_settings())), indent=2))
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from producer.keys import KeyStore
    from worker.settings import get_settings

    try:
        token, key = KeyStore.from_settings(get_settings()).create(args.user, args.name)
    except ValueError as exc:
        print(f"llmq keys create: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**key.as_dict(), "key": token}))
    else:
        # The key alone on stdout, so `KEY=$(llmq keys create alice)` works.
        print(token)
        print(
            f"created key {key.id} for user {key.user_id!r}; it is shown only this once "
            "(llmq stores its sha256): send it as 'Authorization: Bearer <key>'",
            file=sys.stderr,
        )
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from producer.keys import KeyStore
    from worker.settings import get_settings

    keys = [key.as_dict() for key in KeyStore.from_settings(get_settings()).list()]
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    if not keys:
        print("no API keys")
    for key in keys:
        print(f"{key['id']}  {key['created']}  user={key['user_id']!r}  name={key['name']!r}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from producer.keys import KeyStore
    from worker.settings import get_settings

    if not KeyStore.from_settings(get_settings()).revoke(args.key_id):
        print(f"llmq keys revoke: no key with id {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked key {args.key_id}: requests with it now get 401")
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

    summarize = commands.add_parser(
        "summarize",
        help="summarize documents (files, directories, globs, JSONL of {id, text})",
    )
    summarize.add_argument("paths", nargs="+", metavar="PATH")
    summarize.add_argument("--out", help="JSONL results file; a re-run skips what it holds")
    summarize.add_argument("--model", help="model for every call (default: the worker's)")
    summarize.add_argument("--words", type=_positive, default=60, help="summary length in words")
    summarize.add_argument("--user", default="batch", help="user id the jobs are charged to")
    summarize.add_argument(
        "--concurrency",
        type=_positive,
        default=None,
        help="documents in flight at once (default: LLM_BATCH_CONCURRENCY)",
    )
    summarize.add_argument(
        "--chunk-tokens",
        type=_positive,
        default=None,
        help="most tokens of text per call (default: the worker's LLM_BATCH_CHUNK_TOKENS)",
    )
    summarize.add_argument(
        "--no-cache",
        action="store_true",
        help="summarize afresh: neither read nor fill the response cache",
    )
    summarize.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for one document"
    )
    summarize.add_argument(
        "--batch-api",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="through the providers' Batch APIs: half price, results within 24 h "
        "(default: LLM_BATCH_API)",
    )
    summarize.set_defaults(run=_summarize)

    # batches (issue 16): the providers' Batch API batches of `summarize --batch-api`
    batches = commands.add_parser("batches", help="Batch API batches: state, counts, cost, ETA")
    batches.add_argument("--json", action="store_true", help="machine-readable output")
    batches.set_defaults(run=_batches)
    batch_commands = batches.add_subparsers(dest="batches_command")
    cancel = batch_commands.add_parser(
        "cancel", help="cancel a batch (llmq's or the provider's id)"
    )
    cancel.add_argument("batch_id", metavar="ID")
    cancel.add_argument("--timeout", type=float, default=60.0)
    cancel.set_defaults(run=_batches_cancel)

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
    limits = commands.add_parser("limits", help="a user's usage against each rate limit")
    limits.add_argument("user")
    limits.add_argument("--json", action="store_true", help="print JSON")
    limits.set_defaults(run=_limits)

    # cache (cache issue)
    cache = commands.add_parser("cache", help="response cache statistics and clearing")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    stats = cache_commands.add_parser("stats", help="entries, bytes, hit rate, savings")
    which = stats.add_mutually_exclusive_group()
    which.add_argument(
        "--version", type=_cache_version, help="a cache version (default: LLM_CACHE_VERSION)"
    )
    which.add_argument("--all", action="store_true", help="every cache version together")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=_cache_stats)
    clear = cache_commands.add_parser("clear", help="delete cached answers (SCAN, not KEYS)")
    clear.add_argument(
        "--version", type=_cache_version, help="only this cache version (default: every version)"
    )
    clear.add_argument("--json", action="store_true")
    clear.set_defaults(run=_cache_clear)

    # keys (issue 18): API keys of the HTTP front
    keys = commands.add_parser("keys", help="API keys of the HTTP front (producer.web)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="make a key for USER; prints it once")
    create.add_argument("user", metavar="USER", help="the user id every request is charged to")
    create.add_argument("--name", default="", help="what the key is for, e.g. the app's name")
    create.add_argument("--json", action="store_true", help="print the key and its record")
    create.set_defaults(run=_keys_create)
    listing = keys_commands.add_parser("list", help="ids, users, names and creation times")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_keys_list)
    revoke = keys_commands.add_parser("revoke", help="delete a key at once")
    revoke.add_argument("key_id", metavar="KEY_ID", help="the id `llmq keys list` shows")
    revoke.set_defaults(run=_keys_revoke)

    # health (observability issue)
    health = commands.add_parser("health", help="fleet latency, circuits, queues (JSON)")
    health.set_defaults(run=_health)

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
