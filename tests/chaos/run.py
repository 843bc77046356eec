"""`make chaos`: every fault of the suite against `cordumctl up --replicas N`'s stack, in each
NATS mode asked for, then one table of faults and outcomes (see chaos/harness.py).

    make chaos
    PYTHONPATH=tests .venv/bin/python -m chaos.run --mode plain --faults scheduler,nats

Exits 1 when an accepted job or run was lost, completed twice or stuck, or a component did
not come back.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys

from rich.console import Console

from chaos.harness import FAULTS, Options, WindowResult, new_base, print_report, run_suite
from cordum.server.settings import Settings

# Wide enough for the table also when the output is not a terminal (make, CI logs).
console = Console(width=max(Console().width, 140))


def jetstream_supported() -> bool:
    """The server reads NATS_USE_JETSTREAM (the mode's setting exists)."""
    return "use_jetstream" in Settings.model_fields


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode",
        choices=("plain", "jetstream", "both"),
        default=None,
        help="NATS mode (default: plain, and jetstream too when the server supports it)",
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, in order (default: all of {', '.join(FAULTS)})",
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--load-s", type=float, default=Options.load_s)
    parser.add_argument("--job-rate", type=float, default=Options.job_rate)
    parser.add_argument("--run-rate", type=float, default=Options.run_rate)
    parser.add_argument(
        "--down-s",
        type=float,
        default=Options.down_s,
        help="how long a killed component stays down",
    )
    parser.add_argument("--pause-s", type=float, default=Options.pause_s)
    parser.add_argument(
        "--shipped-timeouts",
        action="store_true",
        help="config/timeouts.yaml as shipped instead of the suite's 10 s job timeouts",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data and log directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        console.print(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
        return 2
    mode = args.mode or ("both" if jetstream_supported() else "plain")
    modes = ("plain", "jetstream") if mode == "both" else (mode,)
    results: list[WindowResult] = []
    for m in modes:
        options = dataclasses.replace(
            Options(),
            mode=m,
            faults=faults,
            replicas=args.replicas,
            load_s=args.load_s,
            job_rate=args.job_rate,
            run_rate=args.run_rate,
            down_s=args.down_s,
            pause_s=args.pause_s,
            short_timeouts=not args.shipped_timeouts,
        )
        base = new_base()
        console.print(f"[bold]{m} NATS[/bold]: stack in {base}")

        def show(result: WindowResult) -> None:
            jobs, runs = result.jobs, result.runs
            mark = "[green]ok[/green]" if result.ok else "[red]NOT OK[/red]"
            console.print(
                f"  {result.fault:13} {mark}  jobs {jobs.succeeded}/{jobs.accepted} succeeded, "
                f"runs {runs.succeeded}/{runs.accepted}; {result.fault_note}"
            )

        try:
            results += run_suite(options, base, on_result=show)
        finally:
            if args.keep:
                console.print(f"kept {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)
    print_report(results, console)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
