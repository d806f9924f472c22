"""A tiny wall-clock sampling profiler for ledger node processes (py-spy is not installed here).

A daemon thread wakes every `interval` seconds, takes every other thread's stack
(sys._current_frames) and counts it if the thread is on a CPU (state R in /proc/self/task: a
thread blocked in select, a lock, a queue, or waiting for the GIL is not). Collapsed stacks ("a;b;c count", flamegraph input) are
rewritten to `path` every 2 s, so a node stopped with SIGTERM or SIGKILL still leaves its profile.

Enable in a node process with AITBC_SAMPLE=/some/file (bench/sitecustomize-style hook below):

    PYTHONPATH=$PWD:$PWD/bench/sample_hook AITBC_SAMPLE=/tmp/prof bench/ledger_throughput.py ...

and read the result with `python bench/sampler.py /tmp/prof.<pid> [top]`.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time


def _stack(frame) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    while frame is not None:
        co = frame.f_code
        out.append(f"{os.path.basename(co.co_filename)}:{co.co_name}")
        frame = frame.f_back
    out.reverse()
    return out


def _running(native_id: int | None) -> bool:
    """The thread is on a CPU now (state R in /proc; one waiting for the GIL sleeps on a futex)."""
    if native_id is None:
        return False
    try:
        with open(f"/proc/self/task/{native_id}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "R"
    except OSError:
        return False


def _thread_cpu() -> list[tuple[str, float]]:
    """(thread name, CPU seconds) of every thread of this process (/proc: C threads included)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            comm = open(f"/proc/self/task/{tid}/comm").read().strip()
        except OSError:
            continue
        out.append((names.get(int(tid), comm).replace(" ", "_"), (int(fields[11]) + int(fields[12])) / tick))
    return sorted(out, key=lambda x: -x[1])


def start(path: str, interval: float = 0.003) -> None:
    counts: collections.Counter[str] = collections.Counter()

    def run() -> None:
        me = threading.get_ident()
        last = time.monotonic()
        while True:
            time.sleep(interval)
            native = {t.ident: t.native_id for t in threading.enumerate()}
            for tid, frame in sys._current_frames().items():
                if tid == me or not _running(native.get(tid)):
                    continue
                counts[";".join(_stack(frame))] += 1
            if time.monotonic() - last > 2:
                last = time.monotonic()
                with open(path + ".tmp", "w") as f:
                    f.write(f"#argv {' '.join(sys.orig_argv)[:200]}\n")
                    for name, cpu in _thread_cpu():
                        f.write(f"#cpu {name} {cpu:.2f}\n")
                    for k, v in counts.most_common():
                        f.write(f"{k} {v}\n")
                os.replace(path + ".tmp", path)

    threading.Thread(target=run, daemon=True, name="sampler").start()


def report(path: str, top: int = 40) -> None:
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in open(path):
        if line.startswith("#"):
            print(line.rstrip())
            continue
        stack, n = line.rsplit(" ", 1)
        k = int(n)
        total += k
        frames = stack.split(";")
        self_c[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    print(f"{total} samples")
    print("-- self")
    for f, n in self_c.most_common(top):
        print(f"{100 * n / total:5.1f}% {f}")
    print("-- inclusive")
    for f, n in incl.most_common(top):
        print(f"{100 * n / total:5.1f}% {f}")


if __name__ == "__main__":
    report(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
