"""Check 7, ``block_forward``: one transformers decoder layer run on the same random hidden states with the
FP8-dequantized source weights and with the weights decoded from the output."""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from ..hf_model import is_v3 as hf_model_is_v3
from ..nvfp4 import reconstruction_error
from .inventory import Inventory, decoded_source
from .results import CheckResult, finding

# The block's own contribution (output minus its input streams) may differ by at most this relative L2 error. A
# weight at the 15 dB floor has a relative error of 0.18; reference NVFP4 weights (~0.09) gave 0.084 on the tiny
# checkpoint's layer 3, exact ones give 0. 0.25 allows the floor with some amplification, not a broken block.
MAX_BLOCK_REL_ERROR = 0.25


def default_layer(config: dict) -> int:
    """The first layer with a learned router (V4's hash layers route by token id, so they test less of the
    weights; V3's first ``first_k_dense_replace`` layers are dense)."""
    first = config.get("first_k_dense_replace", 0) if hf_model_is_v3(config) else config.get("num_hash_layers", 0)
    return min(int(first), int(config["num_hidden_layers"]) - 1)


def check_block_forward(ckpt: Checkpoint, inv: Inventory, source: Checkpoint, layer: int | None = None,
                        tokens: int = 32, seed: int = 0) -> CheckResult:
    """The model is built from the source's config.json (model_config checks that the output's equals it)."""
    from ..hf_model import load_dequantized_hf_model

    config = source.config
    layer = default_layer(config) if layer is None else layer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outputs = {}
    torch.manual_seed(seed)
    hidden = int(config["hidden_size"])
    # V4 carries hc_mult hidden streams (mHC) between blocks; V3 one hidden state
    width = (hidden,) if hf_model_is_v3(config) else (int(config["hc_mult"]), hidden)
    streams = torch.randn(1, tokens, *width, device=device)
    ids = torch.randint(0, int(config["vocab_size"]), (1, tokens), device=device)
    for label, tensors in (("fp8", None), ("nvfp4", decoded_source(ckpt, inv))):
        model = load_dequantized_hf_model(source.root, layers=[layer], tensors=tensors).to(device)
        block = model.model.layers[0]
        captured = {}

        def swap_in(module, args, kwargs):  # the same random streams enter both blocks
            return (streams,) + tuple(args[1:]), kwargs

        pre = block.register_forward_pre_hook(swap_in, with_kwargs=True)
        post = block.register_forward_hook(lambda m, a, out: captured.__setitem__("y", out))
        with torch.no_grad():
            model(input_ids=ids)
        pre.remove()
        post.remove()
        outputs[label] = captured["y"].float().cpu()
        del model
    ref, got = outputs["fp8"], outputs["nvfp4"]
    x = streams.float().cpu()
    problems = [f"layer {layer}: {k} output holds NaN/Inf" for k, y in outputs.items()
                if not bool(torch.isfinite(y).all())]
    out_rel = reconstruction_error(ref, got)["rel_error"]
    delta_rel = reconstruction_error(ref - x, got - x)["rel_error"]
    evidence = [
        f"layer {layer} ({tokens} tokens, random hidden streams {[1, tokens, *width]}, seed {seed}, {device}): "
        f"relative error of the output {out_rel:.3e}, of the block's own contribution {delta_rel:.3e} "
        f"(bound {MAX_BLOCK_REL_ERROR})"
    ]
    if not problems and not delta_rel <= MAX_BLOCK_REL_ERROR:
        problems.append(f"layer {layer}: block contribution differs by {delta_rel:.3f} (relative) from the FP8 "
                        f"block, above {MAX_BLOCK_REL_ERROR}")
    return finding("block_forward", evidence, problems)
