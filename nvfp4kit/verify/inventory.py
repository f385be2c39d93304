"""What the output holds, read from its tensor names alone (:class:`Inventory`: layout, NVFP4 and kept-FP8 modules),
the quantization_config readers the checks share, and the output's tensors decoded back to float32."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint
from ..fp8 import dequantize_fp8_blocks, infer_block_size
from ..layouts import FP8_BLOCK_WEIGHTS, NVFP4_WEIGHTS, Layout
from ..nvfp4 import NVFP4Tensor, dequantize_nvfp4
from ..rules import module_name
from ..safetensors_io import TensorInfo, TensorSpec, read_tensor


# ---------------------------------------------------------------------------------------------------------------
# What the output holds, from tensor names alone
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Inventory:
    """The output's modules as its tensors show them (the config is checked against this, not trusted)."""

    format: str  # a layouts.FORMATS value, recognised from tensor names
    nvfp4: dict[str, tuple[int, int]]  # module -> (out_features, in_features)
    fp8: dict[str, str]  # kept FP8 module -> its scale tensor
    num_hidden_layers: int

    def is_w4a4(self, tensors: dict[str, TensorInfo]) -> bool:
        """Whether any NVFP4 module carries an activation scale (used when the config cannot say)."""
        return any(s.name in tensors for m, shape in self.nvfp4.items() for s in layout_specs(self, m, shape, True)[3:])


def layout_specs(inv: Inventory, module: str, shape: tuple[int, int], w4a4: bool) -> list[TensorSpec]:
    """Packed weight, block scale, global scale[, activation scale], as the layout names them.

    Layout N refuses w4a4=False (it is always W4A4); its NVFP4 names are ModelOpt's, so those stand in."""
    fmt = "modelopt" if inv.format == "nvidia" and not w4a4 else inv.format
    return Layout(fmt, w4a4).nvfp4_specs(module, *shape)


def take_inventory(ckpt: Checkpoint) -> Inventory:
    t = ckpt.tensors
    packed_ct = {n[: -len(".weight_packed")] for n in t if n.endswith(".weight_packed")}
    packed_mo = {module_name(n) for n, i in t.items() if n.endswith(".weight") and i.dtype == "U8"}
    fp8_modules = [module_name(n) for n, i in t.items() if n.endswith(".weight") and i.dtype == "F8_E4M3"]
    if packed_ct:
        fmt, packed_suffix = "compressed-tensors", ".weight_packed"
    else:
        # ModelOpt and NVIDIA store NVFP4 alike; kept FP8 tells them apart (.weight_scale vs the source's .scale),
        # and without kept FP8 only the config can.
        declared = config_format(quant_config(ckpt))
        if fp8_modules:
            fmt = "nvidia" if any(m + ".scale" in t for m in fp8_modules) else "modelopt"
        else:
            fmt = declared if declared in ("modelopt", "nvidia") else "modelopt"
        packed_suffix = ".weight"
    nvfp4 = {}
    for m in sorted(packed_ct or packed_mo):
        rows, half = t[m + packed_suffix].shape if len(t[m + packed_suffix].shape) == 2 else (0, 0)
        nvfp4[m] = (rows, 2 * half)
    scale_suffix = ".scale" if fmt == "nvidia" else ".weight_scale"
    fp8 = {m: m + scale_suffix for m in sorted(fp8_modules)}
    return Inventory(fmt, nvfp4, fp8, config_int(ckpt.config, "num_hidden_layers"))


def config_int(config: dict, key: str) -> int:
    """``config[key]`` as an int; 0 where absent or not a number (check_config_file and model_config report it)."""
    try:
        return int(config.get(key, 0))
    except (TypeError, ValueError):
        return 0


def quant_config(ckpt: Checkpoint) -> dict:
    return dict(ckpt.config.get("quantization_config") or {})


def config_format(qcfg: dict) -> str | None:
    """The layout a quantization_config declares; None for a source FP8 config or anything unknown."""
    method = qcfg.get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "modelopt":
        return "modelopt"
    if method in ("fp8", "deepseek_v4_fp8") and qcfg.get("moe_quant_algo") == "NVFP4":
        return "nvidia"
    return None


def config_w4a4(qcfg: dict) -> bool | None:
    """Whether the config asks for activation scales (None if it does not say in a way this kit knows)."""
    fmt = config_format(qcfg)
    if fmt == "compressed-tensors":
        groups = (qcfg.get("config_groups") or {}).values()
        return any(is_nvfp4_group(g) and g.get("input_activations") for g in groups)
    if fmt == "modelopt":
        algos = [v.get("quant_algo") for v in (qcfg.get("quantized_layers") or {}).values()] + [qcfg.get("quant_algo")]
        return "NVFP4" in algos
    if fmt == "nvidia":
        return True  # vLLM's DeepseekV4FP8Config always builds W4A4 experts
    return None


def is_nvfp4_group(group: dict) -> bool:
    w = group.get("weights") or {}
    return all(w.get(k) == NVFP4_WEIGHTS[k] for k in ("num_bits", "type", "strategy", "group_size"))


def is_fp8_block_group(group: dict) -> bool:
    w = group.get("weights") or {}
    return all(w.get(k) == FP8_BLOCK_WEIGHTS[k] for k in ("num_bits", "type", "strategy"))


# ---------------------------------------------------------------------------------------------------------------
# Decoding the output
# ---------------------------------------------------------------------------------------------------------------
def global_scale_multiplier(inv: Inventory, value: torch.Tensor) -> torch.Tensor:
    """float32 0-d multiplier: compressed-tensors stores its reciprocal (a divisor), ModelOpt/NVIDIA the multiplier."""
    v = value.to(torch.float32).reshape(())
    return 1.0 / v if inv.format == "compressed-tensors" else v


def read_nvfp4(ckpt: Checkpoint, inv: Inventory, module: str) -> NVFP4Tensor:
    packed, block, gs = (s.name for s in layout_specs(inv, module, inv.nvfp4[module], False)[:3])
    t = ckpt.tensors
    return NVFP4Tensor(read_tensor(t[packed]), read_tensor(t[block]), global_scale_multiplier(inv, read_tensor(t[gs])))


def read_kept_fp8(ckpt: Checkpoint, inv: Inventory, module: str) -> torch.Tensor:
    """float32 values of a kept FP8 module (ModelOpt's 4-D scale [sm, 1, sn, 1] read back as 2-D)."""
    weight = read_tensor(ckpt.tensors[module + ".weight"])
    scale = read_tensor(ckpt.tensors[inv.fp8[module]])
    scale = scale.reshape(scale.shape[0], -1) if scale.dim() == 4 else scale
    return dequantize_fp8_blocks(weight, scale, infer_block_size(weight.shape, scale.shape, None, module), module)


def decoded_source(ckpt: Checkpoint, inv: Inventory) -> Callable[[str], torch.Tensor]:
    """Native source name -> value from the output: NVFP4 and FP8 weights decoded, other tensors as stored."""

    def read(name: str) -> torch.Tensor:
        module = module_name(name)
        if name.endswith(".weight") and module in inv.nvfp4:
            return dequantize_nvfp4(read_nvfp4(ckpt, inv, module))
        if name.endswith(".weight") and module in inv.fp8:
            return read_kept_fp8(ckpt, inv, module)
        return read_tensor(ckpt.tensors[name])

    return read
