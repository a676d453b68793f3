"""carcert.supervisor.WorkerSupervisor with real short-lived processes: restarts with doubling
backoff, reports each death, stops restarting on stop()."""

from __future__ import annotations

import subprocess
import sys
import time

from carcert.supervisor import WorkerSupervisor


def test_dead_process_is_restarted_with_doubling_backoff():
    starts: list[float] = []
    deaths: list[int] = []
    restarts: list[tuple[int | None, float]] = []

    def start() -> subprocess.Popen:
        starts.append(time.monotonic())
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    sup = WorkerSupervisor(
        start,
        base_delay=0.2,
        max_delay=0.8,
        stable_after=60,
        on_death=deaths.append,
        on_restart=lambda code, delay: restarts.append((code, delay)),
    )
    deadline = time.monotonic() + 30
    while len(starts) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    sup.stop()
    assert len(starts) >= 5
    assert [d for _, d in restarts[:4]] == [0.2, 0.4, 0.8, 0.8]  # doubling, capped at max_delay
    assert all(code == 3 for code, _ in restarts)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(g >= d for g, (_, d) in zip(gaps, restarts, strict=False))
    assert len(deaths) >= 4 and all(isinstance(pid, int) for pid in deaths)
    n = len(starts)
    time.sleep(1.0)
    assert len(starts) == n  # no restart after stop()


def test_stop_terminates_a_running_process():
    proc_holder: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        proc_holder.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return proc_holder[-1]

    sup = WorkerSupervisor(start, base_delay=0.1, on_death=lambda pid: 0)
    time.sleep(0.3)
    sup.stop(timeout=5)
    assert proc_holder[0].poll() is not None and len(proc_holder) == 1
