"""Holding Ctrl-C and SIGTERM back while a file is being written.

`torch.save` calls Python's `write` from C++; a KeyboardInterrupt raised inside that call comes
out as a RuntimeError ("unexpected pos ..."), which the CLI would report as an internal error
(exit 4) instead of an interruption (exit 130). Inside `deferred()` the two signals are only
noted; when the block ends the handlers in place before are restored and the first noted signal
is delivered to them, so the write finishes whole and the run then stops as it would have.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM postponed to its end (main thread only: elsewhere
    Python delivers no signals, so there is nothing to hold)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def note(signum: int, _frame: Any) -> None:
        pending.append(signum)

    previous = {s: signal.signal(s, note) for s in HELD}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])  # to the restored handler: KeyboardInterrupt, or the default action
