"""Run SGLang's own DeepSeek V4 loader over a converted checkpoint from the kit's environment.

SGLang lives in a virtualenv of its own (``scripts/setup_sglang_cpu.sh``: ``sglang==0.5.23`` and the CPU
dependencies its loader imports), so :func:`run_sglang_dry_load` starts ``python -m nvfp4kit.sglang_dry_load``
with that environment's python and reads back its JSON report. Where to find that python, first hit wins:

1. ``$NVFP4KIT_SGLANG_PYTHON``;
2. ``.venv-sglang-cpu/bin/python`` in the repository, once the setup script finished;
3. this interpreter, or ``python`` on PATH, if ``import sglang`` works there (a GPU machine with SGLang installed).

Without any, the result is ``skipped`` with the reason: nothing is claimed about SGLang.
A checkpoint SGLang cannot serve fails with ``not servable by SGLang 0.5.23: <first error>`` as its first problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .engine_venv import EngineVenv, find_python, run_probe, too_big_for_memory

SGLANG_VENV = EngineVenv(
    engine="SGLang",
    env_var="NVFP4KIT_SGLANG_PYTHON",
    venv_dir=".venv-sglang-cpu",
    import_name="sglang",
    setup_script="scripts/setup_sglang_cpu.sh",
)
ENV_VAR = SGLANG_VENV.env_var
DEFAULT_TIMEOUT_S = 1800


@dataclass
class SGLangDryLoadResult:
    """Outcome of one dry load. ``status`` is ``passed``, ``failed`` or ``skipped`` (then ``reason`` says why)."""

    status: str
    problems: list[str] = field(default_factory=list)
    sglang_version: str | None = None
    reason: str = ""
    report: dict = field(default_factory=dict)  # the full JSON report of nvfp4kit.sglang_dry_load
    text: str = ""  # its human-readable report

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"

    def model(self, which: str) -> dict:
        """The report of ``trunk`` or ``draft`` ({} if that model was not loaded)."""
        return next((m for m in self.report.get("models", []) if m["model"] == which), {})


def run_sglang_dry_load(checkpoint_dir: str, python: str | None = None,
                        timeout_s: int = DEFAULT_TIMEOUT_S) -> SGLangDryLoadResult:
    """Load ``checkpoint_dir`` (trunk and MTP draft) with SGLang's own loader in SGLang's environment."""
    return run_sglang_dry_loads([checkpoint_dir], python, timeout_s)[os.path.abspath(checkpoint_dir)]


def run_sglang_dry_loads(checkpoint_dirs: list[str], python: str | None = None,
                         timeout_s: int = DEFAULT_TIMEOUT_S) -> dict[str, SGLangDryLoadResult]:
    """:func:`run_sglang_dry_load` for several checkpoints in one SGLang process (importing SGLang takes most of
    the time). Keys are the absolute checkpoint paths."""
    paths = [os.path.abspath(d) for d in checkpoint_dirs]
    if python is None:
        python, how = find_python(SGLANG_VENV)
        if python is None:
            return {p: SGLangDryLoadResult(status="skipped", reason=how) for p in paths}
    too_big = {p: reason for p in paths if (reason := too_big_for_memory(p, "SGLang"))}
    out = {p: SGLangDryLoadResult(status="skipped", reason=reason) for p, reason in too_big.items()}
    paths = [p for p in paths if p not in too_big]
    if not paths:
        return out
    reports, problem, stdout = run_probe(python, "nvfp4kit.sglang_dry_load", paths, "SGLang", timeout_s)
    if reports is None:
        return out | {p: SGLangDryLoadResult(status="failed", problems=[problem]) for p in paths}
    return out | {path: result_of(report, stdout) for path, report in reports.items()}


def result_of(report: dict, text: str = "") -> SGLangDryLoadResult:
    problems = list(report["problems"])
    if problems:
        problems.insert(0, f"not servable by SGLang {report['sglang_version']}: {report['first_error']}")
    return SGLangDryLoadResult(
        status="passed" if report["passed"] else "failed",
        problems=problems,
        sglang_version=report["sglang_version"],
        report=report,
        text=text,
    )
