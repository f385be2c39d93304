"""Verify a converted NVFP4 checkpoint (Path A or Path B output) before it is served.

Checks, in order; each returns a :class:`CheckResult` whose problems name the tensor at fault:

1. ``static`` (headers, scales and config only): every NVFP4 and kept-FP8 module has exactly the companions its
   layout writes (:class:`nvfp4kit.layouts.Layout` is the one source of names, dtypes and shapes), activation
   scales where the config says W4A4, no stray tensor; no E4M3 NaN or negative block scale, every global and
   activation scale finite and > 0, one global scale per fused group; the index lists every tensor of every
   shard and nothing else, ``total_size`` right; the quantization config parses, no source FP8 config is left,
   and every quantized / kept-FP8 module is described by it as such.
2. ``numeric`` (needs the FP8 source): decoded NVFP4 against the dequantized FP8 source. Tensors the converter
   reports as ``exact`` must decode bit for bit (a swapped nibble anywhere fails); others need an SQNR of at least
   :data:`MIN_SQNR_DB`. Kept FP8 modules must decode to the source's values exactly.
3. ``block_forward`` (needs the source): one transformers DeepSeek V4 decoder layer run on the same random hidden
   states with the FP8-dequantized weights and with the weights decoded from the output.
4. ``vllm_generate`` (GPU with vLLM only): vLLM loads the checkpoint and generates a few tokens.
5. ``vllm_dry_load`` (on by default; skipped where no vLLM environment exists): :func:`nvfp4kit.vllm_check.run_vllm_dry_load` in vLLM's own environment,
   skipped where there is none.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .checkpoint import Checkpoint, configured_block_size, open_checkpoint
from .convert import REPORT_NAME, STATE_DIR
from .fp8 import dequantize_fp8_blocks, infer_block_size
from .layouts import FP8_BLOCK_WEIGHTS, NVFP4_WEIGHTS, Layout, modelopt_key, runtime_module
from .nvfp4 import NVFP4Tensor, dequantize_nvfp4, reconstruction_error
from .rules import collapse, fused_group, module_name, rule_for
from .safetensors_io import TensorInfo, TensorSpec, read_tensor

# Reference NVFP4 (amax/2688, E4M3 block scales) gives 20.4 dB on Gaussian weights, 21.8 dB on Student-t(3) ones and
# 24.0-25.0 dB on the tiny synthetic checkpoint (--scale-policy reference). Decoding bugs land far below: swapped
# nibbles -3.0 dB, an inverted global scale -110 dB, block scales shifted by one block 9.2 dB (all measured on a
# 1024x1024 Gaussian). 15 dB keeps at least 5 dB of margin on both sides: rounding noise passes, a wrong decode fails.
MIN_SQNR_DB = 15.0
# The block's own contribution (output minus its input streams) may differ by at most this relative L2 error. A
# weight at the 15 dB floor has a relative error of 0.18; reference NVFP4 weights (~0.09) gave 0.084 on the tiny
# checkpoint's layer 3, exact ones give 0. 0.25 allows the floor with some amplification, not a broken block.
MAX_BLOCK_REL_ERROR = 0.25
# Numeric check reads every tensor when the NVFP4 + kept-FP8 data is below this; a sample above it.
SAMPLE_ALL_BELOW_BYTES = 4 * 10**9
DEFAULT_SAMPLE = 256
VLLM_PROMPT = "The capital of France is"
# Keys of the source FP8 config (DeepSeek's quant_method fp8); only layout N keeps them, next to moe_quant_algo.
FP8_SOURCE_KEYS = ("fmt", "scale_fmt", "weight_block_size", "activation_scheme")
E4M3_NAN_BITS = 0x7F  # x1111111: E4M3FN's only NaN pattern (it has no Inf)


@dataclass
class CheckResult:
    name: str
    passed: bool
    evidence: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: bool = False
    details: dict = field(default_factory=dict)  # per-tensor numbers: in --json, not in the printed report

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else ("PASS" if self.passed else "FAIL")


def _skip(name: str, why: str) -> CheckResult:
    return CheckResult(name, True, [why], [], skipped=True)


def _result(name: str, evidence: list[str], problems: list[str]) -> CheckResult:
    return CheckResult(name, not problems, evidence, problems)


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
    return Inventory(fmt, nvfp4, fp8, int(ckpt.config.get("num_hidden_layers", 0)))


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
            elif spec.name == gs_name and fused_group(module):
                globals_by_group.setdefault(fused_group(module), {})[gs_name] = float(v[0])
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
                    f"{_few(inv.nvfp4)} as FP8"]
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


def _few(items) -> str:
    items = sorted(items)
    return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")


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
        if rule_for(module).category != "routed_expert":
            problems.append(f"{module}: NVFP4, but layout nvidia quantizes routed experts only (vLLM builds it FP8)")
    for module in inv.fp8:
        if rule_for(module).category == "routed_expert":
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


def check_static(ckpt: Checkpoint) -> tuple[CheckResult, Inventory]:
    inv = take_inventory(ckpt)
    w4a4 = config_w4a4(quant_config(ckpt))
    if w4a4 is None:  # the config cannot say: take what the tensors say, the config check reports the config
        w4a4 = inv.is_w4a4(ckpt.tensors)
    evidence, problems = [], []
    if not inv.nvfp4:
        problems.append("no NVFP4 tensor found (no .weight_packed, no uint8 .weight): not an NVFP4 checkpoint")
    for part in (check_index(ckpt), check_companions(ckpt, inv, w4a4), check_scale_values(ckpt, inv, w4a4),
                 check_config(ckpt, inv)):
        evidence += part[0]
        problems += part[1]
    return _result("static", evidence, problems), inv


# ---------------------------------------------------------------------------------------------------------------
# Check 2: numeric
# ---------------------------------------------------------------------------------------------------------------
def converter_report(dst: str) -> dict:
    path = os.path.join(dst, REPORT_NAME)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def recorded_source(dst: str) -> str | None:
    """The source folder the converter recorded: Path A's ``.nvfp4kit/fingerprint.json``, else the report's."""
    path = os.path.join(dst, STATE_DIR, "fingerprint.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f).get("source")
    return converter_report(dst).get("source")  # Path B writes no fingerprint, only the report


def choose_sample(ckpt: Checkpoint, inv: Inventory, sample: int | None, seed: int = 0) -> list[str]:
    """Modules to compare: all if ``sample`` is None and the data is small, else ``sample`` (default
    :data:`DEFAULT_SAMPLE`) drawn with a fixed seed, so that a rerun checks the same tensors."""
    modules = sorted(inv.nvfp4) + sorted(inv.fp8)
    if sample is None:
        wanted = set(modules)
        size = sum(i.nbytes for n, i in ckpt.tensors.items() if n.rsplit(".", 1)[0] in wanted)
        sample = len(modules) if size < SAMPLE_ALL_BELOW_BYTES else DEFAULT_SAMPLE
    return modules if sample >= len(modules) else sorted(random.Random(seed).sample(modules, sample))


def check_numeric(dst: str, ckpt: Checkpoint, inv: Inventory, src: str, sample: int | None,
                  worst: int = 5) -> CheckResult:
    src_ckpt = open_checkpoint(src)
    if src_ckpt.problems:
        return _result("numeric", [f"source {src}"], [f"source {src}: {p}" for p in src_ckpt.problems[:5]])
    from .hf_model import dequantized_source

    source = dequantized_source(src_ckpt)
    rules = {m: st.get("rule") for m, st in converter_report(dst).get("tensors", {}).items()}
    chosen = choose_sample(ckpt, inv, sample)
    problems: list[str] = []
    metrics: dict[str, dict] = {}
    exact_ok = fp8_ok = 0
    for module in chosen:
        name = module + ".weight"
        if name not in src_ckpt.tensors:
            problems.append(f"{module}: not in the source {src}")
            continue
        ref = source(name)
        if module in inv.fp8:
            if torch.equal(read_kept_fp8(ckpt, inv, module), ref):
                fp8_ok += 1
            else:
                problems.append(f"{module}: kept FP8 but decodes to other values than the source")
            continue
        got = dequantize_nvfp4(read_nvfp4(ckpt, inv, module))
        err = reconstruction_error(ref, got)
        metrics[module] = {"rule": rules.get(module), **err}
        if rules.get(module) == "exact":
            if torch.equal(got, ref.to(torch.float32)):
                exact_ok += 1
            else:
                wrong = int((got != ref).sum())
                problems.append(f"{module}: converted with the exact rule but {wrong} of {got.numel()} values "
                                f"differ from the source (SQNR {err['sqnr_db']:.2f} dB, "
                                f"rel. error {err['rel_error']:.4f})")
        elif err["sqnr_db"] < MIN_SQNR_DB:
            problems.append(f"{module}: SQNR {err['sqnr_db']:.2f} dB < {MIN_SQNR_DB} dB "
                            f"(rel. error {err['rel_error']:.4f}): not rounding noise")
    n_nvfp4 = sum(1 for m in chosen if m in inv.nvfp4)
    finite = [m["sqnr_db"] for m in metrics.values() if math.isfinite(m["sqnr_db"])]
    evidence = [
        f"source {src}; {len(chosen)} of {len(inv.nvfp4) + len(inv.fp8)} modules compared "
        f"({n_nvfp4} NVFP4, {len(chosen) - n_nvfp4} kept FP8)",
        f"{exact_ok} NVFP4 tensors bit-exact (the converter's report says 'exact'); {fp8_ok} kept FP8 modules "
        "identical to the source",
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
    """The first layer with a learned router (hash layers route by token id, so they test less of the weights)."""
    return min(int(config.get("num_hash_layers", 0)), int(config["num_hidden_layers"]) - 1)


def check_block_forward(ckpt: Checkpoint, inv: Inventory, src: str, layer: int | None = None,
                        tokens: int = 32, seed: int = 0) -> CheckResult:
    from .hf_model import load_dequantized_hf_model

    layer = default_layer(ckpt.config) if layer is None else layer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outputs = {}
    torch.manual_seed(seed)
    hc, hidden = int(ckpt.config["hc_mult"]), int(ckpt.config["hidden_size"])
    streams = torch.randn(1, tokens, hc, hidden, device=device)
    ids = torch.randint(0, int(ckpt.config["vocab_size"]), (1, tokens), device=device)
    for label, tensors in (("fp8", None), ("nvfp4", decoded_source(ckpt, inv))):
        model = load_dequantized_hf_model(src, layers=[layer], tensors=tensors).to(device)
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
        f"layer {layer} ({tokens} tokens, random hidden streams [1, {tokens}, {hc}, {hidden}], seed {seed}, {device}): "
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
        return _skip("vllm_generate", "no GPU: vLLM generation not run")
    try:
        import vllm
    except ImportError:
        return _skip("vllm_generate", "vllm is not importable here")
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
    path = os.path.join(dst, ".nvfp4kit", "plan.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        actions = json.load(f)["actions"]
    return {m: a for m, a in actions.items() if a in ("quantize", "keep_fp8")}


def check_vllm_dry_load(dst: str) -> CheckResult:
    """vLLM's own loader over every tensor, in vLLM's environment (:mod:`nvfp4kit.vllm_check`)."""
    try:
        from .vllm_check import run_vllm_dry_load
    except ImportError as e:
        return _skip("vllm_dry_load", f"nvfp4kit.vllm_check not available ({e})")
    r = run_vllm_dry_load(dst, planned=planned_actions(dst))
    if r.skipped:
        return _skip("vllm_dry_load", r.reason)
    evidence = [f"vllm {r.vllm_version}: {len(r.schemes)} modules' schemes as vLLM picked them:"]
    by_scheme: dict[str, set[str]] = {}
    for module, scheme in r.schemes.items():
        by_scheme.setdefault(scheme, set()).add(collapse(module))
    evidence += [f"  {scheme}: {', '.join(sorted(patterns))}" for scheme, patterns in sorted(by_scheme.items())]
    return _result("vllm_dry_load", evidence, r.problems)


# ---------------------------------------------------------------------------------------------------------------
# Entry point and report
# ---------------------------------------------------------------------------------------------------------------
def verify(dst: str, src: str | None = None, sample: int | None = None, layer: int | None = None,
           forward: bool = True, vllm_generate: bool = True, tp: int | None = None,
           vllm_dry_load: bool = True) -> list[CheckResult]:
    """Run the checks on ``dst``; ``src`` defaults to the source the converter recorded, if it still exists."""
    ckpt = open_checkpoint(dst)
    static, inv = check_static(ckpt)
    results = [static]
    src = src or recorded_source(dst)
    if src is None or not os.path.isdir(src):
        why = "no --src given and no source recorded by the converter" if src is None else f"source {src} not found"
        results.append(_skip("numeric", why))
        results.append(_skip("block_forward", why))
    else:
        results.append(check_numeric(dst, ckpt, inv, src, sample))
        if forward:
            results.append(check_block_forward(ckpt, inv, src, layer))
    if vllm_generate:
        w4a4 = config_w4a4(quant_config(ckpt))
        results.append(check_vllm_generate(dst, bool(w4a4), tp))
    if vllm_dry_load:
        results.append(check_vllm_dry_load(dst))
    return results


def all_passed(results: list[CheckResult]) -> bool:
    return all(r.passed for r in results)


def format_report(dst: str, results: list[CheckResult], max_problems: int = 20) -> str:
    lines = [f"verify {dst}"]
    for i, r in enumerate(results, 1):
        lines.append(f"[{r.status}] {i}. {r.name}")
        lines += [f"    {e}" for e in r.evidence]
        lines += [f"    ! {p}" for p in r.problems[:max_problems]]
        if len(r.problems) > max_problems:
            lines.append(f"    ! ... {len(r.problems) - max_problems} more (see --json)")
    verdict = "PASS" if all_passed(results) else "FAIL: " + ", ".join(r.name for r in results if not r.passed)
    lines.append(f"result: {verdict}")
    return "\n".join(lines)


def write_json(path: str, dst: str, results: list[CheckResult]) -> None:
    with open(path, "w") as f:
        json.dump({"checkpoint": dst, "passed": all_passed(results),
                   "checks": [asdict(r) | {"status": r.status} for r in results]}, f, indent=1, default=str)
        f.write("\n")
