"""The model card (``README.md``) of every output folder, in Hugging Face's conventions.

YAML front matter (``base_model``, ``base_model_relation: quantized``, ``library_name``, ``pipeline_tag``,
``tags``, and the source card's ``license`` where its README has front matter with one), then a body built from
what the run recorded: the converter's report (``conversion_report.json``, or Path B's ``path_b_report.json``) and
the output's ``config.json``: layout and scheme, scale policy, counts per action and per rule, joint scales, sizes,
the SQNR summary, the command and kit version, the ``vllm serve`` command and which GPUs run it. The fidelity
section, between two HTML comment markers, says "not measured" until ``verify_nvfp4.py --fidelity`` rewrites it
(:func:`update_card_fidelity`). The source's own README is kept as ``README.source.md`` (:data:`SOURCE_CARD_NAME`).

The card is a side file: no shard and no index entry depends on it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex

import yaml

from . import __version__

CARD_NAME = "README.md"
SOURCE_CARD_NAME = "README.source.md"
FIDELITY_BEGIN = "<!-- nvfp4kit:fidelity -->"
FIDELITY_END = "<!-- /nvfp4kit:fidelity -->"
REPORTS = ("conversion_report.json", "path_b_report.json")  # Path A's, Path B's
_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.S)


def split_front_matter(text: str) -> tuple[dict, str]:
    """(front matter as a dict, body) of a card; ({}, text) if it has none or it is not a YAML mapping."""
    m = _FRONT.match(text)
    if not m:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}, text
    return (meta, text[m.end():]) if isinstance(meta, dict) else ({}, text)


def _read(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _json(path: str) -> dict:
    text = _read(path)
    return json.loads(text) if text else {}


def base_model_name(src: str) -> str:
    """The source as a hub id where its path says it (``.../models--org--name/snapshots/REV``), else its folder."""
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", os.path.realpath(src) + "/")
    return f"{m.group(1)}/{m.group(2)}" if m else os.path.basename(os.path.normpath(src))


def command_line(report: dict, src: str, dst: str) -> str:
    """The command that reproduces the output (every flag that changes its bytes, from the recorded options)."""
    opts = report.get("options") or {}
    if str(report.get("path", "")).startswith("B"):
        args = ["python", "quantize_llmcompressor.py", "--src", src, "--dst", dst]
    else:
        args = ["python", "fp8_to_nvfp4_streaming.py", "--src", src, "--dst", dst]
    for flag, key, default in (("--format", "format", "compressed-tensors"), ("--scale-policy", "scale_policy", "auto"),
                               ("--joint-scale", "joint_scale", "gate-up")):
        if opts.get(key, default) != default:
            args += [flag, str(opts[key])]
    overrides = opts.get("overrides") or {}
    for flag, key in (("--quantize", "quantize"), ("--keep", "keep")):
        for regex in overrides.get(key, []):
            args += [flag, regex]
    if opts.get("activation_scales_sha256"):
        args += ["--activation-scales", "ACT.json"]  # the file's name is not recorded, its sha256 is
    return shlex.join(args)


def _scheme(config: dict) -> tuple[str, bool]:
    """(layout, whether activations are quantized) from the output's quantization_config."""
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if method == "compressed-tensors":
        w4a4 = any(g.get("input_activations") and (g.get("weights") or {}).get("num_bits") == 4
                   for g in (q.get("config_groups") or {}).values())
        return "compressed-tensors", w4a4
    if method == "modelopt":
        return "modelopt", "NVFP4" in [v.get("quant_algo") for v in (q.get("quantized_layers") or {}).values()]
    return ("nvidia", True) if q.get("moe_quant_algo") == "NVFP4" else (str(method), False)


def _link(model: str) -> str:
    """A hub link for an ``org/name`` id, the plain name for a local folder."""
    return f"[{model}](https://huggingface.co/{model})" if "/" in model else f"`{model}`"


def _bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def render_card(dst: str, src: str) -> str:
    """The card's text for the output in ``dst`` converted from ``src`` (the fidelity section not yet measured)."""
    report = next((r for r in (_json(os.path.join(dst, n)) for n in REPORTS) if r), {})
    config = _json(os.path.join(dst, "config.json"))
    source_meta, _ = split_front_matter(_read(os.path.join(src, "README.md")) or "")
    layout, w4a4 = _scheme(config)
    scheme = "NVFP4 W4A4" if w4a4 else "NVFP4 W4A16 (weight-only)"
    meta = {"base_model": base_model_name(src), "base_model_relation": "quantized", "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "tags": [config.get("model_type") or "deepseek", "nvfp4", "fp4", layout, "vllm", "nvfp4kit",
                     "w4a4" if w4a4 else "w4a16"]}
    if source_meta.get("license"):
        meta["license"] = source_meta["license"]
        for key in ("license_name", "license_link"):
            if key in source_meta:
                meta[key] = source_meta[key]
    opts = report.get("options") or {}
    tensors = report.get("tensors") or {}
    rules: dict[str, int] = {}
    for st in tensors.values():
        rules[st.get("rule", "?")] = rules.get(st.get("rule", "?"), 0) + 1
    name = os.path.basename(os.path.normpath(dst))
    src_bytes, out_bytes = report.get("source_bytes") or _bytes(src), report.get("output_bytes") or _bytes(dst)
    lines = [
        f"# {name}",
        "",
        f"{scheme} quantization of {_link(meta['base_model'])} for vLLM, "
        f"written by nvfp4kit {report.get('kit_version', __version__)} "
        f"({'Path B: llm-compressor calibration' if str(report.get('path', '')).startswith('B') else 'Path A: data-free'}).",
        "",
        "## What was quantized, and how",
        "",
        f"- Layout: `{layout}`, {scheme}; routed experts (trunk and MTP) are NVFP4 (E2M1 values, one E4M3 scale per "
        "16 elements, one float32 global scale per tensor); attention, shared experts and the MTP projections stay FP8 "
        "with their 128x128 block scales; embedding, head, norms, router and mHC parameters are copied bit for bit.",
        f"- Scale policy: `{opts.get('scale_policy', 'auto')}` (auto: power-of-two scales wherever they hold the "
        "MXFP4-origin experts exactly, ModelOpt's reference rule elsewhere; reference: amax / 2688 everywhere).",
        f"- Joint scales: `{opts.get('joint_scale', 'gate-up')}` (the modules that share one global scale: an expert's "
        "w1 and w3, which vLLM fuses into one GEMM).",
    ]
    if "quantized_tensors" in report:
        lines.append(f"- Counts: {report['quantized_tensors']} modules quantized to NVFP4, {report['kept_fp8_tensors']} "
                     f"kept FP8, {report['copied_tensors']} tensors copied.")
    else:
        lines.append(f"- Counts: {report.get('modules_from_llmcompressor', '?')} modules calibrated by llm-compressor.")
    if rules:
        lines.append("- Per rule: " + ", ".join(f"{n} `{r}`" for r, n in sorted(rules.items()))
                     + " (`exact`: decodes to the source bit for bit).")
    overrides = opts.get("overrides") or {}
    if overrides.get("quantize") or overrides.get("keep"):
        lines.append(f"- Rule overrides: quantize {overrides.get('quantize', [])}, keep {overrides.get('keep', [])}.")
    lines += ["", "## Size", "",
              f"{src_bytes / 1e9:.2f} GB of source tensors -> {out_bytes / 1e9:.2f} GB "
              f"({100 * out_bytes / max(src_bytes, 1):.1f} %).", "",
              "## Reconstruction (SQNR of every quantized tensor against the dequantized source)", ""]
    if "sqnr_db_mean" in report:
        worst = report.get("sqnr_db_worst")
        lines.append(f"{report.get('exact_tensors', 0)} tensors exact (infinite SQNR)"
                     + (f"; over the others: mean {report['sqnr_db_mean']:.2f} dB, worst {worst:.2f} dB "
                        f"(`{report.get('worst_tensor')}`)." if isinstance(worst, float) and math.isfinite(worst)
                        else "; no inexact tensor."))
    else:
        lines.append("Not recorded by this path; `verify_nvfp4.py OUT` measures it (numeric check).")
    lines += [
        "", "## How it was made", "", "```bash", command_line(report, src, dst), "```", "",
        *([f"`ACT.json`: the activation amax file, sha256 `{opts['activation_scales_sha256']}`.", ""]
          if opts.get("activation_scales_sha256") else []),
        f"nvfp4kit {report.get('kit_version', __version__)}; the full per-tensor record is in "
        f"`{next((n for n in REPORTS if os.path.exists(os.path.join(dst, n))), REPORTS[0])}`. The source's own card is "
        f"kept as `{SOURCE_CARD_NAME}`.",
        "", "## Serving", "", "```bash", f"vllm serve {name} --tensor-parallel-size 8", "```", "",
        "- Blackwell (B200, GB200, SM100): native FP4 kernels, "
        + ("W4A4 with the stored activation scales." if w4a4 else "weight-only NVFP4 (W4A16)."),
        "- Hopper (H100, H200, SM90): vLLM runs NVFP4 weight-only through its Marlin/Humming fallback"
        + ("; the activation scales are ignored there." if w4a4 else "."),
        *(["- `modelopt` layouts are experimental in vLLM's DeepSeek V4 loader."] if layout == "modelopt" else []),
        "", "## Fidelity", "", fidelity_section(None), "",
    ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(lines)


def fidelity_section(figures: dict | None, status: str | None = None) -> str:
    """The marked fidelity section: 'not measured' or the figures of ``verify_nvfp4.py --fidelity``."""
    if figures is None or "kld_mean" not in figures:
        body = ("Not measured yet: `python verify_nvfp4.py OUT --src SRC --fidelity` runs the whole model "
                "teacher-forced on text with the source's and this checkpoint's weights and writes the figures here.")
    else:
        m = figures.get("mtp") or {}
        mtp = (f"| MTP top-1 = trunk top-1 (source / output) | {m['top1_agreement_source']:.4f} / "
               f"{m['top1_agreement_output']:.4f} |" if m.get("measured")
               else f"| MTP | not measured: {m.get('reason', '?')} |")
        worst = max(figures["per_layer"], key=lambda e: e["rel_error"], default={"layer": "-", "rel_error": 0.0})
        body = "\n".join([
            f"`verify_nvfp4.py --fidelity`: {status or '?'}; {figures['tokens']} tokens of "
            f"`{os.path.basename(str(figures.get('data', '?')))}`, teacher-forced"
            + (", activations quantized as vLLM serves W4A4" if figures.get("w4a4") else "") + ".",
            "",
            "| figure | value |",
            "|---|---|",
            f"| KLD(source \\|\\| output), mean / max (nats) | {figures['kld_mean']:.4g} / {figures['kld_max']:.4g} |",
            f"| top-1 agreement | {figures['top1_agreement']:.4f} |",
            f"| perplexity, source / output | {figures['ppl_source']:.4g} / {figures['ppl_output']:.4g} |",
            f"| hidden-state relative error, worst block | {worst['rel_error']:.3g} (block {worst['layer']}) |",
            mtp,
        ])
    return f"{FIDELITY_BEGIN}\n{body}\n{FIDELITY_END}"


def write_card(dst: str, src: str) -> str:
    """Write ``dst/README.md`` (replacing any earlier card of this kit); returns its path."""
    path = os.path.join(dst, CARD_NAME)
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render_card(dst, src))
    os.replace(tmp, path)
    return path


def update_card_fidelity(dst: str, figures: dict, status: str, src: str | None = None) -> str:
    """Rewrite the fidelity section of ``dst/README.md`` (the card is written first if missing; a card without the
    markers gets the section appended)."""
    path = os.path.join(dst, CARD_NAME)
    text = _read(path)
    if text is None and src is not None:
        write_card(dst, src)
        text = _read(path)
    text = text or ""
    section = fidelity_section(figures, status)
    begin, end = text.find(FIDELITY_BEGIN), text.find(FIDELITY_END)
    if begin >= 0 and end > begin:
        text = text[:begin] + section + text[end + len(FIDELITY_END):]
    else:
        text = text.rstrip("\n") + "\n\n## Fidelity\n\n" + section + "\n"
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
