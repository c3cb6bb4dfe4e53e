"""The command lines' shared entry point: a user's mistake ends in one line, not a traceback.

A bad flag, config field, path or file is reported by lorax as a ``ValueError`` (or
``FileNotFoundError``, ``NotADirectoryError``, a busy workdir, a :class:`UserError` such as
a NaN stop) whose message names the field, path or row and what would be valid; a command line
prints that message and exits 2. A Ctrl-C ends in one line too (the loop's says which
checkpoint a rerun resumes from), exit 130. Set ``LORAX_TRACEBACK=1`` to see the traceback as
well (for a bug report).

Importing this module also drops transformers' "PyTorch was not found" notice, which every
command printed first and which reads like an error: lorax never uses PyTorch models. Only that
one record of the ``transformers`` logger is dropped; its other warnings and errors pass. So is
JAX's traceback saying that its CUDA plugin (the ``[plan]`` extra) found no CUDA on a machine
with no GPU; JAX's other warnings and errors pass.

Every command line also keeps the programs XLA compiles in JAX's persistent compilation cache
(:func:`use_xla_cache`), so a second ``lorax.predict`` or ``lorax.export`` of a run starts warm.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from absl import app

from lorax import configdoc, runlock


class UserError(Exception):
    """An error the user fixes by changing the config, flags or data (e.g. a diverged run);
    the command lines print its message as one line."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    FileExistsError,
    PermissionError,
    runlock.WorkdirBusyError,
    UserError,
)


def note(message: str) -> None:
    """A command line's word on what it is doing (stderr, at once), for phases that take
    more than a moment: loading a run, compiling, writing."""
    print(message, file=sys.stderr, flush=True)


def xla_cache_dir() -> str | None:
    """Where the command lines keep compiled XLA programs: ``$LORAX_XLA_CACHE`` if set (``0``
    or empty: nowhere, the cache is off), else ``xla/`` under the lorax cache folder
    (``$LORAX_CACHE`` or ``~/.cache/lorax``). None when JAX's own
    ``JAX_COMPILATION_CACHE_DIR`` is set (it is used as it is) or the cache is off."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    chosen = os.environ.get("LORAX_XLA_CACHE")
    if chosen is not None:
        return None if chosen.strip() in ("", "0") else os.path.expanduser(chosen)
    from lorax import assets

    return os.fspath(assets.cache_root() / "xla")


XLA_CACHE_BYTES = 2 << 30  # the cache's size cap (a MiniLM predict adds ~0.3 MB)


def use_xla_cache() -> str | None:
    """Turns on JAX's persistent compilation cache in :func:`xla_cache_dir` (before anything is
    compiled; compiles from 0.1 s up are kept, so a run's forward pass and step are; at most
    :data:`XLA_CACHE_BYTES`, the least recently used dropped first) and returns it. The
    cache is keyed by the program, the jax version and the flags: a hit is the executable a
    fresh compile would build."""
    path = xla_cache_dir()
    if path is None:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    if not os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE"):  # least recently used go first
        jax.config.update("jax_compilation_cache_max_size", XLA_CACHE_BYTES)
    _mark_unmarked_entries(path)
    return path


def _mark_unmarked_entries(path: str) -> None:
    """Gives each compiled program in the cache folder that lacks one its ``-atime`` mark (its
    write time). JAX's size-capped cache reads the marks of all entries before it writes one,
    and a single entry without a mark (written with no cap: an older lorax, JAX's own cache
    variables, another tool sharing the folder) made every later write fail, so the cache
    stopped growing and each compile printed a warning."""
    try:
        entries = [e for e in os.scandir(path) if e.name.endswith("-cache")]
    except OSError:  # a folder not there yet (JAX makes it) or unreadable (JAX warns)
        return
    for entry in entries:
        mark = entry.path.removesuffix("-cache") + "-atime"
        try:
            if not os.path.exists(mark):
                with open(mark, "xb") as f:  # "x": a mark another process wrote stays
                    f.write(entry.stat().st_mtime_ns.to_bytes(8, "little"))
        except OSError:
            continue


def _not_torch_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


# transformers logs the notice on its root logger ("transformers") when it is first imported,
# which lorax does lazily (lorax.checkpoints.load_tokenizer), after this module.
logging.getLogger("transformers").addFilter(_not_torch_notice)


def _not_missing_cuda(record: logging.LogRecord) -> bool:
    """False for JAX's report that its CUDA plugin found no CUDA on this machine: with the
    ``[plan]`` extra (the plugin compiles for described GPUs) on a machine with no GPU, JAX
    logs that as a 20-line traceback at its first backend use and goes on with the CPU, as
    intended. Any other plugin failure, and this one on a machine with an NVIDIA device (a GPU
    whose CUDA libraries are missing, where JAX would quietly fall back to the CPU), passes."""
    if not str(record.msg).startswith("Jax plugin configuration error"):
        return True
    error = record.exc_info[1] if record.exc_info else None
    return "Unable to load CUDA" not in str(error) or _has_nvidia_device()


def _has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


# The same plugin's C++ loader still says "Could not find cuda drivers" on such a machine (absl
# INFO lines written before absl's logging starts, which no setting here reaches).
logging.getLogger("jax._src.xla_bridge").addFilter(_not_missing_cuda)


def run(main: Callable[[list[str]], object], prog: str) -> None:
    """``absl.app.run(main)``, with a user error printed as ``<prog>: error: <message>``, and
    the XLA compilation cache on (:func:`use_xla_cache`)."""
    use_xla_cache()

    def friendly(argv):
        try:
            return main(argv)
        except USER_ERRORS as e:
            if os.environ.get("LORAX_TRACEBACK"):
                raise
            _leave(2, f"{prog}: error: {e}\n(LORAX_TRACEBACK=1 shows the traceback)", e)
        except KeyboardInterrupt as e:  # Ctrl-C: the loop's message says where a rerun resumes
            if os.environ.get("LORAX_TRACEBACK"):
                raise
            _leave(130, f"\n{prog}: {str(e) or 'interrupted'}", e)

    try:
        app.run(friendly)
    except (AttributeError, KeyError):  # raised while applying a --config.<field> override
        message = _unknown_override(sys.argv[1:])
        if message is None or os.environ.get("LORAX_TRACEBACK"):
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _leave(code: int, text: str, error: BaseException) -> None:
    """Prints ``text`` and ends the process with ``code`` at once (``os._exit``), once the
    device work still in flight is done. A normal exit tears the interpreter down while the
    frames ``error`` cut off still hold jitted functions and device arrays, and after a Ctrl-C
    in a step that teardown segfaulted (after the message; 4 of 7 tries). Nothing is lost by
    skipping it: checkpoints are closed, metrics rows and TensorBoard events are on disk as
    they are written, and stdout / stderr are flushed here."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    jax = sys.modules.get("jax")
    for x in jax.live_arrays() if jax is not None else ():
        try:
            x.block_until_ready()
        except Exception:  # noqa: BLE001 -- a failed computation has nothing left to wait for
            pass
    print(text, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
