"""The one base of every error the kit raises for the user.

A :class:`KitError` is a problem with the input, the flags or the machine, named in its message: every script
prints that message as one line (exit 2) and no traceback (:func:`nvfp4kit.cli.run_main`). Anything else that
escapes is a bug of the kit, and its traceback is what a maintainer needs.
"""

import errno


class KitError(Exception):
    """A problem for the user to fix, said in one message."""


def few(items, n: int = 3) -> str:
    """The first ``n`` of ``items`` (sorted), and how many more: a message names a few, never thousands."""
    items = sorted(items)
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


class ConvertError(KitError, RuntimeError):
    """Path A's refusal or failure, with a message for the user; nothing half-written is left to be trusted."""


def io_failure(path: str, e: OSError) -> ConvertError:
    """An OS error while writing ``path`` (the destination or a shard in it), named, with what to do about it."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space there, then rerun the same command to resume"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "the destination is not writable: choose another --dst or fix its permissions"
    else:
        hint = "rerun the same command to resume once the cause is fixed"
    return ConvertError(f"cannot write {e.filename or path}: {e.strerror or e}; {hint}")
