"""Check 1, ``static``: headers, scale values and config only, no tensor data beyond the scales. The index against
the shards, every module's companions as its layout writes them, the scale values, and whether the config.json /
quantization_config describes every NVFP4 and kept-FP8 module as such."""

from __future__ import annotations

import json
import math
import os
import re

import torch

from ..checkpoint import Checkpoint, configured_block_size
from ..errors import few
from ..families import family_problems, table_for
from ..fp8 import E4M3_NAN_BITS
from ..layouts import Layout, modelopt_key, mxfp4_specs, runtime_module
from ..rules import fused_group, module_name, rule_for
from ..safetensors_io import TensorInfo, TensorSpec, read_tensor
from .inventory import (Inventory, config_format, config_w4a4, is_fp8_block_group, is_nvfp4_group, layout_specs,
                        quant_config, take_inventory)
from .results import CheckResult, crash_line, finding

# Keys of the source FP8 config (DeepSeek's quant_method fp8); only layout N keeps them, next to moe_quant_algo.
FP8_SOURCE_KEYS = ("fmt", "scale_fmt", "weight_block_size", "activation_scheme")


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
        for k, spec in enumerate(layout_specs(inv, module, shape, w4a4)):
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
        specs = [s for s in layout_specs(inv, module, shape, w4a4) if s.name in t]
        names = {s.name for s in specs}
        block_name, gs_name = (s.name for s in layout_specs(inv, module, shape, False)[1:3])
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
        if group is None or not is_nvfp4_group(group):
            given = where if group is None else f"{where} (not NVFP4)"
            problems.append(f"{module}: NVFP4 tensors but the config gives it {given}"
                            f" (runtime name {runtime_module(module, L)})")
        elif group.get("format") not in ("nvfp4-pack-quantized", None):
            problems.append(f"{module}: its group {where} has format {group.get('format')!r}, not nvfp4-pack-quantized")
    for module in inv.fp8:
        where, group = scheme_of(module)
        if where != "ignored" and (group is None or not is_fp8_block_group(group)):
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
            found = ([], [f"{part.__name__}: {crash_line(e)}"])
        evidence += found[0]
        problems += found[1]
    return finding("static", evidence, problems), inv
