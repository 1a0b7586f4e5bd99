"""Runs commands from the controller once each, in arrival order, on one worker thread.

Every command is answered on ``command/result``: ``accepted`` before its handler
runs, then ``done``, ``failed`` or ``rejected``; a command that cannot run gets a
single ``rejected`` with the reason. The journal remembers each command id, so
a command delivered again (a QoS 1 redelivery, a controller retry) never runs
twice: its last stored result is published again instead, for a controller
that missed it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from shared.clock import utcnow
from shared.messages import (
    MAX_PAYLOAD_BYTES,
    Command,
    CommandAction,
    CommandResult,
    CommandStatus,
)

log = logging.getLogger(__name__)

# Commands waiting for the worker; beyond this a flood is refused instead of queued.
QUEUE_LIMIT = 256
_POLL_S = 1.0
INTERRUPTED_REASON = "outcome unknown: the unit stopped while this command was running"


@dataclass(frozen=True)
class Outcome:
    """What a handler reports: DONE, FAILED or REJECTED (``accepted`` is the processor's)."""

    status: CommandStatus
    reason: str | None = None
    recording_id: str | None = None

    def __post_init__(self) -> None:
        if self.status is CommandStatus.ACCEPTED:
            raise ValueError("a handler's outcome is done, failed or rejected, not accepted")


Handler = Callable[[Command], Outcome]


@dataclass(frozen=True)
class _Undecodable:
    command_id: str
    reason: str


class CommandProcessor:
    """``submit`` and ``reject_undecodable`` only queue, so the MQTT thread never waits."""

    def __init__(
        self,
        handlers: Mapping[CommandAction, Handler],
        reply: Callable[[CommandResult], None],
        *,
        remember_command: Callable[[str, datetime], bool],
        store_result: Callable[[CommandResult], None],
        last_result: Callable[[str], CommandResult | None],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._handlers = dict(handlers)
        self._reply = reply
        self._remember = remember_command
        self._store = store_result
        self._last_result = last_result
        self._clock = clock
        self._queue: queue.Queue[Command | _Undecodable | None] = queue.Queue(QUEUE_LIMIT)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts_lock = threading.Lock()
        self._counts = dict.fromkeys(
            (
                "accepted",
                "done",
                "failed",
                "rejected",
                "rejected_expired",
                "rejected_invalid",
                "rejected_unsupported",
                "rejected_busy",
                "duplicates",
            ),
            0,
        )

    @property
    def counts(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self._counts)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("command processor already started")
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finishes the command in hand; queued ones are dropped unanswered and unremembered,
        so the controller's retry runs them after the restart."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        # A full queue needs no wake-up: the worker is about to look at the stop event.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        thread.join(timeout)
        if thread.is_alive():
            log.error("command worker did not stop within %.1fs", timeout)
        dropped = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            dropped += item is not None
        if dropped:
            log.warning("commands dropped at stop count=%d", dropped)

    def submit(self, command: Command) -> None:
        try:
            self._queue.put_nowait(command)
        except queue.Full:
            # Not remembered, so a later retry of the same id is handled afresh.
            log.warning("command refused, queue full id=%s action=%s", command.id, command.action)
            self._count("rejected_busy")
            self._send(
                CommandResult(
                    command_id=command.id,
                    status=CommandStatus.REJECTED,
                    reason=f"busy: {QUEUE_LIMIT} commands are waiting",
                )
            )

    def reject_undecodable(self, payload: bytes, reason: str) -> None:
        """A ``command`` payload that failed validation: answer it if it carries an id."""
        command_id = _command_id(payload)
        if command_id is None:
            log.warning("invalid command without usable id reason=%s", reason)
            self._count("rejected_invalid")
            return
        try:
            self._queue.put_nowait(_Undecodable(command_id, reason))
        except queue.Full:
            log.warning("invalid command not answered, queue full id=%s", command_id)
            self._count("rejected_invalid")

    # --- worker ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is None:
                continue  # the wake-up put by stop()
            if self._stop.is_set():
                log.warning("command dropped at stop id=%s", _item_id(item))
                continue
            try:
                if isinstance(item, _Undecodable):
                    self._answer_undecodable(item)
                else:
                    self._process(item)
            except Exception:
                log.exception("command processing failed id=%s", _item_id(item))

    def _answer_undecodable(self, item: _Undecodable) -> None:
        # Not stored: the id may belong to a real command whose stored result this
        # rejection must not replace, and storing would also mark the id as seen.
        log.warning("command rejected id=%s reason=%s", item.command_id, item.reason)
        self._count("rejected_invalid")
        self._send(_result(item.command_id, CommandStatus.REJECTED, item.reason))

    def _process(self, command: Command) -> None:
        if not self._remember(command.id, command.expires_at):
            self._replay(command)
            return
        now = self._clock()
        if now >= command.expires_at:
            reason = f"expired at {command.expires_at.isoformat()}"
            log.warning(
                "command rejected id=%s action=%s reason=%s", command.id, command.action, reason
            )
            self._count("rejected_expired")
            self._finish(_result(command.id, CommandStatus.REJECTED, reason))
            return
        handler = self._handlers.get(command.action)
        if handler is None:
            reason = f"unsupported action {command.action.value}"
            log.warning("command rejected id=%s reason=%s", command.id, reason)
            self._count("rejected_unsupported")
            self._finish(_result(command.id, CommandStatus.REJECTED, reason))
            return
        self._count("accepted")
        self._finish(_result(command.id, CommandStatus.ACCEPTED))
        log.info("command running id=%s action=%s", command.id, command.action)
        try:
            outcome = handler(command)
        except Exception as exc:
            log.exception("command handler raised id=%s action=%s", command.id, command.action)
            outcome = Outcome(CommandStatus.FAILED, f"{type(exc).__name__}: {exc}")
        self._count(outcome.status.value)
        log.info(
            "command finished id=%s action=%s status=%s reason=%s",
            command.id,
            command.action,
            outcome.status,
            outcome.reason,
        )
        self._finish(_result(command.id, outcome.status, outcome.reason, outcome.recording_id))

    def _replay(self, command: Command) -> None:
        self._count("duplicates")
        previous = self._last_result(command.id)
        if previous is None or previous.status is CommandStatus.ACCEPTED:
            # Only one worker runs commands, so a stored "accepted" (or nothing) for a
            # repeated id means an earlier process stopped in the middle of it.
            log.warning("duplicate command with unknown outcome id=%s", command.id)
            self._finish(_result(command.id, CommandStatus.FAILED, INTERRUPTED_REASON))
            return
        log.info("duplicate command id=%s: result %s sent again", command.id, previous.status)
        self._send(previous)

    def _finish(self, result: CommandResult) -> None:
        """Stores, then sends: a result that was sent is always one a retry can repeat."""
        self._store(result)
        self._send(result)

    def _send(self, result: CommandResult) -> None:
        try:
            self._reply(result)
        except Exception:
            log.exception("command reply failed id=%s status=%s", result.command_id, result.status)

    def _count(self, key: str) -> None:
        with self._counts_lock:
            self._counts[key] += 1


def _result(
    command_id: str,
    status: CommandStatus,
    reason: str | None = None,
    recording_id: str | None = None,
) -> CommandResult:
    return CommandResult(
        command_id=command_id, status=status, reason=reason, recording_id=recording_id
    )


def _item_id(item: Command | _Undecodable) -> str:
    return item.command_id if isinstance(item, _Undecodable) else item.id


def _command_id(payload: bytes) -> str | None:
    """The ``id`` of a payload that failed validation, if it is a valid command id."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        return None
    try:
        # Validating through the result model applies the CommandId pattern.
        return _result(data["id"], CommandStatus.REJECTED).command_id
    except ValidationError:
        return None
