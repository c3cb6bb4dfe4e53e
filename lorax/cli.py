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

from lorax import configdoc, runlock

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

    try:
        app.run(friendly)
    except (AttributeError, KeyError):  # raised while applying a --config.<field> override
        message = _unknown_override(sys.argv[1:])
        if message is None or os.environ.get("LORAX_TRACEBACK"):
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _unknown_override(args: list[str]) -> str | None:
    """For ``--config.a.b=v`` overrides naming no field of the ``--config`` file's config: the
    first such one, and the valid fields of its section; None if every override exists."""
    files = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    if not files:
        return None
    config = configdoc.load_file(files[0])
    for arg in args:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config.") :].split("=", 1)[0]
        node, where = config, "the config"
        for part in dotted.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                return (
                    f"--config.{dotted}: {where} has no field {part!r}; its fields: "
                    f"{', '.join(sorted(keys))} (--print_config lists every field with its "
                    "meaning)"
                )
            node, where = node[part], f"section {part!r}"
    return None
