"""Ctrl-C and SIGTERM stop a run the same way: both raise KeyboardInterrupt in the main thread, so the run cleans up
its temporary folders and writes its summary. While it takes its output folder, a signal waits until that is done;
while it finishes, further signals are ignored (either takes milliseconds). Kept free of heavy imports: the command
line installs this before anything else loads."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def caused_by_interrupt(error: BaseException) -> bool:
    """True for KeyboardInterrupt and for an error it directly caused: Python 3.11 wraps one raised while a class is
    being created (as during an import, if the signal lands there) in RuntimeError."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            return True
        cause = cause.__cause__
    return False


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handlers(handler: Any) -> Iterator[None]:
    """Install `handler` for Ctrl-C and SIGTERM (not for a Ctrl-C the parent process ignores, as in `cmd &`),
    restoring the previous handlers after; signals can only be handled on the main thread."""
    if not _on_main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in _SIGNALS}
    for number in _SIGNALS:
        if previous[number] is not signal.SIG_IGN:
            signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def interrupts_raised() -> contextlib.AbstractContextManager[None]:
    """Within it, Ctrl-C and SIGTERM raise KeyboardInterrupt."""
    return _handlers(_interrupt)


def interrupts_ignored() -> contextlib.AbstractContextManager[None]:
    """Within it, Ctrl-C and SIGTERM are ignored (for the few milliseconds a run needs to finish cleanly)."""
    return _handlers(signal.SIG_IGN)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within it, Ctrl-C and SIGTERM are held back and raised as KeyboardInterrupt when it ends (unless an error is
    already on its way out), so a few steps that belong together are not cut in the middle."""
    received = []
    with _handlers(lambda signum, _frame: received.append(signum)):
        yield
    if received:
        raise KeyboardInterrupt
