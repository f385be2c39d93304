"""The rule table: what each DeepSeek V4 tensor is and what Path A does with it.

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
_DOWN = re.compile(r"^(.*\.(?:experts\.\d+|shared_experts))\.w2$")


def module_name(tensor_name: str) -> str:
    """Strip the parameter suffix: ``x.weight``/``x.scale``/``x.weight_scale_inv`` -> ``x``; others unchanged."""
    for suffix in (".weight", ".scale", ".weight_scale_inv"):
        if tensor_name.endswith(suffix):
            return tensor_name[: -len(suffix)]
    return tensor_name


def rule_for(module: str) -> Rule:
    for rule in RULES:
        if rule.pattern.match(module):
            return rule
    return UNKNOWN


def is_mtp(name: str) -> bool:
    return name.startswith("mtp.")


def fused_group(module: str) -> str | None:
    """Key shared by the modules vLLM fuses with ``module`` (None if it is fused with nothing)."""
    for pattern, tag in FUSED_GROUPS:
        m = pattern.match(module)
        if m:
            return f"{m.group(1)}.{tag}"
    return None


def joint_scale_group(module: str, joint_scale: str = "gate-up") -> str:
    """Key of the modules that share one NVFP4 global scale with ``module``.

    ``gate-up``: the groups vLLM fuses (expert and shared-expert w1+w3, attention wq_a+wkv).
    ``gate-up-down``: experts' w2 joins its w1+w3 too.
    """
    if joint_scale not in JOINT_SCALE_CHOICES:
        raise ValueError(f"--joint-scale must be one of {JOINT_SCALE_CHOICES}, got {joint_scale!r}")
    if joint_scale == "gate-up-down":
        m = _DOWN.match(module)
        if m:
            return f"{m.group(1)}.w13"
    return fused_group(module) or module


@dataclass(frozen=True)
class Overrides:
    """User overrides of the defaults: ``--quantize REGEX`` / ``--keep REGEX`` (``re.search`` on module names)."""

    quantize: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()

    def as_json(self) -> dict[str, list[str]]:
        return {"quantize": list(self.quantize), "keep": list(self.keep)}


class RuleError(KitError, ValueError):
    """An override that would produce a checkpoint vLLM cannot load."""


def decide(module: str, is_fp8_with_scale: bool, overrides: Overrides = Overrides()) -> Action:
    """The action for one module. ``--keep`` beats ``--quantize``; must-keep modules refuse ``--quantize``."""
    rule = rule_for(module)
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


def collapse(name: str) -> str:
    """Pattern of a name with layer and expert indices collapsed: ``layers.{L}.ffn.experts.{E}.w1.weight``."""
    name = re.sub(r"^layers\.\d+\.", "layers.{L}.", name)
    name = re.sub(r"^mtp\.\d+\.", "mtp.{M}.", name)
    return re.sub(r"\.experts\.\d+\.", ".experts.{E}.", name)


# ---------------------------------------------------------------------------------------------------------------
# The model the tensors must describe: config.json against the headers
# ---------------------------------------------------------------------------------------------------------------
ARCHITECTURES = ("DeepseekV4ForCausalLM",)
CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "n_routed_experts", "moe_intermediate_size", "vocab_size")
_LAYER = re.compile(r"^layers\.(\d+)\.")
_MTP = re.compile(r"^mtp\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.w([123])\.weight$")


def is_v4(config: dict) -> bool:
    return isinstance(config.get("architectures"), list) and any(a in ARCHITECTURES for a in config["architectures"])


def structure_problems(config: dict, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Where config.json and the tensors (name -> header shape) disagree on what model this is: an architecture
    that is not V4, layers or MTP blocks missing or past the config's count, experts past ``n_routed_experts``,
    expert or embedding widths other than the config's. Each problem once per cause (the first tensor at fault).

    Rows of a routed expert's weight are compared (the same in every source form); an expert's input width is
    the scale's business (:mod:`nvfp4kit.decode`).
    """
    if not config:
        return []  # config.json itself is the problem, reported by the checkpoint
    archs = config.get("architectures") or []
    if not is_v4(config):
        return [f"config.json: architectures {archs} is not DeepSeek V4 ({', '.join(ARCHITECTURES)}): the kit has "
                "no rules for this model and refuses rather than copy it unconverted"]
    missing = [k for k in CONFIG_KEYS if not isinstance(config.get(k), int)]
    if missing:
        return [f"config.json lacks the integer field(s) {', '.join(missing)}"]
    problems = []
    layers = {int(m.group(1)) for n in shapes if (m := _LAYER.match(n))}
    n = config["num_hidden_layers"]
    if layers != set(range(n)):
        problems.append(_count_problem("layers", layers, n, "num_hidden_layers"))
    mtp = {int(m.group(1)) for n_ in shapes if (m := _MTP.match(n_))}
    n_mtp = config.get("num_nextn_predict_layers", len(mtp))
    if isinstance(n_mtp, int) and mtp - set(range(n_mtp)):
        problems.append(_count_problem("MTP blocks", mtp, n_mtp, "num_nextn_predict_layers"))
    want = {"1": config["moe_intermediate_size"], "3": config["moe_intermediate_size"], "2": config["hidden_size"]}
    first_past, first_width = None, None
    for name, shape in sorted(shapes.items()):
        m = _EXPERT.search(name)
        if m is None:
            continue
        if int(m.group(1)) >= config["n_routed_experts"] and first_past is None:
            first_past = f"{name}: expert {m.group(1)} lies past n_routed_experts={config['n_routed_experts']}"
        if shape and shape[0] != want[m.group(2)] and first_width is None:
            key = "hidden_size" if m.group(2) == "2" else "moe_intermediate_size"
            first_width = f"{name}: shape {list(shape)} has {shape[0]} rows, but config.json says {key}={want[m.group(2)]}"
    problems += [p for p in (first_past, first_width) if p]
    for name in ("embed.weight", "head.weight"):
        shape = shapes.get(name)
        if shape and list(shape) != [config["vocab_size"], config["hidden_size"]]:
            problems.append(f"{name}: shape {list(shape)}, but config.json says vocab_size={config['vocab_size']}, "
                            f"hidden_size={config['hidden_size']}")
    return problems


def _count_problem(what: str, found: set[int], n: int, key: str) -> str:
    held = f"{min(found)}-{max(found)}" if found else "none"
    past = sorted(i for i in found if i >= n)
    gaps = sorted(set(range(n)) - found)
    detail = (f"{len(past)} past it (from {past[0]})" if past else "") + (", " if past and gaps else "") + \
        (f"{len(gaps)} missing (from {gaps[0]})" if gaps else "")
    return f"config.json says {key}={n}, but the tensors hold {what} {held}: {detail}"


def unknown_tensor_problems(names) -> list[str]:
    """Tensors no rule knows, one line per pattern: refused rather than copied into a checkpoint an engine might
    misread (a newer revision's draft blocks, another model's names)."""
    by_pattern: dict[str, list[str]] = {}
    for name in sorted(names):
        if rule_for(module_name(name)) is UNKNOWN:
            by_pattern.setdefault(collapse(name), []).append(name)
    return [f"{pattern}: no rule of the DeepSeek V4 family knows this tensor ({len(found)} like {found[0]}); the kit "
            "refuses rather than copy it unconverted into a checkpoint an engine may misread"
            for pattern, found in by_pattern.items()]
