"""The one base of every error the kit raises for the user.

A :class:`KitError` is a problem with the input, the flags or the machine, named in its message: every script
prints that message as one line (exit 2) and no traceback (:func:`nvfp4kit.cli.run_main`). Anything else that
escapes is a bug of the kit, and its traceback is what a maintainer needs.
"""


class KitError(Exception):
    """A problem for the user to fix, said in one message."""


def few(items, n: int = 3) -> str:
    """The first ``n`` of ``items`` (sorted), and how many more: a message names a few, never thousands."""
    items = sorted(items)
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
