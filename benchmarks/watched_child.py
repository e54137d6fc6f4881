"""Running a benchmark child process and watching it from outside.

`Watched` starts a command, time-stamps its stderr as it arrives (tqdm's redraws included), polls
the CPU time of its main process and the PSS of its process tree, and kills it when the machine is
about to run out of memory; `wait()` adds the kernel's peak RSS (wait4). The parsers read finished
steps and losses off the tqdm lines. Shared by bench_train_network.py and bench_lllite.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3
MIN_AVAILABLE = 1 * GIB  # a child is killed when MemAvailable falls under this while it runs

TQDM_COUNT = re.compile(r"\|\s*(\d+)/(\d+) \[")
TQDM_LOSS = re.compile(r"\|\s*(\d+)/\d+ \[[^\]]*loss=([-+0-9.eE]+|nan|inf)")


def mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


BUSY_SHARE = 0.05  # other processes and steal above this share of the CPUs during the run: a warning


def loadavg() -> float:
    with open("/proc/loadavg", encoding="ascii") as f:
        return float(f.read().split()[0])


def first_touch_us(size: int = 512 << 20) -> float:
    """Microseconds to fault in one 4 KiB page of a fresh anonymous map (the first write to it).

    Loading converted weights and a model's first step touch GBs of new memory. On a bare machine a
    page costs well under a microsecond; on a virtual machine whose host backs guest memory lazily it
    has been seen at 1.6 us (pages the guest had used before) to 11 us (pages never used since boot),
    which moves the time to the first step by many seconds, so it is printed with the results."""
    import mmap

    import numpy as np

    with mmap.mmap(-1, size) as region:
        pages = np.frombuffer(region, dtype=np.uint8)[::4096]
        start = time.perf_counter()
        pages[:] = 1
        seconds = time.perf_counter() - start
        del pages
    return seconds / (size // 4096) * 1e6


# ---------------------------------------------------------------------------------------------
# running a child and watching it from outside


class OutOfMemory(Exception):
    """A child was stopped because the machine was about to run out of memory."""


PSS_EVERY = 8  # polls between two PSS readings of the process tree


class Watched:
    """A child process whose stderr is time-stamped as it arrives and whose tree RSS is polled."""

    def __init__(self, cmd: list, env: dict, poll_seconds: float = 0.25):
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: list = []  # (seconds since launch, text piece)
        self.tree_peak = 0
        self.killed_for_memory = False
        self.cpu_samples: list = [(0.0, 0.0)]  # (seconds since launch, CPU seconds of the main process)
        self.stdout = b""
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._read_stderr, daemon=True),
                         threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._poll_rss, args=(poll_seconds,), daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stderr(self) -> None:
        # tqdm redraws with "\r", so split on both line ends; read1 hands over what is there now
        buffer = b""
        while True:
            chunk = self.proc.stderr.read1(65536)
            if not chunk:
                break
            now = time.perf_counter() - self.start
            buffer += chunk
            pieces = re.split(rb"[\r\n]", buffer)
            buffer = pieces.pop()
            self.events += [(now, p.decode("utf-8", "replace")) for p in pieces if p]
        if buffer:
            self.events.append((time.perf_counter() - self.start, buffer.decode("utf-8", "replace")))

    def _read_stdout(self) -> None:
        self.stdout = self.proc.stdout.read()

    def _poll_rss(self, seconds: float) -> None:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
        except psutil.Error:
            return
        polls = 0
        while not self._done.is_set():
            total = 0
            try:
                # PSS: forked DataLoader workers share the trainer's pages, and a sum of RSS would
                # count those pages once per worker. Reading it walks every page table of the tree
                # and slowed the measured steps by 20-35 % at 0.25 s, so it is read every 8th poll.
                if polls % PSS_EVERY == 0:
                    for p in [root] + root.children(recursive=True):
                        try:
                            total += p.memory_full_info().pss
                        except psutil.Error:
                            pass
                times = root.cpu_times()
            except psutil.Error:
                break
            polls += 1
            self.cpu_samples.append((time.perf_counter() - self.start, times.user + times.system))
            self.tree_peak = max(self.tree_peak, total)
            if mem_available() < MIN_AVAILABLE:
                self.killed_for_memory = True
                self.proc.kill()
                break
            self._done.wait(seconds)

    def wait(self) -> dict:
        """Wait for the child; its wall time, CPU time and kernel peak RSS (its largest process)."""
        _, status, usage = os.wait4(self.proc.pid, 0)
        wall = time.perf_counter() - self.start
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._done.set()
        for t in self._threads:
            t.join(timeout=10)
        return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024,
                "tree_peak": self.tree_peak, "returncode": self.proc.returncode}

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(text for _, text in self.events[-n:])


def step_times(events: list) -> list:
    """Seconds since launch at which the tqdm counter first showed 1, 2, ... finished steps."""
    seen = {}
    for at, text in events:
        for match in TQDM_COUNT.finditer(text):
            seen.setdefault(int(match.group(1)), at)
    return [seen[k] for k in sorted(seen) if k > 0]


def step_losses(events: list) -> list:
    """The loss shown on the tqdm line after each finished step (the trainer's moving average)."""
    seen = {}
    for _, text in events:
        for match in TQDM_LOSS.finditer(text):
            seen[int(match.group(1))] = float(match.group(2))
    return [seen[k] for k in sorted(seen) if k > 0]


def cpu_at(samples: list, at: float) -> float:
    """The main process's CPU seconds at `at`, interpolated between the polled samples."""
    before = max((s for s in samples if s[0] <= at), default=samples[0])
    after = min((s for s in samples if s[0] >= at), default=samples[-1])
    if after[0] == before[0]:
        return before[1]
    return before[1] + (after[1] - before[1]) * (at - before[0]) / (after[0] - before[0])


def first_event(events: list, needle: str) -> float | None:
    return next((at for at, text in events if needle in text), None)


def child_env(threads: int) -> dict:
    # the same thread count for the trainer and the bare run, whatever the caller's environment says
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
                PYTHONUNBUFFERED="1")
