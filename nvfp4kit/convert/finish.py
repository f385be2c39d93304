"""Everything of an output beyond its shards, for Path A and Path B alike: the side files, and the finish step.

The side files (tokenizer, encoding, inference code ...) are copied verbatim. The finish step writes config.json,
hf_quant_config.json where the layout has one, the report, the model card, and last the index, whose presence
means complete: only once every planned shard is recorded and on disk (:func:`check_complete`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil

from .. import __version__
from ..card import CARD_NAME, SOURCE_CARD_NAME, write_card
from ..checkpoint import INDEX_NAME, Checkpoint
from ..errors import ConvertError, few
from ..faults import fault_point
from ..manifest import file_digest
from ..nvfp4 import ScaleRule
from ..plan import ConversionPlan
from ..write import atomic_write_json

log = logging.getLogger("nvfp4kit.convert")

REPORT_NAME = "conversion_report.json"


def copy_side_files(src: str, dst: str) -> None:
    """Every non-tensor file and folder of the source, verbatim (config.json is rewritten by
    :func:`finish_output`); the source's README.md is the source's card, kept as README.source.md (the output gets
    its own, :mod:`nvfp4kit.card`)."""
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, src)
        for name in files:
            if rel == "." and (name.endswith(".safetensors") or name in (INDEX_NAME, "config.json")):
                continue
            s = os.path.join(root, name)
            d = os.path.join(dst, rel, SOURCE_CARD_NAME if rel == "." and name == CARD_NAME else name)
            if os.path.exists(d) and os.path.getsize(d) == os.path.getsize(s) and file_digest(d) == file_digest(s):
                continue
            os.makedirs(os.path.dirname(d), exist_ok=True)
            shutil.copy2(s, d + ".partial")
            fault_point("side_file", d + ".partial")
            os.replace(d + ".partial", d)


def finish(ckpt: Checkpoint, plan: ConversionPlan, dst: str, done: dict[str, dict], seconds: float) -> dict:
    """Path A's finish: its report from the manifest entries ``done``, then :func:`finish_output`; returns it."""
    report = summarize(ckpt, plan, done, seconds)
    finish_output(ckpt, plan, dst, done, report, REPORT_NAME)
    log.info(
        "done: %d tensors quantized, %d kept FP8, %d copied; %.2f GB -> %.2f GB (%.1f%%); %.1f s; "
        "SQNR mean %.2f dB, worst %.2f dB (%s); exact-policy tensors: %d; peak host memory per worker %.2f GB",
        report["quantized_tensors"], report["kept_fp8_tensors"], report["copied_tensors"], report["source_bytes"] / 1e9,
        report["output_bytes"] / 1e9, 100 * report["output_bytes"] / max(report["source_bytes"], 1), seconds,
        report["sqnr_db_mean"], report["sqnr_db_worst"], report["worst_tensor"], report["exact_tensors"],
        report["peak_rss_bytes_per_worker"] / 1e9,
    )
    return report


def finish_output(ckpt: Checkpoint, plan: ConversionPlan, dst: str, done: dict[str, dict], report: dict,
                  report_name: str) -> None:
    """The last step of Path A and Path B alike: config.json (the source's, with the output's quantization config
    in place of the FP8 one), hf_quant_config.json where the layout has one, the report, the model card, and last
    the index, whose presence means complete: only once every planned shard is recorded and on disk."""
    check_complete(plan, dst, done)
    config = dict(ckpt.config)
    config.pop("quantization_config", None)  # the source FP8 config never survives
    config["quantization_config"] = plan.quantization_config
    atomic_write_json(os.path.join(dst, "config.json"), config, point="config")
    if plan.hf_quant_config is not None:
        atomic_write_json(os.path.join(dst, "hf_quant_config.json"), plan.hf_quant_config)
    atomic_write_json(os.path.join(dst, report_name), report)
    write_card(dst, ckpt.root)  # README.md, a side file: no shard or index byte depends on it
    index = {"metadata": {"total_size": plan.output_bytes}, "weight_map": dict(sorted(plan.weight_map().items()))}
    atomic_write_json(os.path.join(dst, INDEX_NAME), index, point="index")  # last: its presence means complete
    fault_point("index_renamed", os.path.join(dst, INDEX_NAME))


def check_complete(plan: ConversionPlan, dst: str, done: dict[str, dict]) -> None:
    """The run is done only when every planned shard is recorded and on disk at its recorded size: nothing else may
    write the index (whatever went wrong before, a missing shard must never look complete)."""
    missing = [s.name for s in plan.shards
               if s.name not in done or not os.path.isfile(os.path.join(dst, s.name))
               or os.path.getsize(os.path.join(dst, s.name)) != done[s.name]["size"]]
    if missing:
        raise ConvertError(f"{len(missing)} of {len(plan.shards)} planned shards are not written ({few(missing)}); "
                           "rerun the same command to resume")


def summarize(ckpt: Checkpoint, plan: ConversionPlan, done: dict[str, dict], seconds: float) -> dict:
    """Path A's report: counts, bytes, time, and each tensor's rule and error from the manifest entries."""
    tensors = {m: st for entry in done.values() for m, st in entry["tensors"].items()}
    finite = [st["sqnr_db"] for st in tensors.values() if math.isfinite(st["sqnr_db"])]
    worst = min(tensors, key=lambda m: tensors[m]["sqnr_db"], default=None)
    counts = {a: sum(1 for v in plan.actions.values() if v == a) for a in ("quantize", "keep_fp8", "keep")}
    return {
        "kit_version": __version__,
        "source": ckpt.root,
        "options": plan.options.as_json(),
        "quantized_tensors": counts["quantize"],
        "kept_fp8_tensors": counts["keep_fp8"],
        "copied_tensors": counts["keep"],
        "source_bytes": plan.source_bytes,
        "output_bytes": plan.output_bytes,
        "seconds_this_run": round(seconds, 3),
        "sqnr_db_mean": sum(finite) / len(finite) if finite else math.inf,
        "sqnr_db_worst": tensors[worst]["sqnr_db"] if worst else math.inf,
        "worst_tensor": worst,
        "exact_tensors": sum(1 for st in tensors.values() if st["rule"] == ScaleRule.EXACT),
        "peak_rss_bytes_per_worker": max((e.get("peak_rss_bytes", 0) for e in done.values()), default=0),
        "cuda_peak_bytes_per_worker": max((e.get("cuda_peak_bytes", 0) for e in done.values()), default=0),
        "tensors": dict(sorted(tensors.items())),
    }
