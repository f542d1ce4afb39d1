"""The ``fusionzoo`` subcommands, one module each, resolved by name from :data:`fusionzoo.cli.COMMANDS`.

``fusionzoo/cli.py`` imports only the standard library and this package's ``__init__`` (which
does the same), so ``fusionzoo --help`` needs no torch; ``importlib.import_module`` loads a
subcommand's module, with its imports at the top as everywhere else, only when that subcommand
runs. Nothing but the CLI imports these modules (``tests/test_layering.py`` checks it).
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """A mistake in a command line or its inputs: reported as one line with exit status 2."""
