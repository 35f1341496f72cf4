"""Bounded, uniform input (issue 6): a receipt is read at most up to the API's body cap, and refused by the
API's rules whether it comes from a file, from stdin or over HTTP — one function reads them all
(``fleetctl.gateway.read_receipt`` / ``parse_json_object``)."""

from __future__ import annotations

import os
import subprocess

import pytest

from fleetctl.errors import UsageError
from fleetctl.gateway import parse_json_object, read_capped, read_receipt


@pytest.fixture
def held(fleet):
    """A fleet whose task is claimed by agent ``puller``: (fleet, task id)."""
    fleet.configure(orchestrator={"db_path": "fleet.db"}, forgejo=None)
    assert fleet.run("agent", "register", "puller", "--type", "x").returncode == 0
    task_id = fleet.create("--title", "Fix the parser")
    fleet.claim(task_id, "puller")
    return fleet, task_id


def complete(fleet, task_id: str, source: str, data: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["fleetctl", "task", "complete", task_id, "--attempt", "1", "--agent", "puller",
                           "--receipt", source], input=data, capture_output=True, env=fleet.env(), cwd=fleet.dir,
                          timeout=60)  # fmt: skip


def assert_refused(fleet, task_id: str, done: subprocess.CompletedProcess, *needles: str) -> None:
    before = len(fleet.events(task_id))
    stderr = done.stderr.decode()
    assert done.returncode == 2, (done.returncode, stderr)
    assert done.stdout == b"" and stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr
    assert "Traceback" not in stderr and "MemoryError" not in stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    assert fleet.task(task_id)["state"] == "assigned" and len(fleet.events(task_id)) == before


def test_receipt_from_dev_zero_is_refused_at_the_body_cap(held):
    """Regression: --receipt /dev/zero read until memory ran out."""
    fleet, task_id = held
    assert_refused(fleet, task_id, complete(fleet, task_id, "/dev/zero"), "larger than 1048576 bytes",
                   "server.max_body_bytes")  # fmt: skip


def test_receipt_on_stdin_past_the_cap_is_refused(held):
    fleet, task_id = held
    big = b'{"summary": "' + b"x" * (1 << 20) + b'"}'
    assert_refused(fleet, task_id, complete(fleet, task_id, "-", big), "larger than 1048576 bytes")


def test_receipt_cap_follows_server_max_body_bytes(fleet):
    fleet.configure()
    text = fleet.config.read_text() + "\n[server]\nmax_body_bytes = 100\n"
    fleet.config.write_text(text)
    assert fleet.run("agent", "register", "puller", "--type", "x").returncode == 0
    task_id = fleet.create("--title", "Fix the parser")
    fleet.claim(task_id, "puller")
    (fleet.dir / "big.json").write_text('{"summary": "' + "x" * 200 + '"}')
    assert_refused(fleet, task_id, complete(fleet, task_id, "big.json"), "big.json is larger than 100 bytes")
    (fleet.dir / "ok.json").write_text('{"summary": "done"}')
    done = complete(fleet, task_id, "ok.json")
    assert done.returncode == 0, done.stderr
    assert fleet.task(task_id)["state"] == "completed"


def test_huge_sparse_receipt_file_is_refused_without_reading_it(held):
    fleet, task_id = held
    path = fleet.dir / "sparse.json"
    with open(path, "wb") as fh:
        fh.truncate(1 << 34)  # 16 GiB of nothing, on no disk
    assert_refused(fleet, task_id, complete(fleet, task_id, str(path)), "larger than 1048576 bytes")


@pytest.mark.parametrize(
    "raw,needle",
    [
        (b'{"summary": "caf\xe9"}', "not valid UTF-8"),
        (b'{"summary": "\\ud800"}', "lone surrogate"),
        (b'{"summary": "x", "n": 99999999999999999999999}', "out of range"),
        (b'{"summary": NaN}', "NaN is not allowed"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
    ],
)
def test_bad_receipt_bytes_are_refused_the_same_from_stdin_and_a_file(held, raw, needle):
    """Regression: invalid UTF-8 on stdin for --receipt - was stored as lone surrogates."""
    fleet, task_id = held
    assert_refused(fleet, task_id, complete(fleet, task_id, "-", raw), needle)
    (fleet.dir / "r.json").write_bytes(raw)
    assert_refused(fleet, task_id, complete(fleet, task_id, "r.json"), needle)


def test_missing_or_directory_receipt_is_a_usage_error(held):
    fleet, task_id = held
    assert_refused(fleet, task_id, complete(fleet, task_id, "nope.json"), "cannot read receipt nope.json")
    assert_refused(fleet, task_id, complete(fleet, task_id, str(fleet.dir)), "is a directory")


def test_a_good_receipt_from_stdin_is_handed_in(held):
    fleet, task_id = held
    done = complete(fleet, task_id, "-", '{"summary": "caf\u00e9 fixed"}'.encode())
    assert done.returncode == 0, done.stderr
    assert fleet.attempts(task_id)[0]["receipt"]["summary"] == "caf\u00e9 fixed"


def test_read_capped_reads_at_most_cap_plus_one_bytes(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"yes > {fifo}"], stderr=subprocess.DEVNULL)
    try:
        with pytest.raises(UsageError, match="larger than 10 bytes"):
            read_capped(str(fifo), 10)
    finally:
        writer.kill()
        writer.wait()


def test_parse_json_object_takes_what_the_api_takes():
    assert parse_json_object(b'{"a": [1, 2.5, "\\u00e9"], "b": -9223372036854775808}') == {
        "a": [1, 2.5, "\u00e9"], "b": -(2**63),
    }  # fmt: skip
    with pytest.raises(UsageError, match="out of range"):
        parse_json_object(b'{"b": 9223372036854775808}')
    with pytest.raises(UsageError, match="Infinity is not allowed"):
        parse_json_object(b'{"b": Infinity}')


def test_read_receipt_from_a_stream():
    import io

    assert read_receipt("-", 100, stdin=io.BytesIO(b'{"outcome": "failure"}')) == {"outcome": "failure"}
