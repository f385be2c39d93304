"""Original-form (MXFP4 experts) V4 Pro and V4 Flash synthetics: converted with default flags, verified against
their MXFP4 source, and loaded dry by vLLM's own DeepSeek V4 loader on CPU, MTP included.

The vLLM environment comes from tests/test_vllm_dry_load.py's session fixture (built once; a test fails with the reason
where it cannot be built); both checkpoints go through one vLLM process.
"""

from __future__ import annotations

import filecmp
import json
import os

import pytest

from nvfp4kit.checkpoint import INDEX_NAME, open_checkpoint
from nvfp4kit.convert import Settings, convert
from nvfp4kit.plan import Options
from nvfp4kit.fixtures.synthetic import generate
from nvfp4kit.verify import verify
from nvfp4kit.vllm_check import run_vllm_dry_loads

PRESETS = ("tiny", "flash-tiny")  # V4 Pro's structure, V4 Flash's (layers 0-1 without a compressor)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[tuple[str, str], str]:
    """(preset, form) -> synthetic source folder, seed 0."""
    root = tmp_path_factory.mktemp("original")
    out = {}
    for preset, form in [(p, "mxfp4") for p in PRESETS] + [("flash-tiny", "fp8")]:
        out[(preset, form)] = str(root / f"{preset}-{form}")
        generate(out[(preset, form)], preset=preset, seed=0, form=form, jobs=2)
    return out


@pytest.fixture(scope="module")
def outputs(sources, tmp_path_factory) -> dict[tuple[str, str], str]:
    """Path A with default flags, as a user runs it: ``--src SRC --dst DST``."""
    root = tmp_path_factory.mktemp("original_out")
    out = {}
    for key, src in sources.items():
        out[key] = str(root / "-".join(key))
        convert(src, out[key], Options(), Settings())
    return out


def test_flash_has_no_compressor_in_layers_0_and_1(sources):
    names = open_checkpoint(sources[("flash-tiny", "mxfp4")]).tensors
    assert not [n for n in names if n.startswith(("layers.0.attn.compressor", "layers.1.attn.compressor"))]
    assert any(n.startswith("layers.2.attn.indexer.compressor") for n in names)
    assert any(n.startswith("layers.3.attn.compressor") for n in names)
    config = json.load(open(os.path.join(sources[("flash-tiny", "mxfp4")], "config.json")))
    assert config["compress_ratios"][:4] == [0, 0, 4, 128] and config["expert_dtype"] == "fp4"


def test_flash_forms_give_identical_shards_and_index(outputs):
    a, b = outputs[("flash-tiny", "fp8")], outputs[("flash-tiny", "mxfp4")]
    files = sorted(f for f in os.listdir(a) if f.endswith(".safetensors")) + [INDEX_NAME]
    assert files == sorted(f for f in os.listdir(b) if f.endswith(".safetensors")) + [INDEX_NAME]
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors
    # config.json: the converter keeps the source's other fields, and the repack has dropped expert_dtype
    ca, cb = (json.load(open(os.path.join(d, "config.json"))) for d in (a, b))
    assert {k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k)} <= {"expert_dtype"}


@pytest.mark.parametrize("preset", PRESETS)
def test_verify_passes_against_the_mxfp4_source(sources, outputs, preset):
    src, dst = sources[(preset, "mxfp4")], outputs[(preset, "mxfp4")]
    results = {r.name: r for r in verify(dst, src, vllm_generate=False, vllm_dry_load=False)}
    failed = {n: r.problems for n, r in results.items() if r.required and not r.passed}
    assert not failed, failed
    experts = sum(1 for n in open_checkpoint(src).tensors if ".experts." in n and n.endswith(".weight"))
    numeric = "\n".join(results["numeric"].evidence)
    assert f"{experts} NVFP4 tensors bit-exact" in numeric, numeric
    assert results["block_forward"].passed and not results["block_forward"].skipped


@pytest.fixture(scope="module")
def dry_loads(vllm_python, outputs):
    keys = [(p, "mxfp4") for p in PRESETS]
    results = run_vllm_dry_loads([outputs[k] for k in keys], python=vllm_python)
    return {k[0]: results[os.path.abspath(outputs[k])] for k in keys}


@pytest.mark.parametrize("preset", PRESETS)
def test_vllm_dry_load_accepts_the_output_mtp_included(dry_loads, preset):
    result = dry_loads[preset]
    assert result.passed, "\n".join(result.problems)
    assert result.schemes["layers.0.ffn.experts"] == "NVFP4 weight-only"
    assert result.schemes["mtp.0.ffn.experts"] == result.schemes["layers.0.ffn.experts"]
    assert result.schemes["mtp.0.e_proj"] == "FP8 block"
