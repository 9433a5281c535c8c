"""The command line: flags become config objects, which the workflows run; no logic lives here."""

INTERRUPTED_AT_START = "gift-quant: interrupted while starting; nothing was done"


def main(argv: list[str] | None = None) -> int:
    """The ``gift-quant`` command. Imported lazily: app.py sets the thread policy before torch loads."""
    import sys

    try:
        from .app import main as run
    except KeyboardInterrupt:  # Ctrl-C during start-up imports: one line, exit 130
        print(INTERRUPTED_AT_START, file=sys.stderr)
        return 130
    from .app import INTERRUPTED, TERMINATED, Terminated

    try:
        code = run(argv)
        _ignore_stops_while_exiting()
    except KeyboardInterrupt:  # landed between the command's own handlers and the line above
        _ignore_stops_while_exiting()
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Terminated:
        _ignore_stops_while_exiting()
        print(TERMINATED, file=sys.stderr)
        return 143
    return code


def _ignore_stops_while_exiting() -> None:
    """Once the command has its exit code (outputs written, or its one interrupt line printed), a Ctrl-C or
    SIGTERM that lands while the interpreter shuts down would kill the process silently with the signal's
    status (Python restores the default handlers late in its shutdown), turning a finished run into an
    unexplained failure. From here on the process only exits, so the stop has nothing left to stop.
    Only in the command's own process: called from Python (tests, notebooks), the caller's handlers stay, and a
    child process would inherit an ignored SIGINT."""
    import signal
    import threading

    from ..util.cpu_policy import launched_as_command

    if threading.current_thread() is not threading.main_thread() or not launched_as_command():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


__all__ = ["main"]
