"""The workspace of a run, and the four small POSIX ``sh`` scripts that work in it.

A run of attempt N of task T lives in ``{work_dir}/{T}/{N}``; its bookkeeping is in ``.fleet/`` there:

| file | written by | what |
|---|---|---|
| ``prompt.md`` | the launcher | the rendered prompt, UTF-8, byte for byte |
| ``run.sh`` | the launcher | ``RUN_WRAPPER`` |
| ``pid`` | the wrapper, first | its pid, which is also its process group (it runs under ``setsid -f``) |
| ``started_at`` | the wrapper | Unix time of the start |
| ``stdout.log``, ``stderr.log`` | the wrapper | the command's output, each capped at ``output_cap_bytes`` |
| ``exit_status`` | the wrapper, last | the command's exit status (written atomically) |
| ``retry_after`` | the agent, optionally | with exit status 75 (a usage limit): whole seconds until it resets |
| ``report.log`` | the wrapper | how it reported the end of the run: the output of ``fleetctl task run-ended`` |
| | | (local runs), or of ``curl``/``wget`` posting ``run-ended`` to ``$FLEET_API_URL`` (remote runs) |

Everything a later process needs to know about a run is in these files, and everything it does to a run
is done by a script that runs *in the workspace* and prints a machine-readable answer: ``PROBE_SCRIPT``
(``key=value`` lines, then the tail of stderr), ``KILL_SCRIPT`` (one ``killed=0|1 …`` line) and
``REMOVE_SCRIPT`` (one ``removed=0|1 …`` line, for the sweep's cleanup of settled attempts). The local
executor runs them with ``sh -c SCRIPT NAME ARGS…``; an SSH executor runs the very same argv on the host
(``shlex``-quoted), so both share one code path and one contract test suite. Paths and ids only ever
reach a shell as positional arguments, never inside the script text.

Design notes:

- **Capping without SIGPIPE.** The command writes into two FIFOs; each reader keeps the first
  ``cap`` bytes (``head -c``) and then drains the rest into ``/dev/null``, so a command that prints
  gigabytes keeps only ``cap`` bytes on disk and still exits normally.
- **The prompt is passed whole.** ``arg`` mode reads the file with a sentinel character appended and
  strips it (``$(cat f; printf .)``), since ``$(cat f)`` alone drops trailing newlines.
- **Pid reuse.** A pid file can outlive its process (a reboot, a ``kill -9``). A live group leader
  counts as our run only if its working directory is still this workspace (``readlink
  /proc/$pid/cwd``); a dead leader's group id cannot be reused while members of its group live, so
  whatever is left of the group is ours. Zombies are not alive.
- **Kill** sends SIGTERM to the whole group, waits up to the grace period for every member to be gone,
  then SIGKILLs the group and waits (bounded) until it is gone, so "killed" means "gone".
- **Exit-status race.** A probe that finds the wrapper dead re-reads ``exit_status``: the wrapper writes
  it before it exits, so a run that ends during a probe is reported ended, never vanished.
- **Remove** (``rm -rf`` of a path read from the database) first proves the path is a fleetctl workspace:
  ``…/{task_id}/{attempt}`` in form (absolute or relative, no ``.``/``..``/``//``, a number last), neither
  it nor its task directory a symbolic link, a real directory with a real ``.fleet/`` directory inside.
  It refuses while any member of the run's process group lives, even after ``exit_status`` was written
  (a child the command left behind); where it cannot tell (a process it may not look at or signal) it
  counts the run as alive. Then it removes the *resolved* path, staying on its file system
  (GNU ``rm --one-file-system``: a FUSE mount an agent left there is not descended into), and then the
  task directory if that became empty (``rmdir``). A missing workspace counts as removed only when its
  task directory or the work_dir is there to be looked into: a path hidden from the sweep (systemd's
  ``ProtectHome=``, an unmounted disk) is an error, never "already gone".
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from fleetctl.executors.base import PROMPT_MODES, LaunchSpec, RunStatus

META = ".fleet"
"""The bookkeeping directory inside a workspace."""

STALE_FILES = ("pid", "exit_status", "started_at", "report.log", "run-ended.json", "wgetrc", "retry_after")
"""What a launch into a workspace whose earlier run has ended removes first (the logs are rewritten anyway)."""

TAIL_BYTES = 2000
"""How much of stderr a probe returns."""

REMOVE_TIMEOUT_SECS = 120.0
"""Bound on one workspace removal (``rm -rf`` of a worktree with its build output can take a while)."""

#: The run wrapper. argv: CAP_BYTES PROMPT_MODE REPORT COMMAND... ; cwd: the workspace.
#: Records .fleet/pid, .fleet/stdout.log and .fleet/stderr.log (each capped at CAP_BYTES; the command never
#: sees SIGPIPE), then .fleet/exit_status atomically; finally, with REPORT = "report", tells fleetctl the run
#: ended, if it can: a local run with this fleetctl ($FLEET_PYTHON) into the database, any other with
#: POST …/run-ended to $FLEET_API_URL. A pull agent's runs pass "quiet": the agent itself settles them.
RUN_WRAPPER = r"""#!/bin/sh
# fleetctl run wrapper (generated; see fleetctl/executors/workspace.py)
cap="$1"; mode="$2"; reporting="$3"; shift 3
m=.fleet
echo $$ > "$m/pid.tmp" && mv "$m/pid.tmp" "$m/pid" || exit 97
date +%s > "$m/started_at"
rm -f "$m/out.fifo" "$m/err.fifo"
mkfifo "$m/out.fifo" "$m/err.fifo" || exit 97
{ head -c "$cap" > "$m/stdout.log"; cat > /dev/null; } < "$m/out.fifo" &
o=$!
{ head -c "$cap" > "$m/stderr.log"; cat > /dev/null; } < "$m/err.fifo" &
e=$!
case "$mode" in
  stdin) "$@" < "$m/prompt.md" > "$m/out.fifo" 2> "$m/err.fifo" ;;
  file)  "$@" "$PWD/$m/prompt.md" < /dev/null > "$m/out.fifo" 2> "$m/err.fifo" ;;
  arg)   prompt=$(cat "$m/prompt.md"; printf .); prompt=${prompt%.}
         "$@" "$prompt" < /dev/null > "$m/out.fifo" 2> "$m/err.fifo" ;;
  *)     { echo "fleetctl: unknown prompt mode $mode" >&2; (exit 2); } > "$m/out.fifo" 2> "$m/err.fifo" ;;
esac
code=$?
wait $o $e
rm -f "$m/out.fifo" "$m/err.fifo"
echo "$code" > "$m/exit_status.tmp" && mv "$m/exit_status.tmp" "$m/exit_status"
# POST the end of the run to $FLEET_API_URL with the task token, which never reaches a command line: curl
# reads it from stdin (-K -, written by the builtin printf; -q: no ~/.curlrc), wget from a private wgetrc
# removed after. The body's values are checked integers and printable ASCII with \ and " escaped.
report() {
  case $FLEET_API_URL in http://*|https://*) ;; *) echo "fleetctl: FLEET_API_URL is not http(s)"; return ;; esac
  case $FLEET_TASK_ID in [!A-Za-z0-9]*|*[!A-Za-z0-9._-]*) echo "fleetctl: odd FLEET_TASK_ID"; return ;; esac
  case $FLEET_ATTEMPT in ''|0*|*[!0-9]*) echo "fleetctl: odd FLEET_ATTEMPT"; return ;; esac
  case $FLEET_TASK_TOKEN in *[!A-Za-z0-9._~+/=-]*) echo "fleetctl: odd FLEET_TASK_TOKEN"; return ;; esac
  case $1 in ''|*[!0-9]*) set -- null ;; esac
  url="${FLEET_API_URL%/}/api/v1/tasks/$FLEET_TASK_ID/run-ended"
  detail=$(tail -c 500 "$m/stderr.log" 2>/dev/null | tr '\t\r\n' '   ' | LC_ALL=C tr -cd ' -~' | tr -s ' ' |
    sed 's/^ //; s/ $//; s/[\\"]/\\&/g')
  extra=; [ -n "$2" ] && extra=", \"retry_after_secs\": $2"
  printf '{"attempt": %s, "exit_code": %s, "detail": "%s"%s}\n' "$FLEET_ATTEMPT" "$1" "$detail" "$extra" > "$m/run-ended.json"
  if command -v curl > /dev/null 2>&1; then
    printf 'header = "Authorization: Bearer %s"\n' "$FLEET_TASK_TOKEN" |
      curl -q -sS -K - --proto =http,https --connect-timeout 5 --max-time 15 --retry 3 --retry-delay 2 \
        --retry-max-time 40 --retry-connrefused -H "Content-Type: application/json" \
        --data-binary "@$m/run-ended.json" -w "\nHTTP %{http_code}\n" "$url"
  elif command -v wget > /dev/null 2>&1; then
    (umask 077 && printf 'header = Authorization: Bearer %s\n' "$FLEET_TASK_TOKEN" > "$m/wgetrc") &&
      WGETRC="$m/wgetrc" wget -q -O - --content-on-error -T 10 -t 3 --waitretry=2 --retry-connrefused \
        --header="Content-Type: application/json" --post-file="$m/run-ended.json" "$url"
    echo "wget exited $?"
    rm -f "$m/wgetrc"
  else
    echo "fleetctl: neither curl nor wget: the sweep settles this run"
  fi
  rm -f "$m/run-ended.json"
}
# exit 75 (EX_TEMPFAIL) is a usage limit; the agent may have written the seconds to wait into .fleet/retry_after
wait_secs=; if [ "$code" = 75 ]; then
  { read -r wait_secs < "$m/retry_after"; } 2>/dev/null; case $wait_secs in ''|*[!0-9]*) wait_secs= ;; esac
fi
if [ "$reporting" != report ]; then
  :  # whoever launched the run settles it (a pull agent)
elif [ -n "${FLEET_PYTHON:-}" ]; then  # a local run: this fleetctl, straight into the database (not the API)
  FLEET_API_URL= "$FLEET_PYTHON" -m fleetctl task run-ended "$FLEET_TASK_ID" --attempt "$FLEET_ATTEMPT" \
    --exit-code "$code" ${wait_secs:+--retry-after "$wait_secs"} >> "$m/report.log" 2>&1 || true
elif [ -n "${FLEET_API_URL:-}" ] && [ -n "${FLEET_TASK_TOKEN:-}" ]; then
  report "$code" "$wait_secs" >> "$m/report.log" 2>&1
fi
exit "$code"
"""

# Shared by the probe and kill scripts. Functions set globals (POSIX sh has no locals): s, v, c, f, g.
_SH_LIB = r"""
num() { v=; { read -r v < "$1"; } 2>/dev/null; case $v in ''|*[!0-9]*) v= ;; esac; printf '%s' "$v"; }
pidnum() { v=$(num "$1"); case $v in 0*|1) v= ;; esac; printf '%s' "$v"; }
live() {
  if [ -r /proc/self/stat ]; then
    { read -r s < "/proc/$1/stat"; } 2>/dev/null || return 1
    s=${s##*) }
    case $s in Z*|X*) return 1 ;; esac
    return 0
  fi
  kill -s 0 "$1" 2>/dev/null
}
ours() {
  [ -d /proc/self ] && command -v readlink > /dev/null 2>&1 || return 0
  c=$(readlink "/proc/$1/cwd" 2>/dev/null) || { [ -e "/proc/$1" ] && return 1; return 0; }
  [ "$c" = "$here" ]
}
group_alive() {
  g=$1
  kill -s 0 -- "-$g" 2>/dev/null || return 1
  [ -r /proc/self/stat ] || return 0
  for f in /proc/[0-9]*/stat; do
    { read -r s < "$f"; } 2>/dev/null || continue
    s=${s##*) }
    set -f; set -- $s; set +f
    [ "$3" = "$g" ] || continue
    case $1 in Z*|X*) continue ;; esac
    return 0
  done
  return 1
}
"""

#: argv: WORKSPACE TAIL_BYTES. Prints exists=0, or exists=1 pid= alive= exit_status= started_at= lines, then
#: a line "--stderr-tail--" and the last TAIL_BYTES bytes of stderr.log.
PROBE_SCRIPT = (
    "# fleetctl probe (generated; see fleetctl/executors/workspace.py)"
    + _SH_LIB
    + r"""
cd -P -- "$1" 2>/dev/null && [ -d .fleet ] || { echo exists=0; exit 0; }
here=$(pwd -P); tail_bytes=${2:-2000}; m=.fleet
pid=$(pidnum "$m/pid"); code=$(num "$m/exit_status"); alive=0
if [ -n "$pid" ] && [ -z "$code" ]; then
  if live "$pid" && ours "$pid"; then alive=1; else code=$(num "$m/exit_status"); fi
fi
echo exists=1
echo "pid=$pid"
echo "alive=$alive"
echo "exit_status=$code"
echo "started_at=$(num "$m/started_at")"
echo "retry_after=$(num "$m/retry_after")"
echo "--stderr-tail--"
if [ -f "$m/stderr.log" ]; then tail -c "$tail_bytes" "$m/stderr.log"; fi
exit 0
"""
)

#: argv: WORKSPACE GRACE_TICKS (tenths of a second between SIGTERM and SIGKILL). Prints one line:
#: "killed=1 signal=TERM|KILL" or "killed=0 why=no-workspace|no-pid|ended|not-ours|gone".
KILL_SCRIPT = (
    "# fleetctl kill (generated; see fleetctl/executors/workspace.py)"
    + _SH_LIB
    + r"""
cd -P -- "$1" 2>/dev/null && [ -d .fleet ] || { echo "killed=0 why=no-workspace"; exit 0; }
here=$(pwd -P); ticks=${2:-30}
pid=$(pidnum .fleet/pid)
[ -n "$pid" ] || { echo "killed=0 why=no-pid"; exit 0; }
[ -z "$(num .fleet/exit_status)" ] || { echo "killed=0 why=ended"; exit 0; }
if live "$pid" && ! ours "$pid"; then echo "killed=0 why=not-ours"; exit 0; fi
group_alive "$pid" && kill -s TERM -- "-$pid" 2>/dev/null || { echo "killed=0 why=gone"; exit 0; }
tick=0.1
sleep 0.01 2>/dev/null || { tick=1; ticks=$(( (ticks + 9) / 10 )); }
n=0
while [ "$n" -lt "$ticks" ] && group_alive "$pid"; do sleep "$tick"; n=$((n + 1)); done
sig=TERM
if group_alive "$pid"; then
  sig=KILL
  kill -s KILL -- "-$pid" 2>/dev/null
  n=0
  while [ "$n" -lt 100 ] && group_alive "$pid"; do sleep "$tick"; n=$((n + 1)); done
fi
echo "killed=1 signal=$sig"
exit 0
"""
)

#: argv: WORKSPACE. Prints one line: "removed=1", or "removed=0 why=gone" (nothing there: fine), "removed=0
#: why=alive pid=N" (a member of the run's process group lives: nothing removed), "removed=0
#: why=not-a-workspace reason=layout|symlink|not-a-directory|no-meta" (refused: nothing removed) or
#: "removed=0 why=failed" followed by what went wrong (rm's errors, capped).
REMOVE_SCRIPT = (
    "# fleetctl remove (generated; see fleetctl/executors/workspace.py)"
    + _SH_LIB
    + r"""
refuse() { echo "removed=0 why=not-a-workspace reason=$1"; exit 0; }
fail() { echo "removed=0 why=failed"; printf '%s\n' "$1" | head -c 600; exit 0; }
# unlike ours(), "cannot tell" is never "elsewhere", and a group we may not signal counts as alive
elsewhere() {
  [ -d /proc/self ] && command -v readlink > /dev/null 2>&1 || return 1
  c=$(readlink "/proc/$1/cwd" 2>/dev/null) || return 1
  [ "$c" != "$here" ]
}
lives() {
  e=$(kill -s 0 -- "-$1" 2>&1) || case $e in *"No such process"*) return 1 ;; *) return 0 ;; esac
  group_alive "$1"
}
ws=$1
case $ws in */*/*|[!/]*/*) ;; *) refuse layout ;; esac
case $ws in */|*//*|*/./*|*/../*|./*|../*|*/.|*/..) refuse layout ;; esac
base=${ws##*/}; parent=${ws%/*}
case $base in ''|0*|*[!0-9]*) refuse layout ;; esac
case $parent in */*) top=${parent%/*}; top=${top:-/} ;; *) top=. ;; esac
if [ ! -e "$ws" ] && [ ! -L "$ws" ]; then
  if [ -d "$parent" ] && [ ! -L "$parent" ] && [ -x "$parent" ]; then
    rmdir -- "$parent" 2>/dev/null; echo "removed=0 why=gone"; exit 0
  fi
  if [ ! -e "$parent" ] && [ ! -L "$parent" ] && [ -d "$top" ] && [ -x "$top" ]; then
    echo "removed=0 why=gone"; exit 0
  fi
  fail "cannot look for $ws: neither it nor its task directory nor the work_dir can be seen"
fi
[ ! -L "$ws" ] && [ ! -L "$parent" ] || refuse symlink
[ -d "$ws" ] || refuse not-a-directory
cd -P -- "$ws" 2>/dev/null || fail "cannot enter $ws"
[ -d .fleet ] && [ ! -L .fleet ] || refuse no-meta
here=$(pwd -P)
[ "${here##*/}" = "$base" ] || refuse symlink
pid=$(pidnum .fleet/pid)
if [ -n "$pid" ] && ! { live "$pid" && elsewhere "$pid"; } && lives "$pid"; then
  echo "removed=0 why=alive pid=$pid"; exit 0
fi
cd / || fail "cannot leave $here"
ofs=
rm --one-file-system -f -- "$here/.fleet/.rm-probe.$$" 2>/dev/null && ofs=--one-file-system
if ! err=$(rm -rf $ofs -- "$here" 2>&1); then
  chmod -R u+rwX -- "$here" 2>/dev/null
  err=$(rm -rf $ofs -- "$here" 2>&1)
fi
[ ! -e "$here" ] && [ ! -L "$here" ] || fail "${err:-rm left $here behind}"
rmdir -- "${here%/*}" 2>/dev/null
echo removed=1
exit 0
"""
)

_TAIL_MARK = b"--stderr-tail--\n"

INHERITED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM")
"""Environment variables a run may inherit from the process that launches it; everything else is dropped,
so that no secret of the orchestrator (Forgejo, Matrix, API tokens) ever reaches an agent."""


def workspace_path(work_dir: str, task_id: str, attempt: int) -> str:
    """``{work_dir}/{task_id}/{attempt}`` (ids are validated, so this never escapes ``work_dir``)."""
    return str(Path(work_dir) / task_id / str(attempt))


def run_env(base: Mapping[str, str], extra: Mapping[str, str], *, fleetctl_on_path: bool = False) -> dict[str, str]:
    """The environment of a run: the ``INHERITED_ENV`` whitelist of ``base`` plus ``extra``.

    With ``fleetctl_on_path``, this interpreter's directory goes first on ``PATH`` so that the run's
    ``fleetctl task complete`` is this installation's.
    """
    env = {k: base[k] for k in INHERITED_ENV if k in base}
    env.update(extra)
    if fleetctl_on_path:
        env["PATH"] = python_bin_dir() + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    return env


def fleet_env(task: Mapping, attempt: int, agent_id: str, token: str, workspace: str,
              api_url: str | None = None) -> dict[str, str]:  # fmt: skip
    """SPEC §8 item 5: the ``FLEET_*`` variables a run needs to know and to report, and no more."""
    env = {
        "FLEET_TASK_ID": task["task_id"],
        "FLEET_ATTEMPT": str(attempt),
        "FLEET_AGENT_ID": agent_id,
        "FLEET_TASK_TOKEN": token,
        "FLEET_BRANCH": f"fleet/{task['task_id']}",
        "FLEET_WORKSPACE": workspace,
        "FLEET_PROMPT_FILE": str(Path(workspace) / META / "prompt.md"),
    }
    if task.get("repo"):
        env["FLEET_REPO"] = task["repo"]
    if task.get("issue_number"):
        env["FLEET_ISSUE"] = str(task["issue_number"])
    if api_url:
        env["FLEET_API_URL"] = api_url
    return env


def python_bin_dir() -> str:
    """The directory of the running interpreter (and so of the ``fleetctl`` script in a venv)."""
    return str(Path(sys.executable).parent)


def launch_problem(spec: LaunchSpec) -> str | None:
    """Why ``spec`` cannot be launched at all (checked before anything is written), or None."""
    if not spec.command:
        return "the agent command is empty"
    if spec.prompt_mode not in PROMPT_MODES:
        return f"unknown prompt mode {spec.prompt_mode!r} (one of {', '.join(PROMPT_MODES)})"
    if not isinstance(spec.output_cap_bytes, int) or spec.output_cap_bytes < 1:
        return f"output_cap_bytes must be a positive integer, not {spec.output_cap_bytes!r}"
    if any("\0" in part for part in (spec.workspace, *spec.command)):
        return "a NUL character in the command or the workspace path"
    return None


def meta_files(spec: LaunchSpec) -> dict[str, bytes]:
    """What the launcher writes into ``.fleet/`` before it starts the wrapper."""
    return {"prompt.md": spec.prompt.encode("utf-8", "replace"), "run.sh": RUN_WRAPPER.encode()}


def wrapper_argv(spec: LaunchSpec) -> list[str]:
    """How to start the wrapper, from the workspace: detached in its own session (its pid = its group)."""
    reporting = "report" if spec.report_end else "quiet"
    return ["setsid", "-f", "sh", f"{META}/run.sh", str(spec.output_cap_bytes), spec.prompt_mode, reporting,
            *spec.command]  # fmt: skip


def probe_argv(workspace: str, tail_bytes: int = TAIL_BYTES) -> list[str]:
    """The probe, as argv (``sh -c SCRIPT NAME ARGS``): the workspace is an argument, never script text."""
    return ["sh", "-c", PROBE_SCRIPT, "fleetctl-probe", workspace, str(int(tail_bytes))]


def kill_argv(workspace: str, grace_secs: float) -> list[str]:
    """The kill script, as argv; the grace period in tenths of a second."""
    ticks = max(0, math.ceil(float(grace_secs) * 10))
    return ["sh", "-c", KILL_SCRIPT, "fleetctl-kill", workspace, str(ticks)]


def remove_argv(workspace: str) -> list[str]:
    """The remove script, as argv (``sh -c SCRIPT NAME WORKSPACE``)."""
    return ["sh", "-c", REMOVE_SCRIPT, "fleetctl-remove", workspace]


def parse_probe(out: bytes) -> RunStatus:
    """``PROBE_SCRIPT``'s output as a ``RunStatus``; ``ValueError`` if it is not a probe's output."""
    head, _, tail = out.partition(_TAIL_MARK)
    fields = dict(line.split("=", 1) for line in head.decode("ascii").splitlines() if "=" in line)
    if fields.get("exists") == "0":
        return RunStatus(exists=False)
    if fields.get("exists") != "1" or _TAIL_MARK not in out:
        raise ValueError(f"not a probe's output: {out[:200]!r}")

    def num(key: str) -> int | None:
        value = fields.get(key, "")
        return int(value) if value.isdigit() else None

    extra = {key: value for key in ("started_at", "retry_after") if (value := num(key)) is not None}
    return RunStatus(exists=True, pid=num("pid"), alive=fields.get("alive") == "1", exit_code=num("exit_status"),
                     stderr_tail=tail.decode("utf-8", "replace").strip(), extra=extra)  # fmt: skip


def parse_kill(out: bytes) -> tuple[bool, str]:
    """``KILL_SCRIPT``'s output: (killed, the signal that did it or why nothing was signalled)."""
    fields = dict(part.split("=", 1) for part in out.decode("ascii").split() if "=" in part)
    if fields.get("killed") not in ("0", "1"):
        raise ValueError(f"not a kill script's output: {out[:200]!r}")
    return fields["killed"] == "1", fields.get("signal") or fields.get("why", "")


_REFUSALS = {
    "layout": "its path is not of the form {work_dir}/{task_id}/{attempt}",
    "symlink": "it or its task directory is a symbolic link",
    "not-a-directory": "it is not a directory",
    "no-meta": f"it has no {META}/ directory",
}


def parse_remove(out: bytes) -> bool:
    """``REMOVE_SCRIPT``'s answer: True if the workspace is gone (removed now, or not there at all), False if
    its run still lives (nothing removed). ``ValueError`` saying why for a refusal (not a fleetctl
    workspace), a removal that failed, or output that is not the script's."""
    first, _, rest = out.decode("utf-8", "replace").partition("\n")
    fields = dict(part.split("=", 1) for part in first.split() if "=" in part)
    answer = fields.get("removed"), fields.get("why")
    if answer in (("1", None), ("0", "gone")):
        return True
    if answer == ("0", "alive"):
        return False
    if answer == ("0", "not-a-workspace"):
        why = _REFUSALS.get(fields.get("reason", ""), fields.get("reason", "?"))
        raise ValueError(f"refusing to remove it: not a fleetctl workspace ({why})")
    if answer == ("0", "failed"):
        raise ValueError(rest.strip() or "rm failed")
    raise ValueError(f"not a remove script's output: {out[:200]!r}")


def read_exit_status(workspace: str) -> int | None:
    """The exit status a local run recorded, if it has ended (a cheap check between probes)."""
    try:
        return int((Path(workspace) / META / "exit_status").read_text().strip())
    except (OSError, ValueError):
        return None
