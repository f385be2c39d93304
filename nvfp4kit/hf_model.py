"""A transformers ``DeepseekV4ForCausalLM`` built from a V4 checkpoint folder, in float (a CPU reference model);
for V3 / R1 / V3.1 / V3.2 checkpoints (Hugging Face names already) ``DeepseekV3ForCausalLM`` / ``DeepseekV32ForCausalLM``.

The checkpoint keeps DeepSeek's native names (``layers.N.attn.wq_a.weight`` + ``.scale``). transformers renames
them itself: ``from_pretrained`` applies its ``deepseek_v4`` entry of ``transformers/conversion_mapping.py``
(``attn`` -> ``self_attn``, ``wq_a`` -> ``q_a_proj``, routed ``experts.E.w1``/``w3`` stacked into
``experts.gate_up_proj``, ...) to any state dict it is given, so this module only supplies native names with
float values and never spells out the HF names.

The values come from a *tensor source*: by default the checkpoint's own tensors with every FP8 weight dequantized
by its ``.scale``; verification can pass its own source (e.g. NVFP4-decoded weights under the same native names)
to run the identical model on other numbers. transformers does not build the MTP block, so ``mtp.*`` is never
requested.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch

from .checkpoint import Checkpoint, configured_block_size, open_checkpoint, scale_of
from .decode import dequantize, form_of, scale_block
from .families import family_for
from .families.v4 import V4
from .safetensors_io import read_tensor

TensorSource = Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor]


def dequantized_source(ckpt: Checkpoint) -> Callable[[str], torch.Tensor]:
    """A tensor source over a checkpoint: native name -> the tensor, scaled weights (FP8, MXFP4) decoded to float32."""
    block = configured_block_size(ckpt.config)

    def read(name: str) -> torch.Tensor:
        info = ckpt.tensors[name]
        tensor = read_tensor(info)
        scale_name = scale_of(name, ckpt.tensors)
        if scale_name is None or form_of(info.dtype) is None:
            return tensor
        s = ckpt.tensors[scale_name]
        return dequantize(tensor, read_tensor(s), scale_block(info.dtype, info.shape, s.dtype, s.shape, block, name), name)

    return read


def is_v3(config: dict) -> bool:
    """DeepSeek V3 / R1 / V3.1 / V3.2: Hugging Face names (``model.layers.N.``), MTP as layer num_hidden_layers."""
    family = family_for(config)
    return family is not None and family.name in ("deepseek_v3", "deepseek_v32")


def _layer_of(name: str, config: dict) -> tuple[str, str, str] | None:
    """``(prefix, index, rest)`` of a decoder-layer tensor name (V4 ``layers.N.``, V3 ``model.layers.N.``)."""
    m = (family_for(config) or V4).layer.match(name)
    return (name[: m.start(1)], m.group(1), name[m.end(1) + 1 :]) if m else None


def model_weight_names(ckpt: Checkpoint, layers: Sequence[int]) -> list[str]:
    """Native names transformers needs: no scale companions, no MTP, only the chosen decoder layers."""
    keep = {str(n) for n in layers}
    names = []
    for name in ckpt.tensors:
        if name.endswith((".scale", ".weight_scale_inv")) or name.startswith("mtp."):
            continue
        layer = _layer_of(name, ckpt.config)
        if layer is not None and layer[1] not in keep:  # (V3's MTP layer, num_hidden_layers, is never chosen)
            continue
        names.append(name)
    return names


def hf_config(config: dict, layers: Sequence[int]):
    """A ``DeepseekV4Config`` for the chosen layers of a checkpoint's config.json, without its FP8 quantization.

    The router schedule is passed as ``mlp_layer_types`` because ``num_hash_layers`` cannot express a subset such
    as ``[3]`` (a top-k layer first).
    """
    if is_v3(config):
        return _hf_v3_config(config, layers)
    from transformers import DeepseekV4Config

    fields = {k: v for k, v in config.items() if k not in ("quantization_config", "num_hash_layers")}
    num_hash = config.get("num_hash_layers", 0)
    fields["num_hidden_layers"] = len(layers)
    # transformers maps each ratio (0 / 4 / 128) to its attention type and ignores entries past the last layer
    fields["compress_ratios"] = [config["compress_ratios"][n] for n in layers]
    fields["mlp_layer_types"] = ["hash_moe" if n < num_hash else "moe" for n in layers]
    return DeepseekV4Config(**fields)


def _hf_v3_config(config: dict, layers: Sequence[int]):
    """A ``DeepseekV3Config`` / ``DeepseekV32Config`` for the chosen layers: dense ones (below
    ``first_k_dense_replace``) must come first, as the model builds its first k layers dense."""
    import transformers

    dense = [n < config["first_k_dense_replace"] for n in layers]
    if dense != sorted(dense, reverse=True):
        raise ValueError(f"layers {list(layers)}: the dense ones (< first_k_dense_replace) must come first")
    fields = {k: v for k, v in config.items() if k != "quantization_config"}
    fields.update(num_hidden_layers=len(layers), first_k_dense_replace=sum(dense))
    name = "DeepseekV32Config" if family_for(config).name == "deepseek_v32" else "DeepseekV3Config"
    return getattr(transformers, name)(**fields)


def load_dequantized_hf_model(
    src_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    layers: Sequence[int] | None = None,
    tensors: TensorSource | None = None,
):
    """Build ``transformers.DeepseekV4ForCausalLM`` from the checkpoint in ``src_dir`` and load its weights.

    ``layers``: decoder layers to keep, by their checkpoint index (default: all). They become the model's layers
    0..len-1 in the given order, each keeping its own attention type and router type; embedding, final norm,
    ``hc_head`` and LM head are always loaded. ``layers=[3]`` gives a one-block model for layer 3.

    ``tensors``: where values come from, by native checkpoint name (a mapping or a callable). Default: the
    checkpoint itself, FP8 weights dequantized with their block scales. Floating values are cast to ``dtype``.

    Raises ``ValueError`` if transformers reports any missing, unexpected or mismatched key. Returns the model in
    eval mode on CPU.
    """
    import transformers

    ckpt = open_checkpoint(str(src_dir))
    model_class = getattr(transformers, ckpt.config["architectures"][0])  # DeepseekV4/V3/V32ForCausalLM
    if ckpt.problems:
        raise ValueError(f"{src_dir}: checkpoint problems: {ckpt.problems[:5]}")
    chosen = list(range(ckpt.config["num_hidden_layers"])) if layers is None else list(layers)
    source = dequantized_source(ckpt) if tensors is None else tensors
    fetch = source.__getitem__ if isinstance(source, Mapping) else source
    new_index = {str(n): str(i) for i, n in enumerate(chosen)}
    state_dict = {}
    for name in model_weight_names(ckpt, chosen):
        value = fetch(name)
        if value.is_floating_point():
            value = value.to(dtype)
        layer = _layer_of(name, ckpt.config)
        if layer is not None:
            head, n, rest = layer
            name = f"{head}{new_index[n]}.{rest}"
        state_dict[name] = value
    model, info = model_class.from_pretrained(
        None, config=hf_config(ckpt.config, chosen), state_dict=state_dict, dtype=dtype, output_loading_info=True
    )
    bad = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
    if bad or info["error_msgs"]:
        raise ValueError(f"{src_dir}: transformers did not load cleanly: {bad} {info['error_msgs']}")
    return model.eval()
