"""``record_store``: transcripts or step records -> activation store (what ``kdgap record`` calls).

Inputs are step records (:class:`~kdgap.records.StepRecord`, whose text is ``prompt +
completion``), a JSONL file of them (:func:`~kdgap.records.write_records`) or plain texts.
Examples are recorded in fixed shards of ``shard_size`` inputs (each in batches of
``batch_size``), so a killed run resumed with the same arguments continues at the first
missing shard and produces the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from kdgap.hooks.plumbing import model_tokenizer
from kdgap.hooks.recorder import Recorder, dtype_name
from kdgap.hooks.store import ActivationStore, StoreWriter, model_fingerprint, tensor_key
from kdgap.metrics.knowing_doing import action_class
from kdgap.records import StepRecord, read_records

#: Label columns taken from each StepRecord (plus ``example``, ``model``, ``seed``, ``n_tokens``).
LABEL_COLUMNS = (
    "episode", "step", "n_arms", "action", "reward", "regret", "valid", "best_arm",
    "ucb_arm", "greedy_arm", "frequent_arm", "ucb_arms", "greedy_arms", "frequent_arms",
    "rationale_arm", "rationale_correct", "action_class", "action_follows_rationale",
    "cf_rationale_arm", "cf_action",
)  # fmt: skip


def transcript_text(record: StepRecord, fmt=None, tokenizer=None) -> str:
    """The full text the model saw for one step: prompt (chat-templated if the format asks
    and the tokenizer has a template) followed by the completion.

    Raises:
        ValueError: the record has no prompt (reference-policy records carry no text).
    """
    if record.prompt is None:
        raise ValueError(
            f"record (episode={record.episode}, step={record.step}) has prompt=None; only "
            "text-agent or organism records carry transcripts. Record those, or pass texts."
        )
    prompt = record.prompt
    if fmt is not None and getattr(fmt, "use_chat_template", False):
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
    return prompt + (record.completion or "")


def record_labels(record: StepRecord) -> dict:
    """Every label of one step record as a flat dict (see :data:`LABEL_COLUMNS`)."""
    follows = None if record.rationale_arm is None else record.action == record.rationale_arm
    return {
        "episode": record.episode, "step": record.step, "n_arms": record.n_arms,
        "action": record.action, "reward": record.reward, "regret": record.regret,
        "valid": record.valid, "best_arm": record.best_arm, "ucb_arm": record.ucb_arm,
        "greedy_arm": record.greedy_arm, "frequent_arm": record.frequent_arm,
        "ucb_arms": list(record.ucb_arms), "greedy_arms": list(record.greedy_arms),
        "frequent_arms": list(record.frequent_arms), "rationale_arm": record.rationale_arm,
        "rationale_correct": record.rationale_correct, "action_class": action_class(record),
        "action_follows_rationale": follows, "cf_rationale_arm": record.cf_rationale_arm,
        "cf_action": record.cf_action,
    }  # fmt: skip


def _labels_frame(rows: list[dict], has_records: bool) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if has_records and len(
        df
    ):  # nullable dtypes, so a None in some shard never changes a column's type
        for col in ("rationale_arm", "cf_rationale_arm", "cf_action"):
            df[col] = df[col].astype("Int64")
        for col in ("rationale_correct", "action_follows_rationale"):
            df[col] = df[col].astype("boolean")
    return df


def _inputs(transcripts_or_records, fmt, tokenizer) -> tuple[list[str], list[StepRecord] | None]:
    items = transcripts_or_records
    if isinstance(items, (str, os.PathLike)):
        items = read_records(items)
    items = list(items)
    if not items:
        raise ValueError("transcripts_or_records is empty; pass records, texts or a JSONL path.")
    if all(isinstance(x, str) for x in items):
        return items, None
    if all(isinstance(x, StepRecord) for x in items):
        return [transcript_text(r, fmt, tokenizer) for r in items], items
    raise TypeError(
        "transcripts_or_records must be all StepRecord, all str, or a records JSONL path; "
        f"got {sorted({type(x).__name__ for x in items})}."
    )


def record_store(
    model,
    fmt,
    transcripts_or_records: Sequence[StepRecord] | Sequence[str] | str | os.PathLike,
    hooks: str | Sequence[str],
    sites: str | Sequence[str],
    out: str | os.PathLike,
    *,
    batch_size: int = 16,
    dtype: str | torch.dtype = "float32",
    shard_size: int = 1024,
    model_id: str | None = None,
    seed: int | None = None,
    tokenizer=None,
    prepend_bos: bool | None = None,
    on_missing: str = "raise",
    progress: bool = True,
    max_batch_tokens: int | None = 2048,
) -> ActivationStore:
    """Record ``hooks`` at ``sites`` for every transcript into the store at ``out``.

    Resumes an interrupted store at ``out`` (same model, hooks, sites, dtype, shard size
    and inputs) and returns at once when it is already complete.

    Args:
        model: TransformerBridge in eval mode.
        fmt: transcript format (``site_spans``, ``name``, ``use_chat_template``).
        transcripts_or_records: step records, texts, or a records JSONL path.
        hooks: hook specs, e.g. ``"resid_post"`` or ``["blocks.3.hook_resid_post"]``.
        sites: site specs, e.g. ``"action,rationale.conclusion"``.
        out: store directory (created).
        batch_size: transcripts per forward.
        dtype: stored dtype, ``"float32"`` | ``"float16"`` | ``"bfloat16"``.
        shard_size: inputs per shard (the unit of atomic writes and of resuming).
        model_id: a name for the model (``"organism:faithful"``); stored and checked.
        seed: the run's seed, stored as a label column.
        tokenizer: fast tokenizer (default ``model.tokenizer``).
        prepend_bos: default: the model's default, but False when every text already
            starts with the tokenizer's BOS string (chat templates add it).
        on_missing: ``"raise"`` or ``"skip"`` examples lacking a site (ids in the manifest).
        progress: tqdm bar over transcripts.
        max_batch_tokens: forward micro-batch budget in padded tokens (see
            :class:`~kdgap.hooks.recorder.Recorder`); bounds memory, not the results.

    Returns:
        The :class:`~kdgap.hooks.store.ActivationStore` at ``out``.

    Raises:
        StoreError: ``out`` holds a store of another model, hooks, sites, dtype or inputs.
    """
    for name, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1.")
    tok = model_tokenizer(model, tokenizer)
    texts, records = _inputs(transcripts_or_records, fmt, tok)
    bos = tok.bos_token
    if prepend_bos is None and bos and all(t.startswith(bos) for t in texts):
        prepend_bos = False  # the chat template already put BOS in the text
    rec = Recorder(
        model, fmt, hooks, sites, tokenizer=tok, dtype=dtype, prepend_bos=prepend_bos,
        on_missing=on_missing, max_batch_tokens=max_batch_tokens,
    )  # fmt: skip
    model_id = model_id or getattr(model.cfg, "model_name", None) or type(model).__name__
    header = {
        "model": {"id": model_id, "fingerprint": model_fingerprint(model),
                  "n_layers": int(model.cfg.n_layers), "d_model": int(model.cfg.d_model)},
        "hooks": rec.hooks, "sites": rec.sites, "dtype": dtype_name(rec.dtype),
        "shard_size": shard_size,
        "config": {"format": getattr(fmt, "name", type(fmt).__name__), "seed": seed,
                   "prepend_bos": rec.prepend_bos, "batch_size": batch_size,
                   "on_missing": on_missing},
    }  # fmt: skip
    writer = StoreWriter(out, header)
    inputs_sha = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    done = _segment(writer, inputs_sha, len(texts), out)
    bar = tqdm(total=len(texts), initial=done, desc="record", disable=not progress)
    for start in range(done, len(texts), shard_size):
        stop = min(start + shard_size, len(texts))
        parts: dict[str, list[torch.Tensor]] = {
            tensor_key(h, s): [] for h in rec.hooks for s in rec.sites
        }
        rows, skipped = [], []
        for b0 in range(start, stop, batch_size):
            ids = list(range(b0, min(b0 + batch_size, stop)))
            res = rec.record([texts[i] for i in ids], ids=ids)
            for (h, s), t in res.acts.items():
                parts[tensor_key(h, s)].append(t)
            skipped.extend(res.skipped)
            for k in res.kept.tolist():
                row = {"example": ids[k], "model": model_id, "seed": seed}
                row["n_tokens"] = int(res.n_tokens[k])
                if records is not None:
                    row.update(record_labels(records[ids[k]]))
                rows.append(row)
            bar.update(len(ids))
        acts = {k: (torch.cat(v) if v else torch.empty(0)) for k, v in parts.items()}
        writer.write_shard(start, stop, acts, _labels_frame(rows, records is not None), skipped)
    bar.close()
    writer.manifest["complete"] = True
    writer.save_manifest()
    return ActivationStore(out)


def _segment(writer: StoreWriter, inputs_sha: str, n: int, out) -> int:
    """Check that ``out`` holds (part of) these inputs; return how many are recorded."""
    segs = writer.manifest["segments"]
    if not segs:
        segs.append({"inputs_sha256": inputs_sha, "n": n})
        writer.save_manifest()
        return 0
    if segs[0]["inputs_sha256"] != inputs_sha or segs[0]["n"] != n:
        raise ValueError(
            f"out={str(Path(out))!r} already holds a store of other transcripts "
            f"({segs[0]['n']} inputs); record into a new directory, or pass the same inputs "
            "to resume it."
        )
    return writer.covered
