#!/usr/bin/env python3
"""The mutation check: every safety rule in tests/mutations/rules.toml has a test that fails
without it.

For each rule the runner disables the rule in a copy of the tree (the rule's `find` text becomes
its `replace` text, in a file that must still compile), runs only the rule's tests against that
copy, and counts the mutation killed when they fail. It fails when a mutation survives, when a
rule's `find` text is not in its file exactly once (the list went stale), or when the tests do not
pass on the unmutated copy (a kill would mean nothing). `make test` runs it after the suite.

    python scripts/mutation_check.py [--rules tests/mutations/rules.toml] [--only SUBSTRING] [--list] [--jobs N]

Rules run `--jobs` at a time (default: 2, or 1 on a one-core machine), each worker on its own copy
of the tree, so one rule's mutant never sees another's; most of a rule's time is a killed test
waiting for its deadline, so two workers on two cores about halve the check's time.

`--list` prints every rule and whether its `find` text occurs exactly once (no tests run). The copy
works from a git worktree too: a symlink that points inside the repository (the git-excluded
aitbc/server -> ../server links of a development checkout) is skipped, since the mapped folders
are copied in their own right; any other symlink is copied as a link.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the installed layout (pyproject package-dir): these folders are subpackages of aitbc
MAPPED = {"server": "aitbc/server", "miner": "aitbc/miner", "hub": "aitbc/hub", "clients": "aitbc/clients"}
PATTERNS = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")


def _inside(link: Path) -> bool:
    try:
        link.resolve().relative_to(ROOT)
    except ValueError:
        return False
    return True


def _ignore(folder: str, names: list[str]) -> set[str]:
    """Build artefacts, and symlinks into the repository (the mapped folders are copied on their own)."""
    skip = set(PATTERNS(folder, names))
    return skip | {n for n in names if (Path(folder) / n).is_symlink() and _inside(Path(folder) / n)}


def site_path(repo_path: str) -> str:
    top, _, rest = repo_path.partition("/")
    return f"{MAPPED[top]}/{rest}" if top in MAPPED else repo_path


def build_copy(dest: Path) -> None:
    """The package as installed (aitbc/ with its mapped subpackages) plus tests/, scripts/ (tests
    load the vector generators from there) and pyproject.toml."""
    shutil.copytree(ROOT / "aitbc", dest / "aitbc", ignore=_ignore, symlinks=True)
    for src, dst in MAPPED.items():
        shutil.copytree(ROOT / src, dest / dst, ignore=_ignore, symlinks=True)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=_ignore, symlinks=True)
    shutil.copytree(ROOT / "scripts", dest / "scripts", ignore=_ignore, symlinks=True)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def find_state(rule: dict) -> str:
    """"ok" when the rule's find text occurs exactly once in its file, else what is wrong."""
    path = ROOT / rule["file"]
    if not path.is_file():
        return "NO FILE"
    n = path.read_text().count(rule["find"])
    return "ok" if n == 1 else "MISSING" if n == 0 else f"AMBIGUOUS ({n}x)"


MUTANT_TEST_S = 90.0  # the slowest rule test takes ~35 s on a loaded 2-core box; its unmutated run is not limited


def run_tests(copy: Path, tests: list[str], timeout: float, *, per_test_s: float | None = None) -> tuple[int, float, str]:
    """`per_test_s`: a mutant that makes a test hang fails it after this long (pytest-timeout), a kill
    like any other, instead of holding the run for the whole `timeout`."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           "--no-header", *(["-o", f"timeout={per_test_s:g}"] if per_test_s else []), *tests]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, time.monotonic() - t0, "timed out"
    return done.returncode, time.monotonic() - t0, (done.stdout + done.stderr)[-3000:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", default=str(ROOT / "tests" / "mutations" / "rules.toml"))
    ap.add_argument("--only", default="", help="run only rules whose text contains this")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    ap.add_argument("--list", action="store_true",
                    help="print every rule and whether its find text occurs exactly once; run no tests")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="rules run at once, each worker on its own copy of the tree")
    args = ap.parse_args()
    rules = [r for r in tomllib.loads(Path(args.rules).read_text())["rule"] if args.only in r["rule"]]
    if not rules:
        print("no rule matches", file=sys.stderr)
        return 5
    if args.list:
        bad = 0
        for r in rules:
            state = find_state(r)
            bad += state != "ok"
            print(f"{state:10s} {r['file']:36s} {r['rule']}")
        print(f"{len(rules)} rules, {bad} with a find text that is not there exactly once")
        return 1 if bad else 0
    problems = [f"rule {r['rule']!r}: its find text is {state} in {r['file']} (it must occur exactly once)"
                for r in rules if (state := find_state(r)) != "ok"]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"{len(problems)} rule(s) went stale; no tests run", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="aitbc-mutants-") as tmp:
        copies: queue.Queue[Path] = queue.Queue()
        for i in range(max(1, args.jobs)):
            build_copy(Path(tmp) / str(i))
            copies.put(Path(tmp) / str(i))
        every = sorted({t for r in rules for t in r["tests"]})
        rc, took, out = run_tests(Path(tmp) / "0", every, args.timeout * 2)
        if rc != 0:
            print(f"the rules' tests fail on the unmutated tree (rc {rc}); fix that first:\n{out}", file=sys.stderr)
            return 1
        print(f"baseline: {len(every)} test targets pass unmutated ({took:.0f} s)")
        survivors = []
        print(f"{'rule':72s} {'result':8s} {'s':>5s}  killed by", flush=True)

        def check(r: dict) -> None:
            copy = copies.get()  # a copy no other worker is mutating now
            target = copy / site_path(r["file"])
            original = target.read_text()
            try:
                target.write_text(original.replace(r["find"], r["replace"], 1))
                try:
                    compile(target.read_text(), str(target), "exec")
                except SyntaxError as exc:
                    problems.append(f"rule {r['rule']!r}: the mutated {r['file']} does not compile: {exc}")
                    return
                rc, took, out = run_tests(copy, r["tests"], args.timeout, per_test_s=MUTANT_TEST_S)
            finally:
                target.write_text(original)
                copies.put(copy)
            killed = rc not in (0, 5)
            failed = next((line.split(" ")[1] for line in out.splitlines() if line.startswith("FAILED ")), "")
            print(f"{r['rule'][:72]:72s} {'killed' if killed else 'SURVIVED':8s} {took:5.1f}  "
                  f"{failed or ', '.join(r['tests']) if killed else ''}", flush=True)
            if rc == 5:
                problems.append(f"rule {r['rule']!r}: no test ran ({', '.join(r['tests'])})")
            elif not killed:
                survivors.append(r["rule"])

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(check, rules))  # re-raises a worker's unexpected error
    for p in problems:
        print(p, file=sys.stderr)
    if survivors:
        print(f"{len(survivors)} mutation(s) survived: " + "; ".join(survivors), file=sys.stderr)
    if problems or survivors:
        return 1
    print(f"all {len(rules)} mutations killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
