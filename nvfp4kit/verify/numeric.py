"""Check 6, ``numeric``: decoded NVFP4 modules against the dequantized FP8 source, bit for bit where the converter
reports the exact rule, an SQNR floor elsewhere; all modules of a small checkpoint, a sample of a large one."""

from __future__ import annotations

import math
import random

import torch

from ..checkpoint import Checkpoint
from ..nvfp4 import ScaleRule, dequantize_nvfp4, reconstruction_error
from .inventory import Inventory, read_nvfp4
from .results import CheckResult, crash_line, finding

# Reference NVFP4 (amax/2688, E4M3 block scales) gives 20.4 dB on Gaussian weights, 21.8 dB on Student-t(3) ones and
# 24.0-25.0 dB on the tiny synthetic checkpoint (--scale-policy reference). Decoding bugs land far below: swapped
# nibbles -3.0 dB, an inverted global scale -110 dB, block scales shifted by one block 9.2 dB (all measured on a
# 1024x1024 Gaussian). 15 dB keeps at least 5 dB of margin on both sides: rounding noise passes, a wrong decode fails.
MIN_SQNR_DB = 15.0
# Numeric check reads every NVFP4 tensor when their data is below this; a sample above it.
SAMPLE_ALL_BELOW_BYTES = 4 * 10**9
DEFAULT_SAMPLE = 256


def choose_sample(ckpt: Checkpoint, inv: Inventory, sample: int | None, seed: int = 0) -> list[str]:
    """NVFP4 modules to compare: all if ``sample`` is None and their data is small, else ``sample`` (default
    :data:`DEFAULT_SAMPLE`) drawn with a fixed seed, so that a rerun checks the same tensors."""
    modules = sorted(inv.nvfp4)
    if sample is None:
        wanted = set(modules)
        size = sum(i.nbytes for n, i in ckpt.tensors.items() if n.rsplit(".", 1)[0] in wanted)
        sample = len(modules) if size < SAMPLE_ALL_BELOW_BYTES else DEFAULT_SAMPLE
    return modules if sample >= len(modules) else sorted(random.Random(seed).sample(modules, sample))


def check_numeric(ckpt: Checkpoint, inv: Inventory, source: Checkpoint, rules: dict[str, str],
                  sample: int | None, worst: int = 5) -> CheckResult:
    """Decoded NVFP4 modules against the dequantized source: bit for bit where ``rules`` (the converter's report)
    says ``exact``, SQNR >= :data:`MIN_SQNR_DB` elsewhere."""
    from ..hf_model import dequantized_source

    read_source = dequantized_source(source)
    chosen = choose_sample(ckpt, inv, sample)
    problems: list[str] = []
    metrics: dict[str, dict] = {}
    exact_ok = 0
    for module in chosen:
        name = module + ".weight"
        if name not in source.tensors:
            problems.append(f"{module}: not in the source {source.root}")
            continue
        try:
            ref = read_source(name)
            got = dequantize_nvfp4(read_nvfp4(ckpt, inv, module))
            if got.shape != ref.shape:
                problems.append(f"{module}: decodes to {list(got.shape)}, the source has {list(ref.shape)}")
                continue
            err = reconstruction_error(ref, got)
        except Exception as e:  # a missing companion, a truncated tensor: this module's finding
            problems.append(f"{module}: cannot be decoded and compared: {crash_line(e)}")
            continue
        metrics[module] = {"rule": rules.get(module), **err}
        if rules.get(module) == ScaleRule.EXACT:
            if torch.equal(got, ref.to(torch.float32)):
                exact_ok += 1
            else:
                wrong = int((got != ref).sum())
                problems.append(f"{module}: converted with the exact rule but {wrong} of {got.numel()} values "
                                f"differ from the source (SQNR {err['sqnr_db']:.2f} dB, "
                                f"rel. error {err['rel_error']:.4f})")
        elif not err["sqnr_db"] >= MIN_SQNR_DB:  # NaN fails too
            problems.append(f"{module}: SQNR {err['sqnr_db']:.2f} dB < {MIN_SQNR_DB} dB "
                            f"(rel. error {err['rel_error']:.4f}): not rounding noise")
    finite = [m["sqnr_db"] for m in metrics.values() if math.isfinite(m["sqnr_db"])]
    evidence = [
        f"source {source.root}; {len(chosen)} of {len(inv.nvfp4)} NVFP4 modules compared",
        f"{exact_ok} NVFP4 tensors bit-exact (the converter's report says 'exact')"
        + ("" if rules else "; no per-tensor rules recorded (Path B or no report): SQNR bound for all"),
    ]
    if finite:
        evidence.append(f"SQNR over {len(finite)} non-exact tensors: mean {sum(finite) / len(finite):.2f} dB, "
                        f"min {min(finite):.2f} dB (threshold {MIN_SQNR_DB} dB)")
    ranked = sorted(metrics.items(), key=lambda kv: kv[1]["sqnr_db"])[:worst]
    evidence += [f"  worst: {m}: SQNR {v['sqnr_db']:.2f} dB, rel. error {v['rel_error']:.4f}"
                 for m, v in ranked if math.isfinite(v["sqnr_db"])]
    result = finding("numeric", evidence, problems)
    result.details = metrics
    return result
