"""What every check returns (:class:`CheckResult`) and the helpers that make one: a check that could not run
(``not_run``), one that ran (``finding``), and one that crashed (``guarded``: the exception is that check's FAIL)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class CheckResult:
    name: str
    passed: bool
    evidence: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: bool = False
    details: dict = field(default_factory=dict)  # per-tensor numbers: in --json, not in the printed report
    required: bool = True  # a required check that could not run makes the result INCOMPLETE, never PASS

    @property
    def status(self) -> str:
        if self.skipped:
            return "NOT RUN" if self.required else "SKIP"
        return "PASS" if self.passed else "FAIL"


def not_run(name: str, why: str, required: bool = True) -> CheckResult:
    """A check that could not run, with the reason; ``passed`` is False when it was required."""
    return CheckResult(name, not required, [why], [], skipped=True, required=required)


def finding(name: str, evidence: list[str], problems: list[str]) -> CheckResult:
    """A check that ran: it passed if it found no problem."""
    return CheckResult(name, not problems, evidence, problems)


def crash_line(e: Exception) -> str:
    """An exception as one problem line: its type and the first line of its message."""
    return f"check stopped by {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def guarded(name: str, check: Callable[..., CheckResult], *args, **kwargs) -> CheckResult:
    """``check(*args, **kwargs)``; an exception it raises becomes its FAIL (the other checks still run)."""
    try:
        return check(*args, **kwargs)
    except Exception as e:  # any input the check did not foresee: a finding, not a crash of the whole run
        return finding(name, [], [crash_line(e)])
