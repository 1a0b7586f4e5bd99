"""``make bench``: every benchmark in turn, then one table of their headline figures, each
beside its baseline from the same run, also written to docs/benchmarks.md.

    .venv/bin/python bench/run_all.py [--only NAME ...] [--output PATH]

Each bench still prints its own figures as it goes and hands its headline ones over
through ``bench._harness.report``. A missed target is reported, not a failure; a bench
that exits non-zero or reports nothing makes this exit non-zero. ``--only`` writes no
file unless ``--output`` names one.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import RESULTS_ENV, Result, machine

BENCHES = [
    "agent.py",
    "press_latency.py",
    "upload.py",
    "command_roundtrip.py",
    "controller_registry.py",
    "controller_ingest.py",
    "schedule_expansion.py",
]

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "benchmarks.md"


@dataclass
class Outcome:
    name: str
    seconds: float
    returncode: int
    results: list[Result]

    @property
    def failed(self) -> bool:
        return self.returncode != 0 or not self.results


def run_bench(name: str, workdir: Path) -> Outcome:
    results_file = workdir / f"{name}.jsonl"
    env = {**os.environ, RESULTS_ENV: str(results_file)}
    print(f"\n=== {name} ===", flush=True)
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(HERE / name)], env=env, check=False)
    seconds = time.monotonic() - started
    lines = results_file.read_text().splitlines() if results_file.exists() else []
    return Outcome(name, seconds, done.returncode, [Result.model_validate_json(x) for x in lines])


def summary(name: str) -> str:
    """The first paragraph of a bench's docstring, on one line."""
    doc = ast.get_docstring(ast.parse((HERE / name).read_text())) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def describe(outcome: Outcome) -> str:
    """What the bench measures, and against what."""
    names = list(dict.fromkeys(r.baseline_name for r in outcome.results if r.baseline_name))
    against = f" Baseline{'s' if len(names) > 1 else ''}: {'; '.join(names)}." if names else ""
    return summary(outcome.name) + against


def number(value: float) -> str:
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def row(result: Result, *, baseline_name: bool) -> list[str]:
    baseline = ""
    if result.baseline is not None:
        baseline = f"{number(result.baseline)} {result.unit}"
        if baseline_name and result.baseline_name:
            baseline += f" ({result.baseline_name})"
    return [
        result.name,
        f"{number(result.value)} {result.unit}",
        baseline,
        f"{result.ratio:.2f}x" if result.ratio is not None else "",
        result.target or "",
        {True: "yes", False: "MISSED", None: ""}[result.ok],
    ]


HEADER = ["figure", "value", "baseline, same run", "ratio", "target", "met"]


def text_table(outcomes: list[Outcome]) -> str:
    rows = [HEADER] + [row(r, baseline_name=False) for o in outcomes for r in o.results]
    widths = [max(len(cells[i]) for cells in rows) for i in range(len(HEADER))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        for cells in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown(outcomes: list[Outcome], described: list[tuple[str, str]], seconds: float) -> str:
    def cells(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    when = dict(described)["date"]
    out = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`bench/run_all.py`) on {when}, in {minutes(seconds)}. "
        "Run it again to refresh this file rather than editing it.",
        "",
        "## How to run",
        "",
        "```sh",
        "make bench                                     # every bench, then this file",
        ".venv/bin/python bench/run_all.py --only upload.py controller_ingest.py",
        ".venv/bin/python bench/upload.py --rounds 9    # one bench alone, with its options",
        "```",
        "",
        "Each bench starts what it measures against on loopback (Mosquitto, SeaweedFS, and a "
        "database made for the run on the PostgreSQL server of `CLASSCAP_TEST_POSTGRES_URL` "
        "when it answers) and stops it again. Every value is a median over repeats (a p95 "
        "where the figure says so); every ratio is value / baseline, both from the same run. "
        "A missed target is shown here; only a bench that fails makes `make bench` fail. "
        "On a shared machine the load (below) moves every figure; the ratios move less.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(cells([label, value]) for label, value in described),
        "",
        "## Results",
        "",
        cells([*HEADER, "note"]),
        cells(["---"] * (len(HEADER) + 1)),
        *(cells([*row(r, baseline_name=True), r.note]) for o in outcomes for r in o.results),
        "",
        "## What each bench measures",
        "",
        *(f"- `bench/{o.name}` ({minutes(o.seconds)}): {describe(o)}" for o in outcomes),
    ]
    failed = [o for o in outcomes if o.failed]
    if failed:
        out += ["", "## Failed", ""]
        out += [f"- `bench/{o.name}`: {failure(o)}" for o in failed]
    return "\n".join(out) + "\n"


def minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s" if whole >= 60 else f"{whole} s"


def failure(outcome: Outcome) -> str:
    if outcome.returncode != 0:
        return f"exit status {outcome.returncode}"
    return "reported no figures"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", nargs="+", choices=BENCHES, metavar="NAME")
    parser.add_argument("--output", type=Path, help=f"default {DOC} unless --only")
    args = parser.parse_args()
    names = args.only or BENCHES
    output = args.output or (None if args.only else DOC)

    described = machine()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="classcap-bench-") as tmp:
        outcomes = [run_bench(name, Path(tmp)) for name in names]
    seconds = time.monotonic() - started

    print(f"\n=== all benchmarks, {minutes(seconds)} ===")
    print(", ".join(f"{label} {value}" for label, value in described))
    print(text_table(outcomes))
    if output is not None:
        output.write_text(markdown(outcomes, described, seconds))
        print(f"written: {output}")
    failed = [o for o in outcomes if o.failed]
    for outcome in failed:
        print(f"failed: {outcome.name} ({failure(outcome)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
