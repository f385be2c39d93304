"""What a source checkpoint holds and what Path A will make of it, from the index and the headers alone.

:func:`checkpoint_facts` gathers the facts into a JSON-ready dict (``inspect_model.py --json`` writes it; verify and
the converter's ``--dry-run`` may reuse it); :func:`render_report` turns that dict into the text report. No tensor
data is read, so the time taken depends on the number of tensors, never on their bytes.

Nothing here decides anything on its own: categories and actions come from the rule table (``rules``), FP8
pairing and block sizes from ``plan.fp8_pairs``, the problems that block conversion, the global-scale groups and
the output size from ``plan.build_plan``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TextIO

from .checkpoint import INDEX_NAME, Checkpoint, CheckpointError, configured_block_size, open_checkpoint
from .decode import FORM_TEXT, FP8, MXFP4, form_of
from .plan import ConversionPlan, Options, PlanError, build_plan, fp8_pairs, source_fingerprint
from .families import Family, family_for
from .families.v4 import V4
from .rules import RuleError, RuleTable, collapse, decide, module_name, rule_for
SCALE_FORMS = {"F8_E8M0": "UE8M0", "F32": "F32 multiplier"}
INDEX_TOKENS = ("L", "E", "M")  # the placeholders rules.collapse writes: layer, expert, MTP block
# One routed expert, the shared experts or the router of one layer (for the instance counts).
_INSTANCE = re.compile(r"^(.*?\.(?:experts\.\d+|shared_experts|ffn\.gate|mlp\.gate))(?:\.|$)")
EXIT_OK, EXIT_PROBLEMS = 0, 2
SOURCE_FORM_TEXT = {
    FP8: "FP8: every scaled linear F8_E4M3 with a block scale (V4's FP8 repack; V3, R1, V3.1, V3.2 as released)",
    MXFP4: "DeepSeek's original release: routed experts MXFP4 (I8 + F8_E8M0 per 1x32 block), other linears FP8",
}


@dataclass
class _PatternRow:
    """One collapsed name pattern; an FP8 weight's row also accounts for its scale companion."""

    pattern: str
    category: str
    count: int = 0
    dtypes: Counter = field(default_factory=Counter)
    shapes: Counter = field(default_factory=Counter)
    indices: dict[str, set[int]] = field(default_factory=dict)
    scale_forms: Counter = field(default_factory=Counter)
    blocks: Counter = field(default_factory=Counter)
    source_bytes: int = 0
    actions: Counter = field(default_factory=Counter)
    output_bytes: int = 0

    def as_json(self) -> dict:
        return {
            "pattern": self.pattern,
            "category": self.category,
            "count": self.count,
            "dtypes": dict(self.dtypes),
            "shapes": {_shape_text(s): n for s, n in self.shapes.items()},
            "indices": {k: sorted(v) for k, v in self.indices.items()},
            "scale_forms": dict(self.scale_forms),
            "blocks": {f"{b[0]}x{b[1]}": n for b, n in self.blocks.items()},
            "source_bytes": self.source_bytes,
            "actions": dict(self.actions),
            "output_bytes": self.output_bytes,
        }


# --- facts ------------------------------------------------------------------------------------------------------
def checkpoint_facts(ckpt: Checkpoint, options: Options = Options(),
                     activation_amax: dict[str, float] | None = None) -> dict:
    """Everything the report says, as plain JSON types. ``convertible`` is False when any problem blocks Path A.

    ``activation_amax``: the converter's ``--activation-scales``, when the report previews a W4A4 run."""
    found = family_for(ckpt.config)
    family = found or V4  # (another model is refused by the plan; its names read as V4's)
    table = family.table
    order = categories_of(table)
    pairs, blocks, _ = fp8_pairs(ckpt)
    forms = {w: form_of(ckpt.tensors[w].dtype) for w in pairs}  # FP8 or MXFP4 (the original release's experts)
    plan, problems = _try_plan(ckpt, options, activation_amax)
    scale_of_weight = pairs
    scales = set(pairs.values())
    rows: dict[str, _PatternRow] = {}
    row_of: dict[str, _PatternRow] = {}  # tensor name -> its row (the output attribution reuses it)
    categories: dict[str, Counter] = {c: Counter() for c in order}
    instances: dict[str, set[str]] = {"routed_expert": set(), "shared_expert": set(), "router": set()}
    for name, info in ckpt.tensors.items():
        module = module_name(name)
        category = rule_for(module, table).category
        cat = categories[category]
        cat["tensors"] += 1
        cat["source_bytes"] += info.nbytes
        cat["mtp_tensors"] += _is_mtp(family, ckpt, name)
        instance = _INSTANCE.match(name)
        if category in instances and instance:
            instances[category].add(instance.group(1))
        if name in scales:
            continue  # accounted for in its weight's row
        pattern = collapse(name, table)
        row = rows.get(pattern) or rows.setdefault(pattern, _PatternRow(pattern, category))
        row_of[name] = row
        row.count += 1
        row.dtypes[info.dtype] += 1
        row.shapes[info.shape] += 1
        for token, value in _indices(pattern, name).items():
            row.indices.setdefault(token, set()).add(value)
        row.source_bytes += info.nbytes
        scale = scale_of_weight.get(name)
        if scale is not None:
            row.scale_forms[SCALE_FORMS.get(ckpt.tensors[scale].dtype, ckpt.tensors[scale].dtype)] += 1
            row.source_bytes += ckpt.tensors[scale].nbytes
            if name in blocks:
                row.blocks[blocks[name]] += 1
        row.actions[_action(module if scale else name, scale is not None, options, table)] += 1
    if plan is not None:
        _add_output_bytes(plan, row_of, categories)
    ordered = sorted(rows.values(), key=lambda r: (order.index(r.category), r.pattern))
    return {
        "source": {**_source_facts(ckpt), "form": MXFP4 if MXFP4 in forms.values() else FP8},
        "patterns": [r.as_json() for r in ordered],
        "categories": {c: dict(n) for c, n in categories.items() if n["tensors"]},
        "family": found.name if found else None,
        "counts": _counts(ckpt, instances, family),
        "fp8": _form_facts(ckpt, pairs, blocks, forms, FP8),
        "mxfp4": _form_facts(ckpt, pairs, blocks, forms, MXFP4),
        "plan": _plan_facts(plan, options, table),
        "notes": _notes(ckpt, instances, family),
        "problems": problems,
        "convertible": not problems,
    }


def _form_facts(ckpt: Checkpoint, pairs: dict[str, str], blocks: dict[str, tuple[int, int]], forms: dict[str, str],
                form: str) -> dict:
    """Scaled source weights stored in ``form`` (decode.FORMS): how many, their scale dtypes and blocks."""
    weights = [w for w in pairs if forms[w] == form]
    facts = {
        "weights": len(weights),
        "scale_forms": dict(Counter(SCALE_FORMS.get(ckpt.tensors[pairs[w]].dtype, ckpt.tensors[pairs[w]].dtype)
                                    for w in weights)),
        "blocks": {f"{b[0]}x{b[1]}": n for b, n in Counter(blocks[w] for w in weights if w in blocks).items()},
    }
    if form == FP8:
        facts["configured_block"] = list(configured_block_size(ckpt.config) or []) or None
    return facts


def _try_plan(
    ckpt: Checkpoint, options: Options, activation_amax: dict[str, float] | None = None
) -> tuple[ConversionPlan | None, list[str]]:
    """The converter's own plan, or the problems that stop it (checkpoint, pairing and flag problems alike)."""
    try:
        return build_plan(ckpt, options, activation_amax), []
    except PlanError as e:
        return None, e.problems


def categories_of(table: RuleTable) -> tuple[str, ...]:
    """Report order of the categories: the rule table's order, then anything unknown."""
    return tuple(dict.fromkeys(r.category for r in table.rules + (table.unknown,)))


def _is_mtp(family: Family, ckpt: Checkpoint, name: str) -> bool:
    n = ckpt.config.get("num_hidden_layers")
    return family.is_mtp(name, n if isinstance(n, int) else 1 << 30)


def _layers(family: Family, ckpt: Checkpoint) -> set[int]:
    """Decoder layers the tensors hold (V3's MTP layer, numbered after them, is not one)."""
    return {int(m.group(1)) for n in ckpt.tensors if (m := family.layer.match(n)) and not _is_mtp(family, ckpt, n)}


def _action(module: str, is_fp8_with_scale: bool, options: Options, table: RuleTable) -> str:
    """The rule table's verdict (the converter's own ``decide``); a refused override shows as ``refused``."""
    try:
        return decide(module, is_fp8_with_scale, options.overrides, table).value
    except RuleError:
        return "refused"


@lru_cache(maxsize=None)
def _index_regex(pattern: str) -> re.Pattern[str]:
    """Regex that takes the indices back out of a name, built from the pattern ``rules.collapse`` wrote."""
    rx = re.escape(pattern)
    for token in INDEX_TOKENS:
        rx = rx.replace(re.escape("{" + token + "}"), rf"(?P<{token}>\d+)")
    return re.compile(rx + "$")


def _indices(pattern: str, name: str) -> dict[str, int]:
    m = _index_regex(pattern).match(name)
    return {k: int(v) for k, v in m.groupdict().items()} if m else {}


def _add_output_bytes(plan: ConversionPlan, row_of: dict[str, _PatternRow], categories: dict[str, Counter]) -> None:
    """Attribute every planned output tensor to the row (and category) of the source tensor it comes from."""
    for unit in plan.units:
        for spec in unit.outputs:
            if unit.kind == "copy":
                row = row_of[unit.modules[0]]
            else:  # an NVFP4 group or a kept FP8 module: outputs are named ``<module>.<something>``
                row = row_of[next(m for m in unit.modules if spec.name.startswith(m + ".")) + ".weight"]
            row.output_bytes += spec.nbytes
            categories[row.category]["output_bytes"] += spec.nbytes


def _source_facts(ckpt: Checkpoint) -> dict:
    return {
        "root": ckpt.root,
        "index": INDEX_NAME if ckpt.weight_map is not None else None,
        "shards": len(ckpt.shards),
        "tensors": len(ckpt.tensors),
        "bytes": ckpt.total_bytes,
        "index_total_size": ckpt.index_total_size,
        "fingerprint": source_fingerprint(ckpt),
        "config": {
            k: ckpt.config.get(k)
            for k in ("architectures", "num_hidden_layers", "n_routed_experts", "n_shared_experts",
                      "num_nextn_predict_layers", "quantization_config")
            if k in ckpt.config
        },
    }


def _counts(ckpt: Checkpoint, instances: dict[str, set[str]], family: Family) -> dict:
    per_layer = Counter(e.rsplit(".experts.", 1)[0] for e in instances["routed_expert"])
    layers = _layers(family, ckpt)
    mtp = {(family.mtp or family.layer).match(n).group(1) for n in ckpt.tensors if _is_mtp(family, ckpt, n)}
    return {
        "decoder_layers": len(layers),
        "mtp_blocks": len(mtp),
        "routed_experts": len(instances["routed_expert"]),
        "routed_experts_per_layer": sorted(set(per_layer.values())),
        "shared_experts": len(instances["shared_expert"]),
        "routers": len(instances["router"]),
        "mtp_tensors": sum(_is_mtp(family, ckpt, n) for n in ckpt.tensors),
    }


def _notes(ckpt: Checkpoint, instances: dict[str, set[str]], family: Family) -> list[str]:
    """Disagreements with config.json that do not stop a conversion but deserve a look."""
    notes = []
    cfg = ckpt.config
    layers = _layers(family, ckpt)
    if "num_hidden_layers" in cfg and layers != set(range(cfg["num_hidden_layers"])):
        notes.append(f"config.json has num_hidden_layers {cfg['num_hidden_layers']}, the tensors cover layers "
                     f"{format_indices(layers) or 'none'}")
    per_layer = Counter(e.rsplit(".experts.", 1)[0] for e in instances["routed_expert"])
    odd = {prefix: n for prefix, n in per_layer.items() if n != cfg.get("n_routed_experts", n)}
    if odd:
        first = sorted(odd)[0]
        notes.append(f"config.json has n_routed_experts {cfg['n_routed_experts']}, but {len(odd)} layers differ "
                     f"(e.g. {first} has {odd[first]})")
    return notes


def _plan_facts(plan: ConversionPlan | None, options: Options, table: RuleTable) -> dict:
    facts: dict = {"options": options.as_json(), "built": plan is not None}
    if plan is None:
        return facts
    by_kind: Counter = Counter()
    groups: Counter = Counter()
    for unit in plan.units:
        by_kind[unit.kind] += sum(s.nbytes for s in unit.outputs)
        if unit.kind == "nvfp4":
            groups[tuple(collapse(m, table) for m in unit.modules)] += 1
    facts.update({
        "output_bytes": plan.output_bytes,
        "output_bytes_by_kind": dict(by_kind),
        "output_shards": len(plan.shards),
        "global_scale_groups": [{"members": list(g), "groups": n} for g, n in sorted(groups.items())],
        "quantization_config": plan.quantization_config,
    })
    return facts


# --- text ---------------------------------------------------------------------------------------------------------
GB = 10**9
MB = 10**6
ACTION_TEXT = {"quantize": "NVFP4", "keep_fp8": "keep FP8", "keep": "keep", "refused": "REFUSED"}
PATTERN_WIDTH = 52  # the longest V4 pattern (layers.{L}.attn.indexer.compressor.wgate.weight) is 48; cut longer


def render_report(facts: dict) -> str:
    """The text report of :func:`checkpoint_facts`: aligned columns, sizes with 2 decimals, lines under ~150."""
    unit, unit_name = (GB, "GB") if facts["source"]["bytes"] >= GB else (MB, "MB")  # a tiny checkpoint is all 0.00 GB

    def size(n: int | None) -> str:
        return "-" if n is None else f"{n / unit:.2f}"

    out: list[str] = []
    out += _render_source(facts["source"], size, unit_name)
    if facts.get("family"):
        out.append(f"  family    {facts['family']} (its rule table: nvfp4kit/families/, docs/families.md)")
    out += _render_patterns(facts["patterns"], size, unit_name)
    out += _render_categories(facts, size, unit_name)
    out += _render_fp8(facts["fp8"])
    out += _render_mxfp4(facts["mxfp4"], facts["patterns"])
    out += _render_plan(facts["plan"], facts["source"]["bytes"], size, unit_name)
    out += ([""] if facts["notes"] else []) + [f"note: {n}" for n in facts["notes"]]
    out += _render_problems(facts["problems"])
    return "\n".join(out) + "\n"


def _render_source(src: dict, size, unit: str) -> list[str]:
    cfg = src["config"]
    q = cfg.get("quantization_config") or {}
    lines = [
        f"checkpoint  {src['root']}",
        f"  form      {SOURCE_FORM_TEXT[src.get('form', FP8)]}",
        f"  files     {src['shards']} shard(s), " + (f"index {src['index']}" if src["index"] else "no index"),
        f"  tensors   {src['tensors']:,}, {size(src['bytes'])} {unit} ({src['bytes']:,} bytes)"
        + (f"; index total_size {src['index_total_size']:,}" if src["index_total_size"] is not None else ""),
    ]
    if cfg:
        lines.append(
            f"  config    {','.join(cfg.get('architectures') or ['?'])}: {cfg.get('num_hidden_layers', '?')} layers, "
            f"{cfg.get('n_routed_experts', '?')} routed + {cfg.get('n_shared_experts', '?')} shared experts, "
            f"{cfg.get('num_nextn_predict_layers', 0)} MTP; quantization {q.get('quant_method', 'none')} "
            f"{q.get('fmt', '')} scale {q.get('scale_fmt', '-')} block {q.get('weight_block_size', '-')}"
        )
    return lines


def _render_patterns(patterns: list[dict], size, unit: str) -> list[str]:
    header = ("pattern", "n", "dtype", "shape", "indices", "fp8 scale", f"src {unit}", "action", f"out {unit}")
    width = min(PATTERN_WIDTH, max([len(p["pattern"]) for p in patterns] + [7]))
    widths = (width, 7, 7, 18, 16, 14, 8, 8, 8)
    right = {1, 6, 8}
    lines = ["", "TENSOR PATTERNS ({L} layer, {E} routed expert, {M} MTP block; an FP8 row includes its scale)"]
    lines.append(_table_line(header, widths, right))
    current = None
    for p in patterns:
        if p["category"] != current:
            current = p["category"]
            lines.append(f"[{current}]")
        lines.append(_table_line((
            p["pattern"],
            f"{p['count']:,}",
            "/".join(p["dtypes"]),
            _shapes_text(p["shapes"]),
            " ".join(f"{k} {format_indices(v)}" for k, v in p["indices"].items()) or "-",
            _scale_text(p["scale_forms"], p["blocks"]),
            size(p["source_bytes"]),
            "/".join(ACTION_TEXT[a] for a in p["actions"]),
            size(p["output_bytes"]) if p["output_bytes"] or not p["actions"] else "-",
        ), widths, right))
    return lines


def _render_categories(facts: dict, size, unit: str) -> list[str]:
    header, widths, right = ("category", "tensors", "of them MTP", f"src {unit}", f"out {unit}"), (16, 9, 12, 10, 10), {1, 2, 3, 4}
    lines = ["", "CATEGORIES", _table_line(header, widths, right)]
    for cat, n in facts["categories"].items():
        out = size(n.get("output_bytes")) if facts["plan"]["built"] else "-"
        lines.append(_table_line((cat, f"{n['tensors']:,}", f"{n.get('mtp_tensors', 0):,}", size(n["source_bytes"]), out),
                                 widths, right))
    c = facts["counts"]
    lines += [
        "",
        f"counts: {c['decoder_layers']} decoder layers + {c['mtp_blocks']} MTP block(s); "
        f"{c['routed_experts']:,} routed experts ({'/'.join(map(str, c['routed_experts_per_layer'])) or 0} per layer), "
        f"{c['shared_experts']} shared experts, {c['routers']} routers, {c['mtp_tensors']:,} MTP tensors",
    ]
    return lines


def _render_fp8(fp8: dict) -> list[str]:
    forms = ", ".join(f"{n:,} {f}" for f, n in fp8["scale_forms"].items()) or "none"
    blocks = ", ".join(f"{n:,} of {b}" for b, n in fp8["blocks"].items()) or "none"
    configured = "x".join(map(str, fp8["configured_block"])) if fp8["configured_block"] else "not set"
    return ["", f"FP8: {fp8['weights']:,} weights with a scale; scales: {forms}; blocks: {blocks} "
                f"(config weight_block_size: {configured})"]


def _render_mxfp4(mx: dict, patterns: list[dict]) -> list[str]:
    """The original release's MXFP4 experts, named as such (nothing when the source has none)."""
    if not mx["weights"]:
        return []
    to_nvfp4 = sum(p["actions"].get("quantize", 0) for p in patterns if "I8" in p["dtypes"])
    blocks = ", ".join(f"{n:,} of {b}" for b, n in mx["blocks"].items()) or "none"
    return [f"MXFP4: {mx['weights']:,} weights in DeepSeek's original form, {FORM_TEXT[MXFP4]} (blocks: {blocks})",
            f"  {to_nvfp4:,} become NVFP4: exactly (power-of-two scales) where a group's block exponents fit E4M3's "
            "power-of-two range,",
            "  else by the reference rule; decided on the data during the run (conversion_report.json: rule per tensor)"]


def _render_plan(plan: dict, source_bytes: int, size, unit: str) -> list[str]:
    o = plan["options"]
    flags = f"--format {o['format']} --joint-scale {o['joint_scale']}" + "".join(
        f" --{k} {p}" for k in ("quantize", "keep") for p in o["overrides"][k])
    lines = ["", f"PATH A ({flags})"]
    if not plan["built"]:
        return lines + ["  no plan: the problems below block the conversion"]
    lines.append("  NVFP4 global scales:")
    for g in plan["global_scale_groups"]:
        what = "share one global scale" if len(g["members"]) > 1 else "has its own global scale"
        lines.append(f"    {_members_text(g['members']):<60} {what} ({g['groups']:,} groups)")
    if not plan["global_scale_groups"]:
        lines.append("    none (nothing is quantized)")
    kinds = plan["output_bytes_by_kind"]
    lines.append("  expected output: " + ", ".join(
        f"{k} {size(kinds.get(k, 0))} {unit}" for k in ("nvfp4", "fp8", "copy")))
    lines.append(f"  expected output size: {plan['output_bytes'] / GB:.2f} GB ({plan['output_bytes']:,} bytes) in "
                 f"{plan['output_shards']} shard(s); source {source_bytes / GB:.2f} GB")
    return lines


def _render_problems(problems: list[str]) -> list[str]:
    if not problems:
        return ["", "RESULT: convertible (no problems found)"]
    return ["", f"PROBLEMS ({len(problems)})"] + [f"  - {p}" for p in problems] + [
        "", f"RESULT: NOT convertible ({len(problems)} problem(s) above)"]


def _table_line(cells: tuple, widths: tuple, right: set[int]) -> str:
    parts = []
    for i, (cell, w) in enumerate(zip(cells, widths)):
        cell = str(cell)
        cell = cell if len(cell) <= w else cell[: w - 1] + "…"
        parts.append(cell.rjust(w) if i in right else cell.ljust(w))
    return " ".join(parts).rstrip()


def _shape_text(shape: tuple | list) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def _shapes_text(shapes: dict[str, int]) -> str:
    """The most common shape, plus how many others there are."""
    ordered = sorted(shapes, key=lambda s: -shapes[s])
    return ordered[0] + (f" +{len(ordered) - 1}" if len(ordered) > 1 else "") if ordered else "-"


def _scale_text(forms: dict[str, int], blocks: dict[str, int]) -> str:
    if not forms:
        return "-"
    return "/".join(f.split()[0] for f in forms) + " " + ("/".join(blocks) or "no block")


def _members_text(members: list[str]) -> str:
    """``a.b.w1`` + ``a.b.w3`` -> ``a.b.w1 + w3``."""
    first, rest = members[0], members[1:]
    prefix = first.rsplit(".", 1)[0] + "."
    return " + ".join([first] + [m[len(prefix):] if m.startswith(prefix) else m for m in rest])


def format_indices(values) -> str:
    """``[0, 1, 3, 5, 7]`` -> ``0,1,3-7/2``: consecutive values first, then runs of three or more with one step."""
    v = sorted(set(values))
    parts: list[str] = []
    i = 0
    while i < len(v):
        j = i
        step = v[i + 1] - v[i] if i + 1 < len(v) else 1
        while j + 1 < len(v) and v[j + 1] - v[j] == step:
            j += 1
        if step == 1 and j > i:  # consecutive: a range, or two plain values
            parts.append(f"{v[i]}-{v[j]}" if j - i >= 2 else f"{v[i]},{v[j]}")
        elif j - i >= 2:
            parts.append(f"{v[i]}-{v[j]}/{step}")
        else:
            parts.append(str(v[i]))
            j = i
        i = j + 1
    return ",".join(parts)


# --- the command ------------------------------------------------------------------------------------------------
def inspect_checkpoint(src: str, options: Options, json_path: str | None = None, out: TextIO | None = None) -> int:
    """``inspect_model.py``: print the report, write the facts as JSON if asked; 0 if convertible, else 2."""
    out = out or sys.stdout
    try:
        ckpt = open_checkpoint(src)
    except CheckpointError as e:  # not even a checkpoint: there is nothing else to report
        facts = {"source": {"root": os.path.abspath(src)}, "problems": [str(e)], "convertible": False}
        out.write("\n".join(_render_problems(facts["problems"])).lstrip("\n") + "\n")
    else:
        facts = checkpoint_facts(ckpt, options)
        out.write(render_report(facts))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(facts, f, indent=1)
            f.write("\n")
    return EXIT_OK if facts["convertible"] else EXIT_PROBLEMS
