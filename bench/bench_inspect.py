#!/usr/bin/env python3
"""Benchmark: ``inspect_model.py`` time grows with the number of tensors, not with their bytes.

Writes two checkpoints with the same tensor names, the same shard count and headers of the same size, whose tensor
data differ 10x in bytes (every tensor's first dimension, and its FP8 scale's, is 10x longer), then times
``checkpoint_facts`` + ``render_report`` on each. By default the layout is the full V4 Pro one (61 layers, 384
experts, 64 shards, ~145k tensors) at the ``tiny`` preset's widths. Data regions are sparse (``ftruncate``): the
files have their full length, but take no disk space; a reader that touched the data would still pay for it.
``--dense`` writes the zeros for real (use small ``--layers``/``--experts``). Not run by CI.

    python bench/bench_inspect.py --dir /tmp/bench_inspect
    python bench/bench_inspect.py --dir /tmp/bench_inspect --layers 4 --experts 32 --dense
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nvfp4kit.checkpoint import INDEX_NAME, open_checkpoint  # noqa: E402
from nvfp4kit.report import checkpoint_facts, render_report  # noqa: E402
from nvfp4kit.safetensors_io import DTYPE_NAMES, TensorSpec, encode_header  # noqa: E402
from nvfp4kit.fixtures.synthetic import (  # noqa: E402
    BLOCK, checkpoint_recipes, materialize, model_config, shard_count, shard_file, shard_number)


def recipe_dtypes(recipes) -> dict[str, list[str]]:
    """dtype of each output of each recipe kind, learnt from the generator itself on a tiny tensor."""
    dtypes: dict[str, list[str]] = {}
    for r in recipes:
        if r.kind not in dtypes:
            small = type(r)(r.name, r.kind, (BLOCK,) * len(r.shape), experts=max(r.experts, 1))
            made = materialize(small, 0, torch.float8_e8m0fnu)
            dtypes[r.kind] = [DTYPE_NAMES[made[n].dtype] for n in small.tensor_names()]
    return dtypes


def tensor_specs(cfg: dict, factor: int) -> dict[int, list[TensorSpec]]:
    """Every tensor of the checkpoint by shard number, with the first dimension multiplied by ``factor``."""
    recipes = checkpoint_recipes(cfg)
    dtypes = recipe_dtypes(recipes)
    by_shard: dict[int, list[TensorSpec]] = {n: [] for n in range(1, shard_count(cfg) + 1)}
    for r in recipes:
        shape = (r.shape[0] * factor,) + tuple(r.shape[1:])
        names = r.tensor_names()
        shapes = [shape] if len(names) == 1 else [shape, tuple(math.ceil(d / BLOCK) for d in shape)]
        for name, dtype, s in zip(names, dtypes[r.kind], shapes):
            by_shard[shard_number(name, cfg)].append(TensorSpec(name, dtype, s))
    return by_shard


def write_checkpoint(dst: str, cfg: dict, factor: int, dense: bool) -> tuple[int, int]:
    """Headers for real, data sparse (or zeros with ``dense``); returns (tensor data bytes, header bytes)."""
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    total = shard_count(cfg)
    weight_map: dict[str, str] = {}
    data_bytes = header_bytes = 0
    for number, specs in tensor_specs(cfg, factor).items():
        name = shard_file(number, total)
        header = encode_header(specs)
        size = sum(s.nbytes for s in specs)
        with open(os.path.join(dst, name), "wb") as f:
            f.write(header)
            if dense:
                chunk = bytes(1 << 24)
                for start in range(0, size, len(chunk)):
                    f.write(chunk[: min(len(chunk), size - start)])
            else:
                f.truncate(len(header) + size)
        weight_map.update({s.name: name for s in specs})
        data_bytes += size
        header_bytes += len(header)
    with open(os.path.join(dst, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": data_bytes}, "weight_map": weight_map}, f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return data_bytes, header_bytes


def time_inspect(src: str, repeats: int) -> tuple[float, float, dict]:
    """Best wall and CPU seconds of ``repeats`` runs of what inspect_model.py does after its imports.

    CPU time (user + system, so reading data would count) is the steadier number on a shared machine."""
    wall = cpu = float("inf")
    facts: dict = {}
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        facts = checkpoint_facts(open_checkpoint(src))
        render_report(facts)
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu, facts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="scratch folder (two checkpoints are written under it)")
    p.add_argument("--preset", default="tiny", help="synthetic preset whose widths to use (default: tiny)")
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--experts", type=int, default=384)
    p.add_argument("--factor", type=int, default=10, help="data-size ratio between the two checkpoints")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense", action="store_true", help="write the data bytes instead of leaving sparse holes")
    args = p.parse_args()
    cfg = model_config(args.preset, num_hidden_layers=args.layers, n_routed_experts=args.experts)
    results = []
    for factor in (1, args.factor):
        src = os.path.join(args.dir, f"x{factor}")
        data, header = write_checkpoint(src, cfg, factor, args.dense)
        os.sync()  # the kernel's write-back of what was just written must not run during the timing
        wall, cpu, facts = time_inspect(src, args.repeats)
        assert facts["convertible"], facts["problems"]
        results.append((wall, cpu))
        print(f"x{factor:<3} {facts['source']['shards']} shards, {facts['source']['tensors']:,} tensors, "
              f"headers {header / 1e6:.2f} MB, data {data / 1e9:.2f} GB "
              f"({'dense' if args.dense else 'sparse'}): inspect {wall:.2f} s wall, {cpu:.2f} s CPU "
              f"(best of {args.repeats}); expected output {facts['plan']['output_bytes'] / 1e9:.2f} GB")
    (w1, c1), (w10, c10) = results
    print(f"x{args.factor} / x1 for {args.factor}x the data bytes: wall {w10 / w1:.2f}, CPU {c10 / c1:.2f}")


if __name__ == "__main__":
    main()
