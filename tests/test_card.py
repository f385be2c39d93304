"""The model card (README.md) Path A writes into every output, and the source's card kept beside it."""

from __future__ import annotations

import os

from nvfp4kit.card import (
    FIDELITY_BEGIN,
    FIDELITY_END,
    SOURCE_CARD_NAME,
    render_card,
    split_front_matter,
    update_card_fidelity,
)


def card_of(folder: str) -> tuple[dict, str]:
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
        return split_front_matter(f.read())


def test_default_output_card_parses_and_names_every_figure(tiny_src, tiny_out):
    meta, body = card_of(tiny_out)
    assert meta["base_model"] == os.path.basename(tiny_src) and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and {"nvfp4", "compressed-tensors", "w4a16"} <= set(meta["tags"])
    assert "license" not in meta  # the synthetic source's README has no front matter
    for needle in ("Layout: `compressed-tensors`, NVFP4 W4A16", "Scale policy: `auto`", "Joint scales: `gate-up`",
                   "144 modules quantized to NVFP4, 52 kept FP8, 120 tensors copied", "Per rule: 144 `exact`",
                   "## Size", "144 tensors exact (infinite SQNR)",
                   f"python fp8_to_nvfp4_streaming.py --src {tiny_src} --dst {tiny_out}", "nvfp4kit 0.1.0",
                   "vllm serve", "Blackwell", "Hopper", "Marlin"):
        assert needle in body, needle
    section = body[body.index(FIDELITY_BEGIN):body.index(FIDELITY_END)]
    assert "Not measured yet" in section and "--fidelity" in section
    # The source's card is kept under another name, byte for byte.
    with open(os.path.join(tiny_src, "README.md"), "rb") as a, open(os.path.join(tiny_out, SOURCE_CARD_NAME), "rb") as b:
        assert a.read() == b.read()


def test_license_and_hub_id_come_from_the_source(tiny_out, tmp_path):
    src = tmp_path / "models--deepseek-ai--DeepSeek-V4-Pro" / "snapshots" / "abc123"
    src.mkdir(parents=True)
    (src / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# DeepSeek V4\n")
    meta, body = split_front_matter(render_card(tiny_out, str(src)))
    assert meta["license"] == "mit" and meta["base_model"] == "deepseek-ai/DeepSeek-V4-Pro"
    assert "[deepseek-ai/DeepSeek-V4-Pro](https://huggingface.co/deepseek-ai/DeepSeek-V4-Pro)" in body


def test_fidelity_section_is_rewritten_in_place(tiny_src, tiny_out, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text(open(os.path.join(tiny_out, "README.md"), encoding="utf-8").read())
    figures = {"tokens": 95, "kld_mean": 0.0123, "kld_max": 0.5, "top1_agreement": 0.9512, "ppl_source": 3.21,
               "ppl_output": 3.25, "per_layer": [{"layer": 0, "rel_error": 0.01}, {"layer": 1, "rel_error": 0.03}],
               "w4a4": True, "data": "/x/fidelity.jsonl",
               "mtp": {"measured": True, "top1_agreement_source": 0.8, "top1_agreement_output": 0.78}}
    for _ in range(2):  # twice: one section, replaced, never appended
        update_card_fidelity(str(out), figures, "PASS", tiny_src)
    meta, body = card_of(str(out))
    assert meta["base_model_relation"] == "quantized" and body.count(FIDELITY_BEGIN) == 1
    for needle in ("`verify_nvfp4.py --fidelity`: PASS; 95 tokens of `fidelity.jsonl`",
                   "activations quantized as vLLM serves W4A4", "| 0.0123 / 0.5 |", "| top-1 agreement | 0.9512 |",
                   "| 3.21 / 3.25 |", "| 0.03 (block 1) |", "| 0.8000 / 0.7800 |"):
        assert needle in body, needle
    assert "Not measured yet" not in body
