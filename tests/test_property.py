"""Random sequences of every write the fleet makes, against a real database; invariants after each step.

Hypothesis drives a state machine over a small pool of task and agent ids (so that operations collide:
late completions, double claims, cancels of finished tasks). The domain refuses what the state machine
forbids with a domain error; anything else — a crash, a projection that no longer replays from its
events, an agent over capacity, a gap in attempt numbers — fails the test. Each example gets a fresh
database in its own temporary directory (``tmp_path`` is per test function, not per example).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from conftest import config_of
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fleetctl import services
from fleetctl.config import OrchestratorConfig
from fleetctl.errors import Conflict, InvalidTransition, NotFound, ValidationFailed
from fleetctl.states import AgentStatus, FailureReason
from fleetctl.store import Store

#: What the services may legitimately refuse in a random sequence (LeaseLost is a Conflict).
EXPECTED = (Conflict, InvalidTransition, NotFound, ValidationFailed)

TASKS = st.sampled_from([f"t{i}" for i in range(6)])
AGENTS = st.sampled_from(["a0", "a1", "a2"])
CAPS = st.sets(st.sampled_from(["py", "rs"]))
#: Which attempt a caller names: the current one, a stale one, a future one, or none (operator).
WHICH = st.sampled_from(["current", "stale", "future", None])
MAYBE_AGENT = st.one_of(st.none(), st.just("holder"), AGENTS)


class FleetMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="fleet-prop-")
        self.orch = OrchestratorConfig(db_path=Path(self.tmp.name) / "fleet.db", retry_backoff_secs=2,
                                       retry_backoff_max_secs=8, default_max_retries=1, lease_secs=60)  # fmt: skip
        self.store = Store.open(self.orch.db_path)
        self.now = 1000.0
        self.capacity: dict[str, int] = {}  # each agent keeps the capacity it first registered with
        self.refused = Counter()

    def teardown(self) -> None:
        self.store.close()
        self.tmp.cleanup()

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now

    def attempt_and_agent(self, task_id: str, which: str | None, who: str | None) -> tuple[int | None, str | None]:
        task = self.store.task(task_id)
        current = task["attempt"] if task else 1
        attempt = {"current": current, "stale": current - 1, "future": current + 1, None: None}[which]
        if attempt is not None and attempt < 1:
            attempt = 1
        agent = (task["agent_id"] if task else None) if who == "holder" else who
        return attempt, agent

    def tolerate(self, op, *args, **kwargs):
        try:
            return op(*args, **kwargs)
        except EXPECTED as exc:
            self.refused[type(exc).__name__] += 1
            return None

    # ------------------------------------------------------------------ rules

    @initialize(fleet=st.lists(st.tuples(CAPS, st.integers(1, 3)), min_size=3, max_size=3),
                tasks=st.lists(st.tuples(CAPS, st.integers(0, 2)), min_size=4, max_size=4))  # fmt: skip
    def populate(self, fleet, tasks):
        """Start with every agent registered and a few tasks queued, so that sequences get to claims quickly."""
        for i, (caps, capacity) in enumerate(fleet):
            self.register(f"a{i}", caps, capacity)
        for i, (reqs, retries) in enumerate(tasks):
            self.create(f"t{i}", reqs, 0, retries, None)

    @rule(task_id=TASKS, reqs=CAPS, priority=st.integers(0, 2), retries=st.integers(0, 2),
          issue=st.one_of(st.none(), st.integers(1, 2)))  # fmt: skip
    def create(self, task_id, reqs, priority, retries, issue):
        labels = [f"agent:{r}" for r in sorted(reqs)] + [f"priority:{priority}", f"retries:{retries}"]
        repo = {"repo": "acme/app", "issue_number": issue} if issue else {}
        self.tolerate(services.create_task, self.store, self.orch, title=f"task {task_id}", labels=labels,
                     task_id=task_id, now=self.tick(), **repo)  # fmt: skip

    @rule(agent_id=AGENTS, caps=CAPS, capacity=st.integers(1, 3))
    def register(self, agent_id, caps, capacity):
        capacity = self.capacity.setdefault(agent_id, capacity)
        services.register_agent(self.store, agent_id, agent_type="codex-cli", capabilities=sorted(caps),
                                max_concurrency=capacity, now=self.tick())  # fmt: skip

    @rule(agent_id=AGENTS, task_id=st.one_of(st.none(), TASKS), wait=st.sampled_from([0.0, 3.0, 10.0]))
    def claim(self, agent_id, task_id, wait):
        agent = self.store.agent(agent_id)
        caps = agent["capabilities"] if agent else []
        self.store.claim(agent_id=agent_id, capabilities=caps, max_concurrency=self.capacity.get(agent_id, 1),
                         lease_secs=self.orch.lease_secs, ts=self.tick(wait), task_id=task_id)  # fmt: skip

    @precondition(lambda self: self.store.agents(status="online"))
    @rule(data=st.data())
    def claim_next(self, data):
        """An online agent asks for work after a while (past most backoffs): the common case, made likely."""
        agent = data.draw(st.sampled_from([a["agent_id"] for a in self.store.agents(status="online")]))
        self.claim(agent, None, 10.0)

    @rule(op=st.sampled_from(["start", "complete", "fail", "settle", "progress"]), task_id=TASKS, which=WHICH,
          who=MAYBE_AGENT, outcome=st.sampled_from(["success", "failure"]), with_pr=st.booleans(),
          require_pr=st.booleans(), reason=st.sampled_from(list(FailureReason)), exit_code=st.sampled_from([0, 1, None]))  # fmt: skip
    def anyone_writes(self, op, task_id, which, who, outcome, with_pr, require_pr, reason, exit_code):
        """A write about an attempt from anyone: the holder, a stale or future attempt, another agent, an operator."""
        attempt, agent = self.attempt_and_agent(task_id, which, who)
        fence = {"agent_id": agent, "attempt": attempt, "now": self.tick()}
        if op == "start":
            self.tolerate(services.start_task, self.store, task_id, **fence)
        elif op == "complete":
            receipt = {"outcome": outcome, "summary": "s",
                       "artifacts": [{"kind": "pull_request", "repo": "acme/app", "number": 5}] if with_pr else []}  # fmt: skip
            cfg = config_of(self.orch, url="http://forge.invalid" if require_pr else None)  # policy from the config
            self.tolerate(services.complete_task, self.store, cfg, task_id, receipt, **fence)
        elif op == "fail":
            self.tolerate(services.fail_attempt, self.store, self.orch, task_id, reason, "random failure", **fence)
        elif op == "progress":
            self.tolerate(services.report_progress, self.store, task_id, "working", **fence)
        else:
            self.tolerate(services.settle_run, self.store, self.orch, task_id, attempt or 1, exit_code,
                         now=fence["now"])  # fmt: skip

    @rule(task_id=TASKS)
    def cancel(self, task_id):
        self.tolerate(services.cancel_task, self.store, task_id, now=self.tick())

    @rule(task_id=TASKS)
    def retry(self, task_id):
        self.tolerate(services.retry_task, self.store, self.orch, task_id, now=self.tick())

    @rule(agent_id=AGENTS, status=st.sampled_from(list(AgentStatus)), deregister=st.booleans())
    def set_status(self, agent_id, status, deregister):
        reason = "deregistered" if deregister and status == AgentStatus.OFFLINE else "operator"
        self.tolerate(services.set_agent_status, self.store, self.orch, agent_id, status, reason, now=self.tick())

    @rule(agent_id=AGENTS)
    def heartbeat(self, agent_id):
        self.tolerate(services.heartbeat, self.store, self.orch, agent_id, now=self.tick())

    @precondition(lambda self: self.store.tasks(states=("assigned", "running")))
    @rule(data=st.data(), step=st.sampled_from(["start", "success", "pull_request", "failure", "fail", "start"]))
    def holder_acts(self, data, step):
        """The rightful holder moves its task on (the random rules above rarely hit the right fencing token)."""
        task = data.draw(st.sampled_from(self.store.tasks(states=("assigned", "running"))))
        fence = {"agent_id": task["agent_id"], "attempt": task["attempt"]}
        if step == "start":
            services.start_task(self.store, task["task_id"], **fence, now=self.tick())
        elif step == "fail":
            services.fail_attempt(self.store, self.orch, task["task_id"], data.draw(st.sampled_from(list(FailureReason))),
                                  **fence, now=self.tick())  # fmt: skip
        else:
            receipt = {"outcome": "failure" if step == "failure" else "success", "summary": step, "artifacts":
                       [{"kind": "pull_request", "number": 3}] if step == "pull_request" else []}  # fmt: skip
            services.complete_task(self.store, config_of(self.orch), task["task_id"], receipt, **fence, now=self.tick())

    @precondition(lambda self: self.store.tasks(states=("assigned", "running")))
    @rule(data=st.data())
    def sweep_one(self, data):
        """What the sweep does to a timed-out attempt (unless it moved on meanwhile)."""
        task = data.draw(st.sampled_from(self.store.tasks(states=("assigned", "running"))))
        services.expire_or_time_out(self.store, self.orch, task, FailureReason.TIMEOUT, "timed out", now=self.tick())

    # ------------------------------------------------------------------ invariants

    @invariant()
    def events_replay_to_the_stored_projections(self):
        report = self.store.check()
        assert report.ok, report.problems

    @invariant()
    def no_agent_over_capacity(self):
        for agent_id, n in self.store.running_counts().items():
            assert n <= self.capacity[agent_id], (agent_id, n)

    @invariant()
    def attempts_are_contiguous_and_only_the_live_one_is_open(self):
        for task in self.store.tasks():
            attempts = self.store.attempts(task["task_id"])
            assert [a["attempt"] for a in attempts] == list(range(1, task["attempt"] + 1)), task["task_id"]
            live = task["state"] in ("assigned", "running")
            open_ = [a["attempt"] for a in attempts if a["ended_at"] is None]
            assert open_ == ([task["attempt"]] if live else []), (task["task_id"], task["state"], open_)
            if live:
                assert task["agent_id"] == attempts[-1]["agent_id"] and task["lease_expires_at"] is not None
            if task["state"] == "queued":
                assert task["agent_id"] is None
            if task["state"] in ("awaiting_review", "completed"):
                assert task["attempt"] >= 1

    @invariant()
    def one_active_task_per_issue(self):
        active = [(t["repo"], t["issue_number"]) for t in self.store.tasks() if t["repo"]
                  and t["state"] not in ("completed", "failed", "cancelled")]  # fmt: skip
        assert len(active) == len(set(active))


FleetMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestFleet = FleetMachine.TestCase
