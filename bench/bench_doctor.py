"""``fleetctl doctor`` when every remote part is down (issue 11: the whole run within 10 s).

Three shapes of "down", each for every remote part at once (serve, Forgejo, one SSH host, Matrix):

  refused  nothing listens on the port (a stopped service): the connection is refused at once
  silent   a listener that accepts and never answers (a hung service, a black-holing firewall): the slow case
  working  for comparison, the same doctor with nothing configured remotely (config, database, disk only)

Each is run ``--runs`` times as a real process (``python -m fleetctl doctor --json``), interleaved; the
median wall time is printed with the 10 s bound, and the ratio to the "working" run of the same round as the
same-run reference. Loopback only; the listeners are this script's own threads, closed at the end.

Usage: python bench/bench_doctor.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BOUND_SECS = 10.0


class Silent:
    """A TCP listener that accepts connections and never writes a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.held:
            s.close()
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp: Path, name: str, port: int | None) -> Path:
    """A config whose serve, Forgejo, SSH host and Matrix are all at 127.0.0.1:port (None: none of them)."""
    key = tmp / "key"
    known = tmp / "known_hosts"
    lines = ["[orchestrator]", f'db_path = "{tmp / "fleet.db"}"']
    if port is not None:
        lines = [
            "[server]", f"port = {port}", 'admin_token = "doctor-bench-admin-token"',
            "[forgejo]", f'url = "http://127.0.0.1:{port}"', 'token = "t"', 'webhook_secret = "s"',
            'repositories = ["acme/widgets"]', *lines,
            "[[hosts]]", 'host_id = "box"', 'hostname = "127.0.0.1"', f"ssh_port = {port}", 'ssh_user = "fleet"',
            f'ssh_key_path = "{key}"', f'known_hosts = "{known}"', 'work_dir = "/tmp/w"',
            'agents = [{ agent_type = "sh", max_concurrency = 1 }]',
            "[agent_types.sh]", 'command = ["sh"]', 'prompt = "stdin"',
            "[matrix]", f'homeserver = "http://127.0.0.1:{port}"', 'access_token = "m"', 'room_id = "!r:x"',
        ]  # fmt: skip
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def run(cfg: Path) -> tuple[float, int, list[str]]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fleetctl", "doctor", "--json", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    secs = time.monotonic() - started
    doc = json.loads(done.stdout)
    return secs, done.returncode, [c["name"] for c in doc["checks"] if c["status"] == "fail"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "key").write_text("not a key\n")
        (tmp / "key").chmod(0o600)
        (tmp / "known_hosts").write_text("")
        subprocess.run([sys.executable, "-m", "fleetctl", "db", "migrate", "--config", str(config(tmp, "base", None))],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        silent = Silent()
        shapes = {"working": config(tmp, "working", None), "refused": config(tmp, "refused", free_port()),
                  "silent": config(tmp, "silent", silent.port)}  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in shapes}
        try:
            for _ in range(args.runs):
                for name, cfg in shapes.items():
                    secs, code, failed = run(cfg)
                    times[name].append(secs)
                    last = (code, failed)
                    if name != "working":
                        assert code == 5, (name, code, failed)
            print(f"fleetctl doctor, {args.runs} runs each, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
            ref = statistics.median(times["working"])
            for name, values in times.items():
                med = statistics.median(values)
                print(
                    f"  {name:<8} median {med:6.2f} s  max {max(values):6.2f} s  {med / ref:5.1f}x the working run"
                    f"{'' if name == 'working' else f'  bound {BOUND_SECS:g} s: ' + ('PASS' if max(values) <= BOUND_SECS else 'FAIL')}"
                )
            print(f"  last silent run: exit {last[0]}, failing {', '.join(last[1])}")
            worst = max(max(times["refused"]), max(times["silent"]))
            print(
                f"RESULT doctor, every remote part down | max {worst:.2f} s | <= {BOUND_SECS:g} s | "
                f"{'PASS' if worst <= BOUND_SECS else 'FAIL'}",
                flush=True,
            )
        finally:
            silent.close()


if __name__ == "__main__":
    main()
