"""DeepSeek V4 (Pro, Flash; the FP8 repack and the original MXFP4 releases): DeepSeek's own tensor names.

The rule table is :data:`nvfp4kit.rules.V4_TABLE` (``layers.N.attn.wq_a``, ``mtp.0.ffn.experts.E.w1``); the MTP
block is ``mtp.K.`` in the checkpoint and ``model.layers.{num_hidden_layers + K}`` at vLLM's runtime
(:func:`nvfp4kit.layouts.runtime_module`).
"""

from __future__ import annotations

import re

from ..rules import V4_TABLE
from . import Family

V4 = Family(
    name="deepseek_v4",
    title="DeepSeek V4",
    architectures=("DeepseekV4ForCausalLM",),
    model_types=("deepseek_v4",),
    table=V4_TABLE,
    signature=re.compile(r"^layers\.\d+\."),
    layer=re.compile(r"^layers\.(\d+)\."),
    mtp=re.compile(r"^mtp\.(\d+)\."),
    expert=re.compile(r"\.experts\.(\d+)\.w([123])\.weight$"),
    expert_rows={"1": "moe_intermediate_size", "3": "moe_intermediate_size", "2": "hidden_size"},
    embed_head=("embed.weight", "head.weight"),
    config_keys=("num_hidden_layers", "hidden_size", "n_routed_experts", "moe_intermediate_size", "vocab_size"),
    vllm_model="vllm.models.deepseek_v4.nvidia.model:DeepseekV4ForCausalLM",
    vllm_mtp_model="vllm.models.deepseek_v4.nvidia.mtp:DeepSeekV4MTP",
    formats=("compressed-tensors", "modelopt", "nvidia"),
    engines=("vllm", "sglang"),
    hf_decoder_layer="DeepseekV4DecoderLayer",
    hf_norm="DeepseekV4RMSNorm",
    hf_renames="deepseek_v4",
)
