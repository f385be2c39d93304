"""What the four scripts share: log format, error exit, and the planning flags inspect and convert both take."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from .layouts import FORMATS
from .plan import DEFAULT_MAX_SHARD_SIZE, SCALE_POLICIES, Options, parse_size
from .rules import JOINT_SCALE_CHOICES, Overrides


def setup_logging(verbose: bool = False) -> None:
    """Timestamped lines on stderr, readable in a ``tee``d file next to tqdm's bar."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """Flags that change what Path A writes (and so its resume fingerprint)."""
    p.add_argument("--format", choices=FORMATS, default="compressed-tensors",
                   help="output layout (default: compressed-tensors, weight-only NVFP4A16 that vLLM loads)")
    p.add_argument("--scale-policy", choices=SCALE_POLICIES, default="auto",
                   help="auto: power-of-two scales where they hold the data exactly (MXFP4-origin experts), "
                        "the reference rule (amax/2688, ModelOpt's bytes) elsewhere; reference: always the latter")
    p.add_argument("--joint-scale", choices=JOINT_SCALE_CHOICES, default="gate-up",
                   help="which modules share one NVFP4 global scale (default: the groups vLLM fuses)")
    p.add_argument("--quantize", action="append", default=[], metavar="REGEX",
                   help="also quantize FP8 modules whose name matches (re.search), e.g. 'shared_experts'")
    p.add_argument("--keep", action="append", default=[], metavar="REGEX",
                   help="keep FP8 modules whose name matches, even if the default quantizes them")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_SIZE,
                   help="output shard size, e.g. 5GB (default)")


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        format=args.format,
        scale_policy=args.scale_policy,
        joint_scale=args.joint_scale,
        overrides=Overrides(tuple(args.quantize), tuple(args.keep)),
        max_shard_size=args.max_shard_size,
    )


def run_main(main: Callable[[], int], errors: tuple[type[BaseException], ...], teardown: bool = True) -> None:
    """Exit with ``main()``'s code; known errors print one clear message (no traceback) and exit 2, Ctrl-C 130.

    ``teardown=False`` (the converter) leaves after an error or Ctrl-C without interpreter teardown once the message
    is out: after a shard was abandoned midway, torch's teardown at exit can abort the process ("terminate called
    without an active exception", exit -6) and hide the exit code. Everything the run wrote is closed or removed
    by then, and its lock goes with the process.
    """
    try:
        sys.exit(main())
    except errors as e:
        logging.getLogger("nvfp4kit").error("%s", e)
        _exit(2, teardown)
    except KeyboardInterrupt:
        logging.getLogger("nvfp4kit").error("interrupted; rerun the same command to resume")
        _exit(130, teardown)


def _exit(code: int, teardown: bool) -> None:
    if teardown:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
