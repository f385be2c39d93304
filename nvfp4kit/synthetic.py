"""A synthetic DeepSeek V4 Pro FP8 checkpoint in the sgl-project repack layout (docs/v4-layout.md).

Every tensor carries DeepSeek's native name, dtype and shape formula; only the dimensions shrink (``tiny``) or the
layer and expert counts (``pro-layers``, real V4 Pro widths). The weights look trained rather than uniform:
Student-t values, log-normal per-output-row scales and a few large outliers. Routed experts are made the way the
repack made them: MXFP4 (E2M1 values x a power-of-two scale per 1x32 block) cast losslessly to FP8 E4M3 with one
UE8M0 scale per 128x128 tile, so the dequantized FP8 equals the MXFP4 values exactly.

Shards follow the original: embed in shard 1, layer N in shard N+2, head/norm/hc_head in the second-to-last,
``mtp.0`` in the last, plus two placements made on purpose (an expert whose w1 and w3 sit in different shards, and
an FP8 weight whose ``.scale`` sits in another shard than the weight) so readers cannot assume locality.

Every tensor is drawn from its own ``torch.Generator`` seeded by (seed, name): the bytes depend on the seed only,
not on generation order.

``--form mxfp4`` writes the same model as DeepSeek's original release stores it: routed experts (trunk and MTP) as
MXFP4, an I8 weight [out, in/2] (two E2M1 codes per byte) with an F8_E8M0 ``.scale`` [out, in/32], everything else
as in the FP8 form. Same seed, same values: both forms decode to the same float32 numbers, tensor for tensor, and
the FP8 form's bytes do not depend on the option.

    python -m nvfp4kit.synthetic --dst DIR --preset tiny --seed 0
    python -m nvfp4kit.synthetic --dst DIR --preset tiny --seed 0 --form mxfp4
    python -m nvfp4kit.synthetic --dst DIR --preset pro-layers --layers 2 --experts 8

``--preset v3-tiny`` / ``v32-tiny`` write DeepSeek V3 (R1, V3.1) / V3.2 instead (deepseek-family.md §3): Hugging
Face names (``model.layers.N.mlp.experts.E.gate_proj``), FP8 linears with F32 ``weight_scale_inv`` multipliers
(block amax / 448, not powers of two; the experts are trained-like FP8, not MXFP4-origin), dense first layers
(``first_k_dense_replace``), the MTP block as layer ``num_hidden_layers`` with BF16 ``eh_proj``, the V3.2 indexer
with F32 LayerNorm (and F32 norms), ``kv_a_proj_with_mqa`` of 576 rows (a partial 128-block), and one routed
expert's gate and up projections in different shards.

    python -m nvfp4kit.synthetic --dst DIR --preset v3-tiny     # or --family v3; v32-tiny / --family v32
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .checkpoint import INDEX_NAME
from .fp8 import quantize_fp8_blocks
from .mxfp4 import quantize_mxfp4
from .safetensors_io import TensorSpec, encode_header, save_file

BLOCK = 128  # FP8 weight_block_size of the source format
MX_BLOCK = 32  # MXFP4 block length along the input dimension
MAX_TILE_EXPONENT_SPAN = 11  # binades a 128x128 tile may span for the MXFP4 -> FP8 cast to be exact (TK's assert)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Real V4 Pro architecture (layout doc §1.1). Both presets share every field; presets override dimensions.
PRO_CONFIG: dict = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1536,
    "o_groups": 16,
    "o_lora_rank": 1024,
    "vocab_size": 129280,
    "moe_intermediate_size": 3072,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "swiglu_limit": 10.0,
    "num_hash_layers": 3,
    "num_nextn_predict_layers": 1,
    "sliding_window": 128,
    "compress_rope_theta": 160000,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 1024,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "max_position_embeddings": 1048576,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "use_cache": True,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    # The repack keeps the original's dict and drops expert_dtype (layout doc §1.2).
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [BLOCK, BLOCK],
    },
}

# Dimension overrides per preset. ``tiny`` keeps what vLLM requires (vllm-v4-contract.md §10): q_lora_rank and
# moe_intermediate_size multiples of 128, compressor head_dim 512, index_head_dim 128. Its hidden_size 448 is not a
# multiple of 128 on purpose: it gives partial FP8 edge blocks (448 = 3x128 + 64), stays a multiple of 32 (MXFP4
# blocks) and of 16 (NVFP4 groups).
PRESETS: dict[str, dict] = {
    "tiny": {
        "hidden_size": 448,
        "num_hidden_layers": 5,  # ratios [128, 128, 4, 128, 4]: HCA+hash, CSA+hash, HCA+bias, CSA+bias
        "num_attention_heads": 4,
        "q_lora_rank": 256,
        "o_groups": 2,
        "o_lora_rank": 128,
        "vocab_size": 1024,
        "moe_intermediate_size": 128,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "index_n_heads": 8,
        "index_topk": 16,
        "max_position_embeddings": 4096,
        "rope_scaling": {
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 256,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    },
    # Real V4 Pro widths; only the layer and expert counts shrink (GB-sized shards, like the repack's).
    "pro-layers": {"num_hidden_layers": 2, "n_routed_experts": 8},
    # V4 Flash's structure at tiny widths (deepseek-family.md §1): layers 0-1 have no compressor (ratio 0), then
    # CSA/HCA alternate from layer 2; its config names expert_dtype "fp4" (the FP8 repack drops it) and a
    # routed_scaling_factor of 1.5. Flash's widths (hidden 4096, q_lora 1024, 64 heads, 8 output groups) are
    # multiples of 128, so this one's are too.
    "flash-tiny": {
        "hidden_size": 512,
        "num_hidden_layers": 5,  # ratios [0, 0, 4, 128, 4]: SWA+hash, SWA+hash, CSA+hash, HCA+bias, CSA+bias
        "num_attention_heads": 4,
        "q_lora_rank": 256,
        "o_groups": 2,
        "o_lora_rank": 128,
        "vocab_size": 1024,
        "moe_intermediate_size": 128,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "routed_scaling_factor": 1.5,
        "index_n_heads": 8,
        "index_topk": 16,
        "max_position_embeddings": 4096,
        "expert_dtype": "fp4",
        "rope_scaling": {
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 256,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    },
}
# DeepSeek V3's config.json (deepseek-ai/DeepSeek-V3; R1 and V3.1 share the architecture). V3.2 adds the indexer.
V3_CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 129280,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "ep_size": 1,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 163840,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "use_cache": True,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [BLOCK, BLOCK]},
}
V32_FIELDS: dict = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
    # V3.1/V3.2 name ue8m0 scales, yet the scales on disk stay F32 weight_scale_inv (deepseek-family.md §3).
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [BLOCK, BLOCK]},
}
# Tiny V3 widths: hidden 512 (a multiple of 128: vLLM derives the indexer wk's block from the shapes), real MLA
# ranks (kv_lora 512 + rope 64 = 576 rows for kv_a_proj_with_mqa: 4.5 blocks), layer 0 dense, layers 1-2 MoE.
V3_TINY: dict = {
    "hidden_size": 512,
    "intermediate_size": 384,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": 256,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}
V3_PRESETS: dict[str, dict] = {"v3-tiny": V3_TINY, "v32-tiny": {**V32_FIELDS, **V3_TINY, "index_topk": 16}}
FAMILY_PRESETS = {"v4": "tiny", "v3": "v3-tiny", "v32": "v32-tiny"}  # --family: the tiny preset of each family
FIRST_LAYERS_RATIO = {"flash-tiny": 0}  # compress ratio of layers 0-1 where it is not Pro's 128
SCALE_DTYPES = {"ue8m0": torch.float8_e8m0fnu, "f32": torch.float32}
FORMS = ("fp8", "mxfp4")  # how routed experts are stored: the FP8 repack, or DeepSeek's original release
SHARDS_IN_FLIGHT = 4  # shards drawn ahead of the one being written (bounds memory with --jobs)


def model_config(preset: str = "tiny", **overrides) -> dict:
    """config.json of a preset: the real V4 Pro fields with the preset's and the caller's overrides."""
    if preset in V3_PRESETS:
        cfg = json.loads(json.dumps(V3_CONFIG))  # deep copy
        cfg.update(json.loads(json.dumps(V3_PRESETS[preset])))
        cfg.update(overrides)
        cfg["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], cfg["n_routed_experts"])
        if cfg["n_routed_experts"] % cfg["n_group"]:  # vLLM's grouped top-k needs whole groups
            cfg.update(n_group=1, topk_group=1)
        return cfg
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS) + sorted(V3_PRESETS)}")
    cfg = json.loads(json.dumps(PRO_CONFIG))  # deep copy
    cfg.update(PRESETS[preset])
    cfg.update(overrides)
    cfg["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], cfg["n_routed_experts"])
    cfg["compress_ratios"] = compress_ratios(cfg["num_hidden_layers"], FIRST_LAYERS_RATIO.get(preset, 128))
    return cfg


def compress_ratios(num_layers: int, first: int = 128) -> list[int]:
    """The real pattern: layers 0-1 ratio ``first`` (Pro 128, Flash 0: no compressor), then even layers 4 and odd
    layers 128; a final 0 for the MTP block."""
    return [first if i < 2 else 128 if i % 2 else 4 for i in range(num_layers)] + [0]


# --------------------------------------------------------------------------------------------------------------
# What to write: one Recipe per tensor, or per FP8 weight+scale pair (they come from one computation).


@dataclass(frozen=True)
class Recipe:
    name: str  # tensor name; for the FP8 kinds the module name, which writes ``.weight`` and ``.scale``
    kind: str  # a key of MAKERS
    shape: tuple[int, ...]
    mean: float = 0.0  # for "f32"
    std: float = 1.0  # for "f32"
    experts: int = 0  # for "tid2eid": ids are drawn from range(experts)

    def tensor_names(self) -> list[str]:
        if self.kind in ("fp8", "expert"):
            return [self.name + ".weight", self.name + ".scale"]
        if self.kind == "fp8_inv":
            return [self.name + ".weight", self.name + ".weight_scale_inv"]
        return [self.name]


def layer_recipes(cfg: dict, prefix: str, ratio: int, hash_routed: bool) -> list[Recipe]:
    """A decoder layer's tensors (layout doc §2.2) under ``prefix`` (``layers.N.`` or ``mtp.0.``).

    ``ratio`` is the layer's compress ratio: 0 means no compressor (the MTP block), 4 adds the indexer.
    """
    H, Q, D = cfg["hidden_size"], cfg["q_lora_rank"], cfg["head_dim"]
    nH, G, R = cfg["num_attention_heads"], cfg["o_groups"], cfg["o_lora_rank"]
    I, E, hc = cfg["moe_intermediate_size"], cfg["n_routed_experts"], cfg["hc_mult"]
    iH, iD = cfg["index_n_heads"], cfg["index_head_dim"]
    p = prefix
    out = []
    for site in ("attn", "ffn"):
        out += [
            Recipe(f"{p}hc_{site}_fn", "f32", ((2 + hc) * hc, hc * H), std=0.02),
            Recipe(f"{p}hc_{site}_base", "f32", ((2 + hc) * hc,), std=0.1),
            Recipe(f"{p}hc_{site}_scale", "f32", (3,), mean=1.0, std=0.1),
        ]
    out += [
        Recipe(f"{p}attn_norm.weight", "norm", (H,)),
        Recipe(f"{p}ffn_norm.weight", "norm", (H,)),
        Recipe(f"{p}attn.attn_sink", "f32", (nH,), std=1.0),
        Recipe(f"{p}attn.q_norm.weight", "norm", (Q,)),
        Recipe(f"{p}attn.kv_norm.weight", "norm", (D,)),
        Recipe(f"{p}attn.wq_a", "fp8", (Q, H)),
        Recipe(f"{p}attn.wq_b", "fp8", (nH * D, Q)),
        Recipe(f"{p}attn.wkv", "fp8", (D, H)),
        Recipe(f"{p}attn.wo_a", "fp8", (G * R, nH * D // G)),
        Recipe(f"{p}attn.wo_b", "fp8", (H, G * R)),
    ]
    if ratio:
        c = 2 if ratio == 4 else 1  # ratio-4 compressors use overlapping windows of two
        out += compressor_recipes(f"{p}attn.compressor.", ratio, c * D, D, H)
    if ratio == 4:
        out += [
            Recipe(f"{p}attn.indexer.wq_b", "fp8", (iH * iD, Q)),
            Recipe(f"{p}attn.indexer.weights_proj.weight", "bf16", (iH, H)),
        ]
        out += compressor_recipes(f"{p}attn.indexer.compressor.", ratio, 2 * iD, iD, H)
    out.append(Recipe(f"{p}ffn.gate.weight", "bf16", (E, H)))
    if hash_routed:
        out.append(Recipe(f"{p}ffn.gate.tid2eid", "tid2eid", (cfg["vocab_size"], cfg["num_experts_per_tok"]), experts=E))
    else:
        out.append(Recipe(f"{p}ffn.gate.bias", "f32", (E,), std=0.01))
    shared = I * cfg["n_shared_experts"]
    out += [
        Recipe(f"{p}ffn.shared_experts.w1", "fp8", (shared, H)),
        Recipe(f"{p}ffn.shared_experts.w2", "fp8", (H, shared)),
        Recipe(f"{p}ffn.shared_experts.w3", "fp8", (shared, H)),
    ]
    for e in range(E):
        out += [
            Recipe(f"{p}ffn.experts.{e}.w1", "expert", (I, H)),
            Recipe(f"{p}ffn.experts.{e}.w2", "expert", (H, I)),
            Recipe(f"{p}ffn.experts.{e}.w3", "expert", (I, H)),
        ]
    return out


def compressor_recipes(p: str, ratio: int, width: int, head_dim: int, hidden: int) -> list[Recipe]:
    return [
        Recipe(f"{p}ape", "f32", (ratio, width), std=0.02),
        Recipe(f"{p}wkv.weight", "bf16", (width, hidden)),
        Recipe(f"{p}wgate.weight", "bf16", (width, hidden)),
        Recipe(f"{p}norm.weight", "norm", (head_dim,)),
    ]


def head_recipes(cfg: dict, p: str) -> list[Recipe]:
    """The mHC head collapse: top level (``p=""``) and the MTP block's own."""
    hc, H = cfg["hc_mult"], cfg["hidden_size"]
    return [
        Recipe(f"{p}hc_head_fn", "f32", (hc, hc * H), std=0.02),
        Recipe(f"{p}hc_head_base", "f32", (hc,), std=0.1),
        Recipe(f"{p}hc_head_scale", "f32", (1,), mean=1.0, std=0.1),
    ]


def is_v3(cfg: dict) -> bool:
    return cfg.get("model_type") in ("deepseek_v3", "deepseek_v32")


def v3_layer_recipes(cfg: dict, n: int) -> list[Recipe]:
    """A V3 / V3.2 decoder layer ``model.layers.n.`` (HF names; dense below ``first_k_dense_replace``)."""
    H, Q, KV = cfg["hidden_size"], cfg["q_lora_rank"], cfg["kv_lora_rank"]
    nH, nope, rope, vd = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    norm = "norm32" if cfg["model_type"] == "deepseek_v32" else "norm"  # V3.2 stores its norms as F32
    p, a = f"model.layers.{n}.", f"model.layers.{n}.self_attn."
    out = [
        Recipe(f"{p}input_layernorm.weight", norm, (H,)),
        Recipe(f"{p}post_attention_layernorm.weight", norm, (H,)),
        Recipe(f"{a}q_a_proj", "fp8_inv", (Q, H)),
        Recipe(f"{a}q_a_layernorm.weight", norm, (Q,)),
        Recipe(f"{a}q_b_proj", "fp8_inv", (nH * (nope + rope), Q)),
        Recipe(f"{a}kv_a_proj_with_mqa", "fp8_inv", (KV + rope, H)),
        Recipe(f"{a}kv_a_layernorm.weight", norm, (KV,)),
        Recipe(f"{a}kv_b_proj", "fp8_inv", (nH * (nope + vd), KV)),
        Recipe(f"{a}o_proj", "fp8_inv", (H, nH * vd)),
    ]
    if "index_n_heads" in cfg:
        iH, iD = cfg["index_n_heads"], cfg["index_head_dim"]
        out += [
            Recipe(f"{a}indexer.wq_b", "fp8_inv", (iH * iD, Q)),
            Recipe(f"{a}indexer.wk", "fp8_inv", (iD, H)),
            Recipe(f"{a}indexer.weights_proj.weight", "bf16", (iH, H)),
            Recipe(f"{a}indexer.k_norm.weight", "f32", (iD,), mean=1.0, std=0.1),
            Recipe(f"{a}indexer.k_norm.bias", "f32", (iD,), std=0.02),
        ]
    m = f"{p}mlp."
    if n < cfg["first_k_dense_replace"]:
        I = cfg["intermediate_size"]
        return out + [Recipe(f"{m}gate_proj", "fp8_inv", (I, H)), Recipe(f"{m}up_proj", "fp8_inv", (I, H)),
                      Recipe(f"{m}down_proj", "fp8_inv", (H, I))]
    I, E, S = cfg["moe_intermediate_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
    out += [Recipe(f"{m}gate.weight", "bf16", (E, H)), Recipe(f"{m}gate.e_score_correction_bias", "f32", (E,), std=0.01),
            Recipe(f"{m}shared_experts.gate_proj", "fp8_inv", (S, H)), Recipe(f"{m}shared_experts.up_proj", "fp8_inv", (S, H)),
            Recipe(f"{m}shared_experts.down_proj", "fp8_inv", (H, S))]
    for e in range(E):
        out += [Recipe(f"{m}experts.{e}.gate_proj", "fp8_inv", (I, H)), Recipe(f"{m}experts.{e}.up_proj", "fp8_inv", (I, H)),
                Recipe(f"{m}experts.{e}.down_proj", "fp8_inv", (H, I))]
    return out


def v3_checkpoint_recipes(cfg: dict) -> list[Recipe]:
    """Every tensor of a V3 / V3.2 checkpoint: embedding, layers, norm and head, then the MTP layer."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    norm = "norm32" if cfg["model_type"] == "deepseek_v32" else "norm"
    out = [Recipe("model.embed_tokens.weight", "bf16", (V, H))]
    for n in range(L):
        out += v3_layer_recipes(cfg, n)
    out += [Recipe("model.norm.weight", norm, (H,)), Recipe("lm_head.weight", "bf16", (V, H))]
    for k in range(cfg["num_nextn_predict_layers"]):
        p = f"model.layers.{L + k}."
        out += [Recipe(f"{p}embed_tokens.weight", "bf16", (V, H)), Recipe(f"{p}enorm.weight", norm, (H,)),
                Recipe(f"{p}hnorm.weight", norm, (H,)), Recipe(f"{p}eh_proj.weight", "bf16", (H, 2 * H)),
                Recipe(f"{p}shared_head.norm.weight", norm, (H,)), Recipe(f"{p}shared_head.head.weight", "bf16", (V, H))]
        out += v3_layer_recipes(cfg, L + k)
    return out


def checkpoint_recipes(cfg: dict) -> list[Recipe]:
    """Every tensor of the checkpoint, in file order."""
    if is_v3(cfg):
        return v3_checkpoint_recipes(cfg)
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    ratios = cfg["compress_ratios"]
    out = [Recipe("embed.weight", "bf16", (V, H))]
    for n in range(L):
        out += layer_recipes(cfg, f"layers.{n}.", ratios[n], hash_routed=n < cfg["num_hash_layers"])
    out += [Recipe("head.weight", "bf16", (V, H)), Recipe("norm.weight", "norm", (H,))]
    out += head_recipes(cfg, "")
    mtp = "mtp.0."
    out += [
        Recipe(f"{mtp}e_proj", "fp8", (H, H)),
        Recipe(f"{mtp}h_proj", "fp8", (H, H)),
        Recipe(f"{mtp}enorm.weight", "norm", (H,)),
        Recipe(f"{mtp}hnorm.weight", "norm", (H,)),
        Recipe(f"{mtp}norm.weight", "norm", (H,)),
    ]
    out += head_recipes(cfg, mtp)
    out += layer_recipes(cfg, mtp, ratio=0, hash_routed=False)
    return out


# --------------------------------------------------------------------------------------------------------------
# Where each tensor goes.


def shard_count(cfg: dict) -> int:
    return cfg["num_hidden_layers"] + 3  # embed, one per layer, head/norm, mtp


def shard_file(number: int, total: int, cfg: dict | None = None) -> str:
    if cfg is not None and is_v3(cfg):  # DeepSeek V3's own names: model-00001-of-000163.safetensors
        return f"model-{number:05d}-of-{total:06d}.safetensors"
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def deliberate_misplacements(cfg: dict) -> dict[str, int]:
    """Tensors put away from their layer's shard on purpose, by shard number.

    * the last routed expert of layer 0 has its w3 (weight and scale) in the next shard (layer 1's): w1 and w3
      of one expert in different files, as where a size-based shard boundary cuts through a layer;
    * ``layers.1.attn.wo_b.scale`` sits in layer 0's shard while its weight stays in layer 1's.
    """
    last = cfg["n_routed_experts"] - 1
    if is_v3(cfg):  # the first MoE layer's last expert: up_proj in the next layer's shard; a scale apart
        k = cfg["first_k_dense_replace"]
        moved = {f"model.layers.{k}.mlp.experts.{last}.up_proj.{s}": k + 3 for s in ("weight", "weight_scale_inv")}
        moved["model.layers.0.self_attn.o_proj.weight_scale_inv"] = 3
        return moved
    moved = {f"layers.0.ffn.experts.{last}.w3.{suffix}": 3 for suffix in ("weight", "scale")}
    if cfg["num_hidden_layers"] > 1:
        moved["layers.1.attn.wo_b.scale"] = 2
    return moved


def shard_number(name: str, cfg: dict) -> int:
    """1-based shard of a tensor (the original's placement, layout doc §3)."""
    moved = deliberate_misplacements(cfg)
    if name in moved:
        return moved[name]
    total = shard_count(cfg)
    if is_v3(cfg):
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            return total if layer >= cfg["num_hidden_layers"] else layer + 2
        return 1 if name.startswith("model.embed_tokens.") else total - 1  # model.norm, lm_head
    if name.startswith("embed."):
        return 1
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 2
    if name.startswith("mtp."):
        return total
    return total - 1  # head, norm, hc_head_*


# --------------------------------------------------------------------------------------------------------------
# How each tensor's values are drawn.


def generator_for(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def trained_like(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """float32 values with the statistics of a trained linear weight [out, in].

    Student-t (4 degrees of freedom) entries, each output row scaled by a log-normal factor (channels differ in
    magnitude by a few binades), a handful of entries blown up 10-30x (outliers), overall std ~ in**-0.5.
    """
    out_dim, in_dim = shape
    df = 4
    z = torch.randn(out_dim, in_dim, generator=gen)
    # chi-square with 4 degrees of freedom = -2 ln(U1 U2): two uniforms instead of four squared normals
    chi2 = torch.rand(out_dim, in_dim, generator=gen).mul_(torch.rand(out_dim, in_dim, generator=gen))
    z.mul_(chi2.clamp_(min=1e-30).log_().mul_(-2.0 / df).rsqrt_())
    del chi2
    row_scale = torch.exp(0.5 * torch.randn(out_dim, 1, generator=gen))
    z.mul_(row_scale * (in_dim**-0.5) / math.sqrt(df / (df - 2)))
    flat = z.view(-1)
    n_outliers = max(1, flat.numel() // 100_000)
    where = torch.randint(0, flat.numel(), (n_outliers,), generator=gen)
    flat[where] *= 10 + 20 * torch.rand(n_outliers, generator=gen)
    return z


def row_chunks(shape: tuple[int, int], gen: torch.Generator) -> Iterator[tuple[int, torch.Tensor]]:
    """``trained_like`` values of ``shape`` drawn a few million elements at a time, as (first row, float32 chunk).

    Chunks are whole 128-row FP8 block rows, so quantizing chunk by chunk equals quantizing the whole; memory stays
    bounded for the 129280 x 7168 embedding of the ``pro-layers`` preset.
    """
    out_dim, in_dim = shape
    step = max(BLOCK, (16 * 2**20 // max(1, in_dim)) // BLOCK * BLOCK)
    for row in range(0, out_dim, step):
        yield row, trained_like((min(step, out_dim - row), in_dim), gen)


def make_bf16(r: Recipe, gen: torch.Generator, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = torch.empty(r.shape, dtype=torch.bfloat16)
    for row, chunk in row_chunks(r.shape, gen):
        out[row : row + len(chunk)] = chunk
    return {r.name: out}


def make_fp8(r: Recipe, gen: torch.Generator, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A dense FP8 weight with its UE8M0 block scale (as DeepSeek's ``scale_fmt: ue8m0``).

    The F32 variant stores the same power-of-two values as float32 (layout doc §5.2), so both share the weight bytes.
    """
    weight = torch.empty(r.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(math.ceil(r.shape[0] / BLOCK), math.ceil(r.shape[1] / BLOCK), dtype=torch.float8_e8m0fnu)
    for row, chunk in row_chunks(r.shape, gen):
        w, s = quantize_fp8_blocks(chunk, (BLOCK, BLOCK), torch.float8_e8m0fnu)
        weight[row : row + len(w)] = w
        scale[row // BLOCK : row // BLOCK + len(s)] = s
    return {r.name + ".weight": weight, r.name + ".scale": scale.to(scale_dtype)}


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (ties away from zero), sign kept; |x| is clamped to 6 as MXFP4 encoders do."""
    grid = torch.tensor(E2M1_VALUES)
    midpoints = (grid[1:] + grid[:-1]) / 2
    idx = torch.bucketize(x.abs().clamp(max=6.0), midpoints, right=True)
    return grid[idx] * torch.sign(x)


def mxfp4_expert(shape: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An MXFP4 expert weight: (E2M1 values [out, in], power-of-two exponent per 1x32 block [out, in/32]).

    Block exponents follow OCP MX (floor(log2(amax)) - 2, the E2M1 max exponent), and within each 128x128 tile
    are raised to at least (tile max - MAX_TILE_EXPONENT_SPAN), the condition for an exact FP8 cast.
    """
    out_dim, in_dim = shape
    assert in_dim % MX_BLOCK == 0, f"MXFP4 needs the input dim to be a multiple of {MX_BLOCK}, got {in_dim}"
    x = trained_like(shape, gen).view(out_dim, in_dim // MX_BLOCK, MX_BLOCK)
    amax = x.abs().amax(dim=-1)
    exponent = torch.floor(torch.log2(amax.clamp(min=2.0**-100))) - 2
    tile_max = tile_reduce_max(exponent, (BLOCK, BLOCK // MX_BLOCK))
    exponent = torch.maximum(exponent, expand_tiles(tile_max, exponent.shape) - MAX_TILE_EXPONENT_SPAN)
    codes = round_to_e2m1(x / torch.exp2(exponent).unsqueeze(-1))
    return codes.view(out_dim, in_dim), exponent


def tile_reduce_max(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Max of ``x`` [M, N] over (tm, tn) tiles, partial edge tiles included -> [ceil(M/tm), ceil(N/tn)]."""
    M, N = x.shape
    tm, tn = tile
    padded = torch.full((math.ceil(M / tm) * tm, math.ceil(N / tn) * tn), -math.inf)
    padded[:M, :N] = x
    return padded.view(padded.shape[0] // tm, tm, padded.shape[1] // tn, tn).amax(dim=(1, 3))


def expand_tiles(per_tile: torch.Tensor, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Broadcast a per-128x128-tile value onto a per-1x32-block grid of ``shape``."""
    tn = BLOCK // MX_BLOCK
    return per_tile.repeat_interleave(BLOCK, 0)[: shape[0]].repeat_interleave(tn, 1)[:, : shape[1]]


def make_expert(r: Recipe, gen: torch.Generator, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The repack's lossless cast (layout doc §2.3): tile scale = largest block scale in the tile / 2^6, and each
    E2M1 value times its block's power-of-two offset (at most 6 x 2^6 = 384 < 448) stored as E4M3."""
    codes, exponent = mxfp4_expert(r.shape, gen)
    tile_exponent = tile_reduce_max(exponent, (BLOCK, BLOCK // MX_BLOCK)) - 6
    offset = exponent - expand_tiles(tile_exponent, exponent.shape)
    fp8_values = codes * torch.exp2(offset).repeat_interleave(MX_BLOCK, dim=1)
    weight = fp8_values.to(torch.float8_e4m3fn)
    return {r.name + ".weight": weight, r.name + ".scale": torch.exp2(tile_exponent).to(scale_dtype)}


def make_mxfp4_expert(r: Recipe, gen: torch.Generator, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The original release's storage of the same expert (same draws as :func:`make_expert`): I8 codes + E8M0 1x32
    scales. ``scale_dtype`` concerns the FP8 linears only: an MXFP4 scale is E8M0 by its format."""
    codes, exponent = mxfp4_expert(r.shape, gen)
    weight, scale = quantize_mxfp4(codes * torch.exp2(exponent).repeat_interleave(MX_BLOCK, dim=1), exponent, r.name)
    return {r.name + ".weight": weight, r.name + ".scale": scale}


def make_fp8_inv(r: Recipe, gen: torch.Generator, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A V3 FP8 weight with its F32 ``weight_scale_inv``: block amax / 448 (a multiplier, not a power of two)."""
    weight = torch.empty(r.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(math.ceil(r.shape[0] / BLOCK), math.ceil(r.shape[1] / BLOCK), dtype=torch.float32)
    for row, chunk in row_chunks(r.shape, gen):
        w, s = quantize_fp8_blocks(chunk, (BLOCK, BLOCK), torch.float32)
        weight[row : row + len(w)] = w
        scale[row // BLOCK : row // BLOCK + len(s)] = s
    return {r.name + ".weight": weight, r.name + ".weight_scale_inv": scale}


def make_norm32(r: Recipe, gen: torch.Generator, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """V3.2's norm gains: as :func:`make_norm`, stored as float32."""
    return {r.name: torch.exp(0.3 * torch.randn(r.shape, generator=gen))}


def make_f32(r: Recipe, gen: torch.Generator, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {r.name: r.mean + r.std * torch.randn(r.shape, generator=gen)}


def make_norm(r: Recipe, gen: torch.Generator, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """RMSNorm gains: positive, around 1 with a log-normal spread (trained norms are far from all-ones)."""
    return {r.name: torch.exp(0.3 * torch.randn(r.shape, generator=gen)).to(torch.bfloat16)}


def make_tid2eid(r: Recipe, gen: torch.Generator, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Hash-routing table [vocab, top-k]: distinct expert ids per token, int64 as on disk."""
    vocab, top_k = r.shape
    return {r.name: torch.rand(vocab, r.experts, generator=gen).argsort(dim=1)[:, :top_k].contiguous()}


MAKERS = {
    "bf16": make_bf16,
    "fp8": make_fp8,
    "fp8_inv": make_fp8_inv,
    "norm32": make_norm32,
    "expert": make_expert,
    "f32": make_f32,
    "norm": make_norm,
    "tid2eid": make_tid2eid,
}


EXPERT_MAKERS = {"fp8": make_expert, "mxfp4": make_mxfp4_expert}  # the only tensors whose storage the form changes


def materialize(r: Recipe, seed: int, scale_dtype: torch.dtype, form: str = "fp8") -> dict[str, torch.Tensor]:
    maker = EXPERT_MAKERS[form] if r.kind == "expert" else MAKERS[r.kind]
    return maker(r, generator_for(seed, r.name), scale_dtype)


# --------------------------------------------------------------------------------------------------------------
# Writing the folder.


def generate(dst: str, preset: str = "tiny", seed: int = 0, scale_dtype: str = "ue8m0", jobs: int = 1,
             form: str = "fp8", **overrides) -> None:
    """Write a synthetic V4 FP8 checkpoint folder to ``dst``.

    ``overrides`` replace config.json fields of the preset (e.g. ``num_hidden_layers=2, n_routed_experts=16``);
    ``scale_dtype`` is ``"ue8m0"`` (as the repack) or ``"f32"`` (same values, float32 ``.scale`` tensors).
    ``jobs`` tensors are drawn at a time (threads: torch's random draws run on one core each). The same arguments
    always give the same bytes, whatever ``jobs``: every tensor has its own generator. ``form``: ``"fp8"`` (the
    repack) or ``"mxfp4"`` (the original release: routed experts as MXFP4, the same values).
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {FORMS}")
    if preset in V3_PRESETS and form != "fp8":
        raise ValueError(f"--form {form}: DeepSeek V3 was released in FP8 only")
    cfg = model_config(preset, **overrides)
    if form == "fp8":
        cfg.pop("expert_dtype", None)  # the FP8 repack drops it (deepseek-v4-layout.md §1.2): its experts are FP8
    os.makedirs(dst, exist_ok=True)
    recipes = checkpoint_recipes(cfg)
    total = shard_count(cfg)
    by_shard: dict[int, list[str]] = {n: [] for n in range(1, total + 1)}
    for r in recipes:
        for name in r.tensor_names():
            by_shard[shard_number(name, cfg)].append(name)
    weight_map: dict[str, str] = {}
    total_size = 0

    def write_shard(number: int, drawn: list) -> None:
        nonlocal total_size
        wanted = set(by_shard[number])
        tensors = {n: t for made in drawn for n, t in made.result().items() if n in wanted}
        path = shard_file(number, total, cfg)
        save_file(tensors, os.path.join(dst, path))
        weight_map.update({n: path for n in tensors})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    # Shards are drawn a few at a time (a single large tensor such as the embedding runs on one thread while the
    # others draw the next shards), and written in order; at most SHARDS_IN_FLIGHT of them sit in memory.
    in_flight: deque[tuple[int, list]] = deque()
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for number, names in by_shard.items():
            # A recipe whose pair is split across shards is drawn once per shard: same seed, same values.
            needed = [r for r in recipes if set(names).intersection(r.tensor_names())]
            in_flight.append((number, [pool.submit(materialize, r, seed, SCALE_DTYPES[scale_dtype], form) for r in needed]))
            if len(in_flight) >= SHARDS_IN_FLIGHT:
                write_shard(*in_flight.popleft())
        while in_flight:
            write_shard(*in_flight.popleft())
    # Sorted by name, as transformers writes an index.
    write_json(dst, INDEX_NAME, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
    write_json(dst, "config.json", cfg)
    write_side_files(dst, cfg, form)


# Header dtype of each recipe kind's tensors (weight, then scale) -- what MAKERS draw, known without drawing.
_KIND_DTYPES = {"bf16": ("BF16",), "f32": ("F32",), "norm": ("BF16",), "norm32": ("F32",), "tid2eid": ("I64",)}
_SCALE_DTYPE_NAMES = {"ue8m0": "F8_E8M0", "f32": "F32"}


def recipe_specs(r: Recipe, scale_dtype: str = "ue8m0", form: str = "fp8") -> list[TensorSpec]:
    """Names, header dtypes and shapes of the tensors ``materialize(r, ...)`` writes, without drawing them."""
    if r.kind in _KIND_DTYPES:
        return [TensorSpec(r.name, _KIND_DTYPES[r.kind][0], r.shape)]
    rows, cols = r.shape
    if r.kind == "fp8_inv":
        return [TensorSpec(r.name + ".weight", "F8_E4M3", r.shape),
                TensorSpec(r.name + ".weight_scale_inv", "F32", (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)))]
    if r.kind == "expert" and form == "mxfp4":
        return [TensorSpec(r.name + ".weight", "I8", (rows, cols // 2)),
                TensorSpec(r.name + ".scale", "F8_E8M0", (rows, cols // MX_BLOCK))]
    # FP8 linears take --scale-dtype; the repack's expert scales are UE8M0 cast the same way (make_expert)
    return [TensorSpec(r.name + ".weight", "F8_E4M3", r.shape),
            TensorSpec(r.name + ".scale", _SCALE_DTYPE_NAMES[scale_dtype], (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)))]


def write_layout(dst: str, cfg: dict, form: str = "fp8", scale_dtype: str = "ue8m0") -> int:
    """The checkpoint's index, config and shard headers for real, its tensor data as sparse holes (``ftruncate``):
    the files have their full length but take no disk space. For header-only readers (inspect, the plan) at full
    V4 size: ``write_layout(d, model_config("pro-layers", num_hidden_layers=61, n_routed_experts=384), "mxfp4")``
    is DeepSeek's original V4 Pro layout (145,116 tensors, 64 shards). Returns the tensor data bytes."""
    os.makedirs(dst, exist_ok=True)
    total = shard_count(cfg)
    by_shard: dict[int, list[TensorSpec]] = {n: [] for n in range(1, total + 1)}
    for r in checkpoint_recipes(cfg):
        for spec in recipe_specs(r, scale_dtype, form):
            by_shard[shard_number(spec.name, cfg)].append(spec)
    weight_map: dict[str, str] = {}
    data = 0
    for number, specs in by_shard.items():
        path = shard_file(number, total, cfg)
        header = encode_header(specs)
        size = sum(s.nbytes for s in specs)
        with open(os.path.join(dst, path), "wb") as f:
            f.write(header)
            f.truncate(len(header) + size)
        weight_map.update({s.name: path for s in specs})
        data += size
    write_json(dst, INDEX_NAME, {"metadata": {"total_size": data}, "weight_map": dict(sorted(weight_map.items()))})
    write_json(dst, "config.json", cfg)
    return data


def write_json(dst: str, name: str, obj: object) -> None:
    path = os.path.join(dst, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_text(dst: str, name: str, text: str) -> None:
    path = os.path.join(dst, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def write_side_files(dst: str, cfg: dict, form: str = "fp8") -> None:
    """The non-tensor files of the real repository (layout doc §3), small stand-ins that a converter must copy."""
    write_json(dst, "generation_config.json", {
        "_from_model_config": True,
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "transformers_version": cfg["transformers_version"],
    })
    write_json(dst, "tokenizer.json", tokenizer_json())
    write_json(dst, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": cfg["max_position_embeddings"],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    })
    write_text(dst, "encoding/encoding_dsv4.py", ENCODING_STUB)
    write_text(dst, "inference/README.md", INFERENCE_README)
    write_text(dst, "inference/model.py", "# Placeholder for DeepSeek's reference model code (synthetic checkpoint).\n")
    write_json(dst, "inference/config.json", {
        "vocab_size": cfg["vocab_size"], "dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"],
        "n_routed_experts": cfg["n_routed_experts"], "moe_inter_dim": cfg["moe_intermediate_size"],
    })
    what = "FP8 checkpoint" if form == "fp8" else "checkpoint in the original release's form (MXFP4 routed experts)"
    model = {"deepseek_v3": "V3", "deepseek_v32": "V3.2"}.get(cfg.get("model_type"), "V4")
    write_text(dst, "README.md", f"Synthetic DeepSeek {model} {what} written by nvfp4kit.synthetic; random weights.\n")


BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def tokenizer_json() -> dict:
    """A valid ``tokenizers`` byte-level BPE: the two DeepSeek specials at ids 0/1, then the 256 byte symbols."""
    byte_symbols = bytes_to_unicode()
    vocab = {BOS: 0, EOS: 1}
    vocab.update({sym: 2 + i for i, sym in enumerate(byte_symbols)})
    special = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, tok in enumerate((BOS, EOS))]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }


def bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order (what ByteLevel pre-tokenization emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    symbols = []
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


ENCODING_STUB = '''"""Placeholder for DeepSeek's V4 prompt encoder (encoding/encoding_dsv4.py in the real repository)."""


def encode_messages(messages: list[dict]) -> str:
    return "".join(m.get("content", "") for m in messages)
'''

INFERENCE_README = """# inference/

Placeholder for DeepSeek's reference inference code (model.py, kernel.py, generate.py, convert.py, config.json).
Written by nvfp4kit.synthetic so that converters are tested on copying non-tensor folders verbatim.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dst", required=True, help="output folder")
    ap.add_argument("--preset", choices=sorted(PRESETS) + sorted(V3_PRESETS), help="default: tiny (or --family's)")
    ap.add_argument("--family", choices=sorted(FAMILY_PRESETS),
                    help="the model family at tiny widths: v4 (tiny), v3 (v3-tiny: V3, R1, V3.1), v32 (v32-tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="num_hidden_layers override")
    ap.add_argument("--experts", type=int, help="n_routed_experts override")
    ap.add_argument("--scale-dtype", default="ue8m0", choices=sorted(SCALE_DTYPES))
    ap.add_argument("--form", default="fp8", choices=FORMS,
                    help="routed experts as FP8 128x128 (the repack, default) or MXFP4 I8 + E8M0 1x32 (the original)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="tensors drawn at a time (default: cores)")
    args = ap.parse_args(argv)
    if args.family and args.preset and FAMILY_PRESETS[args.family] != args.preset:
        ap.error(f"--family {args.family} is --preset {FAMILY_PRESETS[args.family]}, not {args.preset}")
    preset = args.preset or FAMILY_PRESETS.get(args.family, "tiny")
    overrides = {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    if args.experts is not None:
        overrides["n_routed_experts"] = args.experts
    generate(args.dst, preset, args.seed, scale_dtype=args.scale_dtype, jobs=args.jobs, form=args.form,
             **overrides)


if __name__ == "__main__":
    main()
