"""What the converter recorded in the output (:class:`Records`: Path A's plan and fingerprint, either path's
report), and the FP8 source it names, opened for the checks that need it."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from ..calibrate import REPORT_NAME as PATH_B_REPORT_NAME
from ..checkpoint import Checkpoint, open_checkpoint
from ..convert import REPORT_NAME, STATE_DIR
from ..errors import KitError

# The converter's report: Path A's, else Path B's (each names the source and the options it ran with).
REPORT_NAMES = (REPORT_NAME, PATH_B_REPORT_NAME)


@dataclass
class Records:
    """The converter's own files in the output, each optional: Path A's plan and fingerprint, either path's report."""

    plan: dict | None = None  # .nvfp4kit/plan.json (Path A)
    fingerprint: dict | None = None  # .nvfp4kit/fingerprint.json (Path A)
    report: dict | None = None  # conversion_report.json (Path A) or path_b_report.json (Path B)
    report_name: str | None = None
    problems: list[str] = field(default_factory=list)  # a record present but unreadable

    @property
    def source(self) -> str | None:
        """The source folder the converter read: the fingerprint's, else the report's."""
        for record in (self.fingerprint, self.report):
            if record and isinstance(record.get("source"), str):
                return record["source"]
        return None

    @property
    def options(self) -> tuple[dict, str] | None:
        """The converter's options as JSON (``Options.as_json``) and the file they come from, if recorded."""
        for record, name in ((self.plan, f"{STATE_DIR}/plan.json"), (self.report, self.report_name)):
            if record and isinstance(record.get("options"), dict):
                return record["options"], name
        return None

    @property
    def tensor_rules(self) -> dict[str, str]:
        """NVFP4 module -> the scale rule the converter used (``exact`` or ``reference``), where the report says."""
        tensors = (self.report or {}).get("tensors")
        return {m: st.get("rule") for m, st in tensors.items() if isinstance(st, dict)} if isinstance(tensors, dict) else {}


def read_records(dst: str) -> Records:
    records = Records()
    found = {}
    for key, name in (("plan", f"{STATE_DIR}/plan.json"), ("fingerprint", f"{STATE_DIR}/fingerprint.json"),
                      *(("report", n) for n in REPORT_NAMES)):
        path = os.path.join(dst, name)
        if key in found or not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            records.problems.append(f"{name}: cannot be read as JSON ({e})")
            continue
        if not isinstance(data, dict):
            records.problems.append(f"{name}: a {type(data).__name__}, not a JSON object")
            continue
        found[key] = name
        setattr(records, key, data)
    records.report_name = found.get("report")
    return records


def converter_report(dst: str) -> dict:
    """The converter's report (Path A's conversion_report.json, else Path B's path_b_report.json); {} if none."""
    return read_records(dst).report or {}


def recorded_source(dst: str) -> str | None:
    """The source folder the converter recorded: Path A's ``.nvfp4kit/fingerprint.json``, else the report's."""
    return read_records(dst).source


def open_source(src: str | None, given: bool) -> tuple[Checkpoint | None, str]:
    """The source checkpoint, or None and why the checks that need it cannot run."""
    if src is None:
        return None, ("no FP8 source: no --src given and none recorded by the converter (.nvfp4kit/fingerprint.json, "
                      f"{' or '.join(REPORT_NAMES)}); pass --src to verify against it")
    origin = "--src" if given else "the source the converter recorded"
    if not os.path.isdir(src):
        return None, f"{origin} {src} is not a folder; pass --src with the FP8 source"
    try:
        source = open_checkpoint(src)
    except (KitError, OSError, ValueError) as e:  # ValueError: its config.json is not JSON
        return None, f"{origin} {src} cannot be opened: {e}"
    if not isinstance(source.config, dict):
        source = dataclasses.replace(source, config={})
    return source, f"source {src} ({origin})"
