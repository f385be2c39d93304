"""DeepSeek V3, R1, V3.1 (``DeepseekV3ForCausalLM``) and V3.2 (``DeepseekV32ForCausalLM``): Hugging Face names.

Names are the checkpoint's and, unchanged, vLLM's runtime names: ``model.layers.N.mlp.experts.E.gate_proj``,
``model.layers.N.self_attn.kv_a_proj_with_mqa``; FP8 linears carry an F32 ``weight_scale_inv`` (a multiplier
despite its name, :mod:`nvfp4kit.decode`). The MTP block is layer ``num_hidden_layers`` in the checkpoint and at
vLLM's runtime (vLLM's ``DeepSeekMTP`` builds it under the same prefix); besides a full MoE layer it holds
``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj`` (BF16) and ``shared_head.{norm,head}``.
V3.2 is V3 plus the sparse-attention indexer in every layer (``self_attn.indexer.*``).

Defaults (docs/families.md says why): routed experts NVFP4, as in NVIDIA's ``DeepSeek-R1-FP4`` / ``R1-0528-FP4``
(which quantize every MLP); dense and shared MLPs and attention stay FP8 (``--quantize`` can change that, fused
pairs together) -- the V4 defaults, and what keeps attention exact. What vLLM builds unquantized or reads directly
(vllm ``deepseek_v2.py``, ``deepseek_mtp.py``) is never NVFP4: the router and its bias, the indexer's ``wk`` and
``weights_proj`` (fused into ``wk_weights_proj`` with ``quant_config=None``; an FP8 ``wk`` is dequantized on
load), ``eh_proj`` (a plain ``nn.Linear``), norms, embeddings and heads.
"""

from __future__ import annotations

import dataclasses
import re

from ..rules import Rule, RuleTable
from . import Family

# ``model.layers.N.`` (trunk and MTP layer) or ``model.`` (embed_tokens, norm); lm_head has no prefix.
LAYER_PREFIX = r"^(?:model\.layers\.\d+\.|model\.)?"


def _rule(category: str, pattern: str, quantize: bool, must_keep: bool, why: str) -> Rule:
    return Rule(category, re.compile(LAYER_PREFIX + pattern + r"$"), quantize, must_keep, why)


# First match wins; patterns see module names (``model.layers.3.mlp.experts.5.gate_proj``).
RULES: tuple[Rule, ...] = (
    _rule("routed_expert", r"mlp\.experts\.\d+\.(gate|up|down)_proj", True, False,
          "routed experts: NVFP4 (W4A16 in vLLM), as in NVIDIA's R1/V3 NVFP4 releases"),
    _rule("shared_expert", r"mlp\.shared_experts\.(gate|up|down)_proj", False, False,
          "kept FP8 (NVIDIA's R1 release quantizes it: --quantize 'shared_experts')"),
    _rule("dense_mlp", r"mlp\.(gate|up|down)_proj", False, False,
          "dense layers (first_k_dense_replace) kept FP8 (--quantize 'mlp\\.(gate|up|down)_proj' for NVFP4)"),
    _rule("router", r"mlp\.gate(\.e_score_correction_bias)?", False, True,
          "vLLM builds the router unquantized (GateLinear) and reads the bias as float32"),
    _rule("attention", r"self_attn\.(q_a_proj|kv_a_proj_with_mqa|q_b_proj|q_proj|kv_b_proj|o_proj)", False, False,
          "kept FP8 (NVIDIA's release dequantizes attention to BF16; FP8 keeps it exact)"),
    _rule("mtp_proj", r"eh_proj", False, True, "vLLM builds eh_proj as a plain nn.Linear: BF16 only"),
    _rule("norm", r"(self_attn\.|shared_head\.)?\w*norm", False, True, "norms are unquantized"),
    _rule("embedding", r"embed_tokens", False, True, "vLLM builds the embedding unquantized"),
    _rule("head", r"(lm_head|shared_head\.head)", False, True, "the LM heads stay BF16 (lm_head is in 'ignore')"),
)
INDEXER_RULES: tuple[Rule, ...] = (
    _rule("indexer", r"self_attn\.indexer\.(wk|weights_proj)", False, True,
          "vLLM fuses wk + weights_proj into wk_weights_proj built unquantized (it dequantizes an FP8 wk on load)"),
    _rule("indexer", r"self_attn\.indexer\.wq_b", False, False, "kept FP8 with the other attention projections"),
    _rule("norm", r"self_attn\.indexer\.k_norm(\.bias)?", False, True, "the indexer's LayerNorm is float32"),
)
UNKNOWN = Rule("other", re.compile(".*"), False, True, "not a known V3 tensor: refused (unknown_tensor_problems)")

TABLE = RuleTable(
    family="DeepSeek V3",
    rules=RULES,
    unknown=UNKNOWN,
    # vLLM's stacked_params_mapping: gate_up_proj = [gate_proj, up_proj] (dense, shared, and each routed expert's
    # w13), fused_qkv_a_proj = [q_a_proj, kv_a_proj_with_mqa]. The indexer's wk_weights_proj is fused too, but
    # unquantized: both members are must-keep (wk FP8, weights_proj BF16), so it needs no shared action here.
    fused_groups=(
        (re.compile(r"^(.*\.mlp(?:\.experts\.\d+|\.shared_experts)?)\.(gate|up)_proj$"), "gate_up_proj"),
        (re.compile(r"^(.*\.self_attn)\.(q_a_proj|kv_a_proj_with_mqa)$"), "fused_qkv_a_proj"),
    ),
    down=re.compile(r"^(.*\.mlp(?:\.experts\.\d+|\.shared_experts)?)\.down_proj$"),
    down_tag="gate_up_proj",
    collapse=((re.compile(r"^model\.layers\.\d+\."), "model.layers.{L}."),
              (re.compile(r"\.experts\.\d+\."), ".experts.{E}.")),
)
V32_TABLE = dataclasses.replace(TABLE, family="DeepSeek V3.2", rules=INDEXER_RULES + RULES,
                                unknown=dataclasses.replace(UNKNOWN, why="not a known V3.2 tensor: refused"))

V3 = Family(
    name="deepseek_v3",
    title="DeepSeek V3",
    architectures=("DeepseekV3ForCausalLM",),
    model_types=("deepseek_v3",),
    table=TABLE,
    signature=re.compile(r"^model\.layers\.\d+\."),
    layer=re.compile(r"^model\.layers\.(\d+)\."),
    mtp=None,  # layer num_hidden_layers + K
    expert=re.compile(r"\.experts\.(\d+)\.(gate|up|down)_proj\.weight$"),
    expert_rows={"gate": "moe_intermediate_size", "up": "moe_intermediate_size", "down": "hidden_size"},
    embed_head=("model.embed_tokens.weight", "lm_head.weight"),
    config_keys=("num_hidden_layers", "hidden_size", "n_routed_experts", "moe_intermediate_size", "vocab_size",
                 "intermediate_size", "first_k_dense_replace", "kv_lora_rank", "qk_rope_head_dim"),
    vllm_model="vllm.model_executor.models.deepseek_v2:DeepseekV3ForCausalLM",
    vllm_mtp_model="vllm.model_executor.models.deepseek_mtp:DeepSeekMTP",
    # (``nvidia`` is V4's release layout, read by vLLM's DeepseekV4FP8Config only; SGLang: not wired for V3 here)
    formats=("compressed-tensors", "modelopt"),
    engines=("vllm",),
    hf_decoder_layer="DeepseekV3DecoderLayer",
    hf_norm="DeepseekV3RMSNorm",
    hf_renames=None,  # Hugging Face names already: transformers only stacks the experts, which Path B undoes
)
V32 = dataclasses.replace(
    V3,
    name="deepseek_v32",
    title="DeepSeek V3.2",
    architectures=("DeepseekV32ForCausalLM",),
    model_types=("deepseek_v32",),
    table=V32_TABLE,
    signature=re.compile(r"^model\.layers\.\d+\.self_attn\.indexer\."),
    config_keys=V3.config_keys + ("index_n_heads", "index_head_dim", "index_topk"),
    vllm_model="vllm.models.deepseek_v32.nvidia.model:DeepseekV32ForCausalLM",
    vllm_mtp_model="vllm.models.deepseek_v32.nvidia.mtp:DeepseekV32MTP",
    hf_decoder_layer="DeepseekV32DecoderLayer",
    hf_norm="DeepseekV32RMSNorm",
)
