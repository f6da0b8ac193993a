"""What the `slimship` command shows: quiet third-party libraries, progress for long steps, wide tables.

Without `-v`, logs of other libraries below ERROR are dropped (absl, TensorFlow, torch's exporter
registrations, torchao's "Failed to load", litert-torch's "converted in training mode" about a program
that has no train mode), Python warnings from libraries are routed to logging and dropped, tqdm bars are
disabled, and native code that writes to file descriptor 2 (absl's pre-init lines, TFLite's "Created
XNNPACK delegate") writes to /dev/null while a command runs. slimship's own messages, progress and
errors still reach stderr. `-v` shows everything.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from rich.console import Console

# Read by native libraries when they load: set before TensorFlow / LiteRT / absl are imported.
QUIET_ENV: dict[str, str] = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow / LiteRT C++ logs
    "GLOG_minloglevel": "3",  # glog-style native logs
    "TF_ENABLE_ONEDNN_OPTS": "0",  # no "oneDNN custom operations are on" notice
    "TQDM_DISABLE": "1",  # tqdm bars of third-party code
    "LITERT_TORCH_SHOW_PROGRESS": "n",  # litert-torch's console progress
}
# Loggers that install their own handlers (so a root-handler filter does not reach them).
NOISY_LOGGERS = ("torch", "torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "absl", "torchao")
OWN_LOGGER = "slimship"
_HANDLER_NAME = "slimship-console"


class _ThirdPartyFilter(logging.Filter):
    """Pass slimship's records at WARNING+ and other libraries' records at ERROR+ only."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
        return record.levelno >= (logging.WARNING if own else logging.ERROR)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (test capture, redirection)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_logging(verbose: bool) -> None:
    """Install slimship's stderr log handler; without `verbose`, silence third-party libraries."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(not verbose)  # library warnings become log records (dropped below)
    if verbose:  # third-party loggers keep their own levels
        return
    handler.addFilter(_ThirdPartyFilter())
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    quiet_third_party()


def quiet_third_party() -> None:
    """Raise the level of loggers that bypass the root handler (call again after importing them)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# Native log lines some bindings print through Python's sys.stderr (ExecuTorch: "[cpuinfo_utils.cpp:71] ...").
# CSI / OSC / other escape sequences, then any remaining C0/C1 control character (tab and newline kept)
_CONTROL = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)


def printable(text: str) -> str:
    """`text` (a user-provided string: a description, a name) without terminal control sequences."""
    return _CONTROL.sub("", text)


NATIVE_LOG_LINE = re.compile(r"^\[[\w./-]+\.(?:cpp|cc|c|h):\d+\] ")


class _DropNativeLogLines(io.TextIOBase):
    """A text stream that forwards whole lines to `target`, except native log lines."""

    def __init__(self, target: TextIO, native_fd: int) -> None:
        self.target, self.pending, self.native_fd = target, "", native_fd

    def fileno(self) -> int:
        """Native code that writes to `sys.stderr.fileno()` (ExecuTorch's logs) reaches /dev/null."""
        return self.native_fd

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        kept = "".join(line + "\n" for line in lines if not NATIVE_LOG_LINE.match(line))
        if self.pending and not self.pending.startswith("["):  # cannot become a native log line
            kept, self.pending = kept + self.pending, ""
        if kept:
            self.target.write(kept)
            self.target.flush()
        return len(text)

    def flush(self) -> None:  # a partial line waits for its end (bindings flush after every piece)
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def close(self) -> None:
        if self.pending and not NATIVE_LOG_LINE.match(self.pending):
            self.target.write(self.pending)
        self.pending = ""
        self.target.close()
        super().close()


@contextlib.contextmanager
def native_stderr_quiet(enabled: bool = True) -> Iterator[None]:
    """Send native writes to fd 2 to /dev/null; Python's `sys.stderr` keeps reaching the real stderr."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a capture buffer: Python writes do not use fd 2
        real = False
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    previous = sys.stderr
    try:
        if real:
            stream = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace")
            sys.stderr = _DropNativeLogLines(stream, devnull)
        os.dup2(devnull, 2)
        yield
    finally:
        if real:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
                sys.stderr.close()
            sys.stderr = previous
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ------------------------------------------------------------------------------------------ output

_USER_STDOUT: list[TextIO] = []


def user_stdout() -> TextIO:
    """Where a command's own output goes: the real stdout, while `library_prints_to_stderr` holds."""
    return _USER_STDOUT[-1] if _USER_STDOUT else sys.stdout


class _Discard(io.TextIOBase):
    """A text stream that drops what is written to it."""

    def write(self, text: str) -> int:
        return len(text)


@contextlib.contextmanager
def library_prints_to_stderr(quiet: bool = False) -> Iterator[None]:
    """During a command, Python-level prints of the libraries it calls (a quantiser's size summary, a
    converter's progress) go to stderr, or nowhere when `quiet` (the command without -v: their lines are
    noise beside slimship's own): stdout carries only what slimship writes (`user_stdout`), so `--json -`
    stays parseable and a table is not interleaved with foreign lines."""
    real = sys.stdout
    _USER_STDOUT.append(real)
    sys.stdout = _Discard() if quiet else sys.stderr
    try:
        yield
    finally:
        sys.stdout = real
        _USER_STDOUT.pop()


def stdout_console(to_stderr: bool = False) -> Console:
    """Console for human output; never cuts cells when the stream is not a terminal (wide, no wrap)."""
    stream = None if to_stderr else user_stdout()
    console = Console(file=stream, stderr=to_stderr, highlight=False)
    if not console.is_terminal:
        console = Console(file=stream, stderr=to_stderr, highlight=False, width=1000, soft_wrap=True)
    return console


def stderr_console() -> Console:
    """Console for progress and notes (stderr)."""
    return stdout_console(to_stderr=True)


def note(message: str) -> None:
    """One line for the user on stderr (never on stdout: it may hold JSON)."""
    print(f"note: {message}", file=sys.stderr)


class Steps:
    """Long steps with progress on stderr (a spinner while a step runs on a terminal; a line with its time
    when it ends, everywhere) and their wall-clock seconds in `times`."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or stderr_console()
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Run one step; the yielded dict's 'detail' (if set) is printed after the step's time."""
        info: dict[str, Any] = {}
        start = time.perf_counter()
        if self.console.is_terminal:  # a spinner with the step's name while it runs
            with self.console.status(f"{name} ...", spinner="dots"):
                yield info
        else:  # a log: one line per finished step
            yield info
        seconds = time.perf_counter() - start
        self.times[name] = round(seconds, 3)
        detail = f"  {info['detail']}" if info.get("detail") else ""
        self.console.print(f"✓ {name} ({seconds:.1f} s){detail}")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached the `slimship` command: unwinds like Ctrl-C (temporary folders removed,
    nothing partial kept); the command exits 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: the signals the command treats like Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While the command runs, SIGTERM and SIGHUP raise Terminated (the previous handlers are restored
    afterwards). Only in the main thread, where Python delivers signals; library calls never install it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
