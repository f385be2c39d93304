"""Load a converted checkpoint with SGLang's own DeepSeek V4 loader, on CPU, without running a kernel.

Run inside the SGLang virtualenv (``scripts/setup_sglang_cpu.sh`` builds one with ``sglang==0.5.23``)::

    python -m nvfp4kit.sglang_dry_load CHECKPOINT_DIR [CHECKPOINT_DIR ...] [--json REPORT.json]

What it does (shared/reference/sglang-v4.md):

1. ``ServerArgs(model_path=CHECKPOINT_DIR, device="cpu")`` (with ``speculative_algorithm="EAGLE"`` for the MTP
   draft) -> ``ModelConfig.from_server_args`` -> SGLang's ``_get_quantization_config`` and ``_initialize_model``:
   the trunk ``DeepseekV4ForCausalLM`` and the draft ``DeepseekV4ForCausalLMNextN``, every parameter from the
   quant methods' own ``create_weights``, as on a Blackwell server. Only what a GPU answers is stubbed
   (:func:`install_cpu_stubs`); nothing stubbed touches a parameter's name, shape or dtype.
2. Every parameter is filled with a sentinel and every ``weight_loader`` wrapped; the whole checkpoint then goes
   through each model's own ``load_weights`` (SGLang fuses pairs across tensors, so it is one call per model),
   synchronously, so that each loader call is traced to the checkpoint tensor being read.
3. Findings: a tensor that reaches no parameter of its model (fused partners counted: ``wq_a``+``wkv``,
   compressor ``wkv``+``wgate``, ``wo_a`` weight+scale); a parameter left holding the sentinel; an (expert, shard)
   of a routed-expert parameter that received no loader call (SGLang pre-fills input scales with 1.0 and lets one
   shard's input scale overwrite the other's, so only counting calls sees a missing ``w1.input_scale``); a loader
   that casts; SGLang's own warnings (``Some weights are not initialized``, ``... not found in params_dict``).

Imports only the standard library, torch, sglang and the torch-only kit modules. Tensor parallel 1 only;
``process_weights_after_loading`` is not run (it needs flashinfer kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import json
import logging
import os
import re
import socket
import sys
import types
from dataclasses import asdict, dataclass, field

import torch

from nvfp4kit.safetensors_io import read_tensor
from nvfp4kit.vllm_dry_load import (
    CheckpointView,
    fill_with_sentinel,
    first_line,
    natural_key,
    open_checkpoint_headers,
    unwritten_mask,
)

SGLANG_VERSION_TESTED = "0.5.23"
# Parameters SGLang itself never loads from a checkpoint (its own skip list, deepseek_v4.py load_weights).
NEVER_LOADED = ("attn_mqa.k_scale", "attn_mqa.v_scale", "blockscale_swizzled")
# The draft shares the trunk's embedding and head at runtime (load_weights skips them for it).
SHARED_WITH_TRUNK = ("lm_head", "embed_tokens")
# Casts SGLang's loaders do on purpose, all exact: the hash-routing table is int64 on disk, int32 in the model;
# UE8M0 block scales and BF16 compressor norms are widened to float32.
ALLOWED_CASTS = {("tid2eid", torch.int64, torch.int32)}
EXACT_WIDENINGS = {(torch.float8_e8m0fnu, torch.float32), (torch.bfloat16, torch.float32)}
# As a server runs V4's MTP draft (SGLang accepts only EAGLE with top-k 1 for it).
DRAFT_ARGS = {"speculative_algorithm": "EAGLE", "speculative_eagle_topk": 1, "speculative_num_steps": 1,
              "speculative_num_draft_tokens": 2}
# Checkpoint tensors that SGLang consumes in pairs: the loader call comes with the second one.
FUSED_PARTNERS = (
    (re.compile(r"^(.*\.attn)\.wq_a\.(weight|scale)$"), r"\1.wkv.\2"),
    (re.compile(r"^(.*\.attn)\.wkv\.(weight|scale)$"), r"\1.wq_a.\2"),
    (re.compile(r"^(.*\.compressor)\.wkv\.weight$"), r"\1.wgate.weight"),
    (re.compile(r"^(.*\.compressor)\.wgate\.weight$"), r"\1.wkv.weight"),
    (re.compile(r"^(.*\.wo_a)\.weight$"), r"\1.scale"),
    (re.compile(r"^(.*\.wo_a)\.scale$"), r"\1.weight"),
)
EXPERT_SHARDS = {"w13": ("w1", "w3"), "w2": ("w2",)}


# --------------------------------------------------------------------------------------------------- stubs
class _AnythingModule(types.ModuleType):
    """An import-only stand-in: every attribute is a do-nothing class."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {"__init__": lambda self, *args, **kwargs: None})


class _ImportOnlyFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import torchvision...`` / ``import vllm...`` succeed: SGLang imports them at module level in code
    the dry load never runs (multimodal processors, optional kernels); the CUDA builds would not import on CPU."""

    roots = ("torchvision", "vllm")

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _AnythingModule(spec.name)

    def exec_module(self, module) -> None:
        module.__path__ = []


def install_import_stubs() -> list[str]:
    """Fake ``torchvision`` and ``vllm`` for imports only. transformers asks first whether torchvision is installed
    (cached), so it keeps answering no and never imports from the fake."""
    os.environ.setdefault("SGLANG_OPT_USE_TILELANG_MHC_PRE", "0")  # a tilelang kernel prewarm at load time
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()
    import_utils.is_torchvision_v2_available()
    if not any(isinstance(f, _ImportOnlyFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportOnlyFinder())
    return ["import torchvision (fake)", "import vllm (fake)", "SGLANG_OPT_USE_TILELANG_MHC_PRE=0"]


def install_cpu_stubs() -> list[str]:
    """What only a GPU answers, answered as a Blackwell (SM100) server would; nothing here touches a parameter."""
    import sglang.srt.models.deepseek_v4 as dsv4
    from sglang.srt.layers.rotary_embedding import factory
    from sglang.srt.runtime_context import override_platform

    override_platform(is_blackwell=True, is_sm100=True, device_capability=(10, 0)).install()
    torch.cuda.get_device_capability = lambda *args, **kwargs: (10, 0)
    # One loader call at a time, in checkpoint order: each write is traced to the tensor being read.
    dsv4.should_async_load = lambda weight: False

    def unscaled_rope(head_size, rotary_dim, max_position, base, is_neox_style=True, rope_scaling=None,
                      dtype=None, partial_rotary_factor=1.0, device=None):
        # RoPE holds buffers only; SGLang's CPU factory asserts on the MTP layer's compress ratio 0.
        return factory.get_rope(head_size, rotary_dim, max_position, base, is_neox_style, None, dtype,
                                partial_rotary_factor)

    dsv4.get_rope_wrapper = unscaled_rope
    return ["platform: Blackwell SM100", "torch.cuda.get_device_capability -> (10, 0)",
            "deepseek_v4.should_async_load -> False", "deepseek_v4.get_rope_wrapper -> unscaled get_rope"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PARALLEL_READY: list[bool] = []  # process-wide: gloo groups are built once, several checkpoints may follow


def build_model(root: str, draft: bool):
    """(quant config, model) exactly as SGLang's model loader builds the trunk (or, ``draft``, the MTP draft)."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.layers.moe.utils import initialize_moe_config
    from sglang.srt.layers.quantization.fp4_utils import initialize_fp4_gemm_config
    from sglang.srt.layers.quantization.fp8_utils import initialize_fp8_gemm_config
    from sglang.srt.model_loader import loader
    from sglang.srt.model_loader.utils import set_default_torch_dtype
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(model_path=root, device="cpu", tp_size=1,
                             **(DRAFT_ARGS if draft else {}))
    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))
    if not _PARALLEL_READY:
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}", backend="gloo")
        initialize_model_parallel()
        _PARALLEL_READY.append(True)
    # As the scheduler does; initialize_bf16_gemm_config is left out (it asks cutlass, absent on CPU).
    initialize_moe_config()
    initialize_fp8_gemm_config()
    initialize_fp4_gemm_config()
    model_config = ModelConfig.from_server_args(server_args, model_path=root, is_draft_model=draft)
    load_config = LoadConfig()
    quant_config = loader._get_quantization_config(model_config, load_config)
    with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):
        model = loader._initialize_model(model_config, load_config, quant_config)
    return quant_config, model


# ------------------------------------------------------------------------------------------ tracing the load
@dataclass
class LoadCall:
    tensor: str  # the checkpoint tensor being read when the call was made
    parameter: str
    source_dtype: torch.dtype
    target_dtype: torch.dtype
    expert: int | None
    shard: str | None


class LoadTracer:
    """Wraps every parameter's ``weight_loader``; :meth:`weights` feeds the checkpoint and notes the current tensor."""

    def __init__(self, model: torch.nn.Module, view: CheckpointView) -> None:
        from sglang.srt.model_loader.weight_utils import default_weight_loader

        self.view = view
        self.current = ""
        self.calls: list[LoadCall] = []
        for name, p in model.named_parameters():
            wrapped = self._wrap(name, getattr(p, "weight_loader", default_weight_loader))
            # SGLang's parameter classes expose weight_loader as a read-only property over _weight_loader.
            if isinstance(getattr(type(p), "weight_loader", None), property):
                p._weight_loader = wrapped
            else:
                p.weight_loader = wrapped

    def _wrap(self, name: str, inner):
        def tracing_loader(param, loaded_weight, *args, **kwargs):
            # Routed experts are loaded with expert_id= and shard_id= keywords (deepseek_v4.py load_weights).
            self.calls.append(LoadCall(self.current, name, loaded_weight.dtype, param.dtype,
                                       kwargs.get("expert_id"), kwargs.get("shard_id")))
            return inner(param, loaded_weight, *args, **kwargs)

        return tracing_loader

    def weights(self):
        fds: dict[str, int] = {}
        try:
            for name in sorted(self.view.tensors, key=natural_key):
                info = self.view.tensors[name]
                if info.file not in fds:
                    fds[info.file] = os.open(info.file, os.O_RDONLY)
                self.current = name
                yield name, read_tensor(info, fds[info.file])
            self.current = "<end of checkpoint>"
        finally:
            for fd in fds.values():
                os.close(fd)


class WarningLog(logging.Handler):
    """SGLang's warnings while loading (it reports unloaded parameters and unknown names only as log lines)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage()[:1000])


@contextlib.contextmanager
def warnings_logged():
    handler = WarningLog()
    root = logging.getLogger("sglang")
    root.addHandler(handler)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)


# ------------------------------------------------------------------------------------------------- report
@dataclass
class ModelReport:
    """One model's load: ``trunk`` or ``draft``."""

    model: str
    model_class: str = ""
    quant_config_class: str = ""
    tensors_loaded: int = 0
    build_error: str = ""
    load_error: str = ""
    scheme_problems: list[str] = field(default_factory=list)
    unreached_tensors: list[str] = field(default_factory=list)
    unwritten_parameters: list[str] = field(default_factory=list)
    missing_expert_calls: list[str] = field(default_factory=list)
    casts: list[str] = field(default_factory=list)
    sglang_warnings: list[str] = field(default_factory=list)
    expert_methods: dict[str, str] = field(default_factory=dict)  # experts module -> SGLang's quant method

    @property
    def problems(self) -> list[str]:
        tag = f"{self.model}: "
        head = [tag + e for e in (self.build_error, self.load_error) if e]
        rest = self.scheme_problems + self.unreached_tensors + self.unwritten_parameters + self.missing_expert_calls + self.casts
        return head + [tag + p for p in rest]


@dataclass
class DryLoadReport:
    checkpoint: str
    sglang_version: str
    stubbed: list[str] = field(default_factory=list)
    models: list[ModelReport] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [p for m in self.models for p in m.problems]

    @property
    def first_error(self) -> str:
        return self.problems[0] if self.problems else ""

    @property
    def passed(self) -> bool:
        return bool(self.models) and not self.problems

    def as_json(self) -> dict:
        return asdict(self) | {"passed": self.passed, "problems": self.problems, "first_error": self.first_error}


# ------------------------------------------------------------------------------------------------- checks
def belongs_to(tensor: str, model: str) -> bool:
    """Which model must take a checkpoint tensor: ``mtp.*`` the draft, everything else the trunk."""
    return tensor.startswith("mtp.") == (model == "draft")


def partners(tensor: str) -> list[str]:
    return [pattern.sub(repl, tensor) for pattern, repl in FUSED_PARTNERS if pattern.match(tensor)]


def check_reached(view: CheckpointView, calls: list[LoadCall], report: ModelReport) -> None:
    """Every tensor of this model reaches a parameter, itself or through the partner it is fused with."""
    reached = {c.tensor for c in calls}
    mine = [t for t in sorted(view.tensors, key=natural_key) if belongs_to(t, report.model)]
    for tensor in mine:
        if tensor in reached or any(p in reached and p in view.tensors for p in partners(tensor)):
            report.tensors_loaded += 1
        else:
            report.unreached_tensors.append(f"{tensor}: reached no parameter (SGLang's load_weights skipped it)")


def skipped_by_sglang(parameter: str, model: str) -> bool:
    if any(s in parameter for s in NEVER_LOADED):
        return True
    return model == "draft" and any(s in parameter for s in SHARED_WITH_TRUNK)


def check_unwritten(model: torch.nn.Module, report: ModelReport) -> None:
    for name, p in model.named_parameters():
        if skipped_by_sglang(name, report.model):
            continue
        # Packed FP4 bytes (MXFP4 experts are int8) are judged by whole rows of sentinel bytes, as uint8 rows are.
        mask = unwritten_mask(p.data.view(torch.uint8) if p.dtype == torch.int8 else p)
        if bool(mask.any()):
            report.unwritten_parameters.append(
                f"{name}: never written ({int(mask.sum())} of {mask.numel()} elements still hold the sentinel)"
            )


def expert_parameter(name: str) -> tuple[str, str, str] | None:
    """``model.layers.3.mlp.experts.w13_weight_scale`` -> (``model.layers.3.mlp.experts``, ``w13``,
    ``weight_scale``); None for other parameters."""
    m = re.match(r"^(.*\.experts)\.(w13|w2)_(\w+)$", name)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def checkpoint_expert_name(module: str, expert: int, shard: str, suffix: str, example: str | None) -> str:
    """The checkpoint tensor behind one (expert, shard) of an expert parameter: from a tensor of the same
    parameter that did load (exact spelling), else from SGLang's runtime module name."""
    if example:
        return re.sub(r"\.experts\.\d+\.w[123]\.", f".experts.{expert}.{shard}.", example)
    native = re.sub(r"^model\.decoder\.", "mtp.0.", module)
    native = re.sub(r"^model\.", "", native).replace(".mlp.", ".ffn.")
    suffix = "scale" if suffix == "weight_scale_inv" else suffix  # the loader renames an MXFP4/FP8 .scale
    return f"{native}.{expert}.{shard}.{suffix}"


def check_expert_calls(model: torch.nn.Module, calls: list[LoadCall], n_experts: int, report: ModelReport) -> None:
    """Every (expert, shard) of every routed-expert parameter received a loader call."""
    got: dict[str, set[tuple[int, str]]] = {}
    example: dict[str, str] = {}
    for c in calls:
        if c.expert is not None and c.shard is not None:
            got.setdefault(c.parameter, set()).add((int(c.expert), c.shard))
            example.setdefault(c.parameter, c.tensor)
    for name, _ in model.named_parameters():
        parsed = expert_parameter(name)
        if parsed is None or skipped_by_sglang(name, report.model):
            continue
        module, fused, suffix = parsed
        for expert in range(n_experts):
            for shard in EXPERT_SHARDS[fused]:
                if (expert, shard) not in got.get(name, set()):
                    missing = checkpoint_expert_name(module, expert, shard, suffix, example.get(name))
                    report.missing_expert_calls.append(
                        f"{name}: expert {expert} shard {shard} received no loader call: missing {missing}"
                    )


def check_casts(calls: list[LoadCall], report: ModelReport) -> None:
    seen = set()
    for c in calls:
        leaf = c.parameter.rsplit(".", 1)[-1]
        if c.source_dtype == c.target_dtype or (leaf, c.source_dtype, c.target_dtype) in ALLOWED_CASTS:
            continue
        if (c.source_dtype, c.target_dtype) in EXACT_WIDENINGS:
            continue
        key = (c.parameter, c.source_dtype, c.target_dtype)
        if key not in seen:
            seen.add(key)
            report.casts.append(f"{c.tensor} -> {c.parameter}: {dtype_name(c.source_dtype)} cast to "
                                f"{dtype_name(c.target_dtype)} by the loader")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checkpoint_expert_format(view: CheckpointView, module: str) -> str | None:
    """What the checkpoint holds for one routed-expert module (expert 0's w1), by dtypes: NVFP4 (U8 weight, E4M3
    ``weight_scale``), MXFP4 (I8/U8 weight, E8M0 ``scale``), FP8 (E4M3 weight) or None."""
    t = view.tensors
    weight, prefix = t.get(f"{module}.0.w1.weight"), f"{module}.0.w1."
    if weight is None:
        return None
    if weight.dtype == "F8_E4M3":
        return "FP8"
    if prefix + "weight_scale" in t and t[prefix + "weight_scale"].dtype == "F8_E4M3":
        return "NVFP4"
    if prefix + "scale" in t and t[prefix + "scale"].dtype == "F8_E8M0":
        return "MXFP4"
    return None


def method_format(method: str) -> str:
    """``Mxfp4FlashinferTrtllmMoEMethod`` -> MXFP4, ``ModelOptNvFp4FusedMoEMethod`` -> NVFP4, an FP8 method -> FP8."""
    for pattern, label in ((r"mxfp4", "MXFP4"), (r"nvfp4|fp4", "NVFP4"), (r"fp8", "FP8")):
        if re.search(pattern, method, re.I):
            return label
    return method


def check_expert_formats(view: CheckpointView, methods: dict[str, str], report: ModelReport) -> None:
    """Routed experts SGLang builds in one format while the checkpoint holds another load bytes into the wrong
    format silently (the NVFP4 ``weight`` fits an MXFP4 parameter's shape): named before anything else."""
    for runtime, method in sorted(methods.items()):
        module = re.sub(r"^model\.decoder\.", "mtp.0.", runtime)
        module = re.sub(r"^model\.", "", module).replace(".mlp.", ".ffn.")
        held, built = checkpoint_expert_format(view, module), method_format(method)
        if held is not None and held != built:
            hint = (" (SGLang builds V4's MTP experts as MXFP4, as NVIDIA's release stores them: convert with "
                    "--engine sglang)") if report.model == "draft" and built == "MXFP4" else ""
            report.scheme_problems.append(
                f"{module}: SGLang builds these routed experts as {built} ({method}) but the checkpoint holds "
                f"{held}{hint}"
            )


def expert_methods(model: torch.nn.Module) -> dict[str, str]:
    return {name: type(getattr(m, "quant_method", None)).__name__
            for name, m in model.named_modules() if name.endswith(".experts") and hasattr(m, "quant_method")}


# -------------------------------------------------------------------------------------------------------- main
def dry_load_model(view: CheckpointView, which: str) -> ModelReport:
    report = ModelReport(which)
    try:
        quant_config, model = build_model(view.root, draft=which == "draft")
    except Exception as e:  # noqa: BLE001 - SGLang refusing this config is the finding
        report.build_error = f"SGLang cannot build the {which} model: {type(e).__name__}: {first_line(e)}"
        return report
    report.model_class = type(model).__name__
    report.quant_config_class = type(quant_config).__name__ if quant_config is not None else "None"
    report.expert_methods = expert_methods(model)
    with torch.no_grad():
        for p in model.parameters():
            fill_with_sentinel(p)
        tracer = LoadTracer(model, view)
        with warnings_logged() as warnings:
            try:
                model.load_weights(tracer.weights())
            except Exception as e:  # noqa: BLE001 - the loader refusing a tensor is the finding
                notes = " ".join(getattr(e, "__notes__", []))
                report.load_error = (f"SGLang's load_weights raised at {tracer.current}: {type(e).__name__}: "
                                     f"{first_line(e)}" + (f" ({notes[:300]})" if notes else ""))
        report.sglang_warnings = warnings
        check_expert_formats(view, report.expert_methods, report)
        check_reached(view, tracer.calls, report)
        check_unwritten(model, report)
        check_expert_calls(model, tracer.calls, int(view.config.get("n_routed_experts") or 0), report)
        check_casts(tracer.calls, report)
    return report


def dry_load(root: str) -> DryLoadReport:
    import sglang

    view = open_checkpoint_headers(root)
    report = DryLoadReport(os.path.abspath(root), sglang.__version__, install_cpu_stubs())
    report.models.append(dry_load_model(view, "trunk"))
    if int(view.config.get("num_nextn_predict_layers") or 0) > 0:
        report.models.append(dry_load_model(view, "draft"))
    return report


def format_report(r: DryLoadReport) -> str:
    lines = [f"SGLang {r.sglang_version} dry load of {r.checkpoint}"]
    for m in r.models:
        lines.append(f"\n{m.model}: {m.model_class or '-'} with {m.quant_config_class or '-'}; "
                     f"{m.tensors_loaded} tensors reached a parameter")
        methods = sorted(set(m.expert_methods.values()))
        if methods:
            lines.append(f"  routed experts built with: {', '.join(methods)}")
        for title, items in (
            ("errors", [e for e in (m.build_error, m.load_error) if e]),
            ("routed-expert format", m.scheme_problems),
            ("tensors reaching no parameter", m.unreached_tensors),
            ("parameters never written", m.unwritten_parameters),
            ("(expert, shard) with no loader call", m.missing_expert_calls),
            ("casts", m.casts),
            ("SGLang's warnings", m.sglang_warnings),
        ):
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines += [f"    {x}" for x in items[:50]]
    lines.append("\nPASS" if r.passed else f"\nFAIL ({len(r.problems)} problems)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                    help="one or more checkpoint folders (one process: SGLang is imported once)")
    ap.add_argument("--json", help="write {checkpoint path: report} as JSON here")
    args = ap.parse_args(argv)
    reports: dict[str, DryLoadReport] = {}
    with contextlib.redirect_stdout(sys.stderr):  # SGLang prints; the reports are what this command prints
        install_import_stubs()
    for checkpoint in args.checkpoints:
        with contextlib.redirect_stdout(sys.stderr):
            reports[os.path.abspath(checkpoint)] = dry_load(checkpoint)
        print(format_report(reports[os.path.abspath(checkpoint)]) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({path: r.as_json() for path, r in reports.items()}, f, indent=1)
    return 0 if all(r.passed for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
