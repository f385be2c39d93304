"""Model families: which DeepSeek release a checkpoint is, and everything that differs between releases.

A :class:`Family` holds one release family's rule table (what each tensor is, what Path A does with it and why:
:class:`nvfp4kit.rules.RuleTable`), how its tensors are named (layers, MTP block, routed experts, embedding and
head), the config.json fields its structure checks need, and the vLLM model classes that load it. One module per
family: :mod:`.v4` (DeepSeek V4 Pro/Flash), :mod:`.v3` (V3, R1, V3.1, and V3.2 as V3 plus its indexer).

The family is chosen from config.json (``architectures`` first, then ``model_type``) and confirmed by the tensor
names (:func:`family_problems`); a checkpoint of any other model is refused with one line, never copied as is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..rules import RuleTable


@dataclass(frozen=True)
class Family:
    name: str  # short id: "deepseek_v4", "deepseek_v3", "deepseek_v32"
    title: str  # as messages name it
    architectures: tuple[str, ...]  # config.json ``architectures`` entries that choose this family
    model_types: tuple[str, ...]  # config.json ``model_type`` values that choose it (when architectures is absent)
    table: RuleTable
    signature: re.Pattern[str]  # some tensor of every checkpoint of the family matches (confirms the choice)
    layer: re.Pattern[str]  # group 1: a decoder layer's index (V3 counts its MTP layer among them)
    mtp: re.Pattern[str] | None  # group 1: MTP block index where the family names it apart (V4 ``mtp.K.``)
    expert: re.Pattern[str]  # a routed expert's weight; group 1: expert index, group 2: projection
    expert_rows: dict[str, str]  # projection -> config key giving its rows
    embed_head: tuple[str, ...]  # tensors of shape [vocab_size, hidden_size]
    config_keys: tuple[str, ...]  # integer config.json fields the structure checks and verify read
    vllm_model: str  # "module:Class" vLLM builds the target model with (its NVIDIA-platform class)
    vllm_mtp_model: str  # "module:Class" of the MTP draft model
    formats: tuple[str, ...]  # output layouts (``--format``) an engine loads for this family
    engines: tuple[str, ...]  # ``--engine`` values the kit writes for it
    # Path B (transformers' model of the family, calibrated by llm-compressor):
    hf_decoder_layer: str  # transformers' decoder layer class: the sequential pipeline's unit
    hf_norm: str  # transformers' RMSNorm class (cast to the compute dtype where it keeps float32)
    hf_renames: str | None  # model_type whose transformers conversion mapping renames the checkpoint's names
    #   (V4: ``layers.N.attn.wq_a`` -> ``model.layers.N.self_attn.q_a_proj``); None where they are transformers' own

    def is_mtp(self, name: str, num_hidden_layers: int) -> bool:
        """Whether a tensor or module belongs to an MTP block (V4 ``mtp.K.``; V3 ``model.layers.{L+K}.``)."""
        if self.mtp is not None:
            return bool(self.mtp.match(name))
        m = self.layer.match(name)
        return bool(m) and int(m.group(1)) >= num_hidden_layers


def _families() -> tuple[Family, ...]:
    from .v3 import V3, V32
    from .v4 import V4

    return (V4, V3, V32)


def known_architectures() -> list[str]:
    return [a for f in _families() for a in f.architectures]


def family_for(config: dict) -> Family | None:
    """The family config.json names (``architectures``, else ``model_type``); None for any other model."""
    archs = config.get("architectures") if isinstance(config, dict) else None
    families = _families()
    if isinstance(archs, list) and archs:
        return next((f for f in families if any(a in f.architectures for a in archs)), None)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return next((f for f in families if model_type in f.model_types), None)


def by_name(name: str) -> Family:
    return next(f for f in _families() if f.name == name)


def family_problems(config: dict, names) -> list[str]:
    """One line where config.json names no family the kit knows, or one the tensor names contradict."""
    if not config:
        return []  # config.json itself is the problem, reported by the checkpoint
    family = family_for(config)
    if family is None:
        archs, model_type = config.get("architectures") or [], config.get("model_type")
        return [f"config.json: architectures {archs} (model_type {model_type!r}) is not DeepSeek V4, V3, R1, V3.1 "
                f"or V3.2 ({', '.join(known_architectures())}): the kit has no rules for this model and refuses "
                "rather than copy it unconverted"]
    names = list(names)
    if names and not any(family.signature.match(n) for n in names):
        others = [f for f in _families() if f is not family and any(f.signature.match(n) for n in names)]
        seen = f", which are {others[-1].title}'s" if others else ""
        return [f"config.json names {family.title} ({', '.join(family.architectures)}), but no tensor name is "
                f"{family.title}'s (none matches {family.signature.pattern}){seen}: refused rather than guessed"]
    return []


def option_problems(family: Family | None, fmt: str, engine: str) -> list[str]:
    """``--format`` / ``--engine`` the family has no layout for (V4's own release layout, SGLang's V4 draft)."""
    if family is None:
        return []
    problems = []
    if fmt not in family.formats:
        problems.append(f"--format {fmt}: no engine loads {family.title} in this layout; choose one of "
                        f"{', '.join(family.formats)}")
    if engine not in family.engines:
        problems.append(f"--engine {engine}: the kit writes {family.title} for {', '.join(family.engines)} only")
    return problems


def structure_problems(config: dict, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Where config.json and the tensors (name -> header shape) disagree on what model this is: an architecture the
    kit has no family for, layers or MTP blocks missing or past the config's count, experts past
    ``n_routed_experts``, expert or embedding widths other than the config's. Each problem once per cause (the
    first tensor at fault).

    Rows of a routed expert's weight are compared (the same in every source form); an expert's input width is
    the scale's business (:mod:`nvfp4kit.decode`).
    """
    first = family_problems(config, shapes)
    if first or not config:
        return first
    family = family_for(config)
    assert family is not None
    missing = [k for k in family.config_keys if not isinstance(config.get(k), int)]
    if missing:
        return [f"config.json lacks the integer field(s) {', '.join(missing)}"]
    problems = []
    n = config["num_hidden_layers"]
    layers = {int(m.group(1)) for name in shapes if (m := family.layer.match(name))}
    n_mtp = config.get("num_nextn_predict_layers")
    if family.mtp is not None:
        mtp = {int(m.group(1)) for name in shapes if (m := family.mtp.match(name))}
    else:  # the MTP blocks are the layers past num_hidden_layers
        mtp = {i - n for i in layers if i >= n}
        layers -= {i for i in layers if i >= n and isinstance(n_mtp, int) and i < n + n_mtp}
    if layers != set(range(n)):
        problems.append(_count_problem("layers", layers, n, "num_hidden_layers"))
    n_mtp = n_mtp if isinstance(n_mtp, int) else len(mtp)
    if mtp - set(range(n_mtp)):
        problems.append(_count_problem("MTP blocks", mtp, n_mtp, "num_nextn_predict_layers"))
    first_past, first_width = None, None
    for name, shape in sorted(shapes.items()):
        m = family.expert.search(name)
        if m is None:
            continue
        if int(m.group(1)) >= config["n_routed_experts"] and first_past is None:
            first_past = f"{name}: expert {m.group(1)} lies past n_routed_experts={config['n_routed_experts']}"
        key = family.expert_rows[m.group(2)]
        if shape and shape[0] != config[key] and first_width is None:
            first_width = f"{name}: shape {list(shape)} has {shape[0]} rows, but config.json says {key}={config[key]}"
    problems += [p for p in (first_past, first_width) if p]
    for name in family.embed_head:
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


def table_for(config: dict) -> RuleTable:
    """The rule table of config.json's family; V4's for a config that names none (its refusal is the plan's)."""
    family = family_for(config)
    if family is None:
        from .v4 import V4

        family = V4
    return family.table
