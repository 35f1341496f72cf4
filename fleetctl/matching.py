"""Labels into requirements and knobs, and the pure dispatch planner (SPEC §1, §8 step 2–3).

An issue label ``agent:X`` requires capability ``X``; ``priority:N``, ``retries:N`` and ``timeout:D``
(seconds or a duration such as ``30m``) set the task's knobs; every other label is metadata. A knob label
that does not parse is reported (``LabelKnobs.problems``), never silently ignored.

The planner assigns queued tasks (already sorted by priority, then age) to the least loaded capable
agent, then the longest idle one. It is pure and runs in
O(tasks · log agents) using one lazy heap per distinct requirement set, so that 10,000 tasks × 1,000
agents plans in well under the 0.5 s target (bench/bench_dispatch_plan.py).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fleetctl.durations import DURATION_HINT, parse_duration

_KNOBS = ("priority", "retries", "timeout", "review-rounds")
_INT_RE = re.compile(r"^[+-]?[0-9]{1,9}\Z")
_MAX_KNOB = 999_999_999


@dataclass(frozen=True)
class LabelKnobs:
    """What a task's labels say, beyond plain metadata.

    ``problems``: one message per knob label (``priority:``, ``retries:``, ``timeout:``) whose value does
    not parse, or knob labels that disagree; such a knob keeps its default. ``warnings``: labels that look
    like a mistyped requirement or knob (one edit away), which are otherwise plain metadata.
    """

    requirements: tuple[str, ...]
    priority: int = 0
    max_retries: int | None = None
    max_review_rounds: int | None = None  # label review-rounds:N (None: orchestrator.max_review_rounds)
    timeout_secs: int | float | None = None
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def _knob_value(name: str, raw: str) -> tuple[int | float | None, str | None]:
    """(value, None) when ``raw`` is a valid value of knob ``name``, else (None, what is expected)."""
    if name == "timeout":
        secs = parse_duration(raw)
        if secs is None or secs <= 0 or secs > _MAX_KNOB:
            return None, f"timeout must be greater than 0, in {DURATION_HINT}"
        return secs, None
    n = int(raw) if _INT_RE.match(raw) else None
    if name in ("retries", "review-rounds"):
        if n is None or n < 0:
            return None, f"{name} must be a whole number ≥ 0 (at most {_MAX_KNOB})"
        return n, None
    if n is None:
        return None, f"priority must be a whole number from -{_MAX_KNOB} to {_MAX_KNOB} (higher runs first)"
    return n, None


def _one_edit(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` differ by exactly one insertion, deletion, substitution or swap of neighbours."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k in range(len(short)) if short[k] != long_[k]), len(short))
    return short[i:] == long_[i + 1 :]


def _near(label: str, prefix: str) -> str | None:
    """``prefix`` + the rest of ``label`` when the label starts one edit away from ``prefix``, else None.

    The mistyped start must end like the prefix does (a separator such as ``:`` when it ends with one),
    so ``agnet:x``, ``agent-x``, ``agen:x`` and ``Agent:x`` are near ``agent:`` but ``agents`` is not.
    """
    if not prefix or label.startswith(prefix):
        return None
    sep_end = not prefix[-1].isalnum()
    for size in (len(prefix), len(prefix) - 1, len(prefix) + 1):
        if size <= 0 or size >= len(label):
            continue
        start = label[:size]
        if sep_end and start[-1].isalnum():
            continue
        if _one_edit(start, prefix):
            return prefix + label[size:]
    return None


def parse_labels(labels: Iterable[str], prefix: str = "agent:") -> LabelKnobs:
    """Requirements (sorted, unique), knobs, and the problems and warnings found in a task's labels.

    A label ``<prefix>X`` requires capability ``X``; ``priority:N`` (whole number, higher first),
    ``retries:N`` (whole number >= 0) and ``timeout:D`` (seconds or a duration: ``90s``, ``30m``, ``2h``,
    ``1h30m``) are knobs; every other label is metadata. A knob label whose value does not parse (or two
    that disagree) is reported in ``problems`` and leaves that knob at its default.

    Example: ``parse_labels(["agent:code:rust", "priority:5", "bug"])`` requires ``code:rust`` at priority 5.
    """
    reqs: set[str] = set()
    knobs: dict[str, tuple[int | float, str]] = {}
    bad: set[str] = set()
    problems: list[str] = []
    warnings: list[str] = []
    for raw in labels:
        label = raw.strip()
        if prefix and label.startswith(prefix):
            if len(label) > len(prefix):
                reqs.add(label[len(prefix) :])
            else:
                warnings.append(f"label {label!r} names no capability; it requires nothing")
            continue
        name, colon, value = label.partition(":")
        if colon and name in _KNOBS:
            parsed, expected = _knob_value(name, value.strip())
            if expected is not None:
                problems.append(f"label {label!r}: {expected}")
                bad.add(name)
            elif name in knobs and knobs[name][0] != parsed:
                problems.append(f"labels {knobs[name][1]!r} and {label!r} disagree: keep one {name}: label")
                bad.add(name)
            else:
                knobs.setdefault(name, (parsed, label))
            continue
        suggestion = _near(label, prefix)
        if suggestion is not None:
            warnings.append(
                f"label {label!r} looks like a requirement; did you mean {suggestion!r}? "
                "Without it any agent may take the task"
            )
            continue
        for knob in _KNOBS:
            suggestion = _near(label, knob + ":")
            # only when the suggestion would be a valid knob: `priority/high` (a scoped label) is metadata
            if suggestion is not None and _knob_value(knob, suggestion[len(knob) + 1 :].strip())[1] is None:
                warnings.append(f"label {label!r} looks like a knob; did you mean {suggestion!r}? It is ignored")
                break
    value = {name: v for name, (v, _label) in knobs.items() if name not in bad}
    return LabelKnobs(
        requirements=tuple(sorted(reqs)),
        priority=value.get("priority", 0),
        max_retries=value.get("retries"),
        timeout_secs=value.get("timeout"),
        max_review_rounds=value.get("review-rounds"),
        problems=tuple(problems),
        warnings=tuple(warnings),
    )


def covers(capabilities: Iterable[str], requirements: Iterable[str]) -> bool:
    """True when an agent with ``capabilities`` can run a task needing ``requirements``."""
    return set(requirements) <= set(capabilities)


@dataclass
class AgentSlot:
    """An agent as the planner sees it."""

    agent_id: str
    capabilities: frozenset[str]
    max_concurrency: int
    running: int = 0
    idle_since: float = 0.0  # smaller = idle for longer
    version: int = field(default=0, compare=False)

    @property
    def free(self) -> int:
        return self.max_concurrency - self.running

    def key(self) -> tuple[float, float, str]:
        return (self.running / self.max_concurrency, self.idle_since, self.agent_id)


@dataclass(frozen=True)
class QueuedTask:
    """A queued task as the planner sees it (callers pass them sorted by priority desc, then age)."""

    task_id: str
    requirements: tuple[str, ...]
    group: str | None = None  # the repository (lower-cased) whose cap the task counts against, if any


def plan(tasks: Sequence[QueuedTask], agents: Iterable[AgentSlot], now: float = 0.0,
         room: dict[str, int] | None = None) -> list[tuple[str, str]]:  # fmt: skip
    """Pairs ``(task_id, agent_id)`` in dispatch order. Mutates the slots' ``running`` counts.

    ``room``: how many more tasks each group (a repository with a ``max_active_per_repo`` cap) may start; a task
    of a group without room is passed over (the next one of another group gets the slot), and each pair uses
    one. Groups not in ``room`` are unlimited. Mutated.
    """
    slots = [a for a in agents if a.max_concurrency > 0]
    free_total = sum(max(0, a.free) for a in slots)
    heaps: dict[tuple[str, ...], list] = {}
    members: dict[str, list[tuple[str, ...]]] = {a.agent_id: [] for a in slots}
    out: list[tuple[str, str]] = []

    def heap_for(reqs: tuple[str, ...]) -> list:
        heap = heaps.get(reqs)
        if heap is None:
            need = set(reqs)
            heap = []
            for a in slots:
                if need <= a.capabilities:
                    members[a.agent_id].append(reqs)
                    if a.free > 0:
                        heap.append((a.key(), a.version, a))
            heapq.heapify(heap)
            heaps[reqs] = heap
        return heap

    for task in tasks:
        if free_total <= 0:
            break
        if room is not None and task.group is not None and room.get(task.group, 1) <= 0:
            continue
        heap = heap_for(task.requirements)
        while heap:
            _, version, slot = heapq.heappop(heap)
            if version == slot.version and slot.free > 0:
                break
        else:
            continue
        out.append((task.task_id, slot.agent_id))
        if room is not None and task.group in room:
            room[task.group] -= 1
        slot.running += 1
        slot.idle_since = now
        slot.version += 1
        free_total -= 1
        if slot.free > 0:
            entry = (slot.key(), slot.version, slot)
            for reqs in members[slot.agent_id]:
                heapq.heappush(heaps[reqs], entry)
    return out
