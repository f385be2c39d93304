"""What the four scripts share: log format, error exit, and the planning flags inspect and convert both take."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Callable

from .errors import KitError
from .layouts import ENGINES, FORMATS, default_format
from .nvfp4 import ScalePolicy
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse with flag errors as one line (``prog: error: ...``), exit 2, no usage block above it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def regex(text: str) -> str:
    """A ``--quantize``/``--keep`` value: a valid regular expression, or a one-line flag error."""
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression ({e}): {text!r}") from None
    return text


def at_least(minimum: float, kind: type = int, why: str = "") -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` no smaller than ``minimum`` (``why``: the reason, for the message)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{text} is below {minimum}{why}")
        return value

    return parse


def shard_size(text: str) -> int:
    """A ``--max-shard-size`` value: a size above zero (``5GB``, ``500MB``, ``2GiB``)."""
    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text}: a shard size must be above zero")
    return size


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """Flags that change what Path A writes (and so its resume fingerprint)."""
    p.add_argument("--engine", choices=ENGINES, default="vllm",
                   help="the engine the output is for (default: vllm). sglang: the nvidia layout (W4A4, needs "
                        "--activation-scales) with the MTP draft's routed experts as MXFP4, as SGLang 0.5.23 builds "
                        "them; vLLM builds them NVFP4, so one output serves one engine's MTP")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output layout (default: compressed-tensors, weight-only NVFP4A16 that vLLM loads; "
                        "nvidia with --engine sglang)")
    p.add_argument("--scale-policy", choices=SCALE_POLICIES, default=ScalePolicy.AUTO.value,
                   help="auto: power-of-two scales where they hold the data exactly (MXFP4-origin experts), "
                        "the reference rule (amax/2688, ModelOpt's bytes) elsewhere; reference: always the latter")
    p.add_argument("--joint-scale", choices=JOINT_SCALE_CHOICES, default="gate-up",
                   help="which modules share one NVFP4 global scale (default: the groups vLLM fuses)")
    p.add_argument("--quantize", action="append", default=[], metavar="REGEX", type=regex,
                   help="also quantize FP8 modules whose name matches (re.search), e.g. 'shared_experts'")
    p.add_argument("--keep", action="append", default=[], metavar="REGEX", type=regex,
                   help="keep FP8 modules whose name matches, even if the default quantizes them")
    p.add_argument("--max-shard-size", type=shard_size, default=DEFAULT_MAX_SHARD_SIZE,
                   help="output shard size, e.g. 5GB (default)")


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        format=args.format or default_format(args.engine),
        engine=args.engine,
        scale_policy=args.scale_policy,
        joint_scale=args.joint_scale,
        overrides=Overrides(tuple(args.quantize), tuple(args.keep)),
        max_shard_size=args.max_shard_size,
    )


def run_main(main: Callable[[], int], errors: tuple[type[BaseException], ...] = (KitError, OSError),
             teardown: bool = True) -> None:
    """Exit with ``main()``'s code; the kit's errors (and the OS's: a file that cannot be read or written) print one
    clear message (no traceback) and exit 2, Ctrl-C 130.

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
    except KeyboardInterrupt as e:
        why = f" ({e})" if str(e) else ""  # a worker stopped by a signal says which
        logging.getLogger("nvfp4kit").error("interrupted%s; rerun the same command to resume", why)
        _exit(130, teardown)


def _exit(code: int, teardown: bool) -> None:
    if teardown:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
