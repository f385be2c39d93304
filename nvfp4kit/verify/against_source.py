"""Checks 3-5, against the plan and the source: ``tensor_set`` (the output's tensors against the converter's plan and
the plan rebuilt from the source), ``model_config`` (config.json against the source's) and ``copies`` (copied and
kept-FP8 tensors byte for byte)."""

from __future__ import annotations

import dataclasses
import re

import torch

from ..checkpoint import Checkpoint
from ..convert import STATE_DIR
from ..decode import dequantize as dequantize_source, form_of
from ..families import table_for
from ..layouts import Layout
from ..mxfp4 import dequantize_mxfp4
from ..plan import ConversionPlan, Options, build_plan
from ..rules import Overrides, RuleTable, module_name, rule_for
from ..safetensors_io import TensorInfo, TensorSpec, read_tensor, tensor_bytes
from .finite import READ_CHUNK, tensor_chunks
from .inventory import Inventory
from .records import Records
from .results import CheckResult, crash_line, finding


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
    return finding("tensor_set", evidence, problems)


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
    return finding("model_config", [f"{len(src)} model fields compared with the source's config.json"], problems)


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
            problems.append(f"{', '.join(o.name for o in unit.outputs)}: {crash_line(e)}")
    evidence = [f"{copied} copied tensors and {fp8} kept FP8 modules (weight and scale) compared byte for byte "
                "with the source" + (f"; {mxfp4} MXFP4 modules decoded bit-exact against it" if mxfp4 else "") + (f"; {absent} not compared: missing from the output (see tensor_set)" if absent else "")]
    return finding("copies", evidence, problems)
