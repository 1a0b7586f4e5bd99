"""The recording agent: wires button, commands and schedule to the recorder, the spool to
the uploader, and everything to the MQTT link. Each part runs on its own thread so
that a fault in one (a UI press, a bad message, a dead broker) cannot stop a recording.
"""

from __future__ import annotations

import base64
import logging
import subprocess
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from device.button import PressKind, RecordButton
from device.capture import create_backend
from device.commands import CommandProcessor, Outcome
from device.config import AgentConfig
from device.control_socket import ControlServer, drive_press
from device.desired import DesiredStateStore
from device.health import HealthProbe, read_clock
from device.journal import Journal
from device.light import Light, LightPattern, make_pin_factory
from device.link import Link
from device.recorder import Recorder
from device.scheduler import WindowScheduler
from device.segment_intake import SegmentIntake
from device.segment_watcher import SegmentWatcher
from device.simulated_clock import SimulatedClock
from device.spool import Spool
from device.supervision import Supervisor
from device.uploader import Uploader
from shared import __version__
from shared.clock import utcnow
from shared.messages import (
    CaptureWindow,
    Command,
    CommandAction,
    CommandResult,
    CommandStatus,
    DesiredState,
    EndReason,
    Event,
    EventKind,
    Health,
    Message,
    RecorderState,
    RecordingManifest,
    Severity,
    Snapshot,
    StoredConfirmation,
    Trigger,
    UploadGrant,
)
from shared.topics import Channel

log = logging.getLogger(__name__)

_TICK_S = 1.0
# A second tap this soon after a press started a recording is a fumbled double
# press while idle, not a request to stop.
_STOP_GRACE_S = 1.5
_OUTBOX_LIMIT = 1000
_CHANNELS_KEPT_WHILE_OFFLINE = frozenset({Channel.EVENT, Channel.RECORDING, Channel.REPORTED})


@dataclass
class _Counters:
    rejected_messages: int = 0
    disk_low: bool = False
    last_tick: float = field(default_factory=time.monotonic)
    button_started_at: float = 0.0


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._counters = _Counters()
        self._health_interval = config.health.interval_s
        self._outbox: deque[tuple[Channel, Message]] = deque(maxlen=_OUTBOX_LIMIT)
        self._outbox_lock = threading.Lock()
        config.spool_dir.mkdir(parents=True, exist_ok=True)

        self.journal = Journal(config.journal_path, config.device_id)
        self.spool = Spool(config.spool_dir, config.spool.min_free_mb * 1024 * 1024)
        self.desired = DesiredStateStore(self.journal, __version__)
        self.backend = create_backend(config.capture, on_failure=self._on_capture_failure)
        self.recorder = Recorder(
            self.backend,
            self.journal,
            self.spool,
            publish_event=self._publish_event,
            publish_manifest=self._publish_manifest,
            on_state=self._on_state,
            video_codec="h264",
            audio_codec="aac" if config.capture.audio else None,
        )
        self.link = Link(
            config.device_id,
            config.broker,
            next_epoch=self.journal.next_epoch,
            agent_version=__version__,
            capabilities=self._capabilities(),
            on_message=self._on_message,
            on_connection_change=self._on_connection_change,
            on_rejected=self._on_rejected,
        )
        self.uploader = Uploader(
            self.journal, self.spool, self.link.publish, config.upload, config.device_id
        )
        self.recorder.on_recording_ended(self._recording_ended)
        self.scheduler = WindowScheduler(self.recorder, self.journal, self._schedule, utcnow)
        self.recorder.on_recording_ended(self.scheduler.recording_ended)
        self.intake = SegmentIntake(
            self.journal,
            self.spool,
            current_run=lambda: self.recorder.current_run,
            on_new_segment=self.uploader.wake,
            publish_event=self._publish_event,
            publish_manifest=self._publish_manifest,
        )
        self.watcher = SegmentWatcher(config.spool_dir, self.intake.on_closed)
        self.commands = CommandProcessor(
            handlers={
                CommandAction.START_RECORDING: self._cmd_start,
                CommandAction.STOP_RECORDING: self._cmd_stop,
                CommandAction.BOOKMARK: self._cmd_bookmark,
                CommandAction.SNAPSHOT: self._cmd_snapshot,
                CommandAction.REBOOT: self._cmd_reboot,
                CommandAction.APPLY: self._cmd_apply,
            },
            reply=self._reply,
            remember_command=self.journal.remember_command,
            store_result=self.journal.store_command_result,
            last_result=self.journal.last_command_result,
        )
        pin_factory = make_pin_factory(config.gpio.mock)
        self.light = Light(config.gpio.light_pin, pin_factory)
        self._presses = ThreadPoolExecutor(max_workers=1, thread_name_prefix="press")
        self.button = RecordButton(
            config.gpio.button_pin,
            config.gpio.long_press_s,
            config.gpio.double_press_s,
            on_press=lambda kind: self._presses.submit(self._on_press, kind),
            pin_factory=pin_factory,
            double_press_enabled=lambda: self.recorder.state is RecorderState.RECORDING,
        )
        clock = SimulatedClock() if config.system.simulated_clock else None
        self.control = ControlServer(
            config.system.control_socket,
            on_press=self._simulated_press,
            status=self.status,
            on_clock=clock.set if clock is not None else None,
        )
        self.health = HealthProbe(
            config.data_dir,
            self._started,
            config.capture.audio_device if config.capture.backend == "picamera2" else None,
            clock_reader=clock.read if clock is not None else read_clock,
        )
        self.supervisor = Supervisor(healthy=self._healthy)
        self._apply_settings(self.desired.current)

    # --- lifecycle ------------------------------------------------------------------

    def run(self) -> int:
        """Runs until ``request_stop``; returns the process exit status."""
        try:
            self._start_parts()
            self.supervisor.ready()
            self._loop()
        finally:
            self._stop_parts()
        return 0

    def request_stop(self) -> None:
        self._stop.set()

    def _start_parts(self) -> None:
        recovered = self.intake.recover_interrupted()
        if recovered:
            log.warning("recovered interrupted recordings: %s", ", ".join(recovered))
        self.watcher.start()
        self.uploader.start()
        self.scheduler.start()
        self.commands.start()
        self.link.start()
        self.control.start()
        self.supervisor.start()
        self._update_light()
        log.info(
            "agent started device=%s version=%s backend=%s",
            self.config.device_id,
            __version__,
            self.config.capture.backend,
        )

    def _stop_parts(self) -> None:
        log.info("agent stopping device=%s", self.config.device_id)
        self.supervisor.stopping()
        self.scheduler.stop()
        if self.recorder.state is RecorderState.RECORDING:
            self.recorder.stop(EndReason.SHUTDOWN)
        self.control.stop()
        self.button.close()
        self._presses.shutdown(wait=True)
        self.commands.stop()
        self.uploader.stop()
        self.watcher.stop()
        self.link.stop()
        self.supervisor.stop()
        self.light.close()
        self.backend.close()
        self.journal.close()

    def _loop(self) -> None:
        next_health = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            self._counters.last_tick = now
            self._guard_disk()
            self._update_light()
            if now >= next_health:
                self._publish_health()
                next_health = now + self._health_interval
            self._stop.wait(_TICK_S)

    # --- presses and commands --------------------------------------------------------

    def _on_press(self, kind: PressKind) -> None:
        state = self.recorder.state
        log.info("button press kind=%s state=%s", kind.value, state.value)
        if kind is PressKind.LONG:
            return
        if state is RecorderState.RECORDING:
            if kind is PressKind.DOUBLE:
                self.recorder.bookmark("button")
            elif time.monotonic() - self._counters.button_started_at < _STOP_GRACE_S:
                log.info("press ignored: recording started %.1f s ago", _STOP_GRACE_S)
            else:
                self.recorder.stop(EndReason.BUTTON)
        elif state in {RecorderState.IDLE, RecorderState.ERROR}:
            self._counters.button_started_at = time.monotonic()
            self.recorder.start(Trigger.BUTTON)
        self._update_light()

    def _recording_ended(self, recording_id: str) -> None:
        self.uploader.hold_for_spread()
        self.uploader.forget_recording_if_done(recording_id)

    def _simulated_press(self, kind: PressKind) -> None:
        if not self.config.gpio.mock:
            raise PermissionError("presses from the control socket need gpio.mock = true")
        drive_press(self.button.pin, kind, self.config.gpio.long_press_s)

    def _cmd_start(self, command: Command) -> Outcome:
        result = self.recorder.start(Trigger.COMMAND)
        status = CommandStatus.DONE if result.ok else CommandStatus.REJECTED
        return Outcome(status, result.reason, result.recording_id)

    def _cmd_stop(self, command: Command) -> Outcome:
        result = self.recorder.stop(EndReason.COMMAND)
        status = CommandStatus.DONE if result.ok else CommandStatus.REJECTED
        return Outcome(status, result.reason, result.recording_id)

    def _cmd_bookmark(self, command: Command) -> Outcome:
        result = self.recorder.bookmark("command", command.note)
        status = CommandStatus.DONE if result.ok else CommandStatus.REJECTED
        return Outcome(status, result.reason, result.recording_id)

    def _cmd_snapshot(self, command: Command) -> Outcome:
        image = self.backend.snapshot()
        snapshot = Snapshot(
            taken_at=utcnow(),
            command_id=command.id,
            width=image.width,
            height=image.height,
            jpeg_base64=base64.b64encode(image.jpeg).decode(),
        )
        if not self.link.publish(Channel.SNAPSHOT, snapshot, qos=1):
            return Outcome(CommandStatus.FAILED, "not connected to the broker")
        return Outcome(CommandStatus.DONE, None, self.recorder.recording_id)

    def _cmd_reboot(self, command: Command) -> Outcome:
        argv = self.config.system.reboot_command
        if not argv:
            log.info(
                "reboot requested command=%s: no reboot_command configured, ignoring", command.id
            )
            return Outcome(CommandStatus.DONE, "no reboot command configured on this unit")
        timer = threading.Timer(2.0, self._reboot, args=(argv,))
        timer.daemon = True
        timer.start()
        return Outcome(CommandStatus.DONE, f"rebooting with {' '.join(argv)}")

    def _reboot(self, argv: list[str]) -> None:
        if self.recorder.state is RecorderState.RECORDING:
            self.recorder.stop(EndReason.SHUTDOWN)
        log.warning("rebooting: %s", " ".join(argv))
        try:
            subprocess.run(argv, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("reboot command failed: %s", exc)
            self._publish_event(
                Event(
                    kind=EventKind.CAPTURE_ERROR,
                    severity=Severity.ERROR,
                    message=f"reboot command failed: {exc}",
                )
            )

    def _cmd_apply(self, command: Command) -> Outcome:
        assert command.desired is not None
        self._apply_desired(command.desired)
        return Outcome(CommandStatus.DONE)

    # --- messages ----------------------------------------------------------------------

    def _on_message(self, channel: Channel, message: Message) -> None:
        if isinstance(message, Command):
            self.commands.submit(message)
        elif isinstance(message, UploadGrant):
            self.uploader.on_grant(message)
        elif isinstance(message, StoredConfirmation):
            self.uploader.on_stored(message)
        elif isinstance(message, DesiredState):
            self._apply_desired(message)

    def _on_rejected(self, channel: Channel, reason: str, payload: bytes) -> None:
        self._counters.rejected_messages += 1
        if channel is Channel.COMMAND:
            self.commands.reject_undecodable(payload, reason)

    def _on_connection_change(self, online: bool) -> None:
        self.uploader.set_online(online)
        if not online:
            return
        self._publish(Channel.REPORTED, self.desired.reported(), retain=True)
        for recording_id in self.journal.recordings_with_pending_segments():
            manifest = self.journal.manifest(recording_id)
            if manifest is not None:
                self._publish_manifest(manifest)
        self._flush_outbox()

    def _apply_desired(self, desired: DesiredState) -> None:
        result = self.desired.apply(desired)
        if result.applied:
            self._apply_settings(desired)
            self.scheduler.wake()
            self._publish_event(
                Event(
                    kind=EventKind.CONFIG_APPLIED,
                    message=f"desired state version {desired.version} applied",
                    data={"version": desired.version},
                )
            )
        self._publish(Channel.REPORTED, self.desired.reported(), retain=True)

    def _schedule(self) -> list[CaptureWindow]:
        desired = self.desired.current
        return desired.schedule if desired else []

    def _apply_settings(self, desired: DesiredState | None) -> None:
        settings = desired.settings if desired else None
        interval = settings.health_interval_s if settings else None
        self._health_interval = interval or self.config.health.interval_s
        kbps = settings.upload_bandwidth_kbps if settings else None
        self.uploader.set_bandwidth_kbps(
            kbps if kbps is not None else self.config.upload.bandwidth_kbps
        )

    def _publish(
        self, channel: Channel, message: Message, *, retain: bool = False, qos: int = 1
    ) -> bool:
        if self.link.publish(channel, message, qos=qos, retain=retain):
            return True
        if channel in _CHANNELS_KEPT_WHILE_OFFLINE or channel is Channel.COMMAND_RESULT:
            with self._outbox_lock:
                self._outbox.append((channel, message))
        return False

    def _flush_outbox(self) -> None:
        with self._outbox_lock:
            pending = list(self._outbox)
            self._outbox.clear()
        for channel, message in pending:
            self._publish(channel, message, retain=channel is Channel.REPORTED)

    def _reply(self, result: CommandResult) -> None:
        self._publish(Channel.COMMAND_RESULT, result)

    def _publish_event(self, event: Event) -> None:
        self._publish(Channel.EVENT, event)

    def _publish_manifest(self, manifest: RecordingManifest) -> None:
        self._publish(Channel.RECORDING, manifest)

    # --- health, light, disk, supervision ----------------------------------------------

    def _publish_health(self) -> None:
        hw = self.health.sample(recording=self.recorder.state is RecorderState.RECORDING)
        can_record, why = self.spool.can_record()
        segments, spool_bytes = self.journal.backlog()
        health = Health(
            state=self.recorder.state,
            recording_id=self.recorder.recording_id,
            soc_temp_c=hw.soc_temp_c,
            throttling=hw.throttling,
            disk_free_bytes=hw.disk_free_bytes,
            disk_total_bytes=hw.disk_total_bytes,
            can_record=can_record,
            cannot_record_reason=why,
            spool_segments=segments,
            spool_bytes=spool_bytes,
            camera_present=self.backend.camera_present(),
            mic_level_dbfs=hw.mic_level_dbfs,
            clock_synced=hw.clock_synced,
            clock_offset_ms=hw.clock_offset_ms,
            uptime_s=hw.uptime_s,
            agent_version=__version__,
            rejected_messages=self._counters.rejected_messages,
        )
        self.link.publish(Channel.HEALTH, health, qos=0)

    def _guard_disk(self) -> None:
        can_record, why = self.spool.can_record()
        if can_record == (not self._counters.disk_low):
            return
        self._counters.disk_low = not can_record
        if not can_record:
            log.error("disk budget reached: %s", why)
            if self.recorder.state is RecorderState.RECORDING:
                self.recorder.stop(EndReason.DISK_FULL)
            self._publish_event(
                Event(
                    kind=EventKind.DISK_LOW,
                    severity=Severity.ERROR,
                    message=f"new recordings refused: {why}",
                )
            )
        else:
            self._publish_event(Event(kind=EventKind.DISK_OK, message="disk space available again"))

    def _update_light(self) -> None:
        state = self.recorder.state
        if state is RecorderState.RECORDING:
            pattern = LightPattern.RECORDING
        elif state in {RecorderState.STARTING, RecorderState.STOPPING}:
            pattern = LightPattern.STARTING
        elif state is RecorderState.ERROR:
            pattern = LightPattern.ERROR
        elif self._counters.disk_low or self.backend.camera_present() is False:
            pattern = LightPattern.CANNOT_RECORD
        elif self.journal.backlog()[0] > 0:
            pattern = LightPattern.UPLOAD_BACKLOG
        else:
            pattern = LightPattern.OFF
        self.light.show(pattern)

    def _on_state(self, state: RecorderState) -> None:
        # The light must be on as soon as the camera records, not at the next tick.
        if state is RecorderState.RECORDING:
            self.light.show(LightPattern.RECORDING)
        elif state is RecorderState.STARTING:
            self.light.show(LightPattern.STARTING)
        self.supervisor.status(f"state={state.value}")

    def _on_capture_failure(self, reason: str) -> None:
        self.recorder.on_capture_failure(reason)
        self._update_light()

    def _healthy(self) -> bool:
        if self.recorder.state is RecorderState.RECORDING:
            return self.backend.frames_arriving(self.config.capture.stall_timeout_s)
        return time.monotonic() - self._counters.last_tick < 10 * _TICK_S + 5

    def _capabilities(self) -> list[str]:
        caps = ["record", "bookmark", "snapshot", "reboot", "apply", "schedule"]
        caps.append(f"capture:{self.config.capture.backend}")
        if self.config.capture.audio:
            caps.append("audio")
        return caps

    def status(self) -> dict[str, object]:
        segments, spool_bytes = self.journal.backlog()
        return {
            "device_id": self.config.device_id,
            "state": self.recorder.state.value,
            "recording_id": self.recorder.recording_id,
            "light": self.light.pattern.value,
            "light_on": self.light.is_lit,
            "connected": self.link.connected,
            "subscribed": self.link.subscribed,
            "spool_segments": segments,
            "spool_bytes": spool_bytes,
            "rejected_messages": self._counters.rejected_messages,
        }
