"""Run every benchmark on this machine and write bench/results.md.

    python -m bench            # the full run (several minutes)
    python -m bench --quick    # a smoke run of a few seconds: keeps the harness working

Each figure is reported next to a baseline measured in the same run. Nothing here
asserts a timing: targets are reported as met or missed, by how much.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    """Parse options, start the services, run the benchmarks, write the report."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="run these sections only: fake overhead concurrency cache batch limiter",
    )
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="llmq-bench-"))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(base / "tiktoken")
    os.environ["LLMQ_ENV_FILE"] = os.devnull
    from bench.environment import Environment
    from bench.report import Report

    report = Report(quick=args.quick)
    # SIGTERM unwinds like Ctrl-C, so the services below are stopped and the temp dir goes.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Environment(base, quick=args.quick) as env:
            # Imported only now: importing `worker` configures Celery from REDIS_URL.
            from bench.sections import SECTIONS

            for name, section in SECTIONS.items():
                if args.only is None or name in args.only:
                    print(f"== {name}", flush=True)
                    section(env, report)
    except KeyboardInterrupt:
        print("interrupted: services stopped, no report written", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = report.markdown()
    if args.quick:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
