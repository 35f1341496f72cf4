"""Store.check at scale (SPEC §11 ``db check`` ≤ 30 s): the shortcuts it takes must not change its verdicts.

No timing here; bench/bench_store.py times it on 1,000,000 events.
"""

from __future__ import annotations

import gc
import json

import pytest

from fleetctl import services
from fleetctl.store import _loads


def _fill(store, orch):
    t = services.create_task(store, orch, title="one", labels=["agent:py"], now=1.0)
    services.register_agent(store, "a1", agent_type="x", capabilities=["py"], now=1.0)
    store.claim(agent_id="a1", capabilities=["py"], max_concurrency=1, lease_secs=60, ts=2.0)
    services.report_progress(store, t["task_id"], "halfway", now=3.0)
    return t["task_id"]


@pytest.mark.parametrize(
    "text",
    ['{"a":1}', "{}", "[]", '"s"', "1.5", "NaN", " {}", "{} ", '{"a":1}x', "", "{", '{"a":"\\ud800"}', '{"a":1e400}'],
)
def test_loads_agrees_with_json_loads(text):
    try:
        expected = ("ok", json.loads(text))
    except ValueError as exc:
        expected = ("error", type(exc))
    try:
        got = ("ok", _loads(text))
    except ValueError as exc:
        got = ("error", type(exc))
    assert repr(got) == repr(expected)


def test_check_reports_undecodable_event_data_and_restores_gc(store, orch):
    task_id = _fill(store, orch)
    assert store.check().ok
    store.execute("UPDATE events SET data = '{not json' WHERE type = 'task.progress'")
    assert gc.isenabled()
    report = store.check()
    assert gc.isenabled()
    assert not report.ok
    assert any("task.progress" in p and "not valid JSON" in p for p in report.problems), report.problems
    assert store.task(task_id)["state"] == "assigned"


def test_check_still_diffs_rows_column_by_column(store, orch):
    task_id = _fill(store, orch)
    store.execute("UPDATE tasks SET title = 'two', priority = 3 WHERE task_id = ?", (task_id,))
    problems = store.check().problems
    assert problems == [f"tasks {task_id}: priority: replayed 0 != stored 3, title: replayed 'one' != stored 'two'"]
