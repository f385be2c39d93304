"""The rule table: what each DeepSeek V4 tensor is and what Path A does with it, and the rule machinery every
model family shares (:class:`RuleTable`; :mod:`nvfp4kit.families` holds one per family, V4's being this one).

One table serves ``inspect_model.py`` (to report), the converter (to plan) and Path B (its ignore list).
Names are DeepSeek's own (``layers.N.attn.wq_a.weight``, ``mtp.0.ffn.experts.E.w1.weight``); the MTP block
(``mtp.K.``) follows the same rules as a decoder layer, so its routed experts are quantized like the trunk's:
vLLM builds them with the trunk's quantization scheme (vllm-v4-contract.md §6).

Defaults follow what vLLM's V4 loader accepts and what NVIDIA's NVFP4 V4 release does (docs/design.md):
routed experts become NVFP4; attention projections, shared experts and MTP ``e_proj``/``h_proj`` stay FP8
(``--quantize`` can change that); modules vLLM builds unquantized or reads directly stay as they are, always.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .errors import KitError

LAYER_PREFIX = r"^(?:layers\.\d+\.|mtp\.\d+\.)?"


class Action(str, Enum):
    QUANTIZE = "quantize"  # FP8 weight + scale -> NVFP4
    KEEP_FP8 = "keep_fp8"  # FP8 weight kept bit for bit, with its scale
    KEEP = "keep"  # any other tensor, copied bit for bit


@dataclass(frozen=True)
class Rule:
    category: str
    pattern: re.Pattern[str]  # matched against the module name (tensor name without .weight/.scale)
    quantize_by_default: bool
    must_keep: bool  # vLLM builds it unquantized or reads it directly: never NVFP4
    why: str


def _rule(category: str, pattern: str, quantize: bool, must_keep: bool, why: str) -> Rule:
    return Rule(category, re.compile(LAYER_PREFIX + pattern + r"$"), quantize, must_keep, why)


# First match wins. Patterns see the module name: ``layers.3.attn.wq_a`` for ``layers.3.attn.wq_a.weight``.
RULES: tuple[Rule, ...] = (
    _rule("routed_expert", r"ffn\.experts\.\d+\.w[123]", True, False, "routed experts: NVFP4 (W4A16 in vLLM)"),
    _rule("shared_expert", r"ffn\.shared_experts\.w[123]", False, False, "kept FP8 as in NVIDIA's V4 release"),
    _rule("router", r"ffn\.gate(\.weight|\.bias|\.tid2eid)?", False, True, "vLLM builds the router unquantized"),
    _rule("compressor", r"attn\.(indexer\.)?compressor\..+", False, True, "vLLM builds compressors unquantized"),
    _rule("indexer", r"attn\.indexer\.weights_proj", False, True, "vLLM builds weights_proj unquantized"),
    _rule("indexer", r"attn\.indexer\.wq_b", False, False, "kept FP8 with the other attention projections"),
    _rule("attention", r"attn\.wo_a", False, True, "vLLM reads wo_a directly: FP8 or BF16 only"),
    _rule("attention", r"attn\.(wq_a|wkv|wq_b|wo_b)", False, False, "kept FP8 as in NVIDIA's V4 release"),
    _rule("attention", r"attn\.attn_sink", False, True, "per-head float32 parameter"),
    _rule("mtp_proj", r"(e_proj|h_proj)", False, False, "kept FP8 as in NVIDIA's V4 release"),
    _rule("mhc", r"hc_(attn|ffn|head)_(fn|base|scale)", False, True, "mHC parameters are float32, unquantized"),
    _rule("norm", r"(attn\.)?\w*norm", False, True, "norms are unquantized"),
    _rule("embedding", r"embed|emb\.tok_emb", False, True, "vLLM builds the embedding unquantized"),
    _rule("head", r"head", False, True, "the LM head stays BF16 (vLLM's V4 head takes no quant config)"),
)
UNKNOWN = Rule("other", re.compile(".*"), False, True, "not a known V4 tensor: refused (unknown_tensor_problems)")

# Groups that vLLM fuses into one GEMM; their members must share one action and one NVFP4 global scale.
FUSED_GROUPS = (
    (re.compile(r"^(.*\.experts\.\d+)\.w[13]$"), "w13"),
    (re.compile(r"^(.*\.shared_experts)\.w[13]$"), "w13"),
    (re.compile(r"^(.*\.attn)\.(wq_a|wkv)$"), "fused_wqa_wkv"),
)
JOINT_SCALE_CHOICES = ("gate-up", "gate-up-down")


@dataclass(frozen=True)
class RuleTable:
    """One model family's rules: what each tensor is (first match wins), what vLLM fuses, how names collapse.

    ``down``: an expert's down projection, group 1 its owner (``--joint-scale gate-up-down`` joins it to the
    owner's gate/up group, keyed ``<owner>.<down_tag>``). ``collapse``: (pattern, replacement) pairs applied in
    order, writing the index placeholders ``{L}``, ``{E}``, ``{M}`` (layer, expert, MTP block)."""

    family: str  # as messages name it: "DeepSeek V4"
    rules: tuple[Rule, ...]
    unknown: Rule
    fused_groups: tuple[tuple[re.Pattern[str], str], ...]
    down: re.Pattern[str]
    down_tag: str
    collapse: tuple[tuple[re.Pattern[str], str], ...]


V4_TABLE = RuleTable(
    family="DeepSeek V4",
    rules=RULES,
    unknown=UNKNOWN,
    fused_groups=FUSED_GROUPS,
    down=re.compile(r"^(.*\.(?:experts\.\d+|shared_experts))\.w2$"),
    down_tag="w13",
    collapse=((re.compile(r"^layers\.\d+\."), "layers.{L}."), (re.compile(r"^mtp\.\d+\."), "mtp.{M}."),
              (re.compile(r"\.experts\.\d+\."), ".experts.{E}.")),
)


def module_name(tensor_name: str) -> str:
    """Strip the parameter suffix: ``x.weight``/``x.scale``/``x.weight_scale_inv`` -> ``x``; others unchanged."""
    for suffix in (".weight", ".scale", ".weight_scale_inv"):
        if tensor_name.endswith(suffix):
            return tensor_name[: -len(suffix)]
    return tensor_name


def rule_for(module: str, table: RuleTable = V4_TABLE) -> Rule:
    for rule in table.rules:
        if rule.pattern.match(module):
            return rule
    return table.unknown


def is_mtp(name: str) -> bool:
    return name.startswith("mtp.")


def fused_group(module: str, table: RuleTable = V4_TABLE) -> str | None:
    """Key shared by the modules vLLM fuses with ``module`` (None if it is fused with nothing)."""
    for pattern, tag in table.fused_groups:
        m = pattern.match(module)
        if m:
            return f"{m.group(1)}.{tag}"
    return None


def joint_scale_group(module: str, joint_scale: str = "gate-up", table: RuleTable = V4_TABLE) -> str:
    """Key of the modules that share one NVFP4 global scale with ``module``.

    ``gate-up``: the groups vLLM fuses (V4: expert and shared-expert w1+w3, attention wq_a+wkv).
    ``gate-up-down``: experts' down projection (V4 w2) joins its gate/up group too.
    """
    if joint_scale not in JOINT_SCALE_CHOICES:
        raise ValueError(f"--joint-scale must be one of {JOINT_SCALE_CHOICES}, got {joint_scale!r}")
    if joint_scale == "gate-up-down":
        m = table.down.match(module)
        if m:
            return f"{m.group(1)}.{table.down_tag}"
    return fused_group(module, table) or module


@dataclass(frozen=True)
class Overrides:
    """User overrides of the defaults: ``--quantize REGEX`` / ``--keep REGEX`` (``re.search`` on module names)."""

    quantize: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()

    def as_json(self) -> dict[str, list[str]]:
        return {"quantize": list(self.quantize), "keep": list(self.keep)}


class RuleError(KitError, ValueError):
    """An override that would produce a checkpoint vLLM cannot load."""


def decide(module: str, is_fp8_with_scale: bool, overrides: Overrides = Overrides(),
           table: RuleTable = V4_TABLE) -> Action:
    """The action for one module. ``--keep`` beats ``--quantize``; must-keep modules refuse ``--quantize``."""
    rule = rule_for(module, table)
    if not is_fp8_with_scale:
        return Action.KEEP
    wants = rule.quantize_by_default
    if any(re.search(p, module) for p in overrides.quantize):
        if rule.must_keep:
            raise RuleError(f"{module}: --quantize asks for NVFP4 but it must stay as it is ({rule.why})")
        wants = True
    if any(re.search(p, module) for p in overrides.keep):
        wants = False
    return Action.QUANTIZE if wants else Action.KEEP_FP8


def collapse(name: str, table: RuleTable = V4_TABLE) -> str:
    """Pattern of a name with layer and expert indices collapsed: ``layers.{L}.ffn.experts.{E}.w1.weight``."""
    for pattern, replacement in table.collapse:
        name = pattern.sub(replacement, name)
    return name


def unknown_tensor_problems(names, table: RuleTable = V4_TABLE) -> list[str]:
    """Tensors no rule knows, one line per pattern: refused rather than copied into a checkpoint an engine might
    misread (a newer revision's draft blocks, another model's names)."""
    by_pattern: dict[str, list[str]] = {}
    for name in sorted(names):
        if rule_for(module_name(name), table) is table.unknown:
            by_pattern.setdefault(collapse(name, table), []).append(name)
    return [f"{pattern}: no rule of the {table.family} family knows this tensor ({len(found)} like {found[0]}); the kit "
            "refuses rather than copy it unconverted into a checkpoint an engine may misread"
            for pattern, found in by_pattern.items()]
