"""The ``bon-tracker`` command: one module per subcommand."""

from bon_tracker.cli.main import main

__all__ = ["main"]
