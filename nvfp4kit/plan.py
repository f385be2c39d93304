"""What Path A will do with a checkpoint, decided from the index and headers alone.

A :class:`ConversionPlan` lists *units* (tensors processed together: one NVFP4 joint-scale group such as an
expert's w1+w3, one kept FP8 weight with its scale, or one tensor copied as is), packs them into output
:class:`ShardPlan` s of about ``max_shard_size`` bytes, and knows every output tensor's name, dtype and shape
before any data is read. ``inspect_model.py`` prints it, the converter executes it, and its JSON is written to
the destination first so that a resumed run can prove it is doing the same job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field

from . import __version__
from .checkpoint import Checkpoint, configured_block_size, scale_of, weight_of_scale
from .decode import FORMS, MXFP4, SOURCE_FORMAT_ERRORS, decoded_shape, form_of, scale_block
from .layouts import Layout, LayoutError, check_engine, mxfp4_specs, quantization_config, writes_mxfp4
from .nvfp4 import NVFP4FormatError, ScalePolicy, check_quantizable
from .families import family_for, option_problems, structure_problems
from .rules import (V4_TABLE, Action, Overrides, RuleError, RuleTable, decide, fused_group, joint_scale_group,
                    module_name, unknown_tensor_problems)
from .safetensors_io import TensorSpec
from .errors import KitError

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
SCALE_POLICIES = tuple(p.value for p in ScalePolicy)


class PlanError(KitError, ValueError):
    """The checkpoint or the flags cannot be converted; the message lists every reason, ``problems`` each one."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [message])


@dataclass(frozen=True)
class Options:
    """Every flag that changes output bytes (and so belongs to the resume fingerprint)."""

    format: str = "compressed-tensors"
    scale_policy: str = "auto"
    joint_scale: str = "gate-up"
    overrides: Overrides = Overrides()
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    activation_scales_sha256: str | None = None  # of the --activation-scales file, if any
    engine: str = "vllm"  # layouts.ENGINES: which engine's MTP layout to write

    def as_json(self) -> dict:
        d = asdict(self)
        d["overrides"] = self.overrides.as_json()
        if self.engine == "vllm":
            del d["engine"]  # the default's JSON (fingerprints of existing outputs) stays as it was
        return d


@dataclass
class Unit:
    kind: str  # "nvfp4" | "mxfp4" (layouts.writes_mxfp4) | "fp8" | "copy"
    modules: list[str]  # nvfp4/fp8: module names; copy: the tensor name
    sources: list[str]  # source tensor names read (weights, then their scales)
    outputs: list[TensorSpec]
    source_bytes: int


@dataclass
class ShardPlan:
    name: str
    units: list[int]
    nbytes: int


@dataclass
class ConversionPlan:
    source: str
    options: Options
    units: list[Unit]
    shards: list[ShardPlan]
    actions: dict[str, str]  # module or tensor -> Action value
    fp8_blocks: dict[str, tuple[int, int]]  # weight tensor -> block size
    quantization_config: dict
    hf_quant_config: dict | None
    activation_amax: dict[str, float] = field(default_factory=dict)

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def source_bytes(self) -> int:
        return sum(u.source_bytes for u in self.units)

    def weight_map(self) -> dict[str, str]:
        return {spec.name: s.name for s in self.shards for i in s.units for spec in self.units[i].outputs}

    def to_json(self) -> dict:
        return {
            "kit_version": __version__,
            "source": self.source,
            "options": self.options.as_json(),
            "actions": self.actions,
            "shards": [
                {"name": s.name, "nbytes": s.nbytes, "tensors": [o.name for i in s.units for o in self.units[i].outputs]}
                for s in self.shards
            ],
        }


def source_fingerprint(ckpt: Checkpoint) -> str:
    """Changes when any shard's header, size or modification time changes (a re-downloaded or edited source)."""
    h = hashlib.sha256()
    for name in sorted(ckpt.tensors):
        t = ckpt.tensors[name]
        h.update(f"{name}|{t.dtype}|{t.shape}|{os.path.basename(t.file)}|{t.begin}|{t.end}\n".encode())
    for shard in ckpt.shards:
        st = os.stat(os.path.join(ckpt.root, shard))
        h.update(f"{shard}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fp8_pairs(ckpt: Checkpoint) -> tuple[dict[str, str], dict[str, tuple[int, int]], list[str]]:
    """Scaled source weight -> scale companion, weight -> scale block, and the problems found (each naming the
    tensor). Both source forms (:mod:`nvfp4kit.decode`): FP8 weights (blocks such as 128x128) and MXFP4 weights of
    the original V4 releases (I8, block 1x32)."""
    names = ckpt.tensors
    pairs: dict[str, str] = {}
    blocks: dict[str, tuple[int, int]] = {}
    problems: list[str] = []
    configured = configured_block_size(ckpt.config)
    for name, info in names.items():
        form = form_of(info.dtype)
        if form is not None and (form != MXFP4 or name.endswith(".weight")):  # an I8 non-weight is data, copied
            scale = scale_of(name, names)
            if scale is None:
                problems.append(f"{'MXFP4' if form == MXFP4 else 'FP8'} weight {name} ({ckpt.shard_of(name)}) has "
                                "no scale companion (.scale)")
                continue
            pairs[name] = scale
            s = names[scale]
            try:
                blocks[name] = scale_block(info.dtype, info.shape, s.dtype, s.shape, configured, name)
            except SOURCE_FORMAT_ERRORS as e:
                problems.append(str(e))
            if form != MXFP4 and s.dtype not in ("F8_E8M0", "F32"):
                problems.append(f"scale {scale}: dtype {s.dtype}, expected F8_E8M0 or F32")
        elif weight_of_scale(name) is not None:
            weight = weight_of_scale(name)
            if weight not in names:
                problems.append(f"scale {name} ({ckpt.shard_of(name)}) has no weight {weight}")
            elif names[weight].dtype not in FORMS:
                problems.append(f"scale {name} belongs to {weight}, which is {names[weight].dtype}, not FP8 "
                                "(F8_E4M3) or MXFP4 (I8)")
    return pairs, blocks, problems


def load_activation_amax(path: str) -> dict[str, float]:
    """Per-module input amax from ``--activation-scales FILE`` (written by quantize_llmcompressor.py)."""
    shape = "a JSON object with an 'input_amax' mapping of module name -> amax"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"--activation-scales {path}: cannot read it ({e}); expected {shape}") from None
    amax = data.get("input_amax") if isinstance(data, dict) else None
    if not isinstance(amax, dict):
        raise PlanError(f"--activation-scales {path}: expected {shape}")
    try:
        return {str(k): float(v) for k, v in amax.items()}
    except (TypeError, ValueError) as e:
        raise PlanError(f"--activation-scales {path}: an amax is not a number ({e})") from None


def build_plan(ckpt: Checkpoint, options: Options, activation_amax: dict[str, float] | None = None) -> ConversionPlan:
    """Plan the conversion; raises :class:`PlanError` listing every problem that blocks it."""
    problems = list(ckpt.problems)
    pairs, blocks, pair_problems = fp8_pairs(ckpt)
    problems += pair_problems
    # (a tensor in a missing or unreadable shard still counts as present, with its shape unknown)
    problems += structure_problems(ckpt.config, {**dict.fromkeys(ckpt.unavailable, ()),
                                                 **{n: t.shape for n, t in ckpt.tensors.items()}})
    family = family_for(ckpt.config)
    table = family.table if family is not None else V4_TABLE
    if family is not None:  # (another model, or no config: that one line says it all)
        problems += unknown_tensor_problems(ckpt.tensors, table)
        problems += option_problems(family, options.format, options.engine)
    if options.scale_policy not in SCALE_POLICIES:
        problems.append(f"--scale-policy must be one of {SCALE_POLICIES}, got {options.scale_policy!r}")
    try:
        check_engine(options.engine, options.format, w4a4=activation_amax is not None)
        layout = Layout(options.format, w4a4=activation_amax is not None)
    except LayoutError as e:  # a flag problem: listed with the others rather than raised alone
        problems.append(str(e))

    actions: dict[str, str] = {}
    scales = set(pairs.values())
    for name in ckpt.tensors:
        if name in pairs:
            module = module_name(name)
            info = ckpt.tensors[name]
            try:
                action = decide(module, True, options.overrides, table)
                if action is Action.QUANTIZE:
                    check_quantizable(decoded_shape(info.dtype, info.shape), name)
            except (RuleError, NVFP4FormatError) as e:
                problems.append(str(e))
                continue
            if action is Action.KEEP_FP8 and form_of(info.dtype) == MXFP4:
                # No output layout keeps MXFP4 as it is: vLLM would read the I8 bytes as FP8.
                problems.append(f"{module}: stored as MXFP4 (I8 + E8M0 1x32), which the kit can only convert to "
                                "NVFP4; a --keep that matches it cannot hold it as it is")
                continue
            actions[module] = action.value
        elif name not in scales:
            actions[name] = Action.KEEP.value
    problems += _fused_group_problems(actions, table)
    kept_blocks = {blocks[m + ".weight"] for m, a in actions.items() if a == Action.KEEP_FP8.value and m + ".weight" in blocks}
    if len(kept_blocks) > 1:  # the output config describes the kept FP8 linears with one block structure
        problems.append(f"kept FP8 weights use different block sizes {sorted(kept_blocks)}; the output config holds one")
    if activation_amax is not None:
        missing = [m for m, a in actions.items() if a == Action.QUANTIZE.value and m not in activation_amax]
        bad = [m for m, a in (activation_amax or {}).items() if not (0 < a < float("inf"))]
        if missing:
            problems.append(f"--activation-scales has no input amax for {len(missing)} quantized modules, e.g. {missing[:3]}")
        if bad:
            problems.append(f"--activation-scales has non-finite or non-positive amax for {bad[:3]}")
    if not problems and Action.QUANTIZE.value not in actions.values():
        problems.append("nothing to quantize: no tensor gets NVFP4 with these flags (the output would be a copy)")
    problems = [p for p in problems if p in ckpt.problems or not ckpt.is_knock_on(p)]
    if problems:
        listed = problems[0] if len(problems) == 1 else "\n  - " + "\n  - ".join(problems)
        raise PlanError(f"{ckpt.root}: cannot convert: {listed}", problems)

    units = _units(ckpt, pairs, actions, layout, options, table)
    shards = _pack_shards(units, options.max_shard_size)
    quantized = sorted(m for m, a in actions.items() if a == Action.QUANTIZE.value)
    kept_fp8 = sorted(m for m, a in actions.items() if a == Action.KEEP_FP8.value)
    block = next(iter(kept_blocks), (128, 128))
    qcfg, hf_qcfg = quantization_config(layout, quantized, kept_fp8, ckpt.config, block, options.engine)
    amax = {m: activation_amax[m] for m in quantized} if activation_amax is not None else {}
    return ConversionPlan(ckpt.root, options, units, shards, actions, blocks, qcfg, hf_qcfg, amax)


def _fused_group_problems(actions: dict[str, str], table: RuleTable = V4_TABLE) -> list[str]:
    by_group: dict[str, dict[str, str]] = {}
    for module, action in actions.items():
        group = fused_group(module, table)
        if group:
            by_group.setdefault(group, {})[module] = action
    return [
        f"{group}: vLLM fuses {sorted(members)} into one GEMM, so they need one action, got {members}"
        for group, members in sorted(by_group.items())
        if len(set(members.values())) > 1
    ]


def _units(ckpt: Checkpoint, pairs: dict[str, str], actions: dict[str, str], layout: Layout, options: Options,
           table: RuleTable = V4_TABLE) -> list[Unit]:
    t = ckpt.tensors
    groups: dict[str, list[str]] = {}
    units: list[Unit] = []
    for module, action in actions.items():
        if action == Action.QUANTIZE.value and writes_mxfp4(options.engine, module):
            w = module + ".weight"
            sources = [w, pairs[w]]
            specs = mxfp4_specs(module, *decoded_shape(t[w].dtype, t[w].shape))
            units.append(Unit("mxfp4", [module], sources, specs, sum(t[n].nbytes for n in sources)))
        elif action == Action.QUANTIZE.value:
            groups.setdefault(joint_scale_group(module, options.joint_scale, table), []).append(module)
        elif action == Action.KEEP_FP8.value:
            w, s = module + ".weight", pairs[module + ".weight"]
            ws, ss = (TensorSpec(n, t[n].dtype, t[n].shape) for n in (w, s))
            units.append(Unit("fp8", [module], [w, s], layout.fp8_specs(module, ws, ss), t[w].nbytes + t[s].nbytes))
        else:
            units.append(Unit("copy", [module], [module], [TensorSpec(module, t[module].dtype, t[module].shape)], t[module].nbytes))
    for members in groups.values():
        members.sort()
        weights = [m + ".weight" for m in members]
        sources = weights + [pairs[w] for w in weights]
        outputs = [spec for m in members
                   for spec in layout.nvfp4_specs(m, *decoded_shape(t[m + ".weight"].dtype, t[m + ".weight"].shape))]
        units.append(Unit("nvfp4", members, sources, outputs, sum(t[n].nbytes for n in sources)))
    units.sort(key=lambda u: canonical_order(u.modules[0]))
    return units


def canonical_order(name: str) -> tuple:
    """Output order of a module: by block (embedding, layers 0..N-1, MTP blocks, the rest), then by name with its
    numbers compared as numbers. It depends on names alone, never on how the source is sharded: the FP8 repack and
    the original release of one model (sharded differently, tensors in a different order inside each shard) give
    the same output shards. Sources are sharded by layer, so reads stay within a few shards at a time."""
    parts = tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
    if name.startswith("embed"):
        return (0, 0, parts)
    if m := re.match(r"^layers\.(\d+)\.", name):
        return (1, int(m.group(1)), parts)
    if m := re.match(r"^mtp\.(\d+)\.", name):
        return (2, int(m.group(1)), parts)
    return (3, 0, parts)


def _pack_shards(units: list[Unit], max_shard_size: int) -> list[ShardPlan]:
    groups: list[list[int]] = [[]]
    size = 0
    for i, u in enumerate(units):
        n = sum(o.nbytes for o in u.outputs)
        if groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    total = len(groups)
    return [
        ShardPlan(f"model-{k + 1:05d}-of-{total:05d}.safetensors", g, sum(o.nbytes for i in g for o in units[i].outputs))
        for k, g in enumerate(groups)
    ]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.I)


def parse_size(text: str) -> int:
    """``5GB`` -> 5e9, ``512MiB`` -> 512*2^20, ``1000000`` -> 1e6."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = " KMGT".index(unit) if unit else 0
    return int(num * (1024 if binary else 1000) ** power)
