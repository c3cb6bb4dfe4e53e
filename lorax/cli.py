"""The command lines' shared entry point: a user's mistake ends in one line, not a traceback.

A bad flag, config field, path or file is reported by lorax as a ``ValueError`` (or
``FileNotFoundError``, ``NotADirectoryError``, a busy workdir) whose message names the field,
path or row and what would be valid; a command line prints that message and exits 2. Set
``LORAX_TRACEBACK=1`` to see the traceback as well (for a bug report).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app

from lorax import runlock

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    FileExistsError,
    PermissionError,
    runlock.WorkdirBusyError,
)


def run(main: Callable[[list[str]], object], prog: str) -> None:
    """``absl.app.run(main)``, with a user error printed as ``<prog>: error: <message>``."""

    def friendly(argv):
        try:
            return main(argv)
        except USER_ERRORS as e:
            if os.environ.get("LORAX_TRACEBACK"):
                raise
            print(f"{prog}: error: {e}", file=sys.stderr)
            print("(LORAX_TRACEBACK=1 shows the traceback)", file=sys.stderr)
            sys.exit(2)

    app.run(friendly)
