"""The command line: flags become config objects, which the workflows run; no logic lives here."""


def main(argv: list[str] | None = None) -> int:
    """The ``gift-quant`` command. Imported lazily: app.py sets the thread policy before torch loads."""
    from .app import main as run

    return run(argv)


__all__ = ["main"]
