"""A checkpoint folder: ``model.safetensors.index.json`` (or one ``*.safetensors``), shard headers, lazy tensors.

Opening reads only the index and the headers. Every inconsistency is collected as a named problem instead of
stopping at the first one, so that ``inspect_model.py`` can list them all; the converter refuses to start while
any problem remains.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field

from .safetensors_io import SafetensorsError, TensorInfo, read_header
from .errors import KitError

INDEX_NAME = "model.safetensors.index.json"
# Scale companion suffixes of an FP8 ``<module>.weight``: DeepSeek V4 ``.scale`` (UE8M0), V3 ``.weight_scale_inv``.
SCALE_SUFFIXES = (".scale", ".weight_scale_inv")


class CheckpointError(KitError, ValueError):
    """The folder cannot be read as a checkpoint at all."""


@dataclass
class Checkpoint:
    root: str
    tensors: dict[str, TensorInfo]
    shards: list[str]  # file names relative to root, sorted
    weight_map: dict[str, str] | None  # None for a single-file checkpoint without an index
    index_total_size: int | None
    config: dict
    problems: list[str] = field(default_factory=list)
    unavailable: set[str] = field(default_factory=set)  # listed in the index, in a shard missing or unreadable

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def is_knock_on(self, problem: str) -> bool:
        """Whether ``problem`` only follows from a missing or unreadable shard (it names a tensor of one, or the
        weight whose scale is in one): such problems are left out, so that one cause gives one line."""
        if not self.unavailable:
            return False
        lost = {_module(n) for n in self.unavailable}
        return any(_module(w) in lost for w in re.findall(r"[\w.]+\w", problem))

    def shard_of(self, name: str) -> str:
        return os.path.relpath(self.tensors[name].file, self.root)


def _module(name: str) -> str:
    for suffix in (".weight", *SCALE_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def module_of(weight_name: str) -> str | None:
    """``layers.0.attn.wq_a.weight`` -> ``layers.0.attn.wq_a``; None for names without a ``.weight`` suffix."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else None


def scale_of(weight_name: str, names: dict | set) -> str | None:
    """The FP8 scale companion of ``weight_name`` present in ``names``, if any."""
    module = module_of(weight_name)
    if module is None:
        return None
    for suffix in SCALE_SUFFIXES:
        if module + suffix in names:
            return module + suffix
    return None


def weight_of_scale(scale_name: str) -> str | None:
    for suffix in SCALE_SUFFIXES:
        if scale_name.endswith(suffix):
            return scale_name[: -len(suffix)] + ".weight"
    return None


def open_checkpoint(root: str) -> Checkpoint:
    """Read the index and every shard header under ``root``; problems are collected, not raised."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: not a directory")
    problems: list[str] = []
    present = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "*.safetensors")))
    index_path = os.path.join(root, INDEX_NAME)
    weight_map = None
    total_size = None
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                index = json.load(f)
            weight_map = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid index ({e!r})") from None
        total_size = (index.get("metadata") or {}).get("total_size")
        listed = sorted(set(weight_map.values()))
        for s in listed:
            if not os.path.exists(os.path.join(root, s)):
                lost = sorted(n for n, where in weight_map.items() if where == s)
                problems.append(f"shard {s} is listed in the index but missing ({len(lost)} tensors, e.g. {lost[0]})")
        for s in sorted(set(present) - set(listed)):
            problems.append(f"shard {s} is present but not listed in the index")
        shards = [s for s in listed if os.path.exists(os.path.join(root, s))]
    elif present:
        shards = present
    else:
        raise CheckpointError(f"{root}: no {INDEX_NAME} and no *.safetensors file: not a checkpoint")
    tensors: dict[str, TensorInfo] = {}
    unreadable = set()
    for s in shards:
        try:
            found, _ = read_header(os.path.join(root, s))
        except (SafetensorsError, OSError) as e:
            problems.append(f"shard {s}: cannot read header: {e}")
            unreadable.add(s)
            continue
        for name, info in found.items():
            if name in tensors:
                problems.append(f"tensor {name} is in two shards: {os.path.basename(tensors[name].file)} and {s}")
                continue
            tensors[name] = info
            if weight_map is not None and weight_map.get(name) != s:
                where = weight_map.get(name)
                problems.append(
                    f"tensor {name} is in shard {s} but the index "
                    + (f"points to {where}" if where else "does not list it")
                )
    unavailable: set[str] = set()
    if weight_map is not None:
        unavailable = {n for n, s in weight_map.items() if s not in shards or s in unreadable}
        for name, s in weight_map.items():
            if name not in tensors and name not in unavailable:
                problems.append(f"tensor {name} is listed in the index (shard {s}) but not in that shard")
        actual = sum(t.nbytes for t in tensors.values())
        if total_size is not None and int(total_size) != actual and not unavailable:
            problems.append(f"index metadata.total_size {total_size} disagrees with the headers ({actual} bytes)")
    if not tensors and not problems:
        problems.append("the checkpoint holds no tensors (an empty index or empty shards)")
    config, config_problem = read_config(root)
    if config_problem:
        problems.append(config_problem)
    return Checkpoint(root, tensors, shards, weight_map, total_size, config, problems, unavailable)


def read_config(root: str) -> tuple[dict, str | None]:
    """``root/config.json`` and the problem with it, if any: the kit needs the model's config (its layers,
    widths and architecture) to know what it converts."""
    path = os.path.join(root, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        return {}, f"config.json is missing in {root}: the model's config is needed to know what it holds"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return {}, f"config.json in {root} cannot be read: {e}"
    if not isinstance(config, dict):
        return {}, f"config.json in {root} is not a JSON object"
    return config, None


def configured_block_size(config: dict) -> tuple[int, int] | None:
    """``quantization_config.weight_block_size`` of a source FP8 config, if any."""
    wbs = (config.get("quantization_config") or {}).get("weight_block_size")
    return (int(wbs[0]), int(wbs[1])) if wbs else None
