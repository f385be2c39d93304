"""Verify a converted NVFP4 checkpoint (Path A or Path B output) before it is served.

Result (``verify_nvfp4.py`` prints it last and exits with its code):

- ``PASS`` (exit 0): every required check ran and found nothing. Only the optional checks (4 and 5: they need a
  GPU or a vLLM environment, not the checkpoint) may be skipped; the result line names those that were.
- ``FAIL`` (exit 1): a check found a problem; each problem line names the tensor, shard or config key at fault. A
  check that crashes on an input nobody foresaw is that check's FAIL with the exception's text; the others still run.
- ``INCOMPLETE`` (exit 1): nothing failed, but a required check could not run (``NOT RUN``, with the reason): most
  often no FP8 source, neither ``--src`` nor the one the converter recorded (``.nvfp4kit/fingerprint.json``,
  ``conversion_report.json`` or Path B's ``path_b_report.json``). Unverified is never reported as verified.
- exit 2 (``verify_nvfp4.py``): one error line, no report, when the folder is not a checkpoint at all.

Required checks, in order; each returns a :class:`CheckResult` whose problems name the tensor at fault:

1. ``static`` (headers, scales and config only): config.json present and a JSON object; every NVFP4 and kept-FP8
   module has exactly the companions its layout writes (:class:`nvfp4kit.layouts.Layout` is the one source of
   names, dtypes and shapes), activation scales where the config says W4A4, no stray tensor; no E4M3 NaN or negative
   block scale, every global and activation scale finite and > 0, one global scale per fused group; the index lists
   every tensor of every shard and nothing else, ``total_size`` right; the quantization config parses, no source
   FP8 config is left, and every quantized / kept-FP8 module is described by it as such.
2. ``finite``: no NaN or Inf in any floating-point output tensor (every byte read; the NVFP4 block scales are
   scanned by ``static``).
3. ``tensor_set``: the output holds exactly the tensors of the converter's plan (``.nvfp4kit/plan.json``) and of
   the plan rebuilt from the source by :mod:`nvfp4kit.rules` (with the options the converter recorded, else with
   the output's own NVFP4/FP8 choices where the rules allow them): a missing or extra tensor, or another dtype or
   shape, is named. Needs the plan or the source.
4. ``model_config`` (needs the source): every config.json key but ``quantization_config`` equals the source's.
5. ``copies`` (needs the source): every tensor the plan copies (embedding, head, norms, router, ``tid2eid``, ...)
   is the source's bit for bit, and every kept FP8 weight with its scale is bit for bit what the layout makes of
   the source's (the ``Layout.fp8_tensors`` bytes). Always every tensor, even when ``numeric`` samples.
6. ``numeric`` (needs the source): decoded NVFP4 against the dequantized FP8 source. Tensors the converter
   reports as ``exact`` must decode bit for bit (a swapped nibble anywhere fails); others need an SQNR of at least
   :data:`MIN_SQNR_DB`. All modules of a small checkpoint, a fixed-seed sample of a large one.
7. ``block_forward`` (needs the source; ``forward=False`` leaves it out): one transformers DeepSeek V4 decoder
   layer run on the same random hidden states with the FP8-dequantized weights and with the weights decoded from
   the output.

Optional checks (SKIP with the reason where they cannot run; they do not make the result INCOMPLETE):

8. ``vllm_generate`` (GPU with vLLM only): vLLM loads the checkpoint and generates a few tokens.
9. ``vllm_dry_load`` (on by default): :func:`nvfp4kit.vllm_check.run_vllm_dry_load` in vLLM's own environment,
   skipped where there is none.
10. ``sglang_dry_load`` (``sglang_dry_load=True``): :func:`nvfp4kit.sglang_check.run_sglang_dry_load`, SGLang's
    own loader over trunk and MTP draft in SGLang's environment, skipped where there is none.

On request (``fidelity=True``, ``--fidelity``; needs the source, NOT RUN without it):

11. ``fidelity``: :func:`nvfp4kit.fidelity.measure_fidelity`, the whole model teacher-forced on text with the
    source's and the output's weights, one decoder block at a time (W4A4 outputs with activations quantized as vLLM
    does). Details: ``kld_mean``, ``kld_max``, ``top1_agreement``, ``ppl_source``, ``ppl_output``, ``tokens``,
    ``per_layer``, ``mtp``. FAIL when the KLD mean exceeds 1.0 nat, top-1 agreement is below 0.5, the perplexity
    ratio exceeds 2.0 or the hidden-state relative error after any block exceeds 0.5 (bounds that catch a broken
    conversion even on a random-weight synthetic model; a good conversion of a trained model shows a KLD mean of
    0.01-0.1 and top-1 agreement above 0.9, see docs/fidelity.md). Rewrites the fidelity section of ``README.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from .checkpoint import Checkpoint, CheckpointError, configured_block_size, open_checkpoint, read_config
from .calibrate import REPORT_NAME as PATH_B_REPORT_NAME
from .convert import REPORT_NAME, STATE_DIR
from .fp8 import dequantize_fp8_blocks, infer_block_size
from .layouts import FP8_BLOCK_WEIGHTS, NVFP4_WEIGHTS, Layout, modelopt_key, mxfp4_specs, runtime_module
from .decode import dequantize as dequantize_source, form_of
from .mxfp4 import dequantize_mxfp4
from .nvfp4 import NVFP4Tensor, ScaleRule, dequantize_nvfp4, reconstruction_error
from .errors import KitError, few
from .plan import ConversionPlan, Options, build_plan
from .families import family_problems, table_for
from .hf_model import is_v3 as hf_model_is_v3
from .rules import Overrides, RuleTable, collapse, fused_group, module_name, rule_for
from .safetensors_io import DTYPES, TensorInfo, TensorSpec, read_tensor, tensor_bytes

# Reference NVFP4 (amax/2688, E4M3 block scales) gives 20.4 dB on Gaussian weights, 21.8 dB on Student-t(3) ones and
# 24.0-25.0 dB on the tiny synthetic checkpoint (--scale-policy reference). Decoding bugs land far below: swapped
# nibbles -3.0 dB, an inverted global scale -110 dB, block scales shifted by one block 9.2 dB (all measured on a
# 1024x1024 Gaussian). 15 dB keeps at least 5 dB of margin on both sides: rounding noise passes, a wrong decode fails.
MIN_SQNR_DB = 15.0
# The block's own contribution (output minus its input streams) may differ by at most this relative L2 error. A
# weight at the 15 dB floor has a relative error of 0.18; reference NVFP4 weights (~0.09) gave 0.084 on the tiny
# checkpoint's layer 3, exact ones give 0. 0.25 allows the floor with some amplification, not a broken block.
MAX_BLOCK_REL_ERROR = 0.25
# Numeric check reads every NVFP4 tensor when their data is below this; a sample above it.
SAMPLE_ALL_BELOW_BYTES = 4 * 10**9
DEFAULT_SAMPLE = 256
VLLM_PROMPT = "The capital of France is"
# Keys of the source FP8 config (DeepSeek's quant_method fp8); only layout N keeps them, next to moe_quant_algo.
FP8_SOURCE_KEYS = ("fmt", "scale_fmt", "weight_block_size", "activation_scheme")
E4M3_NAN_BITS = 0x7F  # x1111111: E4M3FN's only NaN pattern (it has no Inf)
E5M2_INF_BITS = 0x7C  # x1111100: Inf; x11111mm with mm != 0 is NaN
E8M0_NAN_BYTE = 0xFF  # UE8M0's only NaN
READ_CHUNK = 64 * 2**20  # bytes per read when scanning or comparing whole tensors (the embedding is 1.85 GB)
# The converter's report: Path A's, else Path B's (each names the source and the options it ran with).
REPORT_NAMES = (REPORT_NAME, PATH_B_REPORT_NAME)
PASS, FAIL, INCOMPLETE = "PASS", "FAIL", "INCOMPLETE"


@dataclass
class CheckResult:
    name: str
    passed: bool
    evidence: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: bool = False
    details: dict = field(default_factory=dict)  # per-tensor numbers: in --json, not in the printed report
    required: bool = True  # a required check that could not run makes the result INCOMPLETE, never PASS

    @property
    def status(self) -> str:
        if self.skipped:
            return "NOT RUN" if self.required else "SKIP"
        return "PASS" if self.passed else "FAIL"


def _skip(name: str, why: str, required: bool = True) -> CheckResult:
    """A check that could not run, with the reason; ``passed`` is False when it was required."""
    return CheckResult(name, not required, [why], [], skipped=True, required=required)


def _result(name: str, evidence: list[str], problems: list[str]) -> CheckResult:
    return CheckResult(name, not problems, evidence, problems)


def _crash(e: Exception) -> str:
    return f"check stopped by {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def guarded(name: str, check: Callable[..., CheckResult], *args, **kwargs) -> CheckResult:
    """``check(*args, **kwargs)``; an exception it raises becomes its FAIL (the other checks still run)."""
    try:
        return check(*args, **kwargs)
    except Exception as e:  # any input the check did not foresee: a finding, not a crash of the whole run
        return _result(name, [], [_crash(e)])


# ---------------------------------------------------------------------------------------------------------------
# What the output holds, from tensor names alone
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Inventory:
    """The output's modules as its tensors show them (the config is checked against this, not trusted)."""

    format: str  # a layouts.FORMATS value, recognised from tensor names
    nvfp4: dict[str, tuple[int, int]]  # module -> (out_features, in_features)
    fp8: dict[str, str]  # kept FP8 module -> its scale tensor
    num_hidden_layers: int

    def is_w4a4(self, tensors: dict[str, TensorInfo]) -> bool:
        """Whether any NVFP4 module carries an activation scale (used when the config cannot say)."""
        return any(s.name in tensors for m, shape in self.nvfp4.items() for s in _specs(self, m, shape, True)[3:])


def _specs(inv: Inventory, module: str, shape: tuple[int, int], w4a4: bool) -> list[TensorSpec]:
    """Packed weight, block scale, global scale[, activation scale], as the layout names them.

    Layout N refuses w4a4=False (it is always W4A4); its NVFP4 names are ModelOpt's, so those stand in."""
    fmt = "modelopt" if inv.format == "nvidia" and not w4a4 else inv.format
    return Layout(fmt, w4a4).nvfp4_specs(module, *shape)


def take_inventory(ckpt: Checkpoint) -> Inventory:
    t = ckpt.tensors
    packed_ct = {n[: -len(".weight_packed")] for n in t if n.endswith(".weight_packed")}
    packed_mo = {module_name(n) for n, i in t.items() if n.endswith(".weight") and i.dtype == "U8"}
    fp8_modules = [module_name(n) for n, i in t.items() if n.endswith(".weight") and i.dtype == "F8_E4M3"]
    if packed_ct:
        fmt, packed_suffix = "compressed-tensors", ".weight_packed"
    else:
        # ModelOpt and NVIDIA store NVFP4 alike; kept FP8 tells them apart (.weight_scale vs the source's .scale),
        # and without kept FP8 only the config can.
        declared = config_format(quant_config(ckpt))
        if fp8_modules:
            fmt = "nvidia" if any(m + ".scale" in t for m in fp8_modules) else "modelopt"
        else:
            fmt = declared if declared in ("modelopt", "nvidia") else "modelopt"
        packed_suffix = ".weight"
    nvfp4 = {}
    for m in sorted(packed_ct or packed_mo):
        rows, half = t[m + packed_suffix].shape if len(t[m + packed_suffix].shape) == 2 else (0, 0)
        nvfp4[m] = (rows, 2 * half)
    scale_suffix = ".scale" if fmt == "nvidia" else ".weight_scale"
    fp8 = {m: m + scale_suffix for m in sorted(fp8_modules)}
    return Inventory(fmt, nvfp4, fp8, config_int(ckpt.config, "num_hidden_layers"))


def config_int(config: dict, key: str) -> int:
    """``config[key]`` as an int; 0 where absent or not a number (check_config_file and model_config report it)."""
    try:
        return int(config.get(key, 0))
    except (TypeError, ValueError):
        return 0


def quant_config(ckpt: Checkpoint) -> dict:
    return dict(ckpt.config.get("quantization_config") or {})


def config_format(qcfg: dict) -> str | None:
    """The layout a quantization_config declares; None for a source FP8 config or anything unknown."""
    method = qcfg.get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "modelopt":
        return "modelopt"
    if method in ("fp8", "deepseek_v4_fp8") and qcfg.get("moe_quant_algo") == "NVFP4":
        return "nvidia"
    return None


def config_w4a4(qcfg: dict) -> bool | None:
    """Whether the config asks for activation scales (None if it does not say in a way this kit knows)."""
    fmt = config_format(qcfg)
    if fmt == "compressed-tensors":
        groups = (qcfg.get("config_groups") or {}).values()
        return any(_is_nvfp4_group(g) and g.get("input_activations") for g in groups)
    if fmt == "modelopt":
        algos = [v.get("quant_algo") for v in (qcfg.get("quantized_layers") or {}).values()] + [qcfg.get("quant_algo")]
        return "NVFP4" in algos
    if fmt == "nvidia":
        return True  # vLLM's DeepseekV4FP8Config always builds W4A4 experts
    return None


def _is_nvfp4_group(group: dict) -> bool:
    w = group.get("weights") or {}
    return all(w.get(k) == NVFP4_WEIGHTS[k] for k in ("num_bits", "type", "strategy", "group_size"))


def _is_fp8_block_group(group: dict) -> bool:
    w = group.get("weights") or {}
    return all(w.get(k) == FP8_BLOCK_WEIGHTS[k] for k in ("num_bits", "type", "strategy"))


# ---------------------------------------------------------------------------------------------------------------
# Decoding the output
# ---------------------------------------------------------------------------------------------------------------
def global_scale_multiplier(inv: Inventory, value: torch.Tensor) -> torch.Tensor:
    """float32 0-d multiplier: compressed-tensors stores its reciprocal (a divisor), ModelOpt/NVIDIA the multiplier."""
    v = value.to(torch.float32).reshape(())
    return 1.0 / v if inv.format == "compressed-tensors" else v


def read_nvfp4(ckpt: Checkpoint, inv: Inventory, module: str) -> NVFP4Tensor:
    packed, block, gs = (s.name for s in _specs(inv, module, inv.nvfp4[module], False)[:3])
    t = ckpt.tensors
    return NVFP4Tensor(read_tensor(t[packed]), read_tensor(t[block]), global_scale_multiplier(inv, read_tensor(t[gs])))


def read_kept_fp8(ckpt: Checkpoint, inv: Inventory, module: str) -> torch.Tensor:
    """float32 values of a kept FP8 module (ModelOpt's 4-D scale [sm, 1, sn, 1] read back as 2-D)."""
    weight = read_tensor(ckpt.tensors[module + ".weight"])
    scale = read_tensor(ckpt.tensors[inv.fp8[module]])
    scale = scale.reshape(scale.shape[0], -1) if scale.dim() == 4 else scale
    return dequantize_fp8_blocks(weight, scale, infer_block_size(weight.shape, scale.shape, None, module), module)


def decoded_source(ckpt: Checkpoint, inv: Inventory) -> Callable[[str], torch.Tensor]:
    """Native source name -> value from the output: NVFP4 and FP8 weights decoded, other tensors as stored."""

    def read(name: str) -> torch.Tensor:
        module = module_name(name)
        if name.endswith(".weight") and module in inv.nvfp4:
            return dequantize_nvfp4(read_nvfp4(ckpt, inv, module))
        if name.endswith(".weight") and module in inv.fp8:
            return read_kept_fp8(ckpt, inv, module)
        return read_tensor(ckpt.tensors[name])

    return read


# ---------------------------------------------------------------------------------------------------------------
# Check 1: static
# ---------------------------------------------------------------------------------------------------------------
def check_index(ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    evidence = [f"{len(ckpt.tensors)} tensors in {len(ckpt.shards)} shards, {ckpt.total_bytes} bytes of tensor data"]
    problems = list(ckpt.problems)  # open_checkpoint: index vs shards vs headers, total_size
    if ckpt.weight_map is None:
        problems.append("no model.safetensors.index.json: the converter writes it last, so the output is incomplete")
    elif ckpt.index_total_size is None:
        problems.append("index has no metadata.total_size")
    elif not problems:
        evidence.append(f"index lists exactly these tensors; total_size {ckpt.index_total_size} matches")
    return evidence, problems


def check_companions(ckpt: Checkpoint, inv: Inventory, w4a4: bool) -> tuple[list[str], list[str]]:
    """Exactly the tensors the layout writes for each module, with their dtypes and shapes; nothing stray."""
    t = ckpt.tensors
    problems: list[str] = []
    claimed: set[str] = set()

    def expect(spec: TensorSpec, why: str) -> None:
        claimed.add(spec.name)
        info = t.get(spec.name)
        if info is None:
            problems.append(f"{spec.name} missing ({why})")
        elif info.dtype != spec.dtype or math.prod(info.shape) != math.prod(spec.shape) or (
            len(spec.shape) > 1 and tuple(info.shape) != tuple(spec.shape)
        ):  # a one-element scale may be [1] or 0-d (vLLM accepts both)
            problems.append(f"{spec.name}: {info.dtype} {list(info.shape)}, expected {spec.dtype} {list(spec.shape)}")

    for module, shape in inv.nvfp4.items():
        for k, spec in enumerate(_specs(inv, module, shape, w4a4)):
            expect(spec, "the config says W4A4" if k == 3 else "NVFP4 companion")  # [3]: the activation scale
    for module, shape in mxfp4_modules(t).items():  # --engine sglang's MTP experts (layouts.writes_mxfp4)
        for spec in mxfp4_specs(module, *shape):
            expect(spec, "MXFP4 companion")
    layout = Layout(inv.format, w4a4=True)  # kept-FP8 names do not depend on W4A4 (nvidia requires it set)
    block = configured_block_size({"quantization_config": quant_config(ckpt)}) or (128, 128)
    for module, scale_name in inv.fp8.items():
        w = t[module + ".weight"]
        # The source's scale as the converter read it: the layout maps it to what it writes (nvidia: unchanged).
        source_scale = TensorSpec(module + ".scale", t[scale_name].dtype if scale_name in t else "F8_E8M0",
                                  tuple(math.ceil(d / b) for d, b in zip(w.shape, block)))
        for spec in layout.fp8_specs(module, TensorSpec(w.name, w.dtype, w.shape), source_scale):
            expect(spec, "kept FP8 scale")
    for name in sorted(set(t) - claimed):
        info = t[name]
        if info.dtype in ("U8", "F8_E4M3") or re.search(r"\.(weight_scale(_2|_inv)?|weight_global_scale|input_scale|"
                                                         r"input_global_scale|scale|weight_packed)$", name):
            problems.append(f"{name}: stray tensor ({info.dtype} {list(info.shape)}) that belongs to no "
                            f"{inv.format} module; vLLM raises KeyError or loads garbage")
    evidence = [f"layout {inv.format} ({'W4A4' if w4a4 else 'W4A16'}): {len(inv.nvfp4)} NVFP4 modules, "
                f"{len(inv.fp8)} kept FP8 modules, {len(t) - len(claimed)} other tensors"]
    return evidence, problems


def mxfp4_modules(t: dict[str, TensorInfo]) -> dict[str, tuple[int, int]]:
    """MXFP4 modules of an output (I8 ``.weight``) -> (out_features, in_features)."""
    return {module_name(n): (i.shape[0], 2 * i.shape[1]) for n, i in t.items()
            if n.endswith(".weight") and i.dtype == "I8" and len(i.shape) == 2}


def check_scale_values(ckpt: Checkpoint, inv: Inventory, w4a4: bool) -> tuple[list[str], list[str]]:
    """Block scales free of E4M3 NaN/negative bytes; global and activation scales finite > 0; fused groups agree."""
    t = ckpt.tensors
    problems: list[str] = []
    globals_by_group: dict[str, dict[str, float]] = {}
    scanned = 0
    for module, shape in inv.nvfp4.items():
        specs = [s for s in _specs(inv, module, shape, w4a4) if s.name in t]
        names = {s.name for s in specs}
        block_name, gs_name = (s.name for s in _specs(inv, module, shape, False)[1:3])
        if block_name in names:
            raw = read_tensor(t[block_name]).view(torch.uint8)
            scanned += raw.numel()
            nan, neg = int(((raw & 0x7F) == E4M3_NAN_BITS).sum()), int(((raw & 0x80) != 0).sum())
            if nan or neg:
                problems.append(f"{block_name}: {nan} E4M3 NaN and {neg} negative block scale bytes")
        for spec in specs[2:]:
            v = read_tensor(t[spec.name]).to(torch.float32).reshape(-1)
            if v.numel() != 1 or not bool(torch.isfinite(v).all()) or float(v[0]) <= 0:
                problems.append(f"{spec.name} = {v.tolist()}: a global/activation scale must be one finite value > 0")
            elif spec.name == gs_name and (group := fused_group(module, table_for(ckpt.config))):
                globals_by_group.setdefault(group, {})[gs_name] = float(v[0])
    for group, values in sorted(globals_by_group.items()):
        if len(set(values.values())) > 1:
            problems.append(f"{group}: global scales differ ({values}); vLLM fuses these and uses one for all")
    evidence = [f"{scanned} block scale bytes scanned; {len(globals_by_group)} fused groups with one global scale each"]
    return evidence, problems


def check_config(ckpt: Checkpoint, inv: Inventory) -> tuple[list[str], list[str]]:
    """The config parses, declares the tensors' layout, keeps no source FP8 config, and describes every module."""
    qcfg = quant_config(ckpt)
    declared = config_format(qcfg)
    if not qcfg:
        return [], ["config.json has no quantization_config: vLLM would load the NVFP4 tensors as plain weights"]
    if declared is None:
        return [], [f"config.json quantization_config is a source FP8 or unknown config (quant_method "
                    f"{qcfg.get('quant_method')!r}, no moe_quant_algo): vLLM would build the NVFP4 modules "
                    f"{few(inv.nvfp4)} as FP8"]
    problems: list[str] = []
    if declared != inv.format:
        problems.append(f"config declares {declared} but the tensors are in the {inv.format} layout")
    if declared != "nvidia":
        stale = [k for k in FP8_SOURCE_KEYS if k in qcfg]
        if stale:
            problems.append(f"quantization_config keeps source FP8 keys {stale}: a stale FP8 config")
    describe = {"compressed-tensors": _ct_describes, "modelopt": _modelopt_describes, "nvidia": _nvidia_describes}
    evidence, more = describe[declared](ckpt, inv, qcfg)
    return [f"quantization_config: {declared}"] + evidence, problems + more


def _ct_matches(target: str, runtime: str, num_hidden_layers: int) -> bool:
    """compressed-tensors target matching as vLLM applies it (contract §5.1): ``re:`` anchored at the start,
    dotted names after vLLM's rename, class names (``Linear``) reach every linear and routed expert."""
    if target.startswith("re:"):
        return re.match(target[3:], runtime) is not None
    if "." not in target and target[:1].isupper():
        return target in ("Linear", "FusedMoE", "RoutedExperts")
    return runtime_module(target, num_hidden_layers) == runtime


def _ct_describes(ckpt: Checkpoint, inv: Inventory, qcfg: dict) -> tuple[list[str], list[str]]:
    problems = []
    evidence = []
    try:
        from compressed_tensors.quantization import QuantizationConfig

        QuantizationConfig.model_validate(qcfg)
        evidence.append("compressed_tensors.QuantizationConfig parses it")
    except ImportError:
        evidence.append("compressed-tensors not installed: structure checked by the kit only")
    except Exception as e:  # pydantic's ValidationError: the message is what the user needs
        problems.append(f"compressed_tensors cannot parse quantization_config: {str(e).splitlines()[0:3]}")
    if qcfg.get("format") == "mixed-precision":
        missing = [g for g, spec in (qcfg.get("config_groups") or {}).items() if not spec.get("format")]
        if missing:
            problems.append(f"format mixed-precision needs a format on every group; {missing} have none")
    L = inv.num_hidden_layers
    groups = qcfg.get("config_groups") or {}
    ignore = qcfg.get("ignore") or []

    def scheme_of(module: str) -> tuple[str, dict | None]:
        rt = runtime_module(module, L)
        if any(_ct_matches(t, rt, L) for t in ignore):
            return "ignored", None
        hits = [(g, spec) for g, spec in groups.items() if any(_ct_matches(t, rt, L) for t in spec.get("targets", []))]
        return (hits[0][0], hits[0][1]) if len(hits) == 1 else (f"{len(hits)} groups", None)

    for module in inv.nvfp4:
        where, group = scheme_of(module)
        if group is None or not _is_nvfp4_group(group):
            given = where if group is None else f"{where} (not NVFP4)"
            problems.append(f"{module}: NVFP4 tensors but the config gives it {given}"
                            f" (runtime name {runtime_module(module, L)})")
        elif group.get("format") not in ("nvfp4-pack-quantized", None):
            problems.append(f"{module}: its group {where} has format {group.get('format')!r}, not nvfp4-pack-quantized")
    for module in inv.fp8:
        where, group = scheme_of(module)
        if where != "ignored" and (group is None or not _is_fp8_block_group(group)):
            problems.append(f"{module}: kept FP8 but the config gives it {where} "
                            f"(runtime name {runtime_module(module, L)})")
    evidence.append(f"{len(inv.nvfp4)} NVFP4 modules targeted by an NVFP4 group, {len(inv.fp8)} FP8 modules by an "
                    "FP8-block group" if not problems else "config coverage has problems")
    return evidence, problems


def _modelopt_describes(ckpt: Checkpoint, inv: Inventory, qcfg: dict) -> tuple[list[str], list[str]]:
    problems = []
    layers = qcfg.get("quantized_layers") or {}
    w4a4 = bool(config_w4a4(qcfg))
    nvfp4_algo = "NVFP4" if w4a4 else "W4A16_NVFP4"
    for key in ("quant_algo", "kv_cache_quant_algo", "group_size"):
        if key not in qcfg:
            problems.append(f"modelopt quantization_config lacks {key!r}")
    for module in inv.nvfp4:
        algo = (layers.get(modelopt_key(module, inv.num_hidden_layers)) or {}).get("quant_algo")
        if algo != nvfp4_algo:
            problems.append(f"{module}: NVFP4 tensors but quantized_layers gives {algo!r}, expected {nvfp4_algo}")
    for module in inv.fp8:
        algo = (layers.get(modelopt_key(module, inv.num_hidden_layers)) or {}).get("quant_algo")
        if algo != "FP8_PB_WO":
            problems.append(f"{module}: kept FP8 but quantized_layers gives {algo!r}, expected FP8_PB_WO")
    problems += _hf_quant_config_problems(ckpt, required=("quant_algo", "kv_cache_quant_algo", "group_size",
                                                          "exclude_modules"))
    return [f"{len(layers)} quantized_layers entries, experts {nvfp4_algo}"], problems


def _nvidia_describes(ckpt: Checkpoint, inv: Inventory, qcfg: dict) -> tuple[list[str], list[str]]:
    """vLLM's DeepseekV4FP8Config: FP8 blocks for every linear, moe_quant_algo for every routed expert."""
    problems = []
    if "weight_block_size" not in qcfg:
        problems.append("quantization_config lacks weight_block_size: vLLM's FP8 linears need it")
    for module in inv.nvfp4:
        if rule_for(module, table_for(ckpt.config)).category != "routed_expert":
            problems.append(f"{module}: NVFP4, but layout nvidia quantizes routed experts only (vLLM builds it FP8)")
    for module in inv.fp8:
        if rule_for(module, table_for(ckpt.config)).category == "routed_expert":
            problems.append(f"{module}: a routed expert kept FP8, but moe_quant_algo NVFP4 makes vLLM build it NVFP4")
    problems += _hf_quant_config_problems(ckpt, required=("quant_algo", "kv_cache_quant_algo", "group_size"))
    return ["moe_quant_algo NVFP4 for every routed expert, FP8 blocks for the rest"], problems


def _hf_quant_config_problems(ckpt: Checkpoint, required: tuple[str, ...]) -> list[str]:
    path = os.path.join(ckpt.root, "hf_quant_config.json")
    if not os.path.exists(path):
        return []  # config.json's quantization_config wins in vLLM; the legacy file is for other tools
    with open(path) as f:
        legacy = json.load(f)
    q = legacy.get("quantization") or {}
    missing = [k for k in required if k not in q]
    return [f"hf_quant_config.json lacks {missing} (vLLM raises for NVFP4 without them)"] if missing else []


def config_file_problem(root: str) -> str | None:
    """Why ``root/config.json`` is unusable (missing, not JSON, not an object), or None."""
    path = os.path.join(root, "config.json")
    if not os.path.exists(path):
        return "config.json missing: vLLM and transformers build the model from it"
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        return f"config.json cannot be read as JSON: {e}"
    return None if isinstance(config, dict) else f"config.json holds a {type(config).__name__}, not a JSON object"


def output_w4a4(ckpt: Checkpoint, inv: Inventory) -> bool:
    """Whether the output carries activation scales: as its config says, else as its tensors say."""
    w4a4 = config_w4a4(quant_config(ckpt))
    return inv.is_w4a4(ckpt.tensors) if w4a4 is None else w4a4


def check_static(ckpt: Checkpoint) -> tuple[CheckResult, Inventory]:
    inv = take_inventory(ckpt)
    w4a4 = output_w4a4(ckpt, inv)
    evidence, problems = [], []
    config_problem = config_file_problem(ckpt.root)
    if config_problem:
        problems.append(config_problem)
    problems += family_problems(ckpt.config, ckpt.tensors)  # a model the kit has no family for: one line
    if not inv.nvfp4:
        problems.append("no NVFP4 tensor found (no .weight_packed, no uint8 .weight): not an NVFP4 checkpoint")
    parts = [(check_index, (ckpt,)), (check_companions, (ckpt, inv, w4a4)), (check_scale_values, (ckpt, inv, w4a4))]
    if not config_problem:  # a missing config would only add "no quantization_config"
        parts.append((check_config, (ckpt, inv)))
    for part, args in parts:
        try:
            found = part(*args)
        except Exception as e:  # one part's crash is its finding; the other parts still report
            found = ([], [f"{part.__name__}: {_crash(e)}"])
        evidence += found[0]
        problems += found[1]
    return _result("static", evidence, problems), inv


# ---------------------------------------------------------------------------------------------------------------
# What the converter recorded in the output
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Records:
    """The converter's own files in the output, each optional: Path A's plan and fingerprint, either path's report."""

    plan: dict | None = None  # .nvfp4kit/plan.json (Path A)
    fingerprint: dict | None = None  # .nvfp4kit/fingerprint.json (Path A)
    report: dict | None = None  # conversion_report.json (Path A) or path_b_report.json (Path B)
    report_name: str | None = None
    problems: list[str] = field(default_factory=list)  # a record present but unreadable

    @property
    def source(self) -> str | None:
        """The source folder the converter read: the fingerprint's, else the report's."""
        for record in (self.fingerprint, self.report):
            if record and isinstance(record.get("source"), str):
                return record["source"]
        return None

    @property
    def options(self) -> tuple[dict, str] | None:
        """The converter's options as JSON (``Options.as_json``) and the file they come from, if recorded."""
        for record, name in ((self.plan, f"{STATE_DIR}/plan.json"), (self.report, self.report_name)):
            if record and isinstance(record.get("options"), dict):
                return record["options"], name
        return None

    @property
    def tensor_rules(self) -> dict[str, str]:
        """NVFP4 module -> the scale rule the converter used (``exact`` or ``reference``), where the report says."""
        tensors = (self.report or {}).get("tensors")
        return {m: st.get("rule") for m, st in tensors.items() if isinstance(st, dict)} if isinstance(tensors, dict) else {}


def read_records(dst: str) -> Records:
    records = Records()
    found = {}
    for key, name in (("plan", f"{STATE_DIR}/plan.json"), ("fingerprint", f"{STATE_DIR}/fingerprint.json"),
                      *(("report", n) for n in REPORT_NAMES)):
        path = os.path.join(dst, name)
        if key in found or not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            records.problems.append(f"{name}: cannot be read as JSON ({e})")
            continue
        if not isinstance(data, dict):
            records.problems.append(f"{name}: a {type(data).__name__}, not a JSON object")
            continue
        found[key] = name
        setattr(records, key, data)
    records.report_name = found.get("report")
    return records


def converter_report(dst: str) -> dict:
    """The converter's report (Path A's conversion_report.json, else Path B's path_b_report.json); {} if none."""
    return read_records(dst).report or {}


def recorded_source(dst: str) -> str | None:
    """The source folder the converter recorded: Path A's ``.nvfp4kit/fingerprint.json``, else the report's."""
    return read_records(dst).source


def open_source(src: str | None, given: bool) -> tuple[Checkpoint | None, str]:
    """The source checkpoint, or None and why the checks that need it cannot run."""
    if src is None:
        return None, ("no FP8 source: no --src given and none recorded by the converter (.nvfp4kit/fingerprint.json, "
                      f"{' or '.join(REPORT_NAMES)}); pass --src to verify against it")
    origin = "--src" if given else "the source the converter recorded"
    if not os.path.isdir(src):
        return None, f"{origin} {src} is not a folder; pass --src with the FP8 source"
    try:
        source = open_checkpoint(src)
    except (KitError, OSError, ValueError) as e:  # ValueError: its config.json is not JSON
        return None, f"{origin} {src} cannot be opened: {e}"
    if not isinstance(source.config, dict):
        source = dataclasses.replace(source, config={})
    return source, f"source {src} ({origin})"


# ---------------------------------------------------------------------------------------------------------------
# Reading whole tensors in bounded chunks
# ---------------------------------------------------------------------------------------------------------------
def tensor_chunks(info: TensorInfo, chunk: int = READ_CHUNK) -> Iterator[bytes]:
    """The tensor's bytes, ``chunk`` at a time (a multiple of every element size), read with ``pread``."""
    assert chunk > 0 and chunk % 8 == 0
    fd = os.open(info.file, os.O_RDONLY)
    try:
        for start in range(0, info.nbytes, chunk):
            n = min(chunk, info.nbytes - start)
            data = os.pread(fd, n, info.begin + start)
            if len(data) != n:
                raise OSError(f"{info.file}: tensor {info.name}: file ended while reading (truncated shard?)")
            yield data
    finally:
        os.close(fd)


def nonfinite_count(raw: torch.Tensor, dtype: str) -> int:
    """NaN and Inf values among ``raw`` (uint8, whole elements) read as safetensors ``dtype``."""
    assert raw.dtype == torch.uint8
    if dtype == "F8_E4M3":
        return int(((raw & 0x7F) == E4M3_NAN_BITS).sum())
    if dtype == "F8_E5M2":
        return int(((raw & 0x7F) >= E5M2_INF_BITS).sum())
    if dtype == "F8_E8M0":
        return int((raw == E8M0_NAN_BYTE).sum())
    return int((~torch.isfinite(raw.view(DTYPES[dtype]))).sum())


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0")


# ---------------------------------------------------------------------------------------------------------------
# Check 2: finite
# ---------------------------------------------------------------------------------------------------------------
def check_finite(ckpt: Checkpoint, inv: Inventory) -> CheckResult:
    """No NaN/Inf in any floating-point tensor; NVFP4 block scales are left to ``static``, which scans them."""
    block_scales = {_specs(inv, m, shape, False)[1].name for m, shape in inv.nvfp4.items()}
    problems, scanned, count = [], 0, 0
    for name, info in sorted(ckpt.tensors.items()):
        if info.dtype not in FLOAT_DTYPES or name in block_scales:
            continue
        try:
            bad = sum(nonfinite_count(torch.frombuffer(bytearray(data), dtype=torch.uint8), info.dtype)
                      for data in tensor_chunks(info))
        except Exception as e:  # an unreadable tensor is this tensor's finding
            problems.append(f"{name}: cannot be read: {_crash(e)}")
            continue
        scanned += info.nbytes
        count += 1
        if bad:
            problems.append(f"{name}: {bad} NaN/Inf of {math.prod(info.shape)} values ({info.dtype})")
    return _result("finite", [f"{count} floating-point tensors ({scanned} bytes) scanned for NaN/Inf"], problems)


# ---------------------------------------------------------------------------------------------------------------
# Checks 3-5: against the plan and the source
# ---------------------------------------------------------------------------------------------------------------
def options_from_json(data: dict) -> Options:
    """:class:`Options` from its ``as_json`` form (keys this kit no longer knows are ignored)."""
    overrides = data.get("overrides") or {}
    known = {f.name for f in dataclasses.fields(Options)} - {"overrides"}
    return Options(**{k: v for k, v in data.items() if k in known},
                   overrides=Overrides(tuple(overrides.get("quantize", ())), tuple(overrides.get("keep", ()))))


def inferred_overrides(inv: Inventory, table: RuleTable) -> Overrides:
    """The output's own choices as overrides: NVFP4 where the rules keep FP8 by default, and the reverse.

    :func:`nvfp4kit.rules.decide` still refuses what the rules forbid (NVFP4 for a must-keep module)."""
    quantize = [m for m in inv.nvfp4 if not rule_for(m, table).quantize_by_default]
    keep = [m for m in inv.fp8 if rule_for(m, table).quantize_by_default]
    return Overrides(tuple(f"^{re.escape(m)}$" for m in quantize), tuple(f"^{re.escape(m)}$" for m in keep))


def rebuilt_plan(source: Checkpoint, inv: Inventory, w4a4: bool, records: Records) -> tuple[ConversionPlan, str]:
    """The plan Path A makes of ``source`` (raises :class:`PlanError`), with the recorded options where there are
    some, else the output's layout and its own NVFP4/FP8 choices; and a line saying which."""
    recorded = records.options
    if recorded:
        options, why = options_from_json(recorded[0]), f"options recorded in {recorded[1]}"
    else:
        options = Options(format=inv.format, overrides=inferred_overrides(inv, table_for(source.config)))
        why = f"no recorded options: layout {inv.format}, the output's NVFP4/FP8 choices where the rules allow them"
    # Activation scales only decide which tensor names exist (their values are checked by static): any amax will do.
    amax = {module_name(n): 1.0 for n, i in source.tensors.items() if form_of(i.dtype)} if w4a4 else None  # FP8, MXFP4
    return build_plan(source, options, amax), why


def check_tensor_set(ckpt: Checkpoint, records: Records, plan: ConversionPlan | None, plan_note: str) -> CheckResult:
    """The output's tensors against ``.nvfp4kit/plan.json`` (names, shards) and the rebuilt plan (names, dtypes,
    shapes): every missing, extra or different tensor is named."""
    t = ckpt.tensors
    expected_by: dict[str, dict[str, TensorSpec | None]] = {}  # reference -> name -> spec (None: name only)
    evidence, problems = [], []
    if records.plan is not None:
        shards = records.plan.get("shards") or []
        where = {n: s.get("name") for s in shards for n in s.get("tensors") or []}
        expected_by[f"{STATE_DIR}/plan.json"] = dict.fromkeys(where)
        problems += [f"{n}: in {ckpt.shard_of(n)}, the plan puts it in {s}" for n, s in sorted(where.items())
                     if n in t and ckpt.shard_of(n) != s]
    if plan is not None:
        expected_by["the source's rules"] = {s.name: s for u in plan.units for s in u.outputs}
        evidence.append(f"plan rebuilt from the source ({plan_note})")
    missing: dict[str, list[str]] = {}
    extra: dict[str, list[str]] = {}
    for reference, expected in expected_by.items():
        evidence.append(f"{len(expected)} tensors expected by {reference}")
        for name in set(expected) - set(t):
            missing.setdefault(name, []).append(reference)
        for name in set(t) - set(expected):
            extra.setdefault(name, []).append(reference)
    problems += [f"{n}: missing (expected by {' and '.join(r)})" for n, r in sorted(missing.items())]
    problems += [f"{n}: not expected by {' nor '.join(r)} ({t[n].dtype} {list(t[n].shape)})"
                 for n, r in sorted(extra.items())]
    for reference, expected in expected_by.items():
        for name, spec in sorted(expected.items()):
            if spec is not None and name in t and (t[name].dtype, tuple(t[name].shape)) != (spec.dtype, tuple(spec.shape)):
                problems.append(f"{name}: {t[name].dtype} {list(t[name].shape)}, {reference} give "
                                f"{spec.dtype} {list(spec.shape)}")
    if not problems:
        evidence.append(f"the output's {len(t)} tensors are exactly those")
    return _result("tensor_set", evidence, problems)


def check_model_config(ckpt: Checkpoint, source: Checkpoint) -> CheckResult:
    """Every config.json key but ``quantization_config`` equal to the source's (the converter changes nothing else)."""
    out = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    src = {k: v for k, v in source.config.items() if k != "quantization_config"}
    problems = [f"config.json {k}: {out[k]!r}, the source has {src[k]!r}" for k in sorted(set(out) & set(src))
                if out[k] != src[k]]
    problems += [f"config.json {k}: missing, the source has {src[k]!r}" for k in sorted(set(src) - set(out))]
    problems += [f"config.json {k}: {out[k]!r}, not in the source's config" for k in sorted(set(out) - set(src))]
    if not src:
        problems.append(f"the source {source.root} has no usable config.json to compare with")
    return _result("model_config", [f"{len(src)} model fields compared with the source's config.json"], problems)


def _first_difference(a: bytes, b: bytes) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def compare_bytes(got: TensorInfo, want: TensorInfo | bytes) -> str | None:
    """None if ``got`` holds exactly ``want`` (a source tensor, compared chunk by chunk, or bytes); else why not."""
    want_size = want.nbytes if isinstance(want, TensorInfo) else len(want)
    if got.nbytes != want_size:
        return f"{got.nbytes} bytes, expected {want_size}"
    if isinstance(want, TensorInfo):
        wanted = tensor_chunks(want)
    else:
        wanted = (want[i: i + READ_CHUNK] for i in range(0, len(want), READ_CHUNK))
    offset, differ, first = 0, 0, None
    for a, b in zip(tensor_chunks(got), wanted):
        if a != b:
            diff = torch.frombuffer(bytearray(a), dtype=torch.uint8) != torch.frombuffer(bytearray(b), dtype=torch.uint8)
            differ += int(diff.sum())
            first = offset + _first_difference(a, b) if first is None else first
        offset += len(a)
    return None if not differ else f"{differ} of {got.nbytes} bytes differ from the source's (first at byte {first})"


def check_copies(ckpt: Checkpoint, source: Checkpoint, plan: ConversionPlan) -> CheckResult:
    """Copied tensors identical to the source's; kept FP8 weights and scales identical to what the layout writes
    from the source's (``Layout.fp8_tensors``): every byte of every such tensor."""
    t = ckpt.tensors
    layout = Layout(plan.options.format, w4a4=True)  # kept-FP8 tensors do not depend on W4A4 (nvidia requires it)
    problems: list[str] = []
    copied = fp8 = mxfp4 = absent = 0
    for unit in plan.units:
        if unit.kind == "nvfp4":
            continue
        if any(o.name not in t for o in unit.outputs):
            absent += 1  # check_tensor_set names it
            continue
        try:
            if unit.kind == "mxfp4":  # exact by construction: the decoded output is the decoded source, bit for bit
                got = dequantize_mxfp4(*(read_tensor(t[o.name]) for o in unit.outputs), unit.outputs[0].name)
                weight, scale = (read_tensor(source.tensors[n]) for n in unit.sources)
                want = dequantize_source(weight, scale, plan.fp8_blocks[unit.sources[0]], unit.sources[0])
                if not torch.equal(got, want):
                    problems.append(f"{unit.outputs[0].name}: MXFP4 decodes to other values than the source "
                                    f"({int((got != want).sum())} of {want.numel()} differ)")
                mxfp4 += 1
                continue
            if unit.kind == "copy":
                why = compare_bytes(t[unit.outputs[0].name], source.tensors[unit.sources[0]])
                problems += [f"{unit.outputs[0].name}: {why}"] if why else []
                copied += 1
                continue
            weight, scale = (read_tensor(source.tensors[n]) for n in unit.sources)
            for spec, want in zip(unit.outputs, layout.fp8_tensors(weight, scale)):
                why = compare_bytes(t[spec.name], bytes(tensor_bytes(want.contiguous())))
                problems += [f"{spec.name}: kept FP8: {why}"] if why else []
            fp8 += 1
        except Exception as e:  # an unreadable tensor is its own finding; the others are still compared
            problems.append(f"{', '.join(o.name for o in unit.outputs)}: {_crash(e)}")
    evidence = [f"{copied} copied tensors and {fp8} kept FP8 modules (weight and scale) compared byte for byte "
                "with the source" + (f"; {mxfp4} MXFP4 modules decoded bit-exact against it" if mxfp4 else "") + (f"; {absent} not compared: missing from the output (see tensor_set)" if absent else "")]
    return _result("copies", evidence, problems)


# ---------------------------------------------------------------------------------------------------------------
# Check 6: numeric
# ---------------------------------------------------------------------------------------------------------------
def choose_sample(ckpt: Checkpoint, inv: Inventory, sample: int | None, seed: int = 0) -> list[str]:
    """NVFP4 modules to compare: all if ``sample`` is None and their data is small, else ``sample`` (default
    :data:`DEFAULT_SAMPLE`) drawn with a fixed seed, so that a rerun checks the same tensors."""
    modules = sorted(inv.nvfp4)
    if sample is None:
        wanted = set(modules)
        size = sum(i.nbytes for n, i in ckpt.tensors.items() if n.rsplit(".", 1)[0] in wanted)
        sample = len(modules) if size < SAMPLE_ALL_BELOW_BYTES else DEFAULT_SAMPLE
    return modules if sample >= len(modules) else sorted(random.Random(seed).sample(modules, sample))


def check_numeric(ckpt: Checkpoint, inv: Inventory, source: Checkpoint, rules: dict[str, str],
                  sample: int | None, worst: int = 5) -> CheckResult:
    """Decoded NVFP4 modules against the dequantized source: bit for bit where ``rules`` (the converter's report)
    says ``exact``, SQNR >= :data:`MIN_SQNR_DB` elsewhere."""
    from .hf_model import dequantized_source

    read_source = dequantized_source(source)
    chosen = choose_sample(ckpt, inv, sample)
    problems: list[str] = []
    metrics: dict[str, dict] = {}
    exact_ok = 0
    for module in chosen:
        name = module + ".weight"
        if name not in source.tensors:
            problems.append(f"{module}: not in the source {source.root}")
            continue
        try:
            ref = read_source(name)
            got = dequantize_nvfp4(read_nvfp4(ckpt, inv, module))
            if got.shape != ref.shape:
                problems.append(f"{module}: decodes to {list(got.shape)}, the source has {list(ref.shape)}")
                continue
            err = reconstruction_error(ref, got)
        except Exception as e:  # a missing companion, a truncated tensor: this module's finding
            problems.append(f"{module}: cannot be decoded and compared: {_crash(e)}")
            continue
        metrics[module] = {"rule": rules.get(module), **err}
        if rules.get(module) == ScaleRule.EXACT:
            if torch.equal(got, ref.to(torch.float32)):
                exact_ok += 1
            else:
                wrong = int((got != ref).sum())
                problems.append(f"{module}: converted with the exact rule but {wrong} of {got.numel()} values "
                                f"differ from the source (SQNR {err['sqnr_db']:.2f} dB, "
                                f"rel. error {err['rel_error']:.4f})")
        elif not err["sqnr_db"] >= MIN_SQNR_DB:  # NaN fails too
            problems.append(f"{module}: SQNR {err['sqnr_db']:.2f} dB < {MIN_SQNR_DB} dB "
                            f"(rel. error {err['rel_error']:.4f}): not rounding noise")
    finite = [m["sqnr_db"] for m in metrics.values() if math.isfinite(m["sqnr_db"])]
    evidence = [
        f"source {source.root}; {len(chosen)} of {len(inv.nvfp4)} NVFP4 modules compared",
        f"{exact_ok} NVFP4 tensors bit-exact (the converter's report says 'exact')"
        + ("" if rules else "; no per-tensor rules recorded (Path B or no report): SQNR bound for all"),
    ]
    if finite:
        evidence.append(f"SQNR over {len(finite)} non-exact tensors: mean {sum(finite) / len(finite):.2f} dB, "
                        f"min {min(finite):.2f} dB (threshold {MIN_SQNR_DB} dB)")
    ranked = sorted(metrics.items(), key=lambda kv: kv[1]["sqnr_db"])[:worst]
    evidence += [f"  worst: {m}: SQNR {v['sqnr_db']:.2f} dB, rel. error {v['rel_error']:.4f}"
                 for m, v in ranked if math.isfinite(v["sqnr_db"])]
    result = _result("numeric", evidence, problems)
    result.details = metrics
    return result


# ---------------------------------------------------------------------------------------------------------------
# Check 3: one decoder block, FP8 weights vs NVFP4 weights
# ---------------------------------------------------------------------------------------------------------------
def default_layer(config: dict) -> int:
    """The first layer with a learned router (V4's hash layers route by token id, so they test less of the
    weights; V3's first ``first_k_dense_replace`` layers are dense)."""
    first = config.get("first_k_dense_replace", 0) if hf_model_is_v3(config) else config.get("num_hash_layers", 0)
    return min(int(first), int(config["num_hidden_layers"]) - 1)


def check_block_forward(ckpt: Checkpoint, inv: Inventory, source: Checkpoint, layer: int | None = None,
                        tokens: int = 32, seed: int = 0) -> CheckResult:
    """The model is built from the source's config.json (model_config checks that the output's equals it)."""
    from .hf_model import load_dequantized_hf_model

    config = source.config
    layer = default_layer(config) if layer is None else layer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outputs = {}
    torch.manual_seed(seed)
    hidden = int(config["hidden_size"])
    # V4 carries hc_mult hidden streams (mHC) between blocks; V3 one hidden state
    width = (hidden,) if hf_model_is_v3(config) else (int(config["hc_mult"]), hidden)
    streams = torch.randn(1, tokens, *width, device=device)
    ids = torch.randint(0, int(config["vocab_size"]), (1, tokens), device=device)
    for label, tensors in (("fp8", None), ("nvfp4", decoded_source(ckpt, inv))):
        model = load_dequantized_hf_model(source.root, layers=[layer], tensors=tensors).to(device)
        block = model.model.layers[0]
        captured = {}

        def swap_in(module, args, kwargs):  # the same random streams enter both blocks
            return (streams,) + tuple(args[1:]), kwargs

        pre = block.register_forward_pre_hook(swap_in, with_kwargs=True)
        post = block.register_forward_hook(lambda m, a, out: captured.__setitem__("y", out))
        with torch.no_grad():
            model(input_ids=ids)
        pre.remove()
        post.remove()
        outputs[label] = captured["y"].float().cpu()
        del model
    ref, got = outputs["fp8"], outputs["nvfp4"]
    x = streams.float().cpu()
    problems = [f"layer {layer}: {k} output holds NaN/Inf" for k, y in outputs.items()
                if not bool(torch.isfinite(y).all())]
    out_rel = reconstruction_error(ref, got)["rel_error"]
    delta_rel = reconstruction_error(ref - x, got - x)["rel_error"]
    evidence = [
        f"layer {layer} ({tokens} tokens, random hidden streams {[1, tokens, *width]}, seed {seed}, {device}): "
        f"relative error of the output {out_rel:.3e}, of the block's own contribution {delta_rel:.3e} "
        f"(bound {MAX_BLOCK_REL_ERROR})"
    ]
    if not problems and not delta_rel <= MAX_BLOCK_REL_ERROR:
        problems.append(f"layer {layer}: block contribution differs by {delta_rel:.3f} (relative) from the FP8 "
                        f"block, above {MAX_BLOCK_REL_ERROR}")
    return _result("block_forward", evidence, problems)


# ---------------------------------------------------------------------------------------------------------------
# Checks 4 and 5: vLLM
# ---------------------------------------------------------------------------------------------------------------
def hardware_note(w4a4: bool) -> str:
    major, minor = torch.cuda.get_device_capability()
    if major == 9:
        return (f"SM{major}{minor} (Hopper): vLLM serves NVFP4 weight-only through its Marlin/Humming fallback"
                + ("; the W4A4 activation scales are NOT exercised here" if w4a4 else ""))
    if major >= 10:
        return f"SM{major}{minor} (Blackwell): native FP4 kernels" + ("; W4A4 activation scales used" if w4a4 else "")
    return f"SM{major}{minor}: vLLM's NVFP4 path on this GPU is weight-only at best"


def check_vllm_generate(dst: str, w4a4: bool, tp: int | None = None, max_tokens: int = 8) -> CheckResult:
    if not torch.cuda.is_available():
        return _skip("vllm_generate", "no GPU: vLLM generation not run", required=False)
    try:
        import vllm
    except ImportError:
        return _skip("vllm_generate", "vllm is not importable here", required=False)
    tp = tp or torch.cuda.device_count()
    evidence = [f"vllm {vllm.__version__}, tensor parallel {tp}; {hardware_note(w4a4)}"]
    try:
        llm = vllm.LLM(model=dst, tensor_parallel_size=tp, max_model_len=2048, enforce_eager=True)
        out = llm.generate([VLLM_PROMPT], vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens))[0].outputs[0]
    except Exception as e:  # any load or run failure is the finding
        return _result("vllm_generate", evidence, [f"vLLM failed: {type(e).__name__}: {str(e).splitlines()[:3]}"])
    evidence.append(f"prompt {VLLM_PROMPT!r} -> {out.text!r} (token ids {list(out.token_ids)})")
    return _result("vllm_generate", evidence, [] if out.token_ids else ["vLLM generated no token"])


def planned_actions(dst: str) -> dict[str, str] | None:
    """What Path A meant for each quantized or kept-FP8 module (its plan.json), for comparison with vLLM's choice."""
    actions = (read_records(dst).plan or {}).get("actions")
    if not isinstance(actions, dict):
        return None
    return {m: a for m, a in actions.items() if a in ("quantize", "keep_fp8")}


def check_vllm_dry_load(dst: str) -> CheckResult:
    """vLLM's own loader over every tensor, in vLLM's environment (:mod:`nvfp4kit.vllm_check`)."""
    try:
        from .vllm_check import run_vllm_dry_load
    except ImportError as e:
        return _skip("vllm_dry_load", f"nvfp4kit.vllm_check not available ({e})", required=False)
    r = run_vllm_dry_load(dst, planned=planned_actions(dst))
    if r.skipped:
        return _skip("vllm_dry_load", r.reason, required=False)
    evidence = [f"vllm {r.vllm_version}: {len(r.schemes)} modules' schemes as vLLM picked them:"]
    by_scheme: dict[str, set[str]] = {}
    table = table_for(read_config(dst)[0])
    for module, scheme in r.schemes.items():
        by_scheme.setdefault(scheme, set()).add(collapse(module, table))
    evidence += [f"  {scheme}: {', '.join(sorted(patterns))}" for scheme, patterns in sorted(by_scheme.items())]
    return _result("vllm_dry_load", evidence, r.problems)


def check_sglang_dry_load(dst: str) -> CheckResult:
    """SGLang's own loader over trunk and MTP draft, in SGLang's environment (:mod:`nvfp4kit.sglang_check`)."""
    from .sglang_check import run_sglang_dry_load

    r = run_sglang_dry_load(dst)
    if r.skipped:
        return _skip("sglang_dry_load", r.reason, required=False)
    evidence = [f"sglang {r.sglang_version}: {m['model']} {m['model_class'] or '(not built)'}, "
                f"{m['tensors_loaded']} tensors reached a parameter, routed experts "
                f"{', '.join(sorted(set(m['expert_methods'].values()))) or '-'}" for m in r.report.get("models", [])]
    evidence += [f"  SGLang warned: {w}" for m in r.report.get("models", []) for w in m["sglang_warnings"]]
    return _result("sglang_dry_load", evidence, r.problems)


# ---------------------------------------------------------------------------------------------------------------
# Entry point and report
# ---------------------------------------------------------------------------------------------------------------
def verify(dst: str, src: str | None = None, sample: int | None = None, layer: int | None = None,
           forward: bool = True, vllm_generate: bool = True, tp: int | None = None,
           vllm_dry_load: bool = True, sglang_dry_load: bool = False, fidelity: bool = False,
           fidelity_data: str | None = None, fidelity_tokens: int | None = None,
           device: str | None = None) -> list[CheckResult]:
    """Run the checks on ``dst``; ``src`` defaults to the source the converter recorded. Raises only
    :class:`CheckpointError` (``dst`` is not a checkpoint folder); every other problem is a check's FAIL."""
    try:
        ckpt = open_checkpoint(dst)
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:  # open_checkpoint parses config.json and raises on malformed JSON
        why = config_file_problem(dst) or f"cannot be opened: {_crash(e)}"
        return [_result("static", [], [f"{why}; no other check can run without it"])]
    if not isinstance(ckpt.config, dict):  # config_file_problem reports it
        ckpt = dataclasses.replace(ckpt, config={})
    static, inv = check_static(ckpt)
    records = read_records(dst)
    static.problems += records.problems
    static.passed = not static.problems
    w4a4 = output_w4a4(ckpt, inv)
    results = [static, guarded("finite", check_finite, ckpt, inv)]
    source, source_note = open_source(src or records.source, given=src is not None)
    plan, plan_note = None, ""
    if source is not None:
        try:
            plan, plan_note = rebuilt_plan(source, inv, w4a4, records)
        except (KitError, ValueError) as e:  # PlanError, LayoutError, RuleError: no plan for this output
            plan_note = f"the source's plan cannot be rebuilt: {'; '.join(getattr(e, 'problems', [str(e)])[:5])}"
    results.append(_tensor_set(ckpt, records, source, plan, source_note if source is None else plan_note))
    if source is None:
        results += [_skip(name, source_note) for name in ("model_config", "copies", "numeric")]
        if forward:
            results.append(_skip("block_forward", source_note))
    else:
        results.append(guarded("model_config", check_model_config, ckpt, source))
        results.append(guarded("copies", check_copies, ckpt, source, plan) if plan is not None
                       else _result("copies", [], [f"nothing to compare against: {plan_note}"]))
        results.append(guarded("numeric", check_numeric, ckpt, inv, source, records.tensor_rules, sample))
        if forward:
            results.append(guarded("block_forward", check_block_forward, ckpt, inv, source, layer))
    if fidelity:  # check 11, on request: the whole model on text (nvfp4kit.fidelity), and the card's figures
        results.append(_skip("fidelity", source_note) if source is None else
                       guarded("fidelity", check_fidelity, dst, source.root, fidelity_data, fidelity_tokens, device))
    if vllm_generate:
        results.append(guarded("vllm_generate", check_vllm_generate, dst, w4a4, tp))
        results[-1].required = False
    if vllm_dry_load:
        results.append(guarded("vllm_dry_load", check_vllm_dry_load, dst))
        results[-1].required = False
    if sglang_dry_load:
        results.append(guarded("sglang_dry_load", check_sglang_dry_load, dst))
        results[-1].required = False
    return results


def check_fidelity(dst: str, src: str, data: str | None, tokens: int | None, device: str | None) -> CheckResult:
    """:func:`nvfp4kit.fidelity.measure_fidelity` as a check (its figures in ``details``, its bounds in
    docs/fidelity.md); the output's model card gets the figures."""
    from .card import update_card_fidelity
    from .fidelity import DEFAULT_TOKENS, measure_fidelity, unmeasurable

    why = unmeasurable(read_config(src)[0])
    if why:  # requested but not measurable: NOT RUN (the result is INCOMPLETE), never a PASS
        return _skip("fidelity", why)
    measured = measure_fidelity(dst, src, data, tokens or DEFAULT_TOKENS, device)
    result = _result("fidelity", measured["evidence"], measured["problems"])
    result.details = measured["figures"]
    if measured["figures"]:
        update_card_fidelity(dst, measured["figures"], result.status, src)
    return result


def _tensor_set(ckpt: Checkpoint, records: Records, source: Checkpoint | None, plan: ConversionPlan | None,
                note: str) -> CheckResult:
    """check_tensor_set where there is a reference: NOT RUN without plan.json and source, FAIL when the source
    is there but its plan cannot be rebuilt."""
    if source is None and records.plan is None:
        return _skip("tensor_set", note)
    result = guarded("tensor_set", check_tensor_set, ckpt, records, plan, note)
    if source is not None and plan is None:
        result.problems.append(note)
        result.passed = False
    return result


def verdict(results: list[CheckResult]) -> str:
    """FAIL if a check failed; else INCOMPLETE if a required check could not run; else PASS."""
    if any(not r.passed and not r.skipped for r in results):
        return FAIL
    if any(r.skipped and r.required for r in results):
        return INCOMPLETE
    return PASS


def all_passed(results: list[CheckResult]) -> bool:
    return verdict(results) == PASS


def verdict_line(results: list[CheckResult]) -> str:
    result = verdict(results)
    if result == FAIL:
        return f"result: FAIL: {', '.join(r.name for r in results if not r.passed and not r.skipped)}"
    if result == INCOMPLETE:
        return (f"result: INCOMPLETE: {', '.join(r.name for r in results if r.skipped and r.required)} not run "
                "(see why above); not verified")
    skipped = [r.name for r in results if r.skipped]
    return "result: PASS" + (f" (optional, not run here: {', '.join(skipped)})" if skipped else "")


def format_report(dst: str, results: list[CheckResult], max_problems: int = 20) -> str:
    lines = [f"verify {dst}"]
    for i, r in enumerate(results, 1):
        lines.append(f"[{r.status}] {i}. {r.name}")
        lines += [f"    {e}" for e in r.evidence]
        lines += [f"    ! {p}" for p in r.problems[:max_problems]]
        if len(r.problems) > max_problems:
            lines.append(f"    ! ... {len(r.problems) - max_problems} more (see --json)")
    lines.append(verdict_line(results))
    return "\n".join(lines)


def write_json(path: str, dst: str, results: list[CheckResult]) -> None:
    with open(path, "w") as f:
        json.dump({"checkpoint": dst, "result": verdict(results), "passed": all_passed(results),
                   "checks": [asdict(r) | {"status": r.status} for r in results]}, f, indent=1, default=str)
        f.write("\n")
