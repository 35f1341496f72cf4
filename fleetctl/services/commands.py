"""Comment commands (``forgejo.comment_commands``): ``/fleet retry``, ``/fleet cancel``, ``/fleet rework`` in an
issue or pull request comment act as the operator commands — for a user with write access to the repository.

Two steps, so that no network call runs in a webhook request or under the write lock:

1. ``record`` (inside the delivery's write, through ``apply_change``): a new comment whose first ``/fleet``
   line names a command is kept in ``commands`` (once per comment: a re-delivered or replayed webhook adds
   nothing). fleetctl's own comments never count.
2. ``process_pending`` (the dispatch and sweep passes): the commenter's permission is asked from Forgejo
   (remembered ``permission_cache_secs``), then the command is carried out by the task services (their events
   say ``by``); anyone without write access gets one polite reply and nothing changes. Replies are
   ``command.reply`` events, which the outbox posts (with its marker: never twice).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fleetctl.errors import FleetError
from fleetctl.forgejo.mapping import COMMANDS, comment_command
from fleetctl.log import log
from fleetctl.services._common import forgejo_api, now_or
from fleetctl.states import TERMINAL, TaskState
from fleetctl.store import Store

if TYPE_CHECKING:
    from fleetctl.config import Config
    from fleetctl.forgejo.webhooks import Change

WRITERS = frozenset({"write", "admin", "owner"})
"""Forgejo access levels that may run a command."""
PER_PASS = 20
MAX_TRIES = 10
"""A command whose commenter's permission cannot be asked this many times is given up (``failed``)."""
_PERM_KEY = "forgejo_permission:"


def record(store: Store, cfg: Config, change: Change, bot: str | None, ts: float) -> tuple[str, str]:
    """Keep a comment's command for the next pass (inside the caller's write): ``(verdict, detail)``."""
    comment = change.comment
    if not cfg.forgejo.comment_commands:
        return "ignored", "comment commands are off (forgejo.comment_commands)"
    if bot and change.sender == bot:
        return "ignored", f"a comment by fleetctl's own account ({bot})"
    found = comment_command(comment.body)
    if found is None:
        return "ignored", "the comment has no /fleet command"
    command, rest = found
    key = comment_key(change.repo or "", comment.id)
    row = {"comment_key": key, "received_at": ts, "repo": change.repo, "number": comment.number,
           "is_pull": int(comment.is_pull), "comment_id": comment.id, "sender": change.sender or "", "command": command,
           "body": rest[:4000]}  # fmt: skip
    if not store.add_command(row):
        return "ignored", f"comment {comment.id} was recorded already"
    return "accepted", f"/fleet {command.lstrip('?')} by @{change.sender}: recorded; the next pass checks who may"


def comment_key(repo: str, comment_id: int) -> str:
    """The key of a comment's command (``commands.comment_key``): one row per comment, whatever the delivery."""
    return f"{repo.lower()}#comment-{comment_id}"


def of_delivery(store: Store, delivery: dict, raw: bytes | None) -> dict | None:
    """What became of the command a comment delivery recorded (for ``fleetctl deliveries show``): its command,
    sender, state (``pending``, ``done``, ``refused``, ``failed``), detail and task; None for any other delivery.
    """
    if delivery["event_type"] not in ("issue_comment", "pull_request_comment") or raw is None or not delivery["repo"]:
        return None
    try:
        comment_id = json.loads(raw)["comment"]["id"]
    except (ValueError, KeyError, TypeError):
        return None
    row = store.command(comment_key(delivery["repo"], comment_id))
    if row is None:
        return None
    return {"command": "/fleet " + row["command"].lstrip("?"), **{k: row[k] for k in ("sender", "state", "detail",
                                                                                      "task_id", "tries")}}  # fmt: skip


def process_pending(store: Store, cfg: Config, client: Any = None, *, now: float | None = None) -> list[dict]:
    """Carry out the pending commands (see the module docstring); what was done, one entry each."""
    with store.read():
        pending = store.pending_commands(PER_PASS)
    if not pending:
        return []
    from fleetctl.services.issues import bot_login

    done = []
    with forgejo_api(cfg, client) as client:
        for cmd in pending if client is not None else ():
            ts = now_or(now)
            if cmd["sender"] == bot_login(store, cfg):  # recorded before fleetctl knew its own login: never a command
                with store.write():
                    store.finish_command(cmd["id"], "failed", "a comment by fleetctl's own account", None, ts)
                continue
            try:
                perm = permission(store, cfg, client, cmd["repo"], cmd["sender"], ts)
            except FleetError as exc:
                if getattr(exc, "status", None) == 403:  # fleetctl's account may not ask: asking again won't help
                    done.append(_cannot_ask(store, cmd, ts))
                else:
                    _defer(store, cmd, exc, ts)
                continue
            try:
                task = _task_of(store, client, cmd) if perm in WRITERS and cmd["command"] in COMMANDS else None
            except FleetError as exc:
                _defer(store, cmd, exc, ts)
                continue
            done.append(_carry_out(store, cfg, cmd, perm, task, ts))
    return done


def _defer(store: Store, cmd: dict, exc: FleetError, ts: float) -> None:
    """Forgejo cannot be asked now: the next pass tries again, a bounded number of times."""
    gave_up = cmd["tries"] + 1 >= MAX_TRIES
    with store.write():
        store.finish_command(cmd["id"], "failed" if gave_up else "pending", exc.message, None,
                             ts if gave_up else None)  # fmt: skip
    log("command.deferred", id=cmd["id"], error=exc.message)


def permission(store: Store, cfg: Config, client: Any, repo: str, login: str, ts: float) -> str:
    """``login``'s access to ``repo``, from Forgejo, remembered ``forgejo.permission_cache_secs`` (never longer:
    a writer demoted to reader is refused once the entry is that old)."""
    key = f"{_PERM_KEY}{repo.lower()}:{login}"
    ttl = cfg.forgejo.permission_cache_secs
    with store.read():
        cached = store.meta(key)
    if cached and ttl > 0:
        try:
            entry = json.loads(cached)
            # never older than the TTL; an entry from the future (the clock was set back) is not trusted
            if 0 <= ts - float(entry["at"]) < ttl and isinstance(entry["permission"], str):
                return entry["permission"]
        except (ValueError, KeyError, TypeError):
            pass
    perm = client.permission(repo, login)
    if ttl > 0:
        with store.write():
            store.set_meta(key, json.dumps({"permission": perm, "at": ts}))
    return perm


def _cannot_ask(store: Store, cmd: dict, ts: float) -> dict:
    """Forgejo refused to say who may (403: only an admin of the repository may ask about others)."""
    who, repo = cmd["sender"], cmd["repo"]
    detail = (f"Forgejo refused to tell fleetctl's account @{who}'s access to {repo} (403): the account needs admin "
              "access to the repository for comment commands")  # fmt: skip
    text = (f"@{who}, fleetctl could not check who may run `/fleet` commands in {repo}, so nothing was changed "
            "(its account needs admin access to the repository).")  # fmt: skip
    entry = {"id": cmd["id"], "command": cmd["command"], "sender": who, "repo": repo, "number": cmd["number"]}
    return _finish(store, cmd, "failed", detail, None, text, ts, entry)


def _carry_out(store: Store, cfg: Config, cmd: dict, perm: str, task: dict | None, ts: float) -> dict:
    from fleetctl.services.tasks import cancel_task, retry_task, rework_task

    who, repo, number = cmd["sender"], cmd["repo"], cmd["number"]
    word = cmd["command"]
    entry = {"id": cmd["id"], "command": word, "sender": who, "repo": repo, "number": number}
    if perm not in WRITERS:
        text = (f"@{who}, thank you — but only people with write access to {repo} can run `/fleet` commands, so "
                "nothing was changed.")  # fmt: skip
        return _finish(store, cmd, "refused", f"{who} has {perm} access", None, text, ts, entry)
    if word not in COMMANDS:
        text = f"@{who}, `/fleet {word.lstrip('?')}` is not a command. Try " + ", ".join(
            f"`/fleet {c}`" for c in COMMANDS
        )
        return _finish(store, cmd, "failed", "unknown command", None, text + ".", ts, entry)
    if task is None:
        text = f"@{who}, there is no fleetctl task for this {'pull request' if cmd['is_pull'] else 'issue'}."
        return _finish(store, cmd, "failed", "no task", None, text, ts, entry)
    tid, by = task["task_id"], f"@{who} via /fleet {word}"
    try:
        if word == "retry":
            retry_task(store, cfg.orchestrator, tid, now=ts, by=by)
            text = f"@{who}: task `{tid}` is queued again (a new attempt budget)."
        elif word == "cancel":
            cancel_task(store, tid, f"cancelled by {by}", now=ts, by=by)
            text = f"@{who}: task `{tid}` is cancelled."
        else:
            pr = (task.get("pull_request") or {}).get("number")
            if task["state"] != "awaiting_review":
                from fleetctl.errors import InvalidTransition

                raise InvalidTransition(f"task {tid} is {task['state'].replace('_', ' ')}: only a task awaiting review "
                                        "can be sent back for rework")  # fmt: skip
            rework_task(store, tid, {"body": cmd["body"], "pr": pr, "reviewer": who, "requested_by": who}, now=ts)
            text = f"@{who}: task `{tid}` goes back for a rework attempt with your comment."
    except FleetError as exc:
        return _finish(store, cmd, "failed", exc.message, tid, f"@{who}, `/fleet {word}` did nothing: {exc.message}.",
                       ts, entry)  # fmt: skip
    return _finish(store, cmd, "done", by, tid, text, ts, entry)


def _task_of(store: Store, client: Any, cmd: dict) -> dict | None:
    """The task a command is about: for an issue, its newest task; for a pull request, of the tasks it references
    (its branch ``fleet/<task-id>``, the task it is linked to, the newest task of each issue it closes — the
    pull request is read from Forgejo: a comment's delivery does not carry its branch or body) the newest one
    the command can act on, else the newest."""
    repo, number = cmd["repo"], cmd["number"]
    if not cmd["is_pull"]:
        with store.read():
            return store.last_task_for_issue(repo, number)
    from fleetctl.forgejo.mapping import closing_refs
    from fleetctl.forgejo.webhooks import pull_from
    from fleetctl.services.issues import tasks_of_pull

    raw = client.get_pull(repo, number)
    if raw is None:
        return None
    pull = pull_from(raw)
    with store.read():
        found = {t["task_id"]: t for t in tasks_of_pull(store, repo, pull)}
        for n in closing_refs(pull):  # a finished task too: /fleet retry is for those
            last = store.last_task_for_issue(repo, n)
            if last is not None:
                found.setdefault(last["task_id"], last)
    if not found:
        return None
    fits = [t for t in found.values() if _can(cmd["command"], t["state"])] or list(found.values())
    return max(fits, key=lambda t: t["seq"])


def _can(command: str, state: str) -> bool:
    """Whether ``command`` can act on a task in ``state`` (the task services have the last word)."""
    if command == "retry":
        return state in (TaskState.FAILED, TaskState.CANCELLED)
    if command == "rework":
        return state == TaskState.AWAITING_REVIEW
    return state not in TERMINAL


def _finish(store: Store, cmd: dict, state: str, detail: str, task_id: str | None, reply: str, ts: float,
            entry: dict) -> dict:  # fmt: skip
    """Record a command's outcome and its reply (a ``command.reply`` event the outbox posts) in one write."""
    with store.write():
        store.finish_command(cmd["id"], state, detail, task_id, ts)
        store.emit("command.reply", ts=ts, task_id=task_id,
                   data={"repo": cmd["repo"], "number": cmd["number"], "text": reply, "command_id": cmd["id"],
                         "state": state})  # fmt: skip
    log("command." + state, **entry, task=task_id, detail=detail)
    return {**entry, "state": state, "task_id": task_id, "detail": detail}
