"""Fidelity: the whole model run teacher-forced on text, with the source's weights and with the output's.

What it measures (:func:`measure_fidelity`), on N tokens of chat text rendered by the checkpoint's own tokenizer and
encoder (default: the text set shipped in ``nvfp4kit/data/fidelity.jsonl``; or any file in Path B's JSONL format):

* ``kld_mean`` / ``kld_max``: KL(source || output) of the next-token distributions, in nats, per scored position;
* ``top1_agreement``: fraction of positions where both weight sets pick the same next token;
* ``ppl_source`` / ``ppl_output``: perplexity of the actual next tokens under each weight set;
* ``per_layer``: relative L2 error of the hidden streams after every decoder block (output vs source);
* ``mtp``: for the MTP block, the fraction of positions where its top-1 equals the trunk's top-1 for the same
  token, under the source's weights and under the output's (what speculative decoding's acceptance rests on).

How: one decoder block at a time. For block n, the source's weights are decoded and the source's hidden streams of
every sequence pushed through it; then the same with the output's weights and the output's streams; the block is
freed before block n+1, so the model is never resident (V4 Pro: 61 blocks of ~26 G parameters). Each block is a
one-layer transformers ``DeepseekV4ForCausalLM`` (the reference model verify already uses, :mod:`nvfp4kit.hf_model`)
whose decoder layer receives the streams through a forward pre-hook; the last block's model also gives the logits
(``hc_head``, ``norm``, ``head``). transformers builds no MTP block, so it is built here from its V4 definition
(vLLM ``models/deepseek_v4/nvidia/mtp.py``) around the same decoder-layer class: position ``i`` gets the trunk's
final streams ``h_i`` and the embedding of token ``i + 1`` (zeroed at position 0, as vLLM does),
``x = h_proj(hnorm(h)) + e_proj(enorm(e))``, one decoder layer, then the MTP block's own ``hc_head`` and ``norm`` and
the shared ``head``; its top-1 at ``i`` is compared with the trunk's at ``i + 1``.

V3 / R1 / V3.1 / V3.2 (Hugging Face names) run the same way with one-layer ``DeepseekV3ForCausalLM`` /
``DeepseekV32ForCausalLM`` models (hidden states [T, H], no hc streams; logits from ``model.norm`` and ``lm_head``);
their MTP layer (``model.layers.{num_hidden_layers}.``) follows vLLM's ``DeepSeekMultiTokenPredictorLayer``:
``eh_proj(concat[enorm(e), hnorm(h)])`` with ``h`` the trunk's normed output, then ``shared_head.norm`` / ``.head``.

W4A4 outputs (the output's config asks for input activations) are run as vLLM runs them: before each NVFP4 expert
GEMM the activations are quantized to NVFP4 and back (:func:`fake_quantize_activations`, vLLM's
``ref_nvfp4_quant_dequant``: 16-element blocks, global scale ``448 * 6 / amax`` from the stored input scale; one
scale per fused w1/w3 GEMM: the larger amax of the two, as vLLM's MoE takes it).

Pass/fail (:func:`judge`): thresholds are module constants, documented in docs/fidelity.md.
"""

from __future__ import annotations

import contextlib

import json
import logging
import math
import os
import time
import types
from collections.abc import Callable
from importlib import resources

import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint, open_checkpoint
from .families import Family, family_for
from .families.v4 import V4
from .nvfp4 import BLOCK, E2M1_MAX, E4M3_MAX, GLOBAL_SCALE_DIVISOR, cast_to_e2m1, e2m1_to_float, reconstruction_error

log = logging.getLogger("nvfp4kit.fidelity")

DEFAULT_TOKENS = 2048
MAX_SEQ_LEN = 1024  # a longer row is cut: positions past this add little and cost attention time
DATA_FILE = "fidelity.jsonl"
# Pass/fail (docs/fidelity.md): bounds that catch a broken conversion on any model, the tiny synthetic one included.
# Its random weights amplify every difference (no trained structure damps it): NVFP4 rounding noise alone (reference
# rule on every expert) gives a KLD mean of 0.29-0.35 nats, top-1 agreement 0.68-0.72, a hidden-state relative
# error of 0.29 after the last block and a perplexity ratio of 1.06-1.2; swapped nibbles in every expert of one layer
# give 3.2 nats, 0.15 and 0.85 (in every expert: 6.7 nats, 0.05, 1.4).
MAX_KLD_MEAN = 1.0
MIN_TOP1_AGREEMENT = 0.5
MAX_PPL_RATIO = 2.0  # output perplexity / source perplexity
MAX_LAYER_REL_ERROR = 0.5  # hidden streams after any block
# What a good NVFP4 conversion of a trained model shows (published V3/R1/V4 NVFP4 releases: KLD mean 0.01-0.1 nats,
# top-1 agreement above 0.9): figures beyond these are reported as a note, not a failure.
EXPECTED_KLD_MEAN = 0.1
EXPECTED_TOP1_AGREEMENT = 0.9
MTP = "mtp.0."
MEASURED_FAMILIES = ("deepseek_v4", "deepseek_v3", "deepseek_v32")  # families.Family.name values this module runs
# MTP-only tensors (the rest of ``mtp.0.*`` is an ordinary decoder layer)
_MTP_OWN = ("e_proj.", "h_proj.", "enorm.", "hnorm.", "norm.", "hc_head_")
_OUTER = ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale")
# V3's MTP layer (``model.layers.{num_hidden_layers}.``): what it holds besides an ordinary decoder layer
_V3_MTP_OWN = ("embed_tokens.", "enorm.", "hnorm.", "eh_proj.", "shared_head.")
_SCALES = (".scale", ".weight_scale_inv")  # FP8 scale companions: the tensor sources decode them into the weight

TensorSource = Callable[[str], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------
def default_data() -> str:
    """Path of the shipped text set (found next to this module, in a checkout or an installed package)."""
    return str(resources.files("nvfp4kit").joinpath("data", DATA_FILE))


def read_rows(path: str) -> list[dict]:
    """Rows of a ``.jsonl`` file in Path B's format (``messages`` / ``conversations`` / ``text``), or of a plain text
    file (paragraphs separated by a blank line become ``text`` rows)."""
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if path.endswith((".jsonl", ".json")):
        rows = [json.loads(line) for line in content.splitlines() if line.strip()]
    else:
        rows = [{"text": p.strip()} for p in content.split("\n\n") if p.strip()]
    if not rows:
        raise ValueError(f"{path}: no text rows")
    return rows


def token_sequences(checkpoint_dir: str, path: str, tokens: int, max_seq_len: int = MAX_SEQ_LEN) -> list[torch.Tensor]:
    """Rows rendered as the model sees them (Path B's renderer: chat template, else the checkpoint's
    ``encoding/encoding_dsv4.py``, else DeepSeek's plain format), tokenized by the checkpoint's tokenizer, one
    sequence per row (cut at ``max_seq_len``), until ``tokens`` tokens are taken. Rows of fewer than 2 tokens
    (nothing to predict) are skipped. int64 1-D tensors."""
    assert tokens >= 2, "at least two tokens are needed for one teacher-forced prediction"
    from transformers import AutoTokenizer

    from .calibration_data import chat_renderer, row_text

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    render, how = chat_renderer(tokenizer, checkpoint_dir)
    out, taken = [], 0
    for row in read_rows(path):
        ids = tokenizer(row_text(row, render), add_special_tokens=False)["input_ids"][: min(max_seq_len, tokens - taken)]
        if len(ids) >= 2:
            out.append(torch.tensor(ids, dtype=torch.long))
            taken += len(ids)
        if taken >= tokens:
            break
    if not out:
        raise ValueError(f"{path}: no row gives two tokens")
    log.info("fidelity text: %d sequences, %d tokens of %s, rendered with %s", len(out), taken, path, how)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Activation quantization as vLLM serves W4A4
# ---------------------------------------------------------------------------------------------------------------
def fake_quantize_activations(x: torch.Tensor, amax: float) -> torch.Tensor:
    """NVFP4 quantize-dequantize of activations ``x`` [..., K], as vLLM's ``ref_nvfp4_quant_dequant``.

    ``g = 448 * 6 / amax`` (float32); per 16-element block ``s = e4m3(clamp(g * block_amax / 6, +-448))``; values
    ``x * g / s`` clipped to +-6 and rounded to E2M1 (ties to even); decoded ``e2m1 * s / g``. Same dtype as ``x``.
    """
    assert x.shape[-1] % BLOCK == 0 and amax > 0 and math.isfinite(amax), (x.shape, amax)
    g = torch.tensor(GLOBAL_SCALE_DIVISOR / amax, dtype=torch.float32, device=x.device)
    blocks = x.to(torch.float32).reshape(-1, x.shape[-1] // BLOCK, BLOCK)
    scale = (g * (blocks.abs().amax(-1, keepdim=True) / E2M1_MAX)).clamp(-E4M3_MAX, E4M3_MAX)
    scale = scale.to(torch.float8_e4m3fn).to(torch.float32)
    inverse = torch.where(scale == 0, 0.0, g / torch.where(scale == 0, 1.0, scale))
    values = e2m1_to_float(cast_to_e2m1((blocks * inverse).clamp(-E2M1_MAX, E2M1_MAX)))
    return (values * (scale / g)).reshape(x.shape).to(x.dtype)


def experts_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    quantize: Callable[[torch.Tensor, int, str], torch.Tensor]) -> torch.Tensor:
    """transformers' eager ``DeepseekV4Experts.forward`` with ``quantize(x, expert, "gate_up" | "down")`` applied to
    the input of each expert GEMM (identity gives transformers' result bit for bit; tests check that)."""
    final = torch.zeros_like(hidden_states)
    mask = F.one_hot(top_k_index, num_classes=experts.num_experts).permute(2, 1, 0)
    for expert in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
        top_k_pos, token_idx = torch.where(mask[expert])
        x = quantize(hidden_states[token_idx], expert, "gate_up")
        current = _gate(experts, F.linear(x, experts.gate_up_proj[expert]))
        current = F.linear(quantize(current, expert, "down"), experts.down_proj[expert])
        current = current * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, current.to(final.dtype))
    return final


def _gate(experts, gate_up: torch.Tensor) -> torch.Tensor:
    """The experts' activation on the fused gate/up GEMM: V4's own (clamped SiLU), else V3's ``act(gate) * up``."""
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def serve_w4a4(model, prefix: str, input_amax: dict[str, float], family: Family | None = None) -> int:
    """Make the routed experts of the one-block ``model`` quantize their activations with the output's input
    scales (checkpoint module names under ``prefix``, e.g. ``layers.3.`` or ``model.layers.3.``; the family's
    expert pattern reads them, V4's by default); returns how many experts are affected."""
    family = family or V4
    gate_up, down = {}, {}
    for module, value in input_amax.items():
        m = family.expert.search(module + ".weight") if module.startswith(prefix) else None
        if m is None:  # (the prefix ends with a dot: ``layers.3.`` never matches layer 30)
            continue
        e = int(m.group(1))
        # the projection whose rows are hidden_size is the down GEMM; gate and up share one fused GEMM, whose
        # one scale is the larger amax of the two, as vLLM's MoE takes it
        if family.expert_rows[m.group(2)] == "hidden_size":
            down[e] = value
        else:
            gate_up[e] = max(gate_up.get(e, 0.0), value)
    if not gate_up:
        return 0
    experts = model.model.layers[0].mlp.experts  # (after the check: V3's dense layers have none)
    amax = {"gate_up": gate_up, "down": down}

    def quantize(x: torch.Tensor, expert: int, gemm: str) -> torch.Tensor:
        return fake_quantize_activations(x, amax[gemm][expert]) if expert in amax[gemm] else x

    experts.forward = types.MethodType(lambda self, h, i, w: experts_forward(self, h, i, w, quantize), experts)
    return len(gate_up)


def stored_input_amax(ckpt: Checkpoint, inv) -> dict[str, float]:
    """Input amax of every NVFP4 module with an activation scale in the output (layouts.py: compressed-tensors
    stores ``input_global_scale = 2688 / amax``, ModelOpt and NVIDIA ``input_scale = amax / 2688``)."""
    from .layouts import Layout
    from .safetensors_io import read_tensor

    fmt = inv.format
    out = {}
    for module, shape in inv.nvfp4.items():
        spec = Layout(fmt, True).nvfp4_specs(module, *shape)[3]
        if spec.name in ckpt.tensors:
            v = float(read_tensor(ckpt.tensors[spec.name]).to(torch.float32).reshape(-1)[0])
            out[module] = GLOBAL_SCALE_DIVISOR / v if fmt == "compressed-tensors" else v * GLOBAL_SCALE_DIVISOR
    return out


# ---------------------------------------------------------------------------------------------------------------
# One block at a time
# ---------------------------------------------------------------------------------------------------------------
def block_state_dict(src: Checkpoint, block: int | str, fetch: TensorSource, outer: dict[str, torch.Tensor],
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Native-named tensors of a one-layer model for trunk layer ``block`` (an int) or the MTP block (``"mtp"``):
    the block's tensors renamed to ``layers.0.``, plus embedding, head and final collapse (for MTP its own
    ``hc_head_*`` and ``norm``). ``outer`` caches the shared embedding and head across blocks."""
    prefix = MTP if block == "mtp" else f"layers.{block}."
    state = {}
    for name in src.tensors:
        if not name.startswith(prefix) or name.endswith(".scale"):
            continue
        rest = name[len(prefix):]
        if block == "mtp" and rest.startswith(_MTP_OWN):
            continue
        state["layers.0." + rest] = fetch(name)
    for name in _OUTER:
        source_name = MTP + name if block == "mtp" and name not in ("embed.weight", "head.weight") else name
        if source_name not in outer:
            outer[source_name] = fetch(source_name)
        state[name] = outer[source_name]
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def v3_block_state_dict(src: Checkpoint, block: int | str, fetch: TensorSource, outer: dict[str, torch.Tensor],
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """:func:`block_state_dict` for the V3 family (Hugging Face names): layer ``block`` (or the MTP layer,
    ``num_hidden_layers``) renamed to ``model.layers.0.``, plus every tensor outside the layers (embedding, final
    norm, ``lm_head``); for MTP its own embedding, ``shared_head.norm`` as the final norm and ``shared_head.head``
    (else ``lm_head``) as the head, as vLLM's ``DeepSeekMultiTokenPredictor`` uses them."""
    from .hf_model import _layer_of

    index = str(src.config["num_hidden_layers"] if block == "mtp" else block)
    state, outside = {}, []
    for name in src.tensors:
        if name.endswith(_SCALES):
            continue
        layer = _layer_of(name, src.config)
        if layer is None:
            outside.append(name)
        elif layer[1] == index and not (block == "mtp" and layer[2].startswith(_V3_MTP_OWN)):
            state[f"{layer[0]}0.{layer[2]}"] = fetch(name)
    mtp = _mtp_prefix(src)
    for name in outside:
        source_name = name
        if block == "mtp":  # the MTP layer's own tensor in the same role, where it has one
            own = {"embed_tokens": "embed_tokens.weight", "norm": "shared_head.norm.weight",
                   "lm_head": "shared_head.head.weight"}.get(name.split(".")[-2])
            source_name = mtp + own if own and mtp + own in src.tensors else name
        if source_name not in outer:
            outer[source_name] = fetch(source_name)
        state[name] = outer[source_name]
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def one_block_model(src: Checkpoint, block: int | str, fetch: TensorSource, outer: dict, dtype: torch.dtype):
    """transformers ``DeepseekV4ForCausalLM`` with one decoder layer: trunk layer ``block`` or the MTP block (config
    entry ``num_hidden_layers``: compress ratio 0, learned router), experts run by transformers' eager loop. Raises if
    any key fails to load. V3 family: ``DeepseekV3ForCausalLM`` / ``DeepseekV32ForCausalLM`` (config.json's
    architecture) from :func:`v3_block_state_dict`."""
    import transformers
    from transformers import DeepseekV4ForCausalLM
    from transformers.utils import logging as hf_logging

    from .hf_model import hf_config, is_v3

    hf_logging.disable_progress_bar()  # a bar per block would fill a tee'd log with carriage returns

    if is_v3(src.config):
        index = int(src.config["num_hidden_layers"]) if block == "mtp" else int(block)
        model_class = getattr(transformers, src.config["architectures"][0])
        state = v3_block_state_dict(src, block, fetch, outer, dtype)
        model, info = model_class.from_pretrained(
            None, config=hf_config(src.config, [index]), state_dict=state, dtype=dtype, output_loading_info=True,
            experts_implementation="eager")
        bad = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
        if bad or info["error_msgs"]:
            raise ValueError(f"block {block}: transformers did not load cleanly: {bad} {info['error_msgs']}")
        return model.eval()

    index = int(src.config["num_hidden_layers"]) if block == "mtp" else int(block)
    config = src.config
    if block == "mtp":  # the MTP block has a learned router even in a model shorter than its hash layers
        config = {**config, "num_hash_layers": min(int(config.get("num_hash_layers", 0)), index)}
    state = block_state_dict(src, block, fetch, outer, dtype)
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        None, config=hf_config(config, [index]), state_dict=state, dtype=dtype, output_loading_info=True,
        experts_implementation="eager")  # the loop W4A4 runs too (experts_forward): both sides sum alike
    bad = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
    if bad or info["error_msgs"]:
        raise ValueError(f"block {block}: transformers did not load cleanly: {bad} {info['error_msgs']}")
    return model.eval()


def run_block(model, ids: torch.Tensor, streams: torch.Tensor | None, logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one-layer ``model`` on one sequence: ``streams`` [T, hc, H] replace its layer's input (None: the
    model's own embedding, for layer 0). Returns the layer's output streams and, if ``logits``, float32 logits
    [T, V] computed from them (the model's ``hc_head``, ``norm`` and ``head``)."""
    device = next(model.parameters()).device
    layer = model.model.layers[0]
    captured = {}

    def swap_in(module, args, kwargs):
        return (streams.unsqueeze(0).to(device),) + tuple(args[1:]), kwargs

    hooks = [layer.register_forward_hook(lambda m, a, out: captured.__setitem__("y", out))]
    if streams is not None:
        hooks.append(layer.register_forward_pre_hook(swap_in, with_kwargs=True))
    # In bfloat16 transformers keeps norms and mHC in float32 (_keep_in_fp32_modules_strict), whose float32
    # outputs then meet bfloat16 linears: autocast runs each matmul in bfloat16, as a bfloat16 engine does.
    low = next(p.dtype for p in model.parameters() if p.is_floating_point()) != torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if low else contextlib.nullcontext()
    try:
        with torch.no_grad(), autocast:
            out = model(input_ids=ids.unsqueeze(0).to(device), logits_to_keep=0 if logits else 1)
    finally:
        for h in hooks:
            h.remove()
    return captured["y"][0].cpu(), (out.logits[0].float().cpu() if logits else None)


def mtp_input(model, fetch: TensorSource, ids: torch.Tensor, final: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The MTP block's input streams [T-1, hc, H] (V4's definition, vLLM's ``DeepSeekV4MultiTokenPredictorLayer``):
    position i combines the trunk's final streams at i and the embedding of token i + 1, zeroed at position 0."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

    device = next(model.parameters()).device
    eps = float(model.config.rms_norm_eps)
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids[1:].to(device))
        embeds[0] = 0
        norms = {}
        for name in ("enorm", "hnorm"):
            w = fetch(f"{MTP}{name}.weight")
            norms[name] = DeepseekV4RMSNorm(w.shape[0], eps).to(device)
            norms[name].weight.data = w.to(device, norms[name].weight.dtype)
        e_proj, h_proj = (fetch(f"{MTP}{p}.weight").to(device, dtype) for p in ("e_proj", "h_proj"))
        e = F.linear(norms["enorm"](embeds.to(dtype)).to(dtype), e_proj)
        h = F.linear(norms["hnorm"](final[:-1].to(device, dtype)).to(dtype), h_proj)
        return (h + e.unsqueeze(-2)).cpu()


def v3_mtp_input(model, fetch: TensorSource, ids: torch.Tensor, final: torch.Tensor, dtype: torch.dtype,
                 mtp_prefix: str, final_norm: torch.Tensor) -> torch.Tensor:
    """The V3 MTP layer's input [T-1, H] (vLLM's ``DeepSeekMultiTokenPredictorLayer``): position i gets
    ``eh_proj(concat[enorm(embed(token i + 1)), hnorm(h_i)])``, the embedding zeroed at position 0; ``h_i`` is what
    the trunk hands the draft model, its last layer's output through the final norm (``final_norm``)."""
    device = next(model.parameters()).device
    norm_class, eps = type(model.model.norm), float(model.config.rms_norm_eps)  # the family's own RMSNorm

    def rms(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        norm = norm_class(weight.shape[0], eps=eps).to(device)
        norm.weight.data = weight.to(device, norm.weight.dtype)
        return norm(x).to(dtype)

    with torch.no_grad():
        embeds = model.model.embed_tokens(ids[1:].to(device))  # (the MTP layer's own embedding, as loaded)
        embeds[0] = 0
        h = rms(final_norm, final[:-1].to(device, dtype))
        e = rms(fetch(f"{mtp_prefix}enorm.weight"), embeds.to(dtype))
        h = rms(fetch(f"{mtp_prefix}hnorm.weight"), h)
        return F.linear(torch.cat([e, h], dim=-1), fetch(f"{mtp_prefix}eh_proj.weight").to(device, dtype)).cpu()


def _layer_prefix(src: Checkpoint, n: int) -> str:
    """Checkpoint prefix of decoder layer ``n`` (V4 ``layers.N.``, V3 ``model.layers.N.``), from its tensor names."""
    from .hf_model import _layer_of

    for name in src.tensors:
        layer = _layer_of(name, src.config)
        if layer is not None and layer[1] == str(n):
            return f"{layer[0]}{n}."
    raise ValueError(f"no tensor of layer {n} in {src.root}")


def _mtp_prefix(src: Checkpoint) -> str:
    """V3 family: the MTP layer's prefix, layer ``num_hidden_layers`` under the trunk layers' naming."""
    return _layer_prefix(src, 0)[:-2] + f"{int(src.config['num_hidden_layers'])}."


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------------------------
def unmeasurable(config: dict) -> str | None:
    """Why the fidelity run cannot be made for this checkpoint's family (None where it can): a one-line reason
    that verify reports as NOT RUN, since an unmeasured model must not pass a requested measurement."""
    family = family_for(config)  # None: not a model the kit knows, which the static check already fails
    if family is not None and family.name not in MEASURED_FAMILIES:
        return f"fidelity is not measured for {family.title} (block_forward still applies)"
    return None


def measure_fidelity(dst: str, src: str, data: str | None = None, tokens: int = DEFAULT_TOKENS,
                     device: str | None = None, dtype: torch.dtype | None = None, mtp: bool = True,
                     quantize_activations: bool | None = None) -> dict:
    """Teacher-forced comparison of ``dst`` (the output) with ``src`` (the FP8 source); see the module docstring.

    Returns ``{"figures": {...}, "problems": [...], "evidence": [...]}`` with the figures named in the module
    docstring plus ``tokens``, ``sequences``, ``w4a4``, ``seconds_per_block`` and ``peak_gpu_gb`` (None on CPU).
    ``device`` defaults to CUDA when present; ``dtype`` to bfloat16 there (a V4 Pro block must fit next to the
    other weight set's streams) and float32 on the CPU. Both weight sets always run in the same dtype, so a tensor
    the output holds exactly contributes no difference. ``quantize_activations``: None serves the output as its
    config says
    (W4A4: activations quantized with its input scales); False serves the same weights W4A16, which shows what
    W4A4 costs on top.
    """
    from .verify.inventory import config_w4a4, decoded_source, quant_config, take_inventory

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    src_ckpt, out_ckpt = open_checkpoint(src), open_checkpoint(dst)
    problems = [f"source: {p}" for p in src_ckpt.problems] + [f"output: {p}" for p in out_ckpt.problems]
    if problems:
        return {"figures": {}, "problems": problems[:10], "evidence": []}
    why = unmeasurable(src_ckpt.config)
    if why:
        raise ValueError(why)
    from .hf_model import dequantized_source

    inv = take_inventory(out_ckpt)
    w4a4 = bool(config_w4a4(quant_config(out_ckpt))) if quantize_activations is None else quantize_activations
    amax = stored_input_amax(out_ckpt, inv) if w4a4 else {}
    sides = {"source": dequantized_source(src_ckpt), "output": decoded_source(out_ckpt, inv)}
    data = data or default_data()
    seqs = token_sequences(src, data, tokens)
    n_layers = int(src_ckpt.config["num_hidden_layers"])
    family = family_for(src_ckpt.config) or V4
    streams: dict[str, list] = {s: [None] * len(seqs) for s in sides}
    logits: dict[str, list] = {s: [None] * len(seqs) for s in sides}
    outer: dict[str, dict] = {s: {} for s in sides}
    per_layer, seconds = [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for n in range(n_layers):
        started = time.time()
        for side, fetch in sides.items():
            model = one_block_model(src_ckpt, n, fetch, outer[side], dtype).to(dev)
            if side == "output" and w4a4:
                serve_w4a4(model, _layer_prefix(src_ckpt, n), amax, family)
            for i, ids in enumerate(seqs):
                streams[side][i], lg = run_block(model, ids, streams[side][i], logits=n == n_layers - 1)
                if lg is not None:
                    logits[side][i] = lg
            del model
            _release(dev)
        err = reconstruction_error(torch.cat([s.flatten() for s in streams["source"]]),
                                   torch.cat([s.flatten() for s in streams["output"]]))["rel_error"]
        seconds.append(round(time.time() - started, 3))
        per_layer.append({"layer": n, "rel_error": err, "seconds": seconds[-1]})
        log.info("fidelity: block %d/%d in %.1f s, hidden-state relative error %.3e", n + 1, n_layers, seconds[-1], err)
    figures = token_figures(seqs, logits["source"], logits["output"])
    figures.update(per_layer=per_layer, sequences=len(seqs), w4a4=w4a4, device=str(dev), dtype=str(dtype),
                   data=data, seconds_per_block=seconds)
    evidence = []
    has_mtp = (f"{MTP}e_proj.weight" if family is V4 else f"{_mtp_prefix(src_ckpt)}eh_proj.weight") in src_ckpt.tensors
    if mtp and has_mtp:
        started = time.time()
        figures["mtp"] = mtp_figures(src_ckpt, sides, outer, seqs, streams, logits, amax if w4a4 else {}, dev, dtype)
        seconds.append(round(time.time() - started, 3))
    else:
        why = "not requested" if not mtp else "the source has no MTP block"
        figures["mtp"] = {"measured": False, "reason": why}
    figures["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 3) if dev.type == "cuda" else None
    problems = judge(figures)
    evidence.append(
        f"{figures['tokens']} scored tokens in {len(seqs)} sequences of {os.path.basename(data)}, {n_layers} blocks "
        f"one at a time on {dev} ({dtype}){'; output activations quantized as vLLM W4A4' if w4a4 else ''}")
    evidence.append(
        f"KLD(source||output) mean {figures['kld_mean']:.4g} max {figures['kld_max']:.4g} nats (bound "
        f"{MAX_KLD_MEAN}); top-1 agreement {figures['top1_agreement']:.4f} (bound {MIN_TOP1_AGREEMENT}); perplexity "
        f"{figures['ppl_source']:.4g} -> {figures['ppl_output']:.4g} (ratio bound {MAX_PPL_RATIO})")
    evidence.append(f"hidden-state relative error after each block (bound {MAX_LAYER_REL_ERROR}): "
                    + ", ".join(f"{e['rel_error']:.2e}" for e in per_layer))
    m = figures["mtp"]
    evidence.append(f"MTP top-1 = trunk top-1: source {m['top1_agreement_source']:.4f}, output "
                    f"{m['top1_agreement_output']:.4f}" if m.get("measured") else f"MTP not measured: {m['reason']}")
    evidence.append(f"seconds per block {seconds}; peak GPU memory "
                    + (f"{figures['peak_gpu_gb']} GB" if figures["peak_gpu_gb"] is not None else "n/a (CPU)"))
    evidence += notes(figures)
    return {"figures": figures, "problems": problems, "evidence": evidence}


def token_figures(seqs: list[torch.Tensor], source: list[torch.Tensor], output: list[torch.Tensor]) -> dict:
    """KLD, top-1 agreement and perplexities over every position that has a next token."""
    kld, agree, nll_s, nll_o = [], [], [], []
    for ids, ls, lo in zip(seqs, source, output):
        ps, po = F.log_softmax(ls[:-1], dim=-1), F.log_softmax(lo[:-1], dim=-1)
        kld.append((ps.exp() * (ps - po)).sum(-1))
        agree.append(ls[:-1].argmax(-1) == lo[:-1].argmax(-1))
        target = ids[1:].unsqueeze(-1)
        nll_s.append(-ps.gather(-1, target)[:, 0])
        nll_o.append(-po.gather(-1, target)[:, 0])
    kld_all, nll_s_all, nll_o_all = torch.cat(kld), torch.cat(nll_s), torch.cat(nll_o)
    return {
        "tokens": int(kld_all.numel()),
        "kld_mean": float(kld_all.double().mean()),
        "kld_max": float(kld_all.max()),
        "top1_agreement": float(torch.cat(agree).double().mean()),
        "ppl_source": math.exp(float(nll_s_all.double().mean())),
        "ppl_output": math.exp(float(nll_o_all.double().mean())),
        "finite": bool(torch.isfinite(torch.cat([*source, *output])).all()),
    }


def mtp_figures(src_ckpt: Checkpoint, sides: dict, outer: dict, seqs: list, streams: dict, logits: dict,
                amax: dict[str, float], dev: torch.device, dtype: torch.dtype) -> dict:
    """Agreement of the MTP block's top-1 at position i with the trunk's at i + 1 (both predict token i + 2), per
    weight set; position 0 (embedding masked) is not scored."""
    from .hf_model import is_v3

    v3 = is_v3(src_ckpt.config)
    figures: dict = {"measured": True, "how": "MTP block built from V4's definition around transformers' decoder "
                     "layer (transformers builds none)"}
    if v3:
        figures["how"] = ("MTP layer built from V3's definition (vLLM's DeepSeekMultiTokenPredictorLayer) around "
                          "transformers' decoder layer (transformers builds none)")
    for side, fetch in sides.items():
        model = one_block_model(src_ckpt, "mtp", fetch, outer[side], dtype).to(dev)
        if side == "output" and amax:
            serve_w4a4(model, _mtp_prefix(src_ckpt) if v3 else MTP, amax, family_for(src_ckpt.config))
        hits = total = 0
        for i, ids in enumerate(seqs):
            if len(ids) < 3:
                continue
            if v3:  # the trunk's final norm, cached by its last block under its own name
                final_norm = outer[side][next(n for n in outer[side] if n.split(".")[-2] == "norm")]
                x = v3_mtp_input(model, fetch, ids, streams[side][i], dtype, _mtp_prefix(src_ckpt), final_norm)
            else:
                x = mtp_input(model, fetch, ids, streams[side][i], dtype)
            _, lg = run_block(model, ids[1:], x, logits=True)
            hits += int((lg[1:].argmax(-1) == logits[side][i][2:].argmax(-1)).sum())
            total += len(ids) - 2
        figures[f"top1_agreement_{side}"] = hits / total if total else math.nan
        figures["tokens"] = total
        del model
        _release(dev)
    return figures


def judge(figures: dict) -> list[str]:
    """Problems of a measurement against the documented bounds (docs/fidelity.md)."""
    problems = []
    if not figures.get("finite", False):
        return ["logits hold NaN/Inf"]
    if not figures["kld_mean"] <= MAX_KLD_MEAN:
        problems.append(f"KLD(source||output) mean {figures['kld_mean']:.4g} nats > {MAX_KLD_MEAN}")
    if not figures["top1_agreement"] >= MIN_TOP1_AGREEMENT:
        problems.append(f"top-1 agreement {figures['top1_agreement']:.4f} < {MIN_TOP1_AGREEMENT}")
    ratio = figures["ppl_output"] / figures["ppl_source"]
    if not ratio <= MAX_PPL_RATIO:
        problems.append(f"perplexity {figures['ppl_source']:.4g} -> {figures['ppl_output']:.4g}: ratio {ratio:.3f} "
                        f"> {MAX_PPL_RATIO}")
    bad = [e["layer"] for e in figures["per_layer"] if not e["rel_error"] <= MAX_LAYER_REL_ERROR]
    if bad:
        worst = max(figures["per_layer"], key=lambda e: e["rel_error"] if math.isfinite(e["rel_error"]) else math.inf)
        problems.append(f"hidden-state relative error above {MAX_LAYER_REL_ERROR} after blocks {bad} (worst "
                        f"{worst['rel_error']:.3g} after block {worst['layer']})")
    return problems


def notes(figures: dict) -> list[str]:
    """Figures within the pass bounds but beyond what a good conversion of a trained model shows."""
    out = []
    if figures.get("kld_mean", 0) > EXPECTED_KLD_MEAN:
        out.append(f"note: KLD mean {figures['kld_mean']:.4g} nats is above the {EXPECTED_KLD_MEAN} a good NVFP4 "
                   "conversion of a trained model shows (expected on a synthetic random-weight model)")
    if figures.get("top1_agreement", 1) < EXPECTED_TOP1_AGREEMENT:
        out.append(f"note: top-1 agreement {figures['top1_agreement']:.4f} is below the {EXPECTED_TOP1_AGREEMENT} a "
                   "good NVFP4 conversion of a trained model shows")
    return out
