"""Optional py-spy profiles of cordum-server and one worker during the one-job-per-call phase
(`bench/run.py --pyspy DIR`), and a plain-text summary of where the samples went.

py-spy is installed into the running venv on demand. Profiling costs CPU on this 2-core
machine, so figures from a profiled run are lower than those of a plain run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from cordum.server.stack.process import ManagedProcess

_LINE = re.compile(r"\s*\(([^()]*?)(?::\d+)?\)\s*$")


def pyspy_path() -> Path:
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True, timeout=300
        )
    return exe


def start_record(
    pid: int, out_dir: Path, name: str, duration_s: int, rate: int = 250
) -> ManagedProcess:
    """`py-spy record` of `pid` for `duration_s` into `<out_dir>/<name>.txt` (collapsed
    stacks: feed them to flamegraph.pl or speedscope for a picture). Non-blocking sampling, so
    the target is never paused; the caller stops the recorder by its PID if it must."""
    exe = pyspy_path()
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(exe),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(duration_s),
        "--rate",
        str(rate),
        "--nonblocking",
        "--format",
        "raw",
        "-o",
        str(out_dir / f"{name}.txt"),
    ]
    process = ManagedProcess(f"py-spy {name}", argv, log_path=out_dir / f"{name}.log")
    process.start()
    return process


def _frame(frame: str) -> str:
    """`func (path/to/module.py:123)` -> `func (module.py)`."""
    m = _LINE.search(frame)
    if not m:
        return frame.strip()
    name = frame[: m.start()].strip()
    path = m.group(1)
    short = "/".join(path.split("/")[-2:])
    return f"{name} ({short})"


def summarize(raw: Path, *, duration_s: float, rate: int, top: int = 30) -> str:
    """Top functions by inclusive and by self samples; % of all samples and of one core."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    if not raw.exists():
        return f"(no profile at {raw})"
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f]
        # The first frame is the thread ("process 123:..." / "thread (0x...)"); drop it.
        frames = [f for f in frames if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        total += count
        for f in set(frames):
            inclusive[f] += count
        leaf[frames[-1]] += count
    if total == 0:
        return f"(no samples in {raw})"
    possible = duration_s * rate
    lines = [
        f"{raw.name}: {total} samples = {100 * total / possible:.0f}% of one core busy in Python",
        "  inclusive (% of busy samples)",
    ]
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    lines.append("  self (% of busy samples)")
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in leaf.most_common(top)]
    return "\n".join(lines)
