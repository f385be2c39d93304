"""Calibration samples for Path B: chat-formatted, tokenized, shuffled with a seed, cut to ``max_seq_len``.

``--dataset`` is a local file (``.jsonl``/``.json``/``.parquet``/``.arrow``), a local folder (one written by
``datasets.save_to_disk``, or a folder of such files), or a hub name (default ``HuggingFaceH4/ultrachat_200k``,
which needs a reachable hub). A row holds either chat ``messages`` (``[{"role", "content"}, ...]``; also
``conversations``) or a plain ``text``.

Chat rows are rendered the way the model will see them at serving time: with the tokenizer's chat template if it
has one; else with the checkpoint's own ``encoding/encoding_dsv4.py`` ``encode_messages`` (DeepSeek V4 ships no
Jinja template: its model card encodes prompts with that file); else with DeepSeek's documented plain format
(``<｜begin▁of▁sentence｜>system<｜User｜>...<｜Assistant｜></think>...<｜end▁of▁sentence｜>``).
"""

from __future__ import annotations

import glob
import importlib.util
import inspect
import logging
import os
from typing import Any, Callable

from .errors import KitError

log = logging.getLogger("nvfp4kit.calibration_data")

DEFAULT_DATASET = "HuggingFaceH4/ultrachat_200k"
DEFAULT_SPLIT = {"HuggingFaceH4/ultrachat_200k": "train_sft"}
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

Renderer = Callable[[list[dict]], str]


class CalibrationDataError(KitError, ValueError):
    """The dataset cannot be found, read or rendered; the message says which and why."""


def load_rows(dataset: str, num_samples: int, seed: int, split: str | None = None):
    """``num_samples`` rows of ``dataset`` after a seeded shuffle (a ``datasets.Dataset``)."""
    import datasets

    if os.path.exists(dataset):
        ds = _load_local(dataset)
    else:
        try:
            ds = datasets.load_dataset(dataset, split=split or DEFAULT_SPLIT.get(dataset, "train"))
        except Exception as e:  # no hub, a typo, a gated set: say what was tried
            raise CalibrationDataError(
                f"--dataset {dataset!r} is not a local path and could not be loaded from the hub ({e}); "
                "pass a local JSONL/Parquet/Arrow file or folder"
            ) from None
    if len(ds) < num_samples:
        raise CalibrationDataError(f"--dataset {dataset}: {len(ds)} rows, fewer than --num-samples {num_samples}")
    return ds.shuffle(seed=seed).select(range(num_samples))


def _load_local(path: str):
    import datasets

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "state.json")):
            ds = datasets.load_from_disk(path)
            return ds[next(iter(ds))] if isinstance(ds, datasets.DatasetDict) else ds
        files = sorted(f for ext in LOCAL_FORMATS for f in glob.glob(os.path.join(path, "**", "*" + ext), recursive=True))
        if not files:
            raise CalibrationDataError(f"--dataset {path}: a folder with no {'/'.join(LOCAL_FORMATS)} files")
    else:
        files = [path]
    kinds = {LOCAL_FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) != 1:
        raise CalibrationDataError(f"--dataset {path}: expected files of one kind among {sorted(LOCAL_FORMATS)}")
    return datasets.load_dataset(kinds.pop(), data_files=files, split="train")


def chat_renderer(tokenizer: Any, checkpoint_dir: str) -> tuple[Renderer, str]:
    """How chat messages become text for this model, and a one-line description of the choice for the log."""
    if getattr(tokenizer, "chat_template", None):
        return (lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)), "the tokenizer's chat template"
    encoder = os.path.join(checkpoint_dir, "encoding", "encoding_dsv4.py")
    if os.path.exists(encoder):
        return _checkpoint_encoder(encoder), f"{encoder} (encode_messages)"
    return deepseek_plain_format, "DeepSeek's plain chat format (no template or encoder in the checkpoint)"


def _checkpoint_encoder(path: str) -> Renderer:
    """The checkpoint's ``encode_messages``; :class:`CalibrationDataError` naming ``path`` if it cannot serve."""
    spec = importlib.util.spec_from_file_location("nvfp4kit_dsv4_encoding", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # the checkpoint's own prompt code, as its model card instructs
    except Exception as e:  # its own bug or a missing import: the user must see which file, not a traceback
        raise CalibrationDataError(f"{path}: the checkpoint's chat encoder fails to load "
                                   f"({type(e).__name__}: {e})") from None
    encode = getattr(module, "encode_messages", None)
    if not callable(encode):
        raise CalibrationDataError(f"{path} has no function encode_messages(messages), which renders the calibration "
                                   "chats: restore the file from the model's repository, or remove it to use "
                                   "DeepSeek's plain chat format")
    # The real encoder takes a thinking mode; calibration text is plain chat.
    kwargs = {"thinking_mode": "chat"} if "thinking_mode" in inspect.signature(encode).parameters else {}
    return lambda messages: encode(messages, **kwargs)


def deepseek_plain_format(messages: list[dict]) -> str:
    """DeepSeek's chat format (V3/V3.2 model cards): BOS, system text, then User/Assistant turns."""
    out = [BOS]
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "system":
            out.append(content)
        elif role == "user":
            out.append(USER + content)
        elif role == "assistant":
            out.append(ASSISTANT + "</think>" + content + EOS)
    return "".join(out)


def row_text(row: dict, render: Renderer) -> str:
    for key in ("messages", "conversations"):
        if row.get(key):
            return render([_normalize_turn(t) for t in row[key]])
    if isinstance(row.get("text"), str):
        return row["text"]
    raise CalibrationDataError(f"a calibration row has neither 'messages', 'conversations' nor 'text': keys {sorted(row)}")


def _normalize_turn(turn: dict) -> dict:
    """ShareGPT-style ``{"from": "human", "value": ...}`` turns become ``{"role", "content"}``."""
    if "role" in turn:
        return turn
    role = {"human": "user", "gpt": "assistant", "system": "system"}.get(turn.get("from"), turn.get("from"))
    return {"role": role, "content": turn.get("value", "")}


def tokenized_dataset(
    dataset: str, tokenizer: Any, checkpoint_dir: str, num_samples: int, max_seq_len: int, seed: int = 42,
    split: str | None = None,
):
    """A ``datasets.Dataset`` of ``input_ids``/``attention_mask`` rows, each at most ``max_seq_len`` tokens."""
    from datasets import Dataset

    rows = load_rows(dataset, num_samples, seed, split)
    render, how = chat_renderer(tokenizer, checkpoint_dir)
    log.info("calibration data: %d rows of %s (seed %d), rendered with %s, at most %d tokens each",
             num_samples, dataset, seed, how, max_seq_len)
    samples = []
    for row in rows:
        # The rendered text carries its own BOS; the tokenizer must not add a second one.
        ids = tokenizer(row_text(row, render), add_special_tokens=False, truncation=True, max_length=max_seq_len)["input_ids"]
        samples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    lengths = [len(s["input_ids"]) for s in samples]
    log.info("calibration tokens: %d in total, %d to %d per sample", sum(lengths), min(lengths), max(lengths))
    return Dataset.from_list(samples)
