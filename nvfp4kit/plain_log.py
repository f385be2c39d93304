"""A log written to a file (``2>&1 | tee run.log``) gets the kit's plain progress lines only.

The libraries Path B and verify run (llm-compressor, transformers, datasets) draw tqdm bars: in a terminal they
are useful, in a tee'd file each redraw is a carriage return, thousands over a calibration of hours.
"""

from __future__ import annotations

import os
import sys


def no_bars_unless_a_terminal() -> None:
    """Turn tqdm off for this process and its children when stderr is no terminal.

    Call it before anything imports tqdm: tqdm reads ``TQDM_*`` from the environment when it is imported. A
    ``TQDM_DISABLE`` the user set wins.
    """
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
