"""A simulated camera: ffmpeg's test pattern (wall clock burnt in) and a tone.

It produces what a unit produces, in real time: H.264 + AAC fragmented-MP4
segments split at forced keyframes by ffmpeg's segment muxer, and a
once-a-second JPEG preview from the same filter graph for snapshots.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from device.capture.base import (
    FRAGMENT_DURATION_US,
    MOVFLAGS,
    SYNC_INTERVAL_S,
    CaptureBackend,
    CaptureError,
    FrameClock,
    OpenSegmentSyncer,
    SegmentListWriter,
    SnapshotImage,
    snapshot_size,
)
from device.config import CaptureConfig
from device.segmentlist import sequence_of

logger = logging.getLogger(__name__)

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
START_TIMEOUT_S = 15.0
SNAPSHOT_TIMEOUT_S = 15.0
_SNAPSHOT_WAIT_S = 5.0
_SNAPSHOT_QUALITY = 5  # mjpeg qscale: 2 (best) .. 31
_KILL_WAIT_S = 5.0
_STDERR_LOGGED_LINES = 100
_STDERR_TAIL_LINES = 20
_MAX_LINE = 4096
_MAX_PREVIEW_BUFFER = 8 * 1024 * 1024
_PR_SET_PDEATHSIG = 1
_CONTENT_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)

_libc = ctypes.CDLL(None)


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: SIGTERM the child (ffmpeg then closes its segment) if we die."""

    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # we died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _find_ffmpeg() -> str:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise CaptureError("ffmpeg not found on PATH")
    return ffmpeg


def _picture_filters(config: CaptureConfig) -> list[str]:
    if not FONT.is_file():
        return []
    fontsize = max(12, config.height // 16)
    return [
        f"drawtext=fontfile={FONT}:text=%{{localtime}}:x=8:y=8:fontsize={fontsize}"
        ":fontcolor=white:box=1:boxcolor=black@0.6:boxborderw=4"
    ]


def _jpeg_filters(config: CaptureConfig) -> list[str]:
    width, height = snapshot_size(config.width, config.height)
    # Full-range yuv420p keeps mjpeg off swscale's deprecated yuvj formats.
    return [f"scale={width}:{height}:out_range=full", "format=yuv420p"]


_JPEG_OUTPUT = ["-c:v", "mjpeg", "-strict", "unofficial", "-color_range", "pc"]


def _source_args(config: CaptureConfig) -> list[str]:
    video = f"testsrc2=size={config.width}x{config.height}:rate={config.framerate}"
    if not config.audio:
        return ["-f", "lavfi", "-i", video]
    # One lavfi input for both streams keeps them paced together under -re.
    return ["-f", "lavfi", "-i", f"{video}[out0];sine=frequency=440:sample_rate=48000[out1]"]


def recording_command(
    ffmpeg: str,
    *,
    config: CaptureConfig,
    recording_dir: Path,
    first_sequence: int,
    list_fd: int,
    preview_fd: int,
) -> list[str]:
    """The ffmpeg command line for one recording run."""
    seconds = config.segment_seconds
    kbps = config.bitrate_kbps
    graph = ",".join([*_picture_filters(config), "split=2[rec][pre]"])
    preview = ",".join(["fps=1", *_jpeg_filters(config)])
    # The segment muxer expands %05d; a literal % in the directory must be doubled.
    pattern = "file:" + str(recording_dir).replace("%", "%%") + "/seg-%05d.mp4"
    segment_options = f"movflags={MOVFLAGS}:frag_duration={FRAGMENT_DURATION_US}:flush_packets=1"
    audio_map = ["-map", "0:a"] if config.audio else []
    audio_codec = ["-c:a", "aac", "-b:a", f"{config.audio_bitrate_kbps}k"] if config.audio else []
    return [
        ffmpeg,
        "-hide_banner",
        "-nostdin",
        # Warnings are expected and harmless here (the muxer notes AAC frames that
        # straddle a split); errors are what explain a failure.
        "-loglevel",
        "error",
        "-nostats",
        "-progress",
        "pipe:1",
        "-stats_period",
        "0.5",
        "-re",
        *_source_args(config),
        "-filter_complex",
        f"[0:v]{graph};[pre]{preview}[preview]",
        "-map",
        "[rec]",
        *audio_map,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        # No frame-threading or lookahead delay: the first fragment reaches the spool sooner.
        "-tune",
        "zerolatency",
        "-pix_fmt",
        "yuv420p",
        "-b:v",
        f"{kbps}k",
        "-maxrate",
        f"{kbps}k",
        "-bufsize",
        f"{2 * kbps}k",
        "-force_key_frames",
        f"expr:gte(t,n_forced*{seconds})",
        *audio_codec,
        "-f",
        "segment",
        "-segment_time",
        str(seconds),
        "-segment_format",
        "mp4",
        "-segment_format_options",
        segment_options,
        "-reset_timestamps",
        "0",
        "-segment_start_number",
        str(first_sequence),
        "-segment_list",
        f"pipe:{list_fd}",
        "-segment_list_type",
        "csv",
        pattern,
        "-map",
        "[preview]",
        *_JPEG_OUTPUT,
        "-q:v",
        str(_SNAPSHOT_QUALITY),
        "-f",
        "mpjpeg",
        f"pipe:{preview_fd}",
    ]


class _PreviewReader:
    """Keeps the latest JPEG from ffmpeg's multipart (mpjpeg) preview stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._latest: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        while True:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                break
            match = _CONTENT_LENGTH.search(self._buffer, 0, head_end)
            if match is None:
                del self._buffer[: head_end + 4]
                continue
            body_start = head_end + 4
            body_end = body_start + int(match.group(1))
            if len(self._buffer) < body_end:
                break
            with self._cond:
                self._latest = bytes(self._buffer[body_start:body_end])
                self._cond.notify_all()
            del self._buffer[:body_end]
        if len(self._buffer) > _MAX_PREVIEW_BUFFER:
            logger.warning("preview stream out of sync; discarding %d bytes", len(self._buffer))
            self._buffer.clear()

    def latest(self, wait_s: float) -> bytes | None:
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None, timeout=wait_s)
            return self._latest


class _EncoderRun:
    """One ffmpeg process: spawned and watched by its own thread until it is reaped.

    The thread that spawns a child is the one PR_SET_PDEATHSIG watches, so the
    spawning thread must live exactly as long as ffmpeg does.
    """

    def __init__(
        self,
        ffmpeg: str,
        config: CaptureConfig,
        recording_dir: Path,
        first_sequence: int,
        on_unexpected_exit: Callable[[str], None],
    ) -> None:
        self._ffmpeg = ffmpeg
        self._config = config
        self._writer = SegmentListWriter(recording_dir)
        self._next_sequence = first_sequence
        self._syncer = OpenSegmentSyncer(self._writer, lambda: self._next_sequence, SYNC_INTERVAL_S)
        self._last_end_s = 0.0
        self._on_unexpected_exit = on_unexpected_exit
        self.clock = FrameClock()
        self.preview = _PreviewReader()
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawn_error: str | None = None
        self._settled = threading.Event()  # first frame encoded, or ffmpeg gone
        self._exited = threading.Event()
        self._stop_requested = threading.Event()
        self._halt = threading.Event()  # abandon the pipes (only after ffmpeg is reaped)
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._stderr_logged = 0
        self._thread = threading.Thread(
            target=self._main, name=f"capture-ffmpeg-{recording_dir.name}", daemon=True
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and not self._exited.is_set() else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._exited.is_set()

    def launch(self, timeout: float) -> None:
        self._thread.start()
        self._settled.wait(timeout)
        if self._spawn_error is not None:
            self._thread.join()
            raise CaptureError(self._spawn_error)
        if self.clock.count == 0:
            self.stop(_KILL_WAIT_S)
            detail = "; ".join(self._stderr_tail) or "no error output"
            if self._exited.is_set() and self._proc is not None:
                status = f"ffmpeg exited with status {self._proc.returncode}"
            else:
                status = f"ffmpeg encoded no frame within {timeout:.0f}s"
            raise CaptureError(f"{status}: {detail}")

    def stop(self, timeout: float) -> None:
        """SIGINT (ffmpeg closes its segment), SIGKILL after ``timeout``; always reaped."""
        self._stop_requested.set()
        # From on_failure (our own thread) ffmpeg is already reaped: nothing to wait for.
        if not self._thread.is_alive() or self._thread is threading.current_thread():
            return
        self._signal(signal.SIGINT)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("ffmpeg pid=%s ignored SIGINT for %.0fs; killing it", self.pid, timeout)
            self._signal(signal.SIGKILL)
            self._thread.join(_KILL_WAIT_S)
        if self._thread.is_alive():
            self._halt.set()
            self._thread.join(_KILL_WAIT_S)

    def _signal(self, signum: int) -> None:
        proc = self._proc
        if proc is not None and not self._exited.is_set():
            proc.send_signal(signum)

    def _main(self) -> None:
        list_r, list_w = os.pipe()
        preview_r, preview_w = os.pipe()
        command = recording_command(
            self._ffmpeg,
            config=self._config,
            recording_dir=self._writer.recording_dir,
            first_sequence=self._next_sequence,
            list_fd=list_w,
            preview_fd=preview_w,
        )
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(list_w, preview_w),
                start_new_session=True,
                # The child runs only prctl, getppid and kill: nothing that takes a lock.
                preexec_fn=_die_with_parent(os.getpid()),  # noqa: PLW1509
            )
        except (OSError, subprocess.SubprocessError) as exc:
            for fd in (list_r, list_w, preview_r, preview_w):
                os.close(fd)
            self._spawn_error = f"cannot run ffmpeg: {exc}"
            self._settled.set()
            return
        finally:
            if self._proc is not None:
                os.close(list_w)
                os.close(preview_w)
        proc = self._proc
        logger.info(
            "ffmpeg started pid=%d recording=%s first_seq=%d",
            proc.pid,
            self._writer.recording_dir.name,
            self._next_sequence,
        )
        self._syncer.start()
        assert proc.stdout is not None and proc.stderr is not None
        try:
            self._pump(
                {
                    proc.stdout.fileno(): self._on_progress_line,
                    proc.stderr.fileno(): self._on_stderr_line,
                    list_r: self._on_list_line,
                },
                preview_r,
            )
        except Exception:
            # Nobody would drain ffmpeg's pipes any more: it must not outlive this thread.
            logger.exception("reading ffmpeg output failed pid=%d; killing it", proc.pid)
            proc.kill()
        finally:
            returncode = proc.wait()
            self._syncer.stop()
            self._exited.set()
            self._settled.set()
            proc.stdout.close()
            proc.stderr.close()
            os.close(list_r)
            os.close(preview_r)
        self._after_exit(returncode)

    def _pump(self, line_handlers: dict[int, Callable[[str], None]], preview_fd: int) -> None:
        """Read every pipe until ffmpeg closes them all, so none ever fills up."""
        partial: dict[int, bytes] = dict.fromkeys(line_handlers, b"")
        with selectors.DefaultSelector() as selector:
            for fd in (*line_handlers, preview_fd):
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map() and not self._halt.is_set():
                for key, _ in selector.select(timeout=1.0):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fd)
                        if partial.get(key.fd):
                            line_handlers[key.fd](partial[key.fd].decode("utf-8", "replace"))
                        continue
                    if key.fd == preview_fd:
                        self.preview.feed(chunk)
                        continue
                    *lines, rest = (partial[key.fd] + chunk).split(b"\n")
                    partial[key.fd] = rest[-_MAX_LINE:]
                    for line in lines:
                        line_handlers[key.fd](line.decode("utf-8", "replace").rstrip("\r"))

    def _on_progress_line(self, line: str) -> None:
        key, _, value = line.partition("=")
        if key == "frame" and value.strip().isdigit():
            self.clock.tick(int(value))
            if self.clock.count > 0:
                self._settled.set()

    def _on_stderr_line(self, line: str) -> None:
        if not line.strip():
            return
        line = line[:_MAX_LINE]
        self._stderr_tail.append(line)
        self._stderr_logged += 1
        pid = self._proc.pid if self._proc is not None else None
        if self._stderr_logged <= _STDERR_LOGGED_LINES:
            logger.warning("ffmpeg pid=%s: %s", pid, line)
        elif self._stderr_logged == _STDERR_LOGGED_LINES + 1:
            logger.warning("ffmpeg pid=%s: further output not logged", pid)

    def _on_list_line(self, line: str) -> None:
        parts = line.strip().rsplit(",", 2)
        sequence = sequence_of(parts[0].strip('"')) if len(parts) == 3 else None
        if sequence is None:
            if line.strip():
                logger.error("unexpected segment list line from ffmpeg: %r", line)
            return
        try:
            start_s, end_s = float(parts[1]), float(parts[2])
        except ValueError:
            logger.error("unexpected segment list line from ffmpeg: %r", line)
            return
        self._writer.append(sequence, start_s, end_s)
        self._next_sequence = sequence + 1
        self._last_end_s = end_s

    def _after_exit(self, returncode: int) -> None:
        # A clean exit leaves no file beyond the last listed one; anything there was cut short.
        self._writer.salvage(self._next_sequence, self._last_end_s)
        if self._stop_requested.is_set():
            logger.info("ffmpeg stopped returncode=%d", returncode)
            return
        if self.clock.count == 0:
            return  # launch() reports a failure to start
        detail = self._stderr_tail[-1] if self._stderr_tail else "no error output"
        self._on_unexpected_exit(f"ffmpeg exited unexpectedly with status {returncode}: {detail}")


class SyntheticBackend(CaptureBackend):
    """A camera simulated by ffmpeg, for tests, demos and simulated fleets."""

    def __init__(self, config: CaptureConfig, on_failure: Callable[[str], None]) -> None:
        super().__init__(config, on_failure)
        self._lock = threading.Lock()
        self._run: _EncoderRun | None = None
        self._closed = False

    @property
    def encoder_pid(self) -> int | None:
        run = self._run
        return run.pid if run is not None else None

    @property
    def running(self) -> bool:
        run = self._run
        return run is not None and run.alive

    def start(self, recording_dir: Path, first_sequence: int = 0) -> None:
        with self._lock:
            if self._closed:
                raise CaptureError("capture backend is closed")
            if self._run is not None:
                if self._run.alive:
                    raise CaptureError("capture is already recording")
                self._run.stop(_KILL_WAIT_S)
                self._run = None
            ffmpeg = _find_ffmpeg()
            try:
                recording_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CaptureError(f"cannot create {recording_dir}: {exc}") from exc
            run = _EncoderRun(
                ffmpeg, self.config, recording_dir, first_sequence, self._report_failure
            )
            run.launch(START_TIMEOUT_S)
            self._run = run

    def stop(self, timeout: float = 15.0) -> None:
        # Not under the lock: on_failure handlers may call stop() from the run's thread.
        with self._lock:
            run, self._run = self._run, None
        if run is not None:
            run.stop(timeout)

    def frames_arriving(self, within_s: float) -> bool:
        run = self._run
        return run is not None and run.alive and run.clock.within(within_s)

    def snapshot(self) -> SnapshotImage:
        run = self._run
        if run is not None and run.alive:
            jpeg = run.preview.latest(_SNAPSHOT_WAIT_S)
            if jpeg is None:
                raise CaptureError("the encoder has produced no preview frame yet")
        else:
            jpeg = self._single_frame()
        # At most 640 px wide at this quality the test picture stays far below
        # the limit (about 80 KB at 640x2160); from_jpeg still enforces it.
        return SnapshotImage.from_jpeg(jpeg)

    def camera_present(self) -> bool | None:
        return shutil.which("ffmpeg") is not None

    def close(self) -> None:
        self.stop()
        with self._lock:
            self._closed = True

    def _single_frame(self) -> bytes:
        filters = ",".join([*_picture_filters(self.config), *_jpeg_filters(self.config)])
        source = (
            f"testsrc2=size={self.config.width}x{self.config.height}:rate={self.config.framerate}"
        )
        args = ["-f", "lavfi", "-i", source, "-vf", filters, "-frames:v", "1"]
        return _run_ffmpeg([*args, *_JPEG_OUTPUT, "-q:v", str(_SNAPSHOT_QUALITY)])


def _run_ffmpeg(args: list[str]) -> bytes:
    """One short ffmpeg run writing a single JPEG to stdout."""
    command = [_find_ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", *args]
    command += ["-f", "image2pipe", "pipe:1"]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SNAPSHOT_TIMEOUT_S,
            check=False,
            preexec_fn=_die_with_parent(os.getpid()),
        )
    except subprocess.TimeoutExpired as exc:
        raise CaptureError(f"ffmpeg took over {SNAPSHOT_TIMEOUT_S:.0f}s for a snapshot") from exc
    except (OSError, subprocess.SubprocessError) as exc:
        raise CaptureError(f"cannot run ffmpeg: {exc}") from exc
    if done.returncode != 0 or not done.stdout:
        detail = done.stderr.decode("utf-8", "replace").strip()[-500:] or "no error output"
        raise CaptureError(f"ffmpeg snapshot failed with status {done.returncode}: {detail}")
    return done.stdout
