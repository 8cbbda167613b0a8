"""``python -m fedfs`` is the ``fedfs`` command."""

from .cli import run

if __name__ == "__main__":
    run()
