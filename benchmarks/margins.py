"""The margin table: how much of its tolerance each comparison in tests/ uses, under every CPU kernel
family this machine can run and on 1 and 2 threads.

    python -m benchmarks.margins                      # the whole suite under each configuration (~40 min)
    python -m benchmarks.margins -k two_processes     # a subset (pytest -k)
    python -m benchmarks.margins --table-only         # rebuild the table from the last records

A tolerance set just above the digits one machine printed passes there and fails on a CPU whose
vector kernels add in another order. So every tolerance-based check in tests/ goes through
tests/tolerance.py, which, with NEO_MARGINS set, records the share of its tolerance that the error
used. This script runs pytest once per (ATEN_CPU_CAPABILITY, threads) pair, each on its own record
file, prints whether each run passed, and prints the table: per call site, its tolerance and
margin = tolerance / worst error over every configuration (and per configuration). Margins under
10x need a sentence in the test saying why; the table marks them. Exact checks (tolerance 0) show
"exact" while they hold. Sites never reached (GPU-only tests, skipped cases) are listed at the end.

ATEN_CPU_CAPABILITY picks which of torch's compiled kernel families runs: `default` (plain C++,
no explicit vectors), `avx2`, `avx512`. The machine's best is what runs when it is unset.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "margins"


def capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU can run, plainest first; the best of them as "best"
    (the variable unset: what a user runs)."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(l.split(":", 1)[1].split()) for l in f if l.startswith("flags")), set())
    except OSError:
        pass
    caps = ["default"]
    if {"avx2", "fma"} <= flags:
        caps.append("avx2")
    best = "avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else caps[-1]
    return [c for c in caps if c != best] + ["best"]


def run_suite(capability, threads, pytest_args, records: Path) -> dict:
    records.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NEO_MARGINS": str(records), "HF_HUB_OFFLINE": "1"}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "best":
        env["ATEN_CPU_CAPABILITY"] = capability
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    summary = next((l for l in reversed(r.stdout.splitlines()) if re.search(r"\d+ (passed|failed)", l)),
                   r.stdout[-300:] + r.stderr[-300:])
    failed = [l for l in r.stdout.splitlines() if l.startswith(("FAILED", "ERROR"))]
    return dict(capability=capability, threads=threads, returncode=r.returncode, summary=summary.strip("= "),
                failed=failed, seconds=round(time.time() - t0))


def call_sites() -> set[str]:
    """Every line in tests/ that calls close( or close_norm(, as file:line."""
    sites = set()
    for f in sorted((ROOT / "tests").glob("test_*.py")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"(?<![\w.])close(_norm)?\(", line) and not line.lstrip().startswith(("def ", "#")):
                sites.add(f"{f.relative_to(ROOT)}:{i}")
    return sites


def fmt_margin(used: float) -> str:
    """1 / used: how many times the worst error fits in the tolerance."""
    if used == 0:
        return "∞"  # no error at all (or an exact check that held)
    if used > 1:
        return "FAIL"
    return f"{1 / used:,.0f}x" if 1 / used >= 10 else f"{1 / used:.1f}x"


def table(record_files: list[Path]) -> str:
    rows = [json.loads(l) for f in record_files if f.exists() for l in f.read_text().splitlines()]
    configs = sorted({(r["capability"], r["threads"]) for r in rows})
    by_site = defaultdict(list)
    for r in rows:
        by_site[r["site"]].append(r)
    head = ["site", "test", "tolerance", "worst error", "margin", *[f"{c} {t}t" for c, t in configs]]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    under = 0
    for site in sorted(by_site, key=lambda s: (s.split(":")[0], int(s.split(":")[1]))):
        rs = by_site[site]
        worst = max(rs, key=lambda r: r["used"])
        exact = all(r["tolerance"] in ("atol=0 rtol=0", "rel=0") for r in rs)
        margin = "exact" if exact and worst["used"] == 0 else fmt_margin(worst["used"])
        under += 0 < worst["used"] and 1 / worst["used"] < 10
        per = [fmt_margin(max(r["used"] for r in rs if (r["capability"], r["threads"]) == c))
               if any((r["capability"], r["threads"]) == c for r in rs) else "-" for c in configs]
        tests = sorted({r["test"].split("::", 1)[-1].split("[")[0] for r in rs})
        out.append(f"| {site} | {', '.join(tests)} | {worst['rule']} {worst['tolerance']} | {worst['error']:.2e} | "
                   f"{margin}{' ◀ under 10x' if 0 < worst['used'] and 1 / worst['used'] < 10 else ''} | "
                   + " | ".join(per) + " |")
    missing = sorted(call_sites() - set(by_site), key=lambda s: (s.split(":")[0], int(s.split(":")[1])))
    out.append(f"\n{len(by_site)} call sites measured over {len(configs)} configurations "
               f"({len(rows)} comparisons); {under} with a margin under 10x.")
    if missing:
        out.append(f"Not reached in these runs ({len(missing)}; GPU-only or skipped): " + ", ".join(missing))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capabilities", default=",".join(capabilities()),
                   help="ATEN_CPU_CAPABILITY values to run (default: every one this CPU supports; best: unset)")
    p.add_argument("--threads", default="1,2", help="thread counts to run each capability with")
    p.add_argument("-k", default=None, help="only the tests pytest -k selects")
    p.add_argument("--tests", default="tests", help="test files or folder")
    p.add_argument("--out", default=str(RESULTS), help="folder for the records and the table")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from the records in --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = [(c, int(t)) for c in args.capabilities.split(",") for t in args.threads.split(",")]
    files = [out / f"records-{c}-{t}t.jsonl" for c, t in configs]
    if not args.table_only:
        runs = []
        for (c, t), f in zip(configs, files):
            res = run_suite(c, t, [*args.tests.split(), *(["-k", args.k] if args.k else [])], f)
            cap = "unset (best)" if c == "best" else c
            print(f"ATEN_CPU_CAPABILITY={cap} OMP_NUM_THREADS={t}: {res['summary']} ({res['seconds']} s)", flush=True)
            for line in res["failed"]:
                print("   ", line)
            runs.append(res)
        (out / f"runs-{'-'.join(f'{c}{t}t' for c, t in configs)}.json").write_text(json.dumps(runs, indent=1) + "\n")
    text = table(sorted(out.glob("records-*.jsonl")) if args.table_only else files)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
