"""Labels into requirements and knobs; the dispatch planner, against a naive reference and at scale."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetctl.matching import AgentSlot, LabelKnobs, QueuedTask, covers, parse_labels, plan

# ---------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([], LabelKnobs(())),
        (["agent:code:rust", "priority:5", "bug"], LabelKnobs(("code:rust",), priority=5)),
        (["agent:b", "agent:a", "agent:b"], LabelKnobs(("a", "b"))),  # sorted, unique
        ([" agent:python ", " priority:2"], LabelKnobs(("python",), priority=2)),  # stripped
        (["priority:-3"], LabelKnobs((), priority=-3)),
        (["priority:+3", "priority: 3"], LabelKnobs((), priority=3)),  # the same value twice is no conflict
        (["retries:4", "timeout:900"], LabelKnobs((), max_retries=4, timeout_secs=900)),
        (["retries:0"], LabelKnobs((), max_retries=0)),
        (["retries:2 ", "kind/bug"], LabelKnobs((), max_retries=2)),
        # durations with units (issue 6: timeout:30m meant 30 minutes and was ignored)
        (["timeout:30m"], LabelKnobs((), timeout_secs=1800)),
        (["timeout:90s"], LabelKnobs((), timeout_secs=90)),
        (["timeout:2h"], LabelKnobs((), timeout_secs=7200)),
        (["timeout:1h30m"], LabelKnobs((), timeout_secs=5400)),
        (["timeout:1.5h"], LabelKnobs((), timeout_secs=5400)),
        (["timeout:2.5"], LabelKnobs((), timeout_secs=2.5)),
        (["timeout:1d"], LabelKnobs((), timeout_secs=86400)),
        (["timeout:60", "timeout:1m"], LabelKnobs((), timeout_secs=60)),  # equal values agree
        # metadata: not knobs, no problems
        (["Priority:3", "priority", "help wanted", "agents", "agentic", "kind/bug", "timeouts"], None),
    ],
)
def test_parse_labels(labels, expected):
    got = parse_labels(labels)
    if expected is None:  # metadata only; warnings allowed (Priority:3 is a near miss), no knobs, no problems
        assert (got.requirements, got.priority, got.max_retries, got.timeout_secs, got.problems) == (
            (),
            0,
            None,
            None,
            (),
        )
    else:
        assert got == expected


# every knob label that does not parse is a problem naming the label and what is expected; the knob keeps its
# default (issue 6: these were silently ignored)
PROBLEMS = [
    ("timeout:0", "label 'timeout:0': timeout must be greater than 0"),
    ("timeout:-5", "label 'timeout:-5': timeout must be greater than 0"),
    ("timeout:30 min", "label 'timeout:30 min': timeout must be greater than 0, in seconds (900) or a duration"),
    ("timeout:1e3", "label 'timeout:1e3': timeout must"),
    ("timeout:30M", "label 'timeout:30M': timeout must"),
    ("timeout:30m1h", "label 'timeout:30m1h': timeout must"),
    ("timeout:", "label 'timeout:': timeout must"),
    ("retries:-1", "label 'retries:-1': retries must be a whole number ≥ 0"),
    ("retries:x", "label 'retries:x': retries must be a whole number ≥ 0"),
    ("retries:1.5", "label 'retries:1.5': retries must be a whole number ≥ 0"),
    ("retries:٣", "label 'retries:٣': retries must be a whole number ≥ 0"),  # ASCII digits only
    ("retries:1234567890", "label 'retries:1234567890': retries must be a whole number ≥ 0 (at most 999999999)"),
    ("priority:abc", "label 'priority:abc': priority must be a whole number from -999999999 to 999999999"),
    ("priority:high", "label 'priority:high': priority must be a whole number"),
    ("priority:1.5", "label 'priority:1.5': priority must be a whole number"),
    ("priority:", "label 'priority:': priority must be a whole number"),
    ("priority:3:extra", "label 'priority:3:extra': priority must be a whole number"),
    ("priority:1234567890", "label 'priority:1234567890': priority must be a whole number"),
]


@pytest.mark.parametrize(("label", "message"), PROBLEMS, ids=[p[0] for p in PROBLEMS])
def test_knob_labels_that_do_not_parse_are_problems(label, message):
    got = parse_labels(["agent:docs", label, "bug"])
    assert len(got.problems) == 1 and got.problems[0].startswith(message), got.problems
    assert (got.requirements, got.priority, got.max_retries, got.timeout_secs) == (("docs",), 0, None, None)
    assert got.warnings == ()


def test_knob_labels_that_disagree_are_a_problem_and_keep_the_default():
    got = parse_labels(["priority:1", "priority:5", "timeout:1m", "timeout:2m", "retries:3"])
    assert got.problems == (
        "labels 'priority:1' and 'priority:5' disagree: keep one priority: label",
        "labels 'timeout:1m' and 'timeout:2m' disagree: keep one timeout: label",
    )
    assert (got.priority, got.timeout_secs, got.max_retries) == (0, None, 3)


def test_each_bad_knob_label_is_reported_once():
    got = parse_labels(["timeout:30m", "retries:-1", "priority:abc", "timeout:0"])
    assert [p.split(":", 1)[0] for p in got.problems] == ["label 'retries", "label 'priority", "label 'timeout"]
    assert len(got.problems) == 3


WARNINGS = [
    # (label, the label suggested); prefix agent:
    ("agnet:code:rust", "agent:code:rust"),  # swapped letters
    ("agent-code:rust", "agent:code:rust"),  # wrong separator
    ("agent/code", "agent:code"),
    ("agen:docs", "agent:docs"),  # a letter missing
    ("agentt:docs", "agent:docs"),  # a letter too many
    ("Agent:docs", "agent:docs"),
    ("agemt:docs", "agent:docs"),
]


@pytest.mark.parametrize(("label", "suggestion"), WARNINGS, ids=[w[0] for w in WARNINGS])
def test_a_label_one_edit_from_the_prefix_gets_a_did_you_mean(label, suggestion):
    got = parse_labels([label, "priority:2"])
    assert got.warnings == (
        f"label {label!r} looks like a requirement; did you mean {suggestion!r}? Without it any agent may take the task",
    )
    assert got.requirements == () and got.problems == () and got.priority == 2


@pytest.mark.parametrize(
    "label",
    ["agents", "agentic", "agent", "age:x", "magenta", "urgent:fix", "bug", "kind/agent:x", "reagent:x",
     "priority/high", "Priority:High", "timeouts", "retry:later"],
)  # fmt: skip
def test_labels_further_away_get_no_warning(label):
    assert parse_labels([label]).warnings == ()


def test_near_miss_knobs_and_empty_requirements_are_warned():
    got = parse_labels(["priorty:5", "Timeout:30m", "agent:"])
    assert got.warnings == (
        "label 'priorty:5' looks like a knob; did you mean 'priority:5'? It is ignored",
        "label 'Timeout:30m' looks like a knob; did you mean 'timeout:30m'? It is ignored",
        "label 'agent:' names no capability; it requires nothing",
    )
    assert (got.priority, got.timeout_secs, got.problems) == (0, None, ())


def test_did_you_mean_follows_the_configured_prefix():
    assert (
        parse_labels(["neds/gpu"], prefix="needs/")
        .warnings[0]
        .endswith("did you mean 'needs/gpu'? Without it any agent may take the task")
    )
    assert parse_labels(["neds/gpu", "agnet:x"], prefix="").warnings == ()  # no prefix: nothing is near it


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("agentpriotsm:-/0123456789.h ")), max_size=16), max_size=6))
def test_parse_labels_never_raises_and_problems_name_their_label(labels):
    got = parse_labels(labels)
    stripped = [label.strip() for label in labels]
    for problem in got.problems:
        assert any(repr(label) in problem for label in stripped), problem
    assert got.timeout_secs is None or got.timeout_secs > 0
    assert got.max_retries is None or got.max_retries >= 0


def test_parse_labels_prefix_is_configurable():
    labels = ["needs/gpu", "agent:code", "needs/", "priority:1"]
    assert parse_labels(labels, prefix="needs/") == LabelKnobs(
        ("gpu",), priority=1, warnings=("label 'needs/' names no capability; it requires nothing",)
    )
    assert parse_labels(labels) == LabelKnobs(("code",), priority=1)
    assert parse_labels(labels, prefix="") == LabelKnobs((), priority=1)  # no prefix: nothing is a requirement


def test_parse_labels_takes_any_iterable():
    assert parse_labels(iter(("agent:x",))).requirements == ("x",)


def test_covers():
    assert covers({"a", "b"}, ["a"])
    assert covers(["a"], [])
    assert not covers(["a"], ["a", "b"])
    assert not covers([], ["a"])


# ---------------------------------------------------------------------------------------------- planner


def slot(agent_id, caps=(), max_concurrency=1, running=0, idle_since=0.0):
    return AgentSlot(agent_id, frozenset(caps), max_concurrency, running, idle_since)


def task(task_id, *reqs):
    return QueuedTask(task_id, tuple(sorted(reqs)))


def test_least_loaded_first():
    agents = [slot("busy", max_concurrency=4, running=1), slot("free", max_concurrency=4)]
    assert plan([task("t1")], agents) == [("t1", "free")]


def test_load_is_relative_to_capacity():
    # 1 of 4 (25 %) is less loaded than 1 of 2 (50 %), though both run one task
    agents = [slot("half", max_concurrency=2, running=1), slot("quarter", max_concurrency=4, running=1)]
    assert plan([task("t1")], agents) == [("t1", "quarter")]


def test_then_longest_idle():
    agents = [slot("recent", idle_since=50.0), slot("old", idle_since=10.0), slot("middle", idle_since=20.0)]
    assert plan([task("t1"), task("t2"), task("t3")], agents) == [("t1", "old"), ("t2", "middle"), ("t3", "recent")]


def test_spreads_load_before_stacking():
    agents = [slot("a", max_concurrency=2), slot("b", max_concurrency=2)]
    pairs = plan([task(f"t{i}") for i in range(4)], agents, now=100.0)
    assert [a for _, a in pairs] == ["a", "b", "a", "b"]
    assert all(s.running == 2 and s.idle_since == 100.0 for s in agents)


def test_capability_coverage():
    agents = [slot("py", {"python"}, 5), slot("rs", {"rust"}, 5), slot("both", {"python", "rust", "gpu"}, 5)]
    pairs = dict(plan([task("t-py", "python"), task("t-both", "python", "rust"), task("t-gpu", "gpu")], agents))
    assert pairs["t-both"] == "both" and pairs["t-gpu"] == "both"
    assert pairs["t-py"] in {"py", "both"}


def test_tasks_with_no_capable_agent_are_skipped_not_blocking():
    agents = [slot("py", {"python"}, 2)]
    pairs = plan([task("t-rust", "rust"), task("t-py", "python"), task("t-gpu", "gpu"), task("t-py2", "python")],
                 agents)  # fmt: skip
    assert pairs == [("t-py", "py"), ("t-py2", "py")]


def test_priority_order_respected_when_capacity_is_short():
    tasks = [task("high"), task("mid"), task("low")]  # callers pass them sorted by priority, then age
    assert plan(tasks, [slot("a")]) == [("high", "a")]
    assert [t for t, _ in plan(tasks, [slot("a", max_concurrency=2)])] == ["high", "mid"]


def test_capacity_never_exceeded_and_full_or_disabled_agents_get_nothing():
    agents = [slot("full", max_concurrency=2, running=2), slot("over", max_concurrency=1, running=3),
              slot("zero", max_concurrency=0), slot("one", max_concurrency=1)]  # fmt: skip
    assert plan([task(f"t{i}") for i in range(5)], agents) == [("t0", "one")]
    assert plan([task("t9")], agents) == []


def test_empty_inputs():
    assert plan([], [slot("a")]) == []
    assert plan([task("t1")], []) == []


def naive_plan(tasks, agents, now=0.0):
    """The planner's contract, written the obvious O(tasks × agents) way."""
    out = []
    for t in tasks:
        fits = [a for a in agents if a.max_concurrency > 0 and a.free > 0 and set(t.requirements) <= a.capabilities]
        if fits:
            best = min(fits, key=lambda a: a.key())
            out.append((t.task_id, best.agent_id))
            best.running += 1
            best.idle_since = now
    return out


CAPS = ["a", "b", "c", "d"]


@st.composite
def fleets(draw):
    n_agents = draw(st.integers(0, 8))
    agents = [
        (f"ag{i}", frozenset(draw(st.sets(st.sampled_from(CAPS)))), draw(st.integers(0, 4)),
         draw(st.integers(0, 5)), float(draw(st.integers(0, 3))))
        for i in range(n_agents)
    ]  # fmt: skip
    tasks = [
        QueuedTask(f"t{i}", tuple(sorted(draw(st.sets(st.sampled_from(CAPS), max_size=2)))))
        for i in range(draw(st.integers(0, 30)))
    ]
    return agents, tasks


@settings(max_examples=150, deadline=None)
@given(fleets())
def test_plan_matches_the_naive_reference(fleet):
    agents, tasks = fleet
    fast = [AgentSlot(*a) for a in agents]
    slow = [AgentSlot(*a) for a in agents]
    before = {a.agent_id: (a.running, a.max_concurrency) for a in fast}
    pairs = plan(tasks, fast, now=9.0)
    assert pairs == naive_plan(tasks, slow, now=9.0)
    caps = {a.agent_id: a.capabilities for a in fast}
    reqs = {t.task_id: set(t.requirements) for t in tasks}
    assigned = Counter(a for _, a in pairs)
    for agent_id, n in assigned.items():
        running, max_c = before[agent_id]
        assert running + n <= max_c  # never over capacity
    assert len({t for t, _ in pairs}) == len(pairs)  # each task at most once
    assert all(reqs[t] <= caps[a] for t, a in pairs)
    order = [t.task_id for t in tasks]
    assert [t for t, _ in pairs] == sorted((t for t, _ in pairs), key=order.index)


def test_scales_to_10k_tasks_and_1k_agents():
    """SPEC §11 sizes (the timing target is bench/'s job, not a test's): completes and stays correct."""
    rng = random.Random(7)
    caps = [f"cap{i}" for i in range(12)]
    agents = [
        slot(f"ag{i:04d}", rng.sample(caps, rng.randint(1, 6)) + (["gpu"] if i < 3 else []), rng.randint(1, 24),
             0, rng.random() * 100)
        for i in range(1000)
    ]  # fmt: skip
    tasks = [task(f"t{i:05d}", *rng.sample(caps, rng.randint(0, 2)), *(["gpu"] if i % 20 == 0 else []))
             for i in range(10_000)]  # fmt: skip
    capacity = {a.agent_id: a.max_concurrency for a in agents}
    agent_caps = {a.agent_id: a.capabilities for a in agents}
    reqs = {t.task_id: set(t.requirements) for t in tasks}
    pairs = plan(tasks, agents, now=1000.0)
    assigned = dict(pairs)
    assert len(assigned) == len(pairs) > 5000
    per_agent = Counter(assigned.values())
    assert all(per_agent[a] <= capacity[a] for a in per_agent)
    assert all(reqs[t] <= agent_caps[a] for t, a in pairs)
    # capacity is left over, yet every task left over really had no capable agent with room
    free = [a for a in agents if a.free > 0]
    left = {t.requirements for t in tasks if t.task_id not in assigned}
    assert free and left
    assert not any(set(r) <= a.capabilities for r in left for a in free)
