"""The output layouts vLLM loads for DeepSeek V4 (vllm-v4-contract.md §5), and their configs.

``compressed-tensors`` (default; contract layout C)
    NVFP4 module ``m``: ``m.weight_packed`` u8 [out, in/2], ``m.weight_scale`` e4m3 [out, in/16],
    ``m.weight_global_scale`` f32 [1] (the divisor 1/global_scale); W4A4 adds ``m.input_global_scale`` f32 [1]
    (2688/input_amax). Kept FP8: ``m.weight`` + ``m.weight_scale`` f32 (the UE8M0 ``.scale`` widened, exact).
``modelopt`` (contract layout M, ``MIXED_PRECISION``; experimental in vLLM)
    NVFP4: ``m.weight`` u8, ``m.weight_scale`` e4m3, ``m.weight_scale_2`` f32 0-d (the multiplier amax/2688);
    W4A4 adds ``m.input_scale`` f32 0-d (input_amax/2688). Kept FP8: ``m.weight`` + 4-D f32 ``m.weight_scale``.
``nvidia`` (contract layout N: the form of NVIDIA's own V4 NVFP4 release; always W4A4)
    NVFP4 as ``modelopt`` with ``input_scale``; kept FP8 tensors keep their UE8M0 ``.scale``; the config is the
    source FP8 config plus ``moe_quant_algo: NVFP4``, which is how vLLM's ``DeepseekV4FP8Config`` claims it.

Everything else is copied bit for bit under its own name. No layout ever writes a dummy activation scale.

Engines (``--engine``): ``vllm`` (default) writes the chosen format as above. ``sglang`` writes what SGLang 0.5.23
serves (shared/reference/sglang-v4.md): the ``nvidia`` layout with the MTP draft's routed experts as MXFP4
(``m.weight`` I8 [out, in/2], ``m.scale`` F8_E8M0 [out, in/32], :mod:`nvfp4kit.mxfp4`), because SGLang builds
those as MXFP4 whatever the trunk is, while vLLM builds them with the trunk's NVFP4 scheme (contract §6).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .mxfp4 import MX_BLOCK, MXFP4FormatError, block_exponents, quantize_mxfp4
from .nvfp4 import BLOCK, GLOBAL_SCALE_DIVISOR, NVFP4Tensor
from .safetensors_io import TensorSpec
from .errors import KitError

FORMATS = ("compressed-tensors", "modelopt", "nvidia")
ENGINES = ("vllm", "sglang")
ENGINE_FORMAT = {"sglang": "nvidia"}  # the one layout an engine serves (vLLM serves every format)
# vLLM's V3.2 loader dequantizes the indexer's FP8 wk itself (deepseek_v2.py ``_try_load_fp8_indexer_wk``, into the
# unquantized wk_weights_proj) and reads its scale as 1-D or 2-D only: every layout writes that scale 2-D. The bytes
# are those of ModelOpt's 4-D form; only the header's shape differs.
_SCALE_READ_2D = re.compile(r"\.self_attn\.indexer\.wk$")
# SGLang's HybridFp8NvFp4Config leaves model.decoder.* (the MTP layer) out of NVFP4 and builds its experts as MXFP4.
_MTP_ROUTED_EXPERT = re.compile(r"^mtp\.\d+\.ffn\.experts\.\d+\.w[123]$")


class LayoutError(KitError, ValueError):
    """A layout/flag combination or a plan that the chosen layout cannot describe to vLLM."""


@dataclass(frozen=True)
class Layout:
    format: str
    w4a4: bool  # activation scales present (from --activation-scales)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise LayoutError(f"unknown --format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.format == "nvidia" and not self.w4a4:
            raise LayoutError(
                "--format nvidia is W4A4 (vLLM reads an input_scale for every expert): pass --activation-scales "
                "FILE with calibrated input amax (quantize_llmcompressor.py --export-activation-scales writes one)"
            )

    @property
    def scheme(self) -> str:
        return "NVFP4 W4A4" if self.w4a4 else "NVFP4 W4A16"

    # --- tensor names, shapes and dtypes, known before any data exists -------------------------------------------
    def nvfp4_specs(self, module: str, out_features: int, in_features: int) -> list[TensorSpec]:
        packed, scale = (out_features, in_features // 2), (out_features, in_features // BLOCK)
        if self.format == "compressed-tensors":
            specs = [
                TensorSpec(f"{module}.weight_packed", "U8", packed),
                TensorSpec(f"{module}.weight_scale", "F8_E4M3", scale),
                TensorSpec(f"{module}.weight_global_scale", "F32", (1,)),
            ]
            return specs + ([TensorSpec(f"{module}.input_global_scale", "F32", (1,))] if self.w4a4 else [])
        specs = [
            TensorSpec(f"{module}.weight", "U8", packed),
            TensorSpec(f"{module}.weight_scale", "F8_E4M3", scale),
            TensorSpec(f"{module}.weight_scale_2", "F32", ()),
        ]
        return specs + ([TensorSpec(f"{module}.input_scale", "F32", ())] if self.w4a4 else [])

    def fp8_specs(self, module: str, weight: TensorSpec, scale: TensorSpec) -> list[TensorSpec]:
        if self.format == "compressed-tensors":
            return [weight, TensorSpec(f"{module}.weight_scale", "F32", scale.shape)]
        if self.format == "modelopt":
            sm, sn = scale.shape
            shape = scale.shape if _SCALE_READ_2D.search(module) else (sm, 1, sn, 1)
            return [weight, TensorSpec(f"{module}.weight_scale", "F32", shape)]
        return [weight, scale]

    # --- tensor data -----------------------------------------------------------------------------------------
    def nvfp4_tensors(self, q: NVFP4Tensor, input_amax: float | None) -> list[torch.Tensor]:
        """Data in the order of :meth:`nvfp4_specs`."""
        gs = q.global_scale.to(torch.float32).reshape(())
        if self.format == "compressed-tensors":
            out = [q.packed, q.block_scale, (1.0 / gs).reshape(1)]
            if self.w4a4:
                out.append(torch.tensor([GLOBAL_SCALE_DIVISOR / _checked_amax(input_amax)], dtype=torch.float32))
            return out
        out = [q.packed, q.block_scale, gs]
        if self.w4a4:
            out.append(torch.tensor(_checked_amax(input_amax) / GLOBAL_SCALE_DIVISOR, dtype=torch.float32))
        return out

    def fp8_tensors(self, weight: torch.Tensor, scale: torch.Tensor) -> list[torch.Tensor]:
        if self.format == "compressed-tensors":
            return [weight, scale.to(torch.float32)]
        if self.format == "modelopt":
            sm, sn = scale.shape
            return [weight, scale.to(torch.float32).reshape(sm, 1, sn, 1)]
        return [weight, scale]


def check_engine(engine: str, fmt: str, w4a4: bool) -> None:
    """``--engine`` with ``--format`` and activation scales: SGLang serves the nvidia layout only, which is W4A4."""
    if engine == "sglang" and not w4a4:
        raise LayoutError("--engine sglang writes NVIDIA's W4A4 layout (SGLang reads an input_scale for every expert): "
                          "pass --activation-scales FILE (quantize_llmcompressor.py --export-activation-scales)")
    if engine not in ENGINES:
        raise LayoutError(f"unknown --engine {engine!r}; choose one of {', '.join(ENGINES)}")
    wanted = ENGINE_FORMAT.get(engine)
    if wanted is not None and fmt != wanted:
        raise LayoutError(f"--engine {engine} writes the {wanted} layout (SGLang 0.5.23 fails on the others at model "
                          f"build); drop --format {fmt} or pass --format {wanted}")


def default_format(engine: str) -> str:
    """The format ``--engine`` implies when ``--format`` is not given."""
    return ENGINE_FORMAT.get(engine, "compressed-tensors")


def writes_mxfp4(engine: str, module: str) -> bool:
    """Whether ``module`` (a quantized source module) is written as MXFP4: the MTP routed experts for SGLang."""
    return engine == "sglang" and bool(_MTP_ROUTED_EXPERT.match(module))


def mxfp4_specs(module: str, out_features: int, in_features: int) -> list[TensorSpec]:
    """An MXFP4 module as the original V4 releases store it (and SGLang's draft loads it)."""
    return [TensorSpec(f"{module}.weight", "I8", (out_features, in_features // 2)),
            TensorSpec(f"{module}.scale", "F8_E8M0", (out_features, in_features // MX_BLOCK))]


def mxfp4_tensors(x: torch.Tensor, module: str) -> list[torch.Tensor]:
    """Data in the order of :func:`mxfp4_specs`, exact or refused (:class:`MXFP4FormatError` names the module and
    offers the FP8 alternative)."""
    try:
        return list(quantize_mxfp4(x, block_exponents(x), module + ".weight"))
    except MXFP4FormatError as e:
        raise MXFP4FormatError(
            f"{e}. --engine sglang writes the MTP draft's routed experts as MXFP4, which holds only MXFP4-origin "
            f"experts exactly. Alternative: convert with --format nvidia --keep 'mtp\\.\\d+\\.ffn\\.experts' (MTP "
            f"experts kept FP8) and serve with SGLANG_DSV4_FP4_EXPERTS=0, which makes SGLang build them as FP8 blocks"
        ) from e


def _checked_amax(amax: float | None) -> float:
    if amax is None or not (amax > 0 and amax < float("inf")):
        raise LayoutError(f"activation amax must be finite and > 0, got {amax}")
    return float(amax)


# --- config -------------------------------------------------------------------------------------------------------
def runtime_module(module: str, num_hidden_layers: int) -> str:
    """The module name vLLM's quantization config sees (contract §2.1, §6): ``mtp.K.`` runs as layer L+K."""
    m = re.match(r"^mtp\.(\d+)\.(.*)$", module)
    if m:
        module = f"layers.{num_hidden_layers + int(m.group(1))}.{m.group(2)}"
    module = module.replace(".shared_experts.w2", ".shared_experts.down_proj")
    return "model." + module if module.startswith("layers.") else module


def _target(runtime: str, per_layer: bool) -> str:
    """A compressed-tensors ``re:`` target (matched from the start of the name, hence the leading ``.*``)."""
    rest = runtime if per_layer else re.sub(r"^model\.layers\.\d+\.", "", runtime)
    pattern = re.sub(r"experts\\\.\d+\\\.", r"experts\\.\\d+\\.", re.escape(rest))
    return "re:.*" + ("" if per_layer else r"\.") + pattern + "$"


def ct_targets(modules_by_action: dict[str, list[str]], num_hidden_layers: int) -> dict[str, list[str]]:
    """Targets per action (``quantize`` / ``keep_fp8``), collapsed over layers and experts where unambiguous."""
    collapsed: dict[str, set[str]] = {}
    for action, modules in modules_by_action.items():
        for m in modules:
            collapsed.setdefault(_target(runtime_module(m, num_hidden_layers), False), set()).add(action)
    out: dict[str, set[str]] = {a: set() for a in modules_by_action}
    for action, modules in modules_by_action.items():
        for m in modules:
            rt = runtime_module(m, num_hidden_layers)
            t = _target(rt, False)
            out[action].add(t if len(collapsed[t]) == 1 else _target(rt, True))
    return {a: sorted(ts) for a, ts in out.items()}


NVFP4_WEIGHTS = {
    "num_bits": 4,
    "type": "float",
    "symmetric": True,
    "strategy": "tensor_group",
    "group_size": 16,
    "dynamic": False,
    "scale_dtype": "torch.float8_e4m3fn",
}
NVFP4_INPUTS = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
                "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn"}
FP8_BLOCK_WEIGHTS = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "strategy": "block",
    "block_structure": [128, 128],
    "dynamic": False,
}
FP8_DYNAMIC_INPUTS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group", "group_size": 128,
                      "dynamic": True}


def quantization_config(
    layout: Layout,
    quantized: list[str],
    kept_fp8: list[str],
    source_config: dict,
    fp8_block: tuple[int, int] = (128, 128),
    engine: str = "vllm",
) -> tuple[dict, dict | None]:
    """``(config.json quantization_config, hf_quant_config.json or None)`` describing every quantized module
    and every kept FP8 module (native names in, vLLM runtime names out where vLLM needs them)."""
    L = int(source_config.get("num_hidden_layers", 0))
    if layout.format == "compressed-tensors":
        targets = ct_targets({"quantize": quantized, "keep_fp8": kept_fp8}, L)
        groups = {}
        if quantized:
            groups["group_0"] = {
                "format": "nvfp4-pack-quantized",
                "targets": targets["quantize"],
                "weights": dict(NVFP4_WEIGHTS),
                "input_activations": dict(NVFP4_INPUTS) if layout.w4a4 else None,
                "output_activations": None,
            }
        if kept_fp8:
            groups["group_1"] = {
                "format": "float-quantized",
                "targets": targets["keep_fp8"],
                "weights": dict(FP8_BLOCK_WEIGHTS, block_structure=list(fp8_block)),
                "input_activations": dict(FP8_DYNAMIC_INPUTS, group_size=fp8_block[1]),
                "output_activations": None,
            }
        return {
            "quant_method": "compressed-tensors",
            "format": "mixed-precision",
            "quantization_status": "compressed",
            "ignore": ["lm_head"],
            "kv_cache_scheme": None,
            "config_groups": groups,
        }, None
    if layout.format == "modelopt":
        algo = {"quant_algo": "NVFP4" if layout.w4a4 else "W4A16_NVFP4", "group_size": 16}
        layers: dict[str, dict] = {}
        for m in quantized:
            layers[modelopt_key(m, L)] = dict(algo)
        for m in kept_fp8:
            layers[modelopt_key(m, L)] = {"quant_algo": "FP8_PB_WO"}
        cfg = {
            "quant_method": "modelopt",
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "ignore": [],
            "quantized_layers": dict(sorted(layers.items())),
        }
        legacy = {
            "producer": {"name": "nvfp4kit"},
            "quantization": {k: cfg[k] for k in ("quant_algo", "kv_cache_quant_algo", "group_size", "quantized_layers")}
            | {"exclude_modules": []},
        }
        return cfg, legacy
    # nvidia: vLLM reads the FP8 keys for the linears and moe_quant_algo for every routed expert, MTP included.
    src = dict(source_config.get("quantization_config") or {})
    cfg = {k: src[k] for k in ("quant_method", "fmt", "scale_fmt", "weight_block_size", "activation_scheme") if k in src}
    producer = {"name": "nvfp4kit"} | _engine_note(engine)
    cfg.update({"moe_quant_algo": "NVFP4", "quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
                "group_size": 16, "producer": producer})
    legacy = {"producer": dict(producer),
              "quantization": {"quant_algo": "MIXED_PRECISION", "moe_quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                               "group_size": 16, "exclude_modules": []}}
    return cfg, legacy


def _engine_note(engine: str) -> dict:
    """What the config says about ``--engine`` (nothing for the default, whose configs stay as they were)."""
    if engine == "vllm":
        return {}
    return {"engine": engine, "mtp_routed_experts": "MXFP4 (SGLang builds the MTP draft's experts as MXFP4)"}


def modelopt_key(module: str, num_hidden_layers: int) -> str:
    """ModelOpt ``quantized_layers`` key: experts by their RoutedExperts prefix (V4 ``….experts.E.w1``, V3
    ``….experts.E.gate_proj`` -> ``….experts``); MTP under its runtime name (V3 names are runtime names already)."""
    key = re.sub(r"\.experts\.\d+\.(?:w[123]|gate_proj|up_proj|down_proj)$", ".experts", module)
    return runtime_module(key, num_hidden_layers) if key.startswith("mtp.") else key
