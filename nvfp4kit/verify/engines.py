"""The optional checks 8-10, in the engines: vLLM generates a few tokens (GPU only), vLLM's and SGLang's own
loaders dry-load the output in their environments; each is SKIP with the reason where it cannot run."""

from __future__ import annotations

import torch

from ..checkpoint import read_config
from ..families import table_for
from ..rules import collapse
from .records import read_records
from .results import CheckResult, finding, not_run

VLLM_PROMPT = "The capital of France is"


def hardware_note(w4a4: bool) -> str:
    major, minor = torch.cuda.get_device_capability()
    if major == 9:
        return (f"SM{major}{minor} (Hopper): vLLM serves NVFP4 weight-only through its Marlin/Humming fallback"
                + ("; the W4A4 activation scales are NOT exercised here" if w4a4 else ""))
    if major >= 10:
        return f"SM{major}{minor} (Blackwell): native FP4 kernels" + ("; W4A4 activation scales used" if w4a4 else "")
    return f"SM{major}{minor}: vLLM's NVFP4 path on this GPU is weight-only at best"


def check_vllm_generate(dst: str, w4a4: bool, tp: int | None = None, max_tokens: int = 8) -> CheckResult:
    if not torch.cuda.is_available():
        return not_run("vllm_generate", "no GPU: vLLM generation not run", required=False)
    try:
        import vllm
    except ImportError:
        return not_run("vllm_generate", "vllm is not importable here", required=False)
    tp = tp or torch.cuda.device_count()
    evidence = [f"vllm {vllm.__version__}, tensor parallel {tp}; {hardware_note(w4a4)}"]
    try:
        llm = vllm.LLM(model=dst, tensor_parallel_size=tp, max_model_len=2048, enforce_eager=True)
        out = llm.generate([VLLM_PROMPT], vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens))[0].outputs[0]
    except Exception as e:  # any load or run failure is the finding
        return finding("vllm_generate", evidence, [f"vLLM failed: {type(e).__name__}: {str(e).splitlines()[:3]}"])
    evidence.append(f"prompt {VLLM_PROMPT!r} -> {out.text!r} (token ids {list(out.token_ids)})")
    return finding("vllm_generate", evidence, [] if out.token_ids else ["vLLM generated no token"])


def planned_actions(dst: str) -> dict[str, str] | None:
    """What Path A meant for each quantized or kept-FP8 module (its plan.json), for comparison with vLLM's choice."""
    actions = (read_records(dst).plan or {}).get("actions")
    if not isinstance(actions, dict):
        return None
    return {m: a for m, a in actions.items() if a in ("quantize", "keep_fp8")}


def check_vllm_dry_load(dst: str) -> CheckResult:
    """vLLM's own loader over every tensor, in vLLM's environment (:mod:`nvfp4kit.vllm_check`)."""
    try:
        from ..vllm_check import run_vllm_dry_load
    except ImportError as e:
        return not_run("vllm_dry_load", f"nvfp4kit.vllm_check not available ({e})", required=False)
    r = run_vllm_dry_load(dst, planned=planned_actions(dst))
    if r.skipped:
        return not_run("vllm_dry_load", r.reason, required=False)
    evidence = [f"vllm {r.vllm_version}: {len(r.schemes)} modules' schemes as vLLM picked them:"]
    by_scheme: dict[str, set[str]] = {}
    table = table_for(read_config(dst)[0])
    for module, scheme in r.schemes.items():
        by_scheme.setdefault(scheme, set()).add(collapse(module, table))
    evidence += [f"  {scheme}: {', '.join(sorted(patterns))}" for scheme, patterns in sorted(by_scheme.items())]
    return finding("vllm_dry_load", evidence, r.problems)


def check_sglang_dry_load(dst: str) -> CheckResult:
    """SGLang's own loader over trunk and MTP draft, in SGLang's environment (:mod:`nvfp4kit.sglang_check`)."""
    from ..sglang_check import run_sglang_dry_load

    r = run_sglang_dry_load(dst)
    if r.skipped:
        return not_run("sglang_dry_load", r.reason, required=False)
    evidence = [f"sglang {r.sglang_version}: {m['model']} {m['model_class'] or '(not built)'}, "
                f"{m['tensors_loaded']} tensors reached a parameter, routed experts "
                f"{', '.join(sorted(set(m['expert_methods'].values()))) or '-'}" for m in r.report.get("models", [])]
    evidence += [f"  SGLang warned: {w}" for m in r.report.get("models", []) for w in m["sglang_warnings"]]
    return finding("sglang_dry_load", evidence, r.problems)
