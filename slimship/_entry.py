"""The `slimship` command's entry point: the command's modules (torch, the exporters) take seconds to
import, so Ctrl-C, SIGTERM or SIGHUP in that time ends the way it does later (`slimship: interrupted`,
exit 130; `slimship: terminated`, exit 128 + the signal), never with a traceback."""

from __future__ import annotations

import signal
import sys
from types import FrameType


class _Stopped(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stopped(signum)


STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def main() -> int:
    """Import the command (a stop signal meanwhile ends it cleanly), then run it."""
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        from slimship.cli import main as run
    except KeyboardInterrupt:
        print("slimship: interrupted", file=sys.stderr)
        return 130
    except _Stopped as stop:
        print(f"slimship: terminated ({signal.Signals(stop.signum).name})", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return run()
