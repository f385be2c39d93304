"""Verify a converted NVFP4 checkpoint (Path A or Path B output) before it is served.

Result (``verify_nvfp4.py`` prints it last and exits with its code):

- ``PASS`` (exit 0): every required check ran and found nothing. Only the optional checks (8-10: they need a
  GPU or an engine's environment, not the checkpoint) may be skipped; the result line names those that were.
- ``FAIL`` (exit 1): a check found a problem; each problem line names the tensor, shard or config key at fault. A
  check that crashes on an input nobody foresaw is that check's FAIL with the exception's text; the others still run.
- ``INCOMPLETE`` (exit 1): nothing failed, but a required check could not run (``NOT RUN``, with the reason): most
  often no FP8 source, neither ``--src`` nor the one the converter recorded (``.nvfp4kit/fingerprint.json``,
  ``conversion_report.json`` or Path B's ``path_b_report.json``). Unverified is never reported as verified.
- exit 2 (``verify_nvfp4.py``): one error line, no report, when the folder is not a checkpoint at all.

Required checks, in order; each returns a :class:`CheckResult` whose problems name the tensor at fault:

1. ``static`` (headers, scales and config only): config.json present and a JSON object; every NVFP4 and kept-FP8
   module has exactly the companions its layout writes (:class:`nvfp4kit.layouts.Layout` is the one source of
   names, dtypes and shapes), activation scales where the config says W4A4, no stray tensor; no E4M3 NaN or negative
   block scale, every global and activation scale finite and > 0, one global scale per fused group; the index lists
   every tensor of every shard and nothing else, ``total_size`` right; the quantization config parses, no source
   FP8 config is left, and every quantized / kept-FP8 module is described by it as such.
2. ``finite``: no NaN or Inf in any floating-point output tensor (every byte read; the NVFP4 block scales are
   scanned by ``static``).
3. ``tensor_set``: the output holds exactly the tensors of the converter's plan (``.nvfp4kit/plan.json``) and of
   the plan rebuilt from the source by :mod:`nvfp4kit.rules` (with the options the converter recorded, else with
   the output's own NVFP4/FP8 choices where the rules allow them): a missing or extra tensor, or another dtype or
   shape, is named. Needs the plan or the source.
4. ``model_config`` (needs the source): every config.json key but ``quantization_config`` equals the source's.
5. ``copies`` (needs the source): every tensor the plan copies (embedding, head, norms, router, ``tid2eid``, ...)
   is the source's bit for bit, and every kept FP8 weight with its scale is bit for bit what the layout makes of
   the source's (the ``Layout.fp8_tensors`` bytes). Always every tensor, even when ``numeric`` samples.
6. ``numeric`` (needs the source): decoded NVFP4 against the dequantized FP8 source. Tensors the converter
   reports as ``exact`` must decode bit for bit (a swapped nibble anywhere fails); others need an SQNR of at least
   :data:`.numeric.MIN_SQNR_DB`. All modules of a small checkpoint, a fixed-seed sample of a large one.
7. ``block_forward`` (needs the source; ``forward=False`` leaves it out): one transformers DeepSeek V4 decoder
   layer run on the same random hidden states with the FP8-dequantized weights and with the weights decoded from
   the output.

Optional checks (SKIP with the reason where they cannot run; they do not make the result INCOMPLETE):

8. ``vllm_generate`` (GPU with vLLM only): vLLM loads the checkpoint and generates a few tokens.
9. ``vllm_dry_load`` (on by default): :func:`nvfp4kit.vllm_check.run_vllm_dry_load` in vLLM's own environment,
   skipped where there is none.
10. ``sglang_dry_load`` (``sglang_dry_load=True``): :func:`nvfp4kit.sglang_check.run_sglang_dry_load`, SGLang's
    own loader over trunk and MTP draft in SGLang's environment, skipped where there is none.

On request (``fidelity=True``, ``--fidelity``; needs the source, NOT RUN without it; it runs after check 7, so the
printed report, which numbers checks as they ran, shows it before the optional ones):

11. ``fidelity``: :func:`nvfp4kit.fidelity.measure_fidelity`, the whole model teacher-forced on text with the
    source's and the output's weights, one decoder block at a time (W4A4 outputs with activations quantized as vLLM
    does). Details: ``kld_mean``, ``kld_max``, ``top1_agreement``, ``ppl_source``, ``ppl_output``, ``tokens``,
    ``per_layer``, ``mtp``. FAIL when the KLD mean exceeds 1.0 nat, top-1 agreement is below 0.5, the perplexity
    ratio exceeds 2.0 or the hidden-state relative error after any block exceeds 0.5 (bounds that catch a broken
    conversion even on a random-weight synthetic model; a good conversion of a trained model shows a KLD mean of
    0.01-0.1 and top-1 agreement above 0.9, see docs/fidelity.md). Rewrites the fidelity section of ``README.md``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

from ..checkpoint import Checkpoint, CheckpointError, open_checkpoint, read_config
from ..errors import KitError
from ..plan import ConversionPlan
from .against_source import check_copies, check_model_config, check_tensor_set, rebuilt_plan
from .engines import check_sglang_dry_load, check_vllm_dry_load, check_vllm_generate
from .finite import check_finite
from .forward import check_block_forward
from .numeric import check_numeric
from .records import Records, open_source, read_records
from .results import CheckResult, crash_line, finding, not_run, guarded
from .static import check_static, config_file_problem, output_w4a4

PASS, FAIL, INCOMPLETE = "PASS", "FAIL", "INCOMPLETE"


def verify(dst: str, src: str | None = None, sample: int | None = None, layer: int | None = None,
           forward: bool = True, vllm_generate: bool = True, tp: int | None = None,
           vllm_dry_load: bool = True, sglang_dry_load: bool = False, fidelity: bool = False,
           fidelity_data: str | None = None, fidelity_tokens: int | None = None,
           device: str | None = None) -> list[CheckResult]:
    """Run the checks on ``dst``; ``src`` defaults to the source the converter recorded. Raises only
    :class:`CheckpointError` (``dst`` is not a checkpoint folder); every other problem is a check's FAIL."""
    try:
        ckpt = open_checkpoint(dst)
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:  # open_checkpoint parses config.json and raises on malformed JSON
        why = config_file_problem(dst) or f"cannot be opened: {crash_line(e)}"
        return [finding("static", [], [f"{why}; no other check can run without it"])]
    if not isinstance(ckpt.config, dict):  # config_file_problem reports it
        ckpt = dataclasses.replace(ckpt, config={})
    static, inv = check_static(ckpt)
    records = read_records(dst)
    static.problems += records.problems
    static.passed = not static.problems
    w4a4 = output_w4a4(ckpt, inv)
    results = [static, guarded("finite", check_finite, ckpt, inv)]
    source, source_note = open_source(src or records.source, given=src is not None)
    plan, plan_note = None, ""
    if source is not None:
        try:
            plan, plan_note = rebuilt_plan(source, inv, w4a4, records)
        except (KitError, ValueError) as e:  # PlanError, LayoutError, RuleError: no plan for this output
            plan_note = f"the source's plan cannot be rebuilt: {'; '.join(getattr(e, 'problems', [str(e)])[:5])}"
    results.append(_tensor_set(ckpt, records, source, plan, source_note if source is None else plan_note))
    if source is None:
        results += [not_run(name, source_note) for name in ("model_config", "copies", "numeric")]
        if forward:
            results.append(not_run("block_forward", source_note))
    else:
        results.append(guarded("model_config", check_model_config, ckpt, source))
        results.append(guarded("copies", check_copies, ckpt, source, plan) if plan is not None
                       else finding("copies", [], [f"nothing to compare against: {plan_note}"]))
        results.append(guarded("numeric", check_numeric, ckpt, inv, source, records.tensor_rules, sample))
        if forward:
            results.append(guarded("block_forward", check_block_forward, ckpt, inv, source, layer))
    if fidelity:  # check 11, on request: the whole model on text (nvfp4kit.fidelity), and the card's figures
        results.append(not_run("fidelity", source_note) if source is None else
                       guarded("fidelity", check_fidelity, dst, source.root, fidelity_data, fidelity_tokens, device))
    if vllm_generate:
        results.append(guarded("vllm_generate", check_vllm_generate, dst, w4a4, tp))
        results[-1].required = False
    if vllm_dry_load:
        results.append(guarded("vllm_dry_load", check_vllm_dry_load, dst))
        results[-1].required = False
    if sglang_dry_load:
        results.append(guarded("sglang_dry_load", check_sglang_dry_load, dst))
        results[-1].required = False
    return results


def check_fidelity(dst: str, src: str, data: str | None, tokens: int | None, device: str | None) -> CheckResult:
    """:func:`nvfp4kit.fidelity.measure_fidelity` as a check (its figures in ``details``, its bounds in
    docs/fidelity.md); the output's model card gets the figures."""
    from ..card import update_card_fidelity
    from ..fidelity import DEFAULT_TOKENS, measure_fidelity, unmeasurable

    why = unmeasurable(read_config(src)[0])
    if why:  # requested but not measurable: NOT RUN (the result is INCOMPLETE), never a PASS
        return not_run("fidelity", why)
    measured = measure_fidelity(dst, src, data, tokens or DEFAULT_TOKENS, device)
    result = finding("fidelity", measured["evidence"], measured["problems"])
    result.details = measured["figures"]
    if measured["figures"]:
        update_card_fidelity(dst, measured["figures"], result.status, src)
    return result


def _tensor_set(ckpt: Checkpoint, records: Records, source: Checkpoint | None, plan: ConversionPlan | None,
                note: str) -> CheckResult:
    """check_tensor_set where there is a reference: NOT RUN without plan.json and source, FAIL when the source
    is there but its plan cannot be rebuilt."""
    if source is None and records.plan is None:
        return not_run("tensor_set", note)
    result = guarded("tensor_set", check_tensor_set, ckpt, records, plan, note)
    if source is not None and plan is None:
        result.problems.append(note)
        result.passed = False
    return result


def verdict(results: list[CheckResult]) -> str:
    """FAIL if a check failed; else INCOMPLETE if a required check could not run; else PASS."""
    if any(not r.passed and not r.skipped for r in results):
        return FAIL
    if any(r.skipped and r.required for r in results):
        return INCOMPLETE
    return PASS


def all_passed(results: list[CheckResult]) -> bool:
    return verdict(results) == PASS


def verdict_line(results: list[CheckResult]) -> str:
    result = verdict(results)
    if result == FAIL:
        return f"result: FAIL: {', '.join(r.name for r in results if not r.passed and not r.skipped)}"
    if result == INCOMPLETE:
        return (f"result: INCOMPLETE: {', '.join(r.name for r in results if r.skipped and r.required)} not run "
                "(see why above); not verified")
    skipped = [r.name for r in results if r.skipped]
    return "result: PASS" + (f" (optional, not run here: {', '.join(skipped)})" if skipped else "")


def format_report(dst: str, results: list[CheckResult], max_problems: int = 20) -> str:
    lines = [f"verify {dst}"]
    for i, r in enumerate(results, 1):
        lines.append(f"[{r.status}] {i}. {r.name}")
        lines += [f"    {e}" for e in r.evidence]
        lines += [f"    ! {p}" for p in r.problems[:max_problems]]
        if len(r.problems) > max_problems:
            lines.append(f"    ! ... {len(r.problems) - max_problems} more (see --json)")
    lines.append(verdict_line(results))
    return "\n".join(lines)


def write_json(path: str, dst: str, results: list[CheckResult]) -> None:
    with open(path, "w") as f:
        json.dump({"checkpoint": dst, "result": verdict(results), "passed": all_passed(results),
                   "checks": [asdict(r) | {"status": r.status} for r in results]}, f, indent=1, default=str)
        f.write("\n")
