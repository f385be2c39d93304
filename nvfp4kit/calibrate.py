"""Path B: calibrate NVFP4 W4A4 with llm-compressor's ``oneshot`` and write the checkpoint vLLM loads.

Every family the kit knows (:mod:`nvfp4kit.families`): DeepSeek V4, and V3 / R1 / V3.1 / V3.2. What differs between
them (transformers' model and decoder layer classes, whether transformers renames the checkpoint's names, how the
MTP block is named) comes from the family; the stages below are the same.

The job, top to bottom (:func:`quantize_with_llmcompressor`):

1. refuse a non-empty destination (unless ``overwrite``); plan with Path A's rule table (:mod:`nvfp4kit.plan`):
   the modules Path A quantizes are exactly the ones calibrated here, everything else is ignored;
2. **stage**: dequantize the FP8 source with the kit's own FP8 code into a BF16 checkpoint under
   ``offload_dir/staging`` (DeepSeek's names, no MTP, no ``.scale``), one shard at a time, resumable;
3. **load** transformers' model of the family (``DeepseekV4ForCausalLM``, ``DeepseekV3ForCausalLM``,
   ``DeepseekV32ForCausalLM``) from it with compressed-tensors' disk offload, linearize the routed experts into
   per-expert ``nn.Linear`` (llm-compressor's generic entry), and cast the norms that transformers keeps in float32
   to the compute dtype (a float32 norm output into a BF16 Linear is a dtype error);
4. **calibrate**: ``oneshot(pipeline="sequential", sequential_targets=[<the family's decoder layer>])`` with
   ``QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=<every Linear the rule table keeps>)``;
   llm-compressor's MoE calibration context runs every routed expert on every token while the router's real
   top-k weights make the layer output, so each expert sees activations; saved with ``save_compressed=True``;
5. **collect** each quantized module's compressed tensors from that save (names checked one by one), derive the
   per-module input amax (``2688 / input_global_scale``), give an expert without a usable activation scale the
   largest amax of its peers (reported), and the MTP experts (transformers does not build MTP) the largest amax
   of the trunk's experts of the same projection (reported);
6. **write** the output with Path A's plan for those amax: quantized modules take llm-compressor's tensors,
   every other unit (kept FP8, copied tensors, the MTP block) goes through Path A's own unit code, so the two paths
   differ only in the quantized experts; config from :func:`nvfp4kit.layouts.quantization_config`; index last;
7. optionally export the activation amax for ``fp8_to_nvfp4_streaming.py --activation-scales``; clean up.

Refusals come before any work: the destination, the rule table, host memory for the activation cache, the
calibration data and its chat rendering. A rerun of the same command resumes: staging skips its finished shards,
a finished calibration (``calibration.json`` next to llm-compressor's save) is reused, and the output writing skips
the shards its manifest (``DST/.nvfp4kit/manifest.jsonl``) records as intact and made from that calibration; the
bytes equal an uninterrupted run's. Only a calibration cut short starts over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import __version__
from .checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
# Path A's pieces Path B shares: the lock, reading and computing a unit, the finish step.
from .convert import (LOCK_NAME, STATE_DIR, atomic_write_json, check_apart, compute_unit, copy_side_files,
                      exclusive_lock, finish_output, peak_rss_bytes, read_unit)
from .families import Family, family_for
from .families.v4 import V4
from .hf_model import dequantized_source
from .layouts import Layout
from .manifest import append_entry, intact_entries, intact_shards, read_manifest
from .nvfp4 import GLOBAL_SCALE_DIVISOR
from .plan import ConversionPlan, Options, build_plan, source_fingerprint
from .rules import Action, joint_scale_group, module_name
from .safetensors_io import DTYPES, TensorInfo, TensorSpec, read_header, read_tensor
from .errors import KitError
from .write import Piece, atomic_write_json, write_shard

log = logging.getLogger("nvfp4kit.calibrate")

STAGING = "staging"
LLMC_SAVE = "llmcompressor-save"
OFFLOAD = "offload"
REPORT_NAME = "path_b_report.json"
FINGERPRINT_NAME = "path_b.json"  # in DST/.nvfp4kit/: the command whose output this is (Path A's is fingerprint.json)
CALIBRATION_NAME = "calibration.json"  # in the work folder: a finished calibration, reused by a rerun
HEADROOM_GB = 10.0  # host memory left to the process itself, torch and the page cache
ACTIVATION_SCALES_FORMAT = "nvfp4kit.activation-scales.v1"
NVFP4_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json")


class PathBError(KitError, RuntimeError):
    """A refusal or a failed check, with a message for the user."""


@dataclass
class CalibrationSettings:
    dataset: str
    num_samples: int = 256
    max_seq_len: int = 4096
    seed: int = 42
    split: str | None = None
    offload_dir: str | None = None  # default: DST.offload next to the destination
    dtype: torch.dtype = torch.bfloat16
    overwrite: bool = False
    keep_offload: bool = False
    max_cpu_memory_gb: float | None = None  # model share kept in host memory; default from layer_memory_estimate
    export_activation_scales: str | None = None


@dataclass
class CalibrationResult:
    input_amax: dict[str, float]  # native module -> amax, every module Path A quantizes
    calibrated: frozenset[str] = frozenset()  # modules whose tensors come from llm-compressor's save (not MTP)
    fallbacks: dict[str, str] = field(default_factory=dict)  # module -> why its amax is a peer maximum
    layer_log: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------
def quantize_with_llmcompressor(src: str, dst: str, options: Options, settings: CalibrationSettings) -> dict:
    """Run Path B from ``src`` (FP8) to ``dst`` (NVFP4 W4A4, compressed-tensors); returns the report."""
    started = time.time()
    src, dst = os.path.realpath(src), os.path.realpath(dst)
    if options.format != "compressed-tensors":
        raise PathBError("Path B writes compressed-tensors only (llm-compressor's format); use Path A for others")
    check_apart(src, dst)
    ckpt = open_checkpoint(src)
    fingerprint = run_fingerprint(ckpt, options, settings)
    check_destination(dst, fingerprint, settings.overwrite)
    weight_only = build_plan(ckpt, options)  # fails early, listing every problem, before hours of work
    family = family_for(ckpt.config)  # (the plan refused a model of no family)
    quantized = sorted(m for m, a in weight_only.actions.items() if a == Action.QUANTIZE.value)
    log.info("rule table (%s): %d modules to quantize (%d in MTP), %d kept FP8", family.title, len(quantized),
             sum(map(mtp_test(ckpt), quantized)), sum(a == Action.KEEP_FP8.value for a in weight_only.actions.values()))
    estimate = layer_memory_estimate(ckpt, settings.num_samples, settings.max_seq_len)
    budget = cpu_budget_gb(estimate, host_memory_gb(), settings.num_samples, settings.max_seq_len)
    cpu_gb = budget if settings.max_cpu_memory_gb is None else settings.max_cpu_memory_gb
    data = _calibration_data(src, settings)  # the dataset and its chat rendering fail here, not after staging
    work = os.path.realpath(settings.offload_dir or dst.rstrip("/") + ".offload")
    log.info("Path B: %s -> %s, work folder %s", src, dst, work)
    os.makedirs(dst, exist_ok=True)
    with exclusive_lock(dst):
        finished = claim_destination(dst, fingerprint, settings.overwrite)
        if finished is not None:
            log.info("%s is already complete (every shard intact by hash): nothing to do", dst)
            return finished
        calibration = _read_json(os.path.join(work, CALIBRATION_NAME))
        if calibration is not None and calibration.get("fingerprint") == fingerprint:
            log.info("reusing the finished calibration %s in %s", calibration["calibration_id"], work)
        else:
            _stage("1/5 staging", started)
            staging = stage_bf16_checkpoint(ckpt, os.path.join(work, STAGING), settings.dtype)
            calibration = run_calibration(ckpt, staging, work, weight_only, data, settings, cpu_gb, fingerprint,
                                          started)
        _stage("4/5 collecting scales", started)
        saved = saved_tensors(os.path.join(work, LLMC_SAVE), family)
        result = collect_activation_amax(saved, quantized, options.joint_scale, family,
                                         int(ckpt.config["num_hidden_layers"]))
        result.layer_log = calibration["layers"]
        if settings.export_activation_scales:
            export_activation_scales(settings.export_activation_scales, src, result)
        _stage("5/5 writing", started)
        plan = build_plan(ckpt, options, result.input_amax)
        done = write_output(ckpt, plan, saved, dst, result, calibration["calibration_id"])
        report = finish(ckpt, plan, dst, done, result, time.time() - started)
    if not settings.keep_offload:
        shutil.rmtree(work, ignore_errors=True)
        log.info("removed the work folder %s", work)
    log.info("Path B done in %s: %s", _hms(time.time() - started), dst)
    return report


def _calibration_data(src: str, settings: CalibrationSettings):
    """The tokenized calibration samples (the source's tokenizer: staging copies its files unchanged)."""
    from transformers import AutoTokenizer

    from .calibration_data import tokenized_dataset

    return tokenized_dataset(settings.dataset, AutoTokenizer.from_pretrained(src), src, settings.num_samples,
                             settings.max_seq_len, settings.seed, settings.split)


def run_calibration(ckpt: Checkpoint, staging: str, work: str, weight_only: ConversionPlan, data,
                    settings: CalibrationSettings, cpu_gb: float, fingerprint: dict, started: float) -> dict:
    """Load, calibrate and save into ``work``; returns the record :data:`CALIBRATION_NAME` holds, written last: a
    rerun reuses a calibration only once it is complete."""
    for stale in (CALIBRATION_NAME, LLMC_SAVE, OFFLOAD):  # a calibration cut short leaves nothing to trust
        path = os.path.join(work, stale)
        shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
    _stage("2/5 loading", started)
    family = family_for(ckpt.config)
    model, tokenizer = load_for_calibration(staging, os.path.join(work, OFFLOAD), settings.dtype, cpu_gb, family)
    ignore = ignore_list(model, hf_to_native_modules(ckpt), weight_only.actions)
    _stage("3/5 calibration", started)
    layer_log = run_oneshot(model, tokenizer, data, ignore, os.path.join(work, LLMC_SAVE), settings, family)
    del model
    record = {"fingerprint": fingerprint, "calibration_id": uuid.uuid4().hex, "layers": layer_log}
    atomic_write_json(os.path.join(work, CALIBRATION_NAME), record)
    return record


# ---------------------------------------------------------------------------------------------------------------
# The destination: new, resumed, or replaced
# ---------------------------------------------------------------------------------------------------------------
def run_fingerprint(ckpt: Checkpoint, options: Options, settings: CalibrationSettings) -> dict:
    """What the output bytes depend on: the source, the plan's flags and the calibration's inputs."""
    return {
        "kit_version": __version__,
        "source": ckpt.root,
        "source_fingerprint": source_fingerprint(ckpt),
        "options": options.as_json(),
        "calibration": {"dataset": settings.dataset, "split": settings.split, "num_samples": settings.num_samples,
                        "max_seq_len": settings.max_seq_len, "seed": settings.seed, "dtype": str(settings.dtype)},
    }


def check_destination(dst: str, fingerprint: dict, overwrite: bool) -> bool:
    """Whether ``dst`` holds this command's output (to resume); refuses anything else non-empty unless
    ``overwrite``. Reads only."""
    previous = _read_json(os.path.join(dst, STATE_DIR, FINGERPRINT_NAME))
    if previous == fingerprint:
        return True
    leftovers = sorted(n for n in os.listdir(dst) if not n.startswith(LOCK_NAME)) if os.path.isdir(dst) else []
    if leftovers and not overwrite:
        if previous is not None:
            raise PathBError(f"{dst} holds a Path B run with other settings ({_changes(previous, fingerprint)}): "
                             "rerun that command to resume it, or pass --overwrite to replace it")
        raise PathBError(f"{dst} is not empty and holds no Path B run ({', '.join(leftovers[:5])}); choose an empty "
                         "destination or pass --overwrite to replace its contents")
    return False


def _changes(previous: dict, now: dict) -> str:
    """``options.max_shard_size, calibration.num_samples``: which recorded settings differ."""
    def flat(d: dict, prefix: str = "") -> dict:
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}
    a, b = flat(previous), flat(now)
    return ", ".join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)) or "its record differs"


def claim_destination(dst: str, fingerprint: dict, overwrite: bool) -> dict | None:
    """Make ``dst`` this command's: resumed if it holds this command's output (its report if that is complete and
    intact), else emptied (with ``overwrite``) and its fingerprint written. Runs under the destination's lock."""
    state = os.path.join(dst, STATE_DIR)
    if check_destination(dst, fingerprint, overwrite):
        report = _complete_report(dst, state)
        if report is not None:
            return report
        log.info("resuming this command's unfinished output in %s", dst)
        if os.path.exists(os.path.join(dst, INDEX_NAME)):
            os.remove(os.path.join(dst, INDEX_NAME))  # rewritten last, once every shard is recorded
        return None
    for name in os.listdir(dst):
        if not name.startswith(LOCK_NAME):
            log.warning("--overwrite: removing %s", os.path.join(dst, name))
            path = os.path.join(dst, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.makedirs(state)
    atomic_write_json(os.path.join(state, FINGERPRINT_NAME), fingerprint)
    return None


def _complete_report(dst: str, state: str) -> dict | None:
    """The report of a finished output whose every indexed shard is recorded and intact by hash, else None."""
    index, report = _read_json(os.path.join(dst, INDEX_NAME)), _read_json(os.path.join(dst, REPORT_NAME))
    if index is None or report is None:
        return None
    recorded = read_manifest(state)
    shards = sorted(set(index["weight_map"].values()))
    if any(s not in recorded for s in shards):
        return None
    return report if all(intact_entries(dst, [recorded[s] for s in shards], by_hash=True)) else None


def finished_shards(folder: str, state: str, names: list[str], by_hash: bool) -> dict[str, dict]:
    """Manifest entries (in ``state``) of the shards ``names`` that are on disk intact; removes every partial file
    a killed run left in ``folder`` (never trusted)."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".partial"):
            os.remove(os.path.join(folder, name))
    return intact_shards(folder, state, names, by_hash)


def _stage(what: str, started: float) -> None:
    log.info("=== stage %s (elapsed %s, peak host RSS %.2f GB)", what, _hms(time.time() - started), _peak_rss_gb())


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _peak_rss_gb() -> float:
    return peak_rss_bytes() / 1e9


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: the BF16 staging checkpoint
# ---------------------------------------------------------------------------------------------------------------
def mtp_test(ckpt: Checkpoint) -> Callable[[str], bool]:
    """Whether a tensor or module name is in the checkpoint's MTP block (V4 ``mtp.K.``, V3 layer
    ``num_hidden_layers``), by the checkpoint's family."""
    family, layers = family_for(ckpt.config) or V4, ckpt.config.get("num_hidden_layers")
    return lambda name: family.is_mtp(name, layers)


def staged_tensor_names(ckpt: Checkpoint) -> list[str]:
    """What transformers' model reads: no FP8 scale companions and no MTP block (it builds none)."""
    scales = {n for n in ckpt.tensors if n.endswith((".scale", ".weight_scale_inv"))}
    mtp = mtp_test(ckpt)
    return [n for n in ckpt.tensors if n not in scales and not mtp(n)]


def stage_bf16_checkpoint(ckpt: Checkpoint, staging: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Write ``staging``: the source with FP8 weights dequantized to ``dtype``, shard by shard; returns its path.

    Each staging shard mirrors one source shard, written by :func:`nvfp4kit.write.write_shard` and recorded in the
    staging folder's manifest; a rerun for the same source (``staging.json`` holds its fingerprint) skips the
    shards recorded and present at their size (not re-hashed: the staging checkpoint is several TB and only read
    back by transformers). Only one tensor is in memory at a time.
    """
    os.makedirs(staging, exist_ok=True)
    state_path = os.path.join(staging, "staging.json")
    fingerprint = {"source_fingerprint": source_fingerprint(ckpt), "dtype": str(dtype), "kit_version": __version__}
    state = _read_json(state_path)
    if state is None or state.get("fingerprint") != fingerprint:
        if state is not None:
            log.warning("staging folder %s belongs to another source or dtype: rebuilding it", staging)
        shutil.rmtree(staging)
        os.makedirs(staging)
        atomic_write_json(state_path, {"fingerprint": fingerprint})
    wanted = set(staged_tensor_names(ckpt))
    fp8 = {n for n in wanted if ckpt.tensors[n].dtype == "F8_E4M3"}
    read = dequantized_source(ckpt)
    by_shard = {shard: sorted((n for n in wanted if ckpt.shard_of(n) == shard), key=lambda n: ckpt.tensors[n].begin)
                for shard in ckpt.shards}
    done = finished_shards(staging, staging, list(by_shard), by_hash=False)
    t0 = time.time()
    for k, (shard, names) in enumerate(by_shard.items()):
        if shard in done or not names:
            continue
        specs = [TensorSpec(n, "BF16" if n in fp8 and dtype == torch.bfloat16 else
                            ("F32" if n in fp8 else ckpt.tensors[n].dtype), ckpt.tensors[n].shape) for n in names]
        tensors = (read(n).to(dtype) if n in fp8 else read(n) for n in names)
        append_entry(staging, write_shard(staging, shard, specs, (Piece([t]) for t in tensors)))
        done_now = k + 1
        eta = (time.time() - t0) / done_now * (len(ckpt.shards) - done_now)
        log.info("staged %s (%d/%d shards), elapsed %s, ETA %s", shard, done_now, len(ckpt.shards),
                 _hms(time.time() - t0), _hms(eta))
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    atomic_write_json(os.path.join(staging, "config.json"), config)
    weight_map = {n: shard for shard, names in by_shard.items() for n in names}
    atomic_write_json(os.path.join(staging, INDEX_NAME), {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(ckpt.root, name)):
            shutil.copy2(os.path.join(ckpt.root, name), os.path.join(staging, name))
    return staging


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: transformers' model, offloaded, experts linearized
# ---------------------------------------------------------------------------------------------------------------
def load_for_calibration(staging: str, offload_folder: str, dtype: torch.dtype = torch.bfloat16,
                         max_cpu_memory_gb: float | None = None, family: Family = V4):
    """``(model, tokenizer)``: the family's transformers model on CPU/disk (compressed-tensors offload;
    llm-compressor's sequential pipeline moves one decoder layer at a time to the GPU), experts as per-expert
    Linears."""
    import transformers
    from compressed_tensors.offload import load_offloaded_model
    from llmcompressor.modeling.moe.conversion_mappings import set_save_conversion_mapping
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoTokenizer

    model_class = getattr(transformers, family.architectures[0])
    # llm-compressor's load_quantizable_moe would load the per-expert staging tensors directly, but its
    # transformers patch registry imports every model module, torchvision included (no CPU wheel for torch 2.13):
    # load the stacked experts instead and linearize after loading.
    limits = {} if max_cpu_memory_gb is None else {"max_memory": {"cpu": int(max_cpu_memory_gb * 1e9)}}
    with load_offloaded_model(model_class):
        model = model_class.from_pretrained(staging, dtype=dtype, device_map="auto_offload",
                                            offload_folder=offload_folder, **limits)
    linearize_moe(model)
    # Saving reverses these mappings, so the save carries the checkpoint's names (V4 experts.E.w1, attn.wq_a, ...).
    set_save_conversion_mapping(model, save_mapping(family))
    cast_fp32_norms(model, dtype, family.hf_norm)
    return model.eval(), AutoTokenizer.from_pretrained(staging)


def save_mapping(family: Family) -> list:
    """transformers' conversions that turn the linearized model's names into the checkpoint's on save (and the
    checkpoint's into the model's on load): llm-compressor's per-expert entries for a family transformers renames
    (V4); none where the names are transformers' own (V3: ``model.layers.N.mlp.experts.E.gate_proj`` both ways)."""
    if family.hf_renames is None:
        return []
    from llmcompressor.modeling.moe.conversion_mappings import get_linearize_load_mappings

    return get_linearize_load_mappings(family.hf_renames)[2]


def cast_fp32_norms(model: torch.nn.Module, dtype: torch.dtype, norm_class: str = V4.hf_norm) -> list[str]:
    """Cast the RMSNorm weights transformers keeps in float32 to ``dtype``; returns their names.

    A float32 norm weight turns the norm's output float32, and the BF16 Linear after it fails with "expected m1 and
    m2 to have the same dtype". The mHC parameters, sinks and position biases stay float32: their code upcasts
    explicitly. Calibration-only: the output copies these tensors from the source, bit for bit.
    """
    cast = []
    for name, module in model.named_modules():
        if type(module).__name__ == norm_class and module.weight.dtype != dtype:
            module.to(dtype)
            cast.append(name)
    return cast


def hf_to_native_modules(ckpt: Checkpoint) -> dict[str, str]:
    """transformers module name (linearized experts) -> DeepSeek module name, for every weight outside MTP.

    Built by running transformers' own load renamings of the family, with llm-compressor's per-expert entries in
    place of the stacking converter, over the checkpoint's names: the mapping is the loader's, never a hand-written
    copy. (V3's names are transformers' own: the mapping is the identity.)
    """
    from transformers.core_model_loading import rename_source_key

    load_map = save_mapping(family_for(ckpt.config) or V4)  # (llm-compressor's load and save lists are one)
    out = {}
    for name in staged_tensor_names(ckpt):
        if name.endswith(".weight"):
            hf = module_name(rename_source_key(name, load_map, [])[0] if load_map else name)
            # transformers' state dict holds the decoder under ``model.``; V3's names carry it already
            out[hf if hf.startswith(("lm_head", "model.")) else "model." + hf] = module_name(name)
    return out


def ignore_list(model: torch.nn.Module, names: dict[str, str], actions: dict[str, str]) -> list[str]:
    """Every Linear of ``model`` that the rule table does not quantize (exact names: honoured module by module).

    Raises if a Linear has no DeepSeek name (it would be quantized blindly) or a module the table quantizes is no
    Linear in the model (it would never be calibrated).
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    unknown = [n for n in linears if n not in names]
    if unknown:
        raise PathBError(f"transformers Linear modules with no DeepSeek name: {unknown[:5]}")
    staged = set(names.values())  # (no MTP: transformers builds none)
    wanted = {m for m, a in actions.items() if a == Action.QUANTIZE.value and m in staged}
    missing = wanted - {names[n] for n in linears}
    if missing:
        raise PathBError(f"modules the rule table quantizes are not Linear layers of the model: {sorted(missing)[:5]}")
    return [n for n in linears if names[n] not in wanted]


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: oneshot, with progress per decoder layer
# ---------------------------------------------------------------------------------------------------------------
def run_oneshot(model, tokenizer, data, ignore: list[str], save_dir: str, settings: CalibrationSettings,
                family: Family = V4) -> list[dict]:
    """Calibrate and save (compressed) to ``save_dir``; returns one progress record per decoder layer."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    recipe = QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=ignore)
    progress = LayerProgress(model, len(data), family.hf_decoder_layer)
    log.info("oneshot: sequential pipeline over %d decoder layers, %d samples, every routed expert calibrated on "
             "every token; %d Linear modules ignored by the rule table", progress.total, len(data), len(ignore))
    try:
        with per_expert_save_names(family):
            oneshot(model=model, processor=tokenizer, dataset=data, recipe=recipe, pipeline="sequential",
                    sequential_targets=[family.hf_decoder_layer], num_calibration_samples=len(data),
                    max_seq_length=settings.max_seq_len, shuffle_calibration_samples=False,
                    moe_calibrate_all_experts=True, output_dir=save_dir, save_compressed=True)
        progress.end()
    finally:
        progress.close()
    return progress.records


@contextmanager
def per_expert_save_names(family: Family = V4) -> Iterator[None]:
    """transformers' conversion mapping of the family with per-expert entries while llm-compressor saves, restored
    after: left in place it would make every later load of the family in this process expect per-expert weights."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

    model_type = family.hf_renames or family.model_types[0]
    original = get_checkpoint_conversion_mapping(model_type)
    register_checkpoint_conversion_mapping(model_type, save_mapping(family), overwrite=True)
    try:
        yield
    finally:
        register_checkpoint_conversion_mapping(model_type, original, overwrite=True)


class LayerProgress:
    """Logs each decoder layer as the sequential pipeline finishes it: elapsed, ETA and peak memory.

    The pipeline runs a layer once per sample to calibrate and once more per sample to propagate its output to the
    next layer, so a layer is done after ``2 * samples`` forward calls, or at the latest when a later layer runs
    or the pipeline ends (:meth:`end`): how many passes a layer gets is llm-compressor's choice, and a count
    that never arrives must not silence the log (it did on a GPU run with one layer).
    """

    def __init__(self, model: torch.nn.Module, samples: int, layer_class: str = V4.hf_decoder_layer) -> None:
        self.layers = [m for m in model.modules() if type(m).__name__ == layer_class]
        self.total, self.samples, self.records = len(self.layers), samples, []
        self.calls = [0] * self.total
        self.finished: set[int] = set()
        self.started = self.last = time.time()
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int):
        def hook(module, args, output) -> None:
            for earlier in range(index):  # a later layer runs: every earlier one is done
                self._finish(earlier)
            self.calls[index] += 1
            if self.calls[index] == 2 * self.samples:
                self._finish(index)
        return hook

    def _finish(self, index: int) -> None:
        if self.calls[index] and index not in self.finished:
            self.finished.add(index)
            self._finished(index)

    def _finished(self, index: int) -> None:
        now = time.time()
        done = len(self.records) + 1
        record = {"layer": index, "seconds": round(now - self.last, 3), "peak_host_rss_gb": round(_peak_rss_gb(), 3)}
        if torch.cuda.is_available():
            record["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
            torch.cuda.reset_peak_memory_stats()
        self.records.append(record)
        eta = (now - self.started) / done * (self.total - done)
        log.info("calibrated layer %d (%d/%d) in %.1f s; elapsed %s, ETA %s; peak host RSS %.2f GB%s", index, done,
                 self.total, now - self.last, _hms(now - self.started), _hms(eta), record["peak_host_rss_gb"],
                 f", peak GPU {record['peak_gpu_gb']:.2f} GB" if "peak_gpu_gb" in record else "")
        self.last = now

    def end(self) -> None:
        """The pipeline is through: a layer not yet logged is done."""
        for index in range(self.total):
            self._finish(index)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def layer_memory_estimate(ckpt: Checkpoint, num_samples: int, max_seq_len: int) -> dict[str, float]:
    """Bytes Path B holds per decoder layer, from the checkpoint's own tensor sizes (GB).

    ``layer_gb``: the largest decoder layer with FP8 weights widened to BF16: what one onloaded layer puts on the
    GPU (plus per-sample activations, ``sample_activations_gb``). ``activation_cache_gb``: the sequential
    pipeline's cached inputs of the current layer for every sample (``[samples, seq, hc_mult, hidden]`` BF16),
    held in host memory. Host peak is about the offload's CPU share plus this cache plus one layer in transit.
    """
    per_layer: dict[str, int] = {}
    layer = (family_for(ckpt.config) or V4).layer
    for name in staged_tensor_names(ckpt):
        m = layer.match(name)
        if m:
            info = ckpt.tensors[name]
            width = 2 if info.dtype == "F8_E4M3" else info.nbytes // max(math.prod(info.shape), 1)
            per_layer[m.group(1)] = per_layer.get(m.group(1), 0) + math.prod(info.shape) * width
    cfg = ckpt.config
    hidden, hc = int(cfg["hidden_size"]), int(cfg.get("hc_mult", 1))
    inter = int(cfg["moe_intermediate_size"])
    return {
        "layer_gb": max(per_layer.values()) / 1e9,
        "activation_cache_gb": num_samples * max_seq_len * hc * hidden * 2 / 1e9,
        # one sample through one expert at a time (all tokens): gate+up outputs in float32, twice for the observer
        "sample_activations_gb": (max_seq_len * hc * hidden * 2 * 4 + max_seq_len * 2 * inter * 4 * 2) / 1e9,
    }


def host_memory_gb() -> float:
    """This machine's physical memory (GB)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def cpu_budget_gb(estimate: dict[str, float], host_gb: float, num_samples: int, max_seq_len: int,
                  headroom_gb: float = HEADROOM_GB) -> float:
    """Host memory the offloaded model may keep on the CPU: what remains of ``host_gb`` once the activation cache,
    one layer in transit and ``headroom_gb`` are set aside (the rest of the model stays on disk).

    Raises :class:`PathBError` with the figures and the largest ``--num-samples``/``--max-seq-len`` that fit when
    nothing remains: the sequential pipeline must hold the whole cache, and would die hours later.
    """
    assert num_samples > 0 and max_seq_len > 0 and host_gb > 0
    cache, layer = estimate["activation_cache_gb"], estimate["layer_gb"]
    budget = host_gb - cache - layer - headroom_gb
    if budget < 0:
        room = host_gb - layer - headroom_gb  # what the cache may take
        fits = (f"at most --num-samples {math.floor(num_samples * room / cache)} (with --max-seq-len {max_seq_len}) or "
                f"--max-seq-len {math.floor(max_seq_len * room / cache)} (with --num-samples {num_samples})"
                if room > 0 else "no cache at all: one decoder layer alone does not fit")
        raise PathBError(
            f"not enough host memory for calibration: the activation cache of {num_samples} samples x {max_seq_len} "
            f"tokens takes {cache:.1f} GB, one decoder layer {layer:.1f} GB, headroom {headroom_gb:.0f} GB: "
            f"{cache + layer + headroom_gb:.1f} GB needed, {host_gb:.1f} GB on this machine; {fits} fits")
    log.info("memory per layer: %.2f GB onloaded (GPU), %.2f GB activation cache (host); host %.1f GB -> model share "
             "kept in host memory: %.1f GB, the rest offloaded to disk", layer, cache, host_gb, budget)
    return budget


# ---------------------------------------------------------------------------------------------------------------
# Stage 4: the calibrated tensors and activation scales
# ---------------------------------------------------------------------------------------------------------------
def saved_tensors(saved_dir: str, family: Family = V4) -> dict[str, TensorInfo]:
    """llm-compressor's save, by the checkpoint's names (V4: transformers' ``model.`` prefix dropped; V3's names
    carry it themselves)."""
    prefix = "model." if family.hf_renames else ""
    out: dict[str, TensorInfo] = {}
    for name in sorted(os.listdir(saved_dir)):
        if name.endswith(".safetensors"):
            tensors, _ = read_header(os.path.join(saved_dir, name))
            out.update({k.removeprefix(prefix): v for k, v in tensors.items()})
    return out


def input_amax_of(global_scale: float) -> float:
    """compressed-tensors' ``input_global_scale`` is ``2688 / amax``; nan if the scale is unusable."""
    return GLOBAL_SCALE_DIVISOR / global_scale if math.isfinite(global_scale) and global_scale > 0 else math.nan


def collect_activation_amax(saved: dict[str, TensorInfo], quantized: list[str], joint_scale: str,
                            family: Family = V4, num_hidden_layers: int | None = None) -> CalibrationResult:
    """Input amax for every module Path A quantizes, with fallbacks; checks what vLLM relies on.

    Raises :class:`PathBError` if llm-compressor saved a quantized module under another name or without one of its
    tensors, or if a fused group (an expert's w1/w3) got different weight global scales.
    """
    def is_mtp(module: str) -> bool:
        return family.is_mtp(module, num_hidden_layers)

    trunk = [m for m in quantized if not is_mtp(m)]
    missing = [f"{m}.{s}" for m in trunk for s in NVFP4_SUFFIXES if f"{m}.{s}" not in saved]
    if missing:
        raise PathBError(f"llm-compressor's save lacks {len(missing)} quantized tensors (expert names on save?), "
                         f"e.g. {missing[:4]}")
    _check_joint_global_scales(saved, trunk, joint_scale, family)
    amax = {m: input_amax_of(float(read_tensor(saved[f"{m}.input_global_scale"]).float().reshape(-1)[0])) for m in trunk}
    fallbacks: dict[str, str] = {}
    by_peer: dict[str, list[str]] = {}
    for m in trunk:
        by_peer.setdefault(peer_key(m), []).append(m)
    for key, members in by_peer.items():
        good = [amax[m] for m in members if math.isfinite(amax[m])]
        for m in members:
            if not math.isfinite(amax[m]):
                if not good:
                    raise PathBError(f"no module of {key} has a usable activation scale: calibration saw no data?")
                amax[m] = max(good)
                fallbacks[m] = f"no usable calibrated scale: max input amax of {len(good)} peers in {key}"
    by_proj: dict[str, list[float]] = {}
    for m in trunk:
        by_proj.setdefault(projection_key(m, family), []).append(amax[m])
    for m in quantized:
        if is_mtp(m):
            key = projection_key(m, family)
            peers = by_proj.get(key)
            if not peers:
                raise PathBError(f"{m}: the MTP block is not calibrated and the trunk has no {key} peer")
            amax[m] = max(peers)
            fallbacks[m] = f"MTP is not built by transformers: max input amax of the trunk's {key}"
    for m, why in sorted(fallbacks.items()):
        log.warning("activation scale fallback: %s: %s (amax %.6g)", m, why, amax[m])
    return CalibrationResult(dict(sorted(amax.items())), frozenset(trunk), fallbacks)


def peer_key(module: str) -> str:
    """Experts of one layer and one projection: ``layers.3.ffn.experts.*.w2``; other modules are their own peers."""
    return re.sub(r"\.experts\.\d+\.", ".experts.*.", module)


def projection_key(module: str, family: Family = V4) -> str:
    """One projection across layers: ``ffn.experts.*.w2`` (V3 ``mlp.experts.*.down_proj``)."""
    key = peer_key(module)
    for block in (family.layer, family.mtp):
        m = block.match(key) if block is not None else None
        if m:
            return key[m.end():]
    return key


def _check_joint_global_scales(saved: dict[str, TensorInfo], modules: list[str], joint_scale: str,
                               family: Family = V4) -> None:
    groups: dict[str, list[str]] = {}
    for m in modules:
        groups.setdefault(joint_scale_group(m, joint_scale, family.table), []).append(m)
    bad = []
    for group, members in groups.items():
        values = {m: float(read_tensor(saved[f"{m}.weight_global_scale"]).float().reshape(-1)[0]) for m in members}
        if len(set(values.values())) > 1:
            bad.append(f"{group}: {values}")
    if bad:
        raise PathBError("vLLM fuses these modules into one GEMM with one global scale, but llm-compressor gave them "
                         f"different ones ({len(bad)} groups): {bad[:3]}")


def export_activation_scales(path: str, src: str, result: CalibrationResult) -> None:
    """The file ``fp8_to_nvfp4_streaming.py --activation-scales`` reads (:func:`nvfp4kit.plan.load_activation_amax`)."""
    atomic_write_json(path, {
        "format": ACTIVATION_SCALES_FORMAT,
        "source": src,
        "producer": f"nvfp4kit {__version__} quantize_llmcompressor.py",
        "input_amax": result.input_amax,
        "fallbacks": result.fallbacks,
    })
    log.info("wrote %d activation amax values to %s (%d fallbacks)", len(result.input_amax), path, len(result.fallbacks))


# ---------------------------------------------------------------------------------------------------------------
# Stage 5: the output, by Path A's plan
# ---------------------------------------------------------------------------------------------------------------
def write_output(ckpt: Checkpoint, plan: ConversionPlan, saved: dict[str, TensorInfo], dst: str,
                 result: CalibrationResult, calibration_id: str) -> dict[str, dict]:
    """Write every shard of ``plan`` the manifest does not record as intact and made from ``calibration_id``;
    returns the manifest entries of all of them. Calibrated units take llm-compressor's tensors."""
    state = os.path.join(dst, STATE_DIR)
    done = {n: e for n, e in finished_shards(dst, state, [s.name for s in plan.shards], by_hash=True).items()
            if e.get("calibration_id") == calibration_id}  # another calibration's shards would mix two results
    if done:
        log.info("%d of %d shards already written (verified by hash)", len(done), len(plan.shards))
    layout = Layout(plan.options.format, w4a4=True)
    for k, shard in enumerate(plan.shards):
        if shard.name in done:
            continue
        units = [plan.units[i] for i in shard.units]
        stats: dict[str, dict] = {}
        entry = write_shard(dst, shard.name, [o for u in units for o in u.outputs],
                            (Piece([t]) for t in _shard_tensors(units, ckpt, plan, layout, saved, result, stats)),
                            {"format": "pt", "producer": f"nvfp4kit {__version__} path B"})
        entry.update(calibration_id=calibration_id, tensors=stats,
                     modules_from_llmcompressor=sum(len(u.modules) for u in units if _calibrated(u, result)))
        append_entry(state, entry)
        done[shard.name] = entry
        log.info("wrote %s (%d/%d)", shard.name, k + 1, len(plan.shards))
    return done


def _calibrated(unit, result: CalibrationResult) -> bool:
    """Units whose tensors come from llm-compressor: NVFP4 outside MTP (transformers builds no MTP)."""
    return unit.kind == "nvfp4" and all(m in result.calibrated for m in unit.modules)


def _shard_tensors(units: list, ckpt: Checkpoint, plan: ConversionPlan, layout: Layout,
                   saved: dict[str, TensorInfo], result: CalibrationResult, stats: dict) -> Iterator[torch.Tensor]:
    """One shard's tensors in the plan's order, one unit at a time; Path A's unit code for every uncalibrated unit
    (kept FP8, copies, MTP experts), its per-tensor statistics into ``stats``."""
    cpu = torch.device("cpu")
    for unit in units:
        if _calibrated(unit, result):
            yield from _calibrated_tensors(unit.modules, unit.outputs, saved, result)
            continue
        for item in read_unit(unit, ckpt.tensors, False):
            yield from compute_unit(item, plan, layout, cpu, stats)[0]


def finish(ckpt: Checkpoint, plan: ConversionPlan, dst: str, done: dict[str, dict], result: CalibrationResult,
           seconds: float) -> dict:
    """Side files, config, report, card, and last the index: only once every planned shard is recorded and on disk
    (Path A's check). Returns the report."""
    copy_side_files(ckpt.root, dst)
    report = {
        "kit_version": __version__,
        "path": "B (llm-compressor oneshot, NVFP4 W4A4)",
        "source": ckpt.root,
        "options": plan.options.as_json(),
        "modules_from_llmcompressor": sum(e["modules_from_llmcompressor"] for e in done.values()),
        "modules_quantized_by_path_a_code": sorted(m for e in done.values() for m in e["tensors"]),
        "activation_scale_fallbacks": result.fallbacks,
        "layers": result.layer_log,
        "seconds": round(seconds, 1),
    }
    finish_output(ckpt, plan, dst, done, report, REPORT_NAME)
    return report


def _calibrated_tensors(modules: list[str], outputs: list[TensorSpec], saved: dict[str, TensorInfo],
                        result: CalibrationResult) -> list[torch.Tensor]:
    """llm-compressor's tensors for ``modules`` in the plan's output order; a fallback module's input scale is
    ``2688 / amax`` as Path A writes it. Each tensor is checked against the plan's dtype and shape."""
    data = []
    for spec in outputs:
        module, suffix = spec.name.rsplit(".", 1)
        if suffix == "input_global_scale" and module in result.fallbacks:
            t = torch.tensor([GLOBAL_SCALE_DIVISOR / result.input_amax[module]], dtype=torch.float32)
        else:
            t = read_tensor(saved[spec.name])
            if suffix.endswith("global_scale"):
                t = t.to(torch.float32).reshape(spec.shape)
        if tuple(t.shape) != tuple(spec.shape) or t.dtype != DTYPES[spec.dtype]:
            raise PathBError(f"{spec.name}: llm-compressor saved {t.dtype} {list(t.shape)}, the layout needs "
                             f"{spec.dtype} {list(spec.shape)}")
        data.append(t)
    return data
