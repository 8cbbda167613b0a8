"""``python -m fedfs`` is the ``fedfs`` command."""

from .cli.app import run

if __name__ == "__main__":
    run()
