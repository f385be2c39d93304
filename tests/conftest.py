"""Shared fixtures: one tiny synthetic V4 FP8 checkpoint per test session (nvfp4kit.fixtures.synthetic)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from nvfp4kit.fixtures.synthetic import generate

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


def engine_python(env_var: str, setup_script: str, what: str) -> str:
    """The python of an engine's own CPU venv (vLLM, SGLang): ``env_var`` if set, else the one ``setup_script``
    builds (or finds built). Where it cannot be built, the tests that need it fail with the script's last lines: a
    dry load that did not run is no pass."""
    configured = os.environ.get(env_var)
    if configured:
        return configured
    try:
        proc = subprocess.run(["bash", setup_script], capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"cannot build the {what} virtualenv ({e})")
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        pytest.fail(f"cannot build the {what} virtualenv with {os.path.relpath(setup_script)}:\n{tail}")
    return proc.stdout.strip().splitlines()[-1]
