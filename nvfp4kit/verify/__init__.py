"""Verify a converted NVFP4 checkpoint before it is served: :func:`verify` runs the checks, :func:`format_report`
prints them. What PASS, FAIL and INCOMPLETE mean and every check in full: :mod:`nvfp4kit.verify.run`.

Modules, in the order of the checks:

- ``results``         CheckResult, what every check returns; ``guarded`` turns a check's crash into its FAIL
- ``inventory``       what the output holds, from tensor names alone; config readers; the output's tensors decoded
- ``static``          check 1: index, companions, scale values, the quantization_config's description of each module
- ``records``         what the converter recorded (plan, fingerprint, report) and the FP8 source it names
- ``finite``          whole tensors in bounded chunks; check 2: no NaN/Inf
- ``against_source``  checks 3-5 against the plan and the source: tensor_set, model_config, copies
- ``numeric``         check 6: decoded NVFP4 against the dequantized source
- ``forward``         check 7: one decoder block, FP8 weights vs the output's
- ``engines``         checks 8-10, optional: vLLM generate, vLLM and SGLang dry loads
- ``run``             verify() (with check 11, fidelity, on request), the verdict, the report, its JSON
"""

from .inventory import config_w4a4, decoded_source, quant_config, take_inventory
from .numeric import check_numeric
from .results import CheckResult
from .run import FAIL, INCOMPLETE, PASS, all_passed, format_report, verdict, verify, write_json
from .static import check_static

__all__ = [
    "FAIL", "INCOMPLETE", "PASS", "CheckResult", "all_passed", "check_numeric", "check_static", "config_w4a4",
    "decoded_source", "format_report", "quant_config", "take_inventory", "verdict", "verify", "write_json",
]
