"""Start `migpredictd run` as a real process on 127.0.0.1 and read its /metrics (shared by daemon tests)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback only
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def scrape(port: int) -> Samples:
    status, body = http(port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def vms(samples: Samples) -> set[str]:
    return {dict(labels)["vm"] for (_, labels) in samples if "vm" in dict(labels)}


def wait_for(port: int, predicate: Callable[[Samples], bool], timeout: float) -> Samples:
    """Scrape until ``predicate`` holds; return that scrape. Fails after ``timeout`` s.

    Polls every 0.1 s, or as long as the last scrape took if longer, so a daemon with thousands of
    targets spends at most about half its time answering the test.
    """
    deadline = time.monotonic() + timeout
    last: Samples = {}
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            last = scrape(port)
        except OSError:  # not listening yet
            time.sleep(0.1)
            continue
        if predicate(last):
            return last
        time.sleep(max(0.1, time.monotonic() - t0))
    raise AssertionError(f"condition not met within {timeout}s; last scrape: {sorted(vms(last))}")


class LoggedProcess:
    """A server started for a test: stderr goes to ``log`` for failure messages; stopped by PID."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("wb")
        )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """Terminate (kill after 10 s); return the exit status. Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


class DaemonProcess(LoggedProcess):
    """`migpredictd run` in a subprocess on 127.0.0.1:``port``."""

    def __init__(self, config: Path, port: int, *extra: str) -> None:
        self.port = port
        super().__init__(
            [sys.executable, "-m", "migpredictd.cli", "run", f"--config.file={config}",
             f"--web.listen-address=127.0.0.1:{port}", *extra],
            config.parent / "daemon.log",
        )  # fmt: skip
