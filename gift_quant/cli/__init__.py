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
    return run(argv)


__all__ = ["main"]
