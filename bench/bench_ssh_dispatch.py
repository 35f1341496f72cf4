"""A dispatch pass launching 20 runs on 2 SSH hosts (SPEC §11: one connection per host; at most 3 × a bare
connection setup per host + 20 exec round trips).

Two real sshd processes on 127.0.0.1 (tests/sshd.py: their own host and client keys), one per host; a
config with both as ``[[hosts]]``, each with an agent of a type whose command is ``true`` and room for 10
runs; 20 queued tasks. Timed: one ``fleetctl.passes.dispatch(store, cfg)`` in-process (planning, the
store's writes and every SSH launch: workspace, uploads, the detached start and its pid), median of
``--rounds`` rounds, each with a fresh database and fresh workspaces. Counted: the logins each sshd
accepted during the pass (its ``Accepted publickey`` log lines), which must be 1 per host.

Reference, measured in the same run, against the same two servers: with plain paramiko (its defaults, as
a script would use it), per host one connection setup (TCP, handshake, key exchange, public-key login),
then 20 exec round trips in all (``true`` over an open connection, each a new channel, waiting for its
exit status). The budget is 3 × that.

Usage: python bench/bench_ssh_dispatch.py [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))  # tests/sshd.py: the sshd the SSH tests use

from _common import header, result, verdict  # noqa: E402

RUNS = 20
HOSTS = 2
FACTOR = 3.0


def bare_reference(servers) -> float:
    """Seconds for one plain-paramiko connection setup per server plus RUNS exec round trips in all."""
    import paramiko

    t0 = time.perf_counter()
    clients = []
    for s in servers:
        client = paramiko.SSHClient()
        client.load_host_keys(s.known_hosts)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(s.host, port=s.port, username=s.user, key_filename=s.key_path, look_for_keys=False,
                       allow_agent=False, timeout=10)  # fmt: skip
        clients.append(client)
    for i in range(RUNS):
        chan = clients[i % len(clients)].get_transport().open_session()
        chan.exec_command("true")
        assert chan.recv_exit_status() == 0
        chan.close()
    took = time.perf_counter() - t0
    for c in clients:
        c.close()
    return took


def one_pass(servers, scratch: Path) -> tuple[float, list[int], int]:
    """Seconds of one dispatch pass launching RUNS runs; the logins each server accepted; runs launched."""
    from fleetctl import passes, services
    from fleetctl.config import (
        AgentSpec,
        AgentTypeConfig,
        Config,
        ForgejoConfig,
        HostConfig,
        MatrixConfig,
        OrchestratorConfig,
        ServerConfig,
    )
    from fleetctl.store import Store

    hosts = tuple(
        HostConfig(
            host_id=f"box-{n}",
            hostname=s.host,
            ssh_user=s.user,
            ssh_port=s.port,
            ssh_key_path=s.key_path,
            known_hosts=s.known_hosts,
            connect_timeout_secs=10,
            work_dir=str(scratch / f"ws-{n}"),
            agents=(
                AgentSpec(
                    agent_type="quick", agent_id=f"box-{n}.quick", max_concurrency=RUNS // HOSTS, capabilities=()
                ),
            ),
        )  # fmt: skip
        for n, s in enumerate(servers)
    )
    cfg = Config(server=ServerConfig(), forgejo=ForgejoConfig(), hosts=hosts, matrix=MatrixConfig(),
                 orchestrator=OrchestratorConfig(db_path=scratch / "fleet.db"),
                 agent_types={"quick": AgentTypeConfig(name="quick", command=("true",), prompt="file")})  # fmt: skip
    with Store.open(cfg.orchestrator.db_path) as store:
        for i in range(RUNS):
            services.create_task(store, cfg.orchestrator, title=f"run {i}")
        before = [s.accepted_logins() for s in servers]
        t0 = time.perf_counter()
        report = passes.dispatch(store, cfg)
        took = time.perf_counter() - t0
        logins = [s.accepted_logins() - b for s, b in zip(servers, before, strict=True)]
        launched = sum(1 for r in report.to_json().get("launched", []) if r.get("ok"))
        assert store.check().ok
    return took, logins, launched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed passes (and references); median reported")
    args = parser.parse_args()
    from sshd import Sshd, ensure_installed

    header("SSH dispatch: 20 runs on 2 hosts")
    missing = ensure_installed()
    if missing:
        raise SystemExit(missing)
    root = Path(tempfile.mkdtemp(prefix="fleetctl-bench-ssh-"))
    servers = [Sshd.start(root / f"sshd-{n}") for n in range(HOSTS)]
    passes_s, refs_s, all_logins, launched = [], [], [], []
    try:
        bare_reference(servers)  # warm-up: host keys and code paths loaded once, as for every later pass
        for r in range(max(1, args.rounds)):
            refs_s.append(bare_reference(servers))
            scratch = root / f"round-{r}"
            scratch.mkdir()
            took, logins, n = one_pass(servers, scratch)
            passes_s.append(took)
            all_logins.append(logins)
            launched.append(n)
            print(
                f"   round {r + 1}: pass {took * 1000:7.1f} ms  reference {refs_s[-1] * 1000:7.1f} ms  "
                f"ratio {took / (FACTOR * refs_s[-1]):.2f} of budget  logins per host {logins}  launched {n}"
            )
            time.sleep(0.5)  # the `true` runs end; their wrappers have nothing to report to (no API URL)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)
    med_pass, med_ref = statistics.median(passes_s), statistics.median(refs_s)
    budget = FACTOR * med_ref
    ratio = med_pass / budget
    one_each = all(logins == [1] * HOSTS for logins in all_logins) and all(n == RUNS for n in launched)
    print(f"   pass median {med_pass * 1000:.1f} ms; reference median {med_ref * 1000:.1f} ms "
          f"(budget {FACTOR:g}× = {budget * 1000:.1f} ms); ratio {ratio:.2f}")  # fmt: skip
    result("ssh dispatch: 20 runs on 2 hosts", f"{med_pass * 1000:.0f} ms ({ratio:.2f}× budget {budget * 1000:.0f} ms)",
           f"≤ {FACTOR:g}× bare setup per host + {RUNS} exec round trips", verdict(ratio <= 1.0))  # fmt: skip
    result("ssh dispatch: connections per host", str(sorted({x for lg in all_logins for x in lg})), "1 per host",
           verdict(one_each))  # fmt: skip
    return 0 if ratio <= 1.0 and one_each else 1


if __name__ == "__main__":
    sys.exit(main())
