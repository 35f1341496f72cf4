"""Receipts checked against Forgejo (SPEC §7.4): the verdict on the pull requests a receipt names.

The check is a read of Forgejo, so it never runs inside a write transaction: a caller first computes the
verdict (``prepare_receipt``: a short read of the task, then Forgejo), then writes once with it
(``runs.hand_in_receipt(…, verdict=…)``). The CLI (``LocalGateway.complete``), the server's ``complete``
and the passes (``validate_pending``, ``settle_ended_run``) all go through these functions, so no two
paths can disagree about a receipt.

Forgejo unreachable (network error, timeout, 5xx/429 after the client's retries, or any other Forgejo
error that is not the agent's fault) is not a refusal: the verdict says ``unreachable`` and the receipt is
stored as pending until a later pass can ask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fleetctl.config import Config
from fleetctl.errors import FleetError, LeaseLost, UsageError
from fleetctl.log import log
from fleetctl.receipts import RATE_LIMITED_EXIT, Receipt, parse_receipt
from fleetctl.services._common import MAX_MESSAGE, check_text, get_task, now_or
from fleetctl.states import ACTIVE
from fleetctl.store import Store

if TYPE_CHECKING:
    from fleetctl.forgejo.client import ForgejoClient

_HEX = re.compile(r"[0-9a-f]{7,64}")


@dataclass(frozen=True)
class Verdict:
    """Forgejo's answer about a receipt: accepted (``ok``, with the pull request to keep), refused (``reason``),
    or not known because Forgejo could not be asked (``unreachable``)."""

    ok: bool
    reason: str | None = None
    pull_request: dict | None = None
    unreachable: bool = False

    @classmethod
    def refused(cls, reason: str) -> Verdict:
        return cls(False, reason)

    @classmethod
    def down(cls, why: str) -> Verdict:
        return cls(False, f"Forgejo could not be asked: {why}", unreachable=True)


# ---------------------------------------------------------------------------------------------- the rules


def checks_forgejo(cfg: Config, task: dict) -> bool:
    """Whether receipts of ``task`` are checked against Forgejo: it has a repository and Forgejo is configured."""
    return bool(cfg.forgejo.url) and bool(task.get("repo"))


def branch_of(task_id: str) -> str:
    """The branch an agent works on for ``task_id`` (the prompt tells it so)."""
    return f"fleet/{task_id}"


def _pull(pr: dict):
    """Forgejo's pull request object as the mapping's ``Pull`` (one reading of a pull request everywhere)."""
    from fleetctl.forgejo.webhooks import pull_from

    return pull_from(pr)


def references_task(pr: dict, task: dict) -> bool:
    """Whether ``pr`` is the task's (``forgejo.mapping.references_task``: its head branch is ``fleet/<task-id>``
    in the task's repository, or its title or body says ``Closes|Fixes|Resolves #N`` for the task's issue)."""
    from fleetctl.forgejo import mapping
    from fleetctl.forgejo.webhooks import BadPayload

    try:
        return mapping.references_task(_pull(pr), task)
    except BadPayload:
        return False


def pull_request_record(repo: str, pr: dict) -> dict:
    """What the task keeps of an accepted pull request (its ``pull_request`` field), as the webhooks keep it."""
    return _pull(pr).link(repo)


def _pr_problem(task: dict, named: dict, pr: dict | None) -> str | None:
    """Why the pull request ``named`` in a receipt (Forgejo's answer: ``pr``) does not fit ``task``, or None."""
    where = f"{task['repo']}#{named['number']}"
    if pr is None:
        return f"{where} is not a pull request (a plain issue or no such number)"
    if pr.get("state") != "open" and not pr.get("merged"):
        return f"pull request {where} is closed without being merged"
    if not references_task(pr, task):
        issue = f" nor says Closes #{task['issue_number']}" if task.get("issue_number") else ""
        return f"pull request {where} does not reference task {task['task_id']}: its head branch is not " \
               f"{branch_of(task['task_id'])}{issue}"  # fmt: skip
    return None


def _commit_problem(receipt: Receipt, heads: list[str]) -> str | None:
    """Why a ``commit`` artifact is not the head of a named pull request, or None."""
    for art in receipt.artifacts:
        if art["kind"] != "commit":
            continue
        sha = art["sha"].lower()
        if not _HEX.fullmatch(sha) or not any(h and h.lower().startswith(sha) for h in heads):
            return f"commit {sha} is not the head of the pull request ({', '.join(h[:12] for h in heads if h)})"
    return None


def validate(task: dict, receipt: Receipt, cfg: Config, client: ForgejoClient | None) -> Verdict:
    """The verdict on a success ``receipt`` for ``task`` (SPEC §7.4): every named pull request is in the task's
    repository, is a pull request, is open or merged and references the task; a ``commit`` is its head. With
    ``require_pull_request`` a receipt naming none is refused. Without Forgejo (or a repository) only the
    face checks apply. The pull request kept is the first open one named (else the first)."""
    from fleetctl.forgejo.client import ForgejoError
    from fleetctl.services.runs import _receipt_problem, requires_pull_request

    problem = _receipt_problem(task, receipt, requires_pull_request(cfg, task))
    if problem:
        return Verdict.refused(problem)
    named = receipt.pull_requests()
    if not named or not checks_forgejo(cfg, task) or client is None:
        return Verdict(True)
    found = []
    try:
        for item in named:
            pr = client.get_pull(task["repo"], item["number"])
            if problem := _pr_problem(task, item, pr):
                return Verdict.refused(problem)
            found.append(pr)
    except ForgejoError as exc:  # not the agent's fault: ask again later
        return Verdict.down(exc.message)
    if problem := _commit_problem(receipt, [(p.get("head") or {}).get("sha") or "" for p in found]):
        return Verdict.refused(problem)
    kept = next((p for p in found if p.get("state") == "open"), found[0])
    return Verdict(True, pull_request=pull_request_record(task["repo"], kept))


# ---------------------------------------------------------------------------------------------- callers


def make_client(cfg: Config) -> ForgejoClient:
    """A Forgejo client from the configuration (``forgejo.client_for``)."""
    from fleetctl.forgejo.client import client_for

    return client_for(cfg.forgejo)


def _asks_forgejo(store: Store, cfg: Config, task: dict, receipt: Receipt, attempt: int | None) -> bool:
    """Whether handing in ``receipt`` now needs Forgejo's word: a success naming a pull request, for a Forgejo
    task whose attempt could still take it (a late write or a repeat of a settled receipt needs none)."""
    if receipt.outcome != "success" or not receipt.pull_requests() or not checks_forgejo(cfg, task):
        return False
    n = attempt if attempt is not None else task["attempt"]
    if task["state"] not in ACTIVE or task["attempt"] != n:
        return False
    prior = store.attempt(task["task_id"], n)
    return not (prior and prior["receipt"] == receipt.to_json() and not prior["receipt_pending"])


def prepare_receipt(store: Store, cfg: Config, task_id: str, doc: Any, *, attempt: int | None = None,
                    client: ForgejoClient | None = None) -> tuple[Receipt, Verdict | None]:  # fmt: skip
    """Parse ``doc`` and compute its verdict: a short read of the task (no write lock), then Forgejo — only
    when needed (see ``_asks_forgejo``). Pass the verdict to ``hand_in_receipt``. Raises ``UsageError`` for a
    malformed receipt and ``NotFound`` for an unknown task, before anything is asked or written."""
    receipt = parse_receipt(doc)
    with store.read():
        task = get_task(store, task_id)
        needed = _asks_forgejo(store, cfg, task, receipt, attempt)
    if not needed:
        return receipt, None
    if client is None and not cfg.forgejo.api_ready:  # e.g. a local run without the token: a pass with it decides
        return receipt, Verdict.down("this process has no forgejo.token to check the pull request with")
    own = client is None
    client = client or make_client(cfg)
    try:
        return receipt, validate(task, receipt, cfg, client)
    finally:
        if own:
            client.close()


class ForgejoLink:
    """One pass's way to Forgejo: a client made on first use, the default branches it read, and whether
    Forgejo was found unreachable (then nothing more is asked in this pass, and it is logged once)."""

    def __init__(self, cfg: Config, client: ForgejoClient | None = None) -> None:
        self.cfg = cfg
        self._client = client
        self._own = client is None
        self.branches: dict[str, str] = {}
        self.down: str | None = None

    @property
    def client(self) -> ForgejoClient:
        if self._client is None:
            self._client = make_client(self.cfg)
        return self._client

    def default_branch(self, repo: str) -> str:
        """The repository's default branch (cached for the pass)."""
        if repo not in self.branches:
            self.branches[repo] = self.client.get_repo(repo).get("default_branch") or "main"
        return self.branches[repo]

    def unreachable(self, why: str) -> None:
        """Note that Forgejo could not be asked (logged once per pass)."""
        if self.down is None:
            log("forgejo.unreachable", error=why)
        self.down = why

    def close(self) -> None:
        if self._own and self._client is not None:
            self._client.close()
            self._client = None


def _link(cfg: Config, client: Any) -> ForgejoLink:
    return client if isinstance(client, ForgejoLink) else ForgejoLink(cfg, client)


def validate_pending(store: Store, cfg: Config, client: ForgejoClient | ForgejoLink | None = None, *,
                     now: float | None = None) -> list[dict]:  # fmt: skip
    """Validate the receipts stored as pending (``store.pending_receipts()``) and apply each verdict through
    the same write as a fresh receipt: accepted → awaiting_review/completed, refused → ``receipt_invalid``.
    Forgejo still unreachable → they stay pending (logged once, never an error). What was decided, per receipt."""
    rows = store.pending_receipts()
    if not rows or (client is None and not cfg.forgejo.api_ready):
        return []
    link = _link(cfg, client)
    done = []
    try:
        for row in rows:
            if link.down:
                break
            done += _validate_one(store, cfg, link, row, now)
    finally:
        if link is not client:
            link.close()
    return done


def _validate_one(store: Store, cfg: Config, link: ForgejoLink, row: dict, now: float | None) -> list[dict]:
    from fleetctl.services.runs import hand_in_receipt

    task = store.task(row["task_id"])
    receipt = parse_receipt(row["receipt"])
    verdict = validate(task, receipt, cfg, link.client)
    if verdict.unreachable:
        link.unreachable(verdict.reason or "")
        return []
    try:
        result = hand_in_receipt(store, cfg, row["task_id"], row["receipt"], agent_id=row["agent_id"],
                                 attempt=row["attempt"], now=now_or(now), verdict=verdict)  # fmt: skip
    except LeaseLost:
        return []  # it moved on meanwhile (cancelled, validated by another pass)
    ids = {"task": row["task_id"], "attempt": row["attempt"], "state": result.task["state"]}
    log("task.receipt_validated", **ids, rejected=result.rejected)
    return [{"action": "task.receipt_validated", **ids, "rejected": result.rejected}]


# ---------------------------------------------------------------------------------------------- runs ended


def receipt_from_branch(cfg: Config, task: dict, link: ForgejoLink) -> tuple[dict, Verdict] | None:
    """For a run that ended without a receipt: the pull request on ``fleet/<task-id>`` into the repository's
    default branch, as a receipt document with its verdict, if one is found that validates; else None.
    Raises ``ForgejoError`` when Forgejo cannot be asked."""
    from fleetctl.forgejo.client import ForgejoError

    repo = task["repo"]
    pr = link.client.pull_by_branch(repo, link.default_branch(repo), branch_of(task["task_id"]))
    if pr is None:
        return None
    doc = {"outcome": "success", "summary": "found by branch after the run ended",
           "artifacts": [{"kind": "pull_request", "repo": repo, "number": pr["number"]}]}  # fmt: skip
    verdict = validate(task, parse_receipt(doc), cfg, link.client)
    if verdict.unreachable:
        raise ForgejoError(verdict.reason or "Forgejo could not be asked", retryable=True)
    return (doc, verdict) if verdict.ok else None


@dataclass(frozen=True)
class EndedRun:
    """What to do about a run that ended, decided before any write (``prepare_ended_run``) and applied in one
    short write (``settle_prepared_run``), so that the Forgejo lookup never runs inside a transaction or the
    server's writer thread. ``skip`` says why nothing is to be settled: ``attempt_over`` (the agent handed in
    its receipt, or the attempt failed, was cancelled or is no longer the current one), ``receipt_pending``
    (its receipt waits for Forgejo) or ``deferred`` (Forgejo could not be asked about the branch: the sweep
    settles it). ``found`` is the pull request found on the task's branch, as a receipt with its verdict."""

    task_id: str
    attempt: int
    exit_code: int | None
    detail: str = ""
    skip: str | None = None
    found: tuple[dict, Verdict] | None = None
    agent_id: str | None = None
    retry_after: float | None = None  # exit 75 (a usage limit): how long the run asked its agent to rest


EXIT_CODE_RANGE = (-(2**31), 2**31 - 1)
"""What an exit status may be (a shell's is 0-255; a signal may be reported negative)."""


def check_ended_report(attempt: Any, exit_code: Any, detail: Any) -> None:
    """``UsageError`` (``invalid_field``) unless ``attempt`` is a positive integer, ``exit_code`` an integer in
    ``EXIT_CODE_RANGE`` or None, and ``detail`` a string of at most ``MAX_MESSAGE`` characters without NUL: a
    run's own report of its end (the CLI, the API). The sweep's probe is trusted (its stderr tail may hold NUL)."""
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt < 2**63:
        raise UsageError("'attempt' must be a positive integer", code="invalid_field")
    if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)
                                  or not EXIT_CODE_RANGE[0] <= exit_code <= EXIT_CODE_RANGE[1]):  # fmt: skip
        raise UsageError(f"'exit_code' must be null or an integer from {EXIT_CODE_RANGE[0]} to {EXIT_CODE_RANGE[1]}",
                         code="invalid_field")  # fmt: skip
    if not isinstance(detail, str):
        raise UsageError("'detail' must be a string", code="invalid_field")
    check_text(detail, "'detail'", MAX_MESSAGE)


def prepare_ended_run(store: Store, cfg: Config, task_id: str, attempt: int, exit_code: int | None, detail: str = "",
                      *, link: ForgejoLink | None = None, past_timeout: bool = False,
                      agent_id: str | None = None, retry_after: float | None = None) -> EndedRun:  # fmt: skip
    """Read the task (one short snapshot) and, for a Forgejo task whose attempt is still open, look for its pull
    request by branch (outside any transaction). ``NotFound`` for an unknown task; with ``agent_id``,
    ``LeaseLost`` when the open attempt is another agent's. Forgejo unreachable → ``deferred`` (unless
    ``past_timeout``); a process without the Forgejo token and no ``link`` → ``deferred`` (a pass looks)."""
    from fleetctl.services.runs import _receipt_pending

    with store.read():
        task = get_task(store, task_id)
        pending = _receipt_pending(store, task)
    ended = EndedRun(task_id, attempt, exit_code, detail, agent_id=task["agent_id"], retry_after=retry_after)
    if task["attempt"] != attempt or task["state"] not in ACTIVE:
        return replace(ended, skip="attempt_over")
    if agent_id is not None and task["agent_id"] != agent_id:
        raise LeaseLost(f"agent {agent_id} does not hold task {task_id} attempt {attempt}",
                        details={"state": task["state"], "attempt": task["attempt"]})  # fmt: skip
    if pending:
        return replace(ended, skip="receipt_pending")
    never_ran = exit_code in (126, 127)  # the shell could not start the agent: it opened no pull request
    # a usage limit (exit 75) is not a finished run: its attempt goes back to the queue, whatever the branch holds
    lookup = not never_ran and exit_code != RATE_LIMITED_EXIT and checks_forgejo(cfg, task)
    if lookup and not cfg.forgejo.api_ready:
        if link is None:  # the run's own report, in a process without the token: the sweep looks it up
            return replace(ended, skip="deferred")
        lookup = False  # a pass without the token: nobody could look, settle as before
    if not lookup:
        return ended
    own, found = link is None, None
    link = link or ForgejoLink(cfg)
    try:
        found = None if link.down else receipt_from_branch(cfg, task, link)
    except FleetError as exc:
        link.unreachable(exc.message)
    finally:
        if own:
            link.close()
    if link.down:
        return ended if past_timeout else replace(ended, skip="deferred")
    return replace(ended, found=found)


def settle_prepared_run(store: Store, cfg: Config, ended: EndedRun, *, now: float | None = None) -> dict | None:
    """Apply ``prepare_ended_run``'s decision in one write: hand in the pull request found by branch
    (→ awaiting_review), else ``settle_run`` (``no_receipt`` / ``agent_error``). The task afterwards, or None
    when nothing was settled (skipped, or the attempt moved on meanwhile)."""
    from fleetctl.services.runs import hand_in_receipt, settle_run

    if ended.skip:
        return None
    if ended.found is not None:
        doc, verdict = ended.found
        try:
            return hand_in_receipt(store, cfg, ended.task_id, doc, agent_id=ended.agent_id, attempt=ended.attempt,
                                   now=now, verdict=verdict).task  # fmt: skip
        except LeaseLost:
            return None
    return settle_run(store, cfg.orchestrator, ended.task_id, ended.attempt, ended.exit_code, ended.detail, now=now,
                      retry_after=ended.retry_after)  # fmt: skip


def settle_ended_run(store: Store, cfg: Config, task_id: str, attempt: int, exit_code: int | None, detail: str = "",
                     *, link: ForgejoLink | None = None, past_timeout: bool = False,
                     now: float | None = None, retry_after: float | None = None) -> dict | None:  # fmt: skip
    """A run ended: for a Forgejo task whose attempt is still open, look for its pull request by branch first
    (outside any transaction) and hand that in as the receipt (→ awaiting_review); else ``settle_run`` as
    before (``no_receipt`` / ``agent_error``). Forgejo unreachable → None, left for the next sweep (unless
    ``past_timeout``). The task afterwards, or None when nothing was settled. The sweep, ``fleetctl task
    run-ended`` and ``POST …/run-ended`` all come here (the last two in two steps: ``prepare_ended_run``,
    then ``settle_prepared_run``), so they agree."""
    ended = prepare_ended_run(store, cfg, task_id, attempt, exit_code, detail, link=link, past_timeout=past_timeout,
                              retry_after=retry_after)  # fmt: skip
    return settle_prepared_run(store, cfg, ended, now=now)


def run_ended_view(store: Store, ended: EndedRun, task: dict | None) -> dict:
    """The answer to a run's report of its end (``fleetctl task run-ended``, ``POST …/run-ended``): the task as
    it is now, ``settled`` (this report settled the attempt) and, when it did not, the ``reason``."""
    from fleetctl.services.views import task_view

    if task is not None:
        return {**task_view(task), "settled": True, "reason": None}
    with store.read():
        current = get_task(store, ended.task_id)
    return {**task_view(current), "settled": False, "reason": ended.skip or "attempt_over"}
