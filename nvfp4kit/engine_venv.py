"""Run a probe module inside a serving engine's own virtualenv and read back its JSON report.

vLLM and SGLang each pin their own torch, transformers and compressed-tensors, so their dry loads
(:mod:`nvfp4kit.vllm_dry_load`, :mod:`nvfp4kit.sglang_dry_load`) run as ``python -m MODULE CHECKPOINT... --json F``
with that environment's python; :mod:`nvfp4kit.vllm_check` and :mod:`nvfp4kit.sglang_check` turn the JSON into
results. This module holds what both share: finding the python, running the probe, the memory guard.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class EngineVenv:
    """Where an engine's python is looked for, first hit wins: ``$env_var``; ``REPO/venv_dir/bin/python`` once its
    setup script wrote the stamp; this interpreter or ``python`` on PATH if ``import import_name`` works there."""

    engine: str  # "vLLM", "SGLang": for messages
    env_var: str
    venv_dir: str  # relative to the repository
    import_name: str
    setup_script: str  # relative to the repository

    @property
    def venv_python(self) -> str:
        return os.path.join(REPO_ROOT, self.venv_dir, "bin", "python")

    @property
    def stamp(self) -> str:
        return os.path.join(REPO_ROOT, self.venv_dir, ".installed")

    @property
    def setup_hint(self) -> str:
        return (f"build it with {self.setup_script}, or point ${self.env_var} at a python with "
                f"{self.import_name}")


def _imports(python: str, module: str) -> bool:
    try:
        return subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_python(venv: EngineVenv) -> tuple[str | None, str]:
    """``(python, how it was found)``, or ``(None, why not)``."""
    configured = os.environ.get(venv.env_var)
    if configured:
        if os.access(configured, os.X_OK):
            return configured, f"${venv.env_var}"
        return None, f"${venv.env_var}={configured} is not an executable"
    # The stamp is written last by the setup script: an interrupted build does not count.
    if os.access(venv.venv_python, os.X_OK) and os.path.exists(venv.stamp):
        return venv.venv_python, f"the repository's {venv.venv_dir}"
    if importlib.util.find_spec(venv.import_name) is not None:
        return sys.executable, "this interpreter"
    on_path = shutil.which("python")
    if on_path and _imports(on_path, venv.import_name):
        return on_path, "python on PATH"
    return None, f"no python with {venv.import_name} found ({venv.setup_hint})"


def run_probe(
    python: str,
    module: str,
    checkpoints: list[str],
    engine: str,
    timeout_s: int,
    extra_files: dict[str, object] | None = None,
) -> tuple[dict | None, str, str]:
    """Run ``python -m module CHECKPOINT... --json REPORT [--NAME FILE]...`` (each ``extra_files`` entry is written
    as JSON and passed as ``--NAME``). Returns ``(reports by checkpoint path or None, problem, stdout)``."""
    with tempfile.TemporaryDirectory(prefix=f"nvfp4kit-{engine.lower()}-") as tmp:
        report_path = os.path.join(tmp, "report.json")
        cmd = [python, "-m", module, *checkpoints, "--json", report_path]
        for name, obj in (extra_files or {}).items():
            path = os.path.join(tmp, f"{name}.json")
            with open(path, "w") as f:
                json.dump(obj, f)
            cmd += [f"--{name}", path]
        # The kit's torch-only modules come from this checkout; everything else from the engine's environment.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            return None, f"{engine} dry load timed out after {timeout_s} s", ""
        if not os.path.exists(report_path):
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            return None, f"{engine} dry load stopped before reporting (exit {proc.returncode}):\n{tail}", proc.stdout
        with open(report_path) as f:
            return json.load(f), "", proc.stdout


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


def too_big_for_memory(root: str, engine: str, checkpoint_bytes=_checkpoint_bytes) -> str | None:
    """Why a checkpoint cannot be dry-loaded here, or None. A dry load materialises every parameter on CPU: about
    the checkpoint's size again (wider dtypes for a few), plus the engine itself."""
    needed = 2 * checkpoint_bytes(root) + (2 << 30)
    available = _available_memory_bytes()
    if available is None or needed <= available:
        return None
    return (
        f"the {engine} dry load builds the whole model on CPU: about {needed / 2**30:.0f} GiB for {root}, "
        f"{available / 2**30:.0f} GiB available. Dry-load the tiny checkpoint converted with the same options "
        f"instead (the test suite does), or run it on a machine with the memory"
    )
