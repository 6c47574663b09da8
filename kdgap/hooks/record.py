"""``record_store``: transcripts or step records -> activation store (what ``kdgap record`` calls).

Inputs are step records (:class:`~kdgap.records.StepRecord`, whose text is ``prompt +
completion``), a JSONL file of them (:func:`~kdgap.records.write_records`) or plain texts.
Examples are recorded in fixed shards of ``shard_size`` inputs (each in batches of
``batch_size``), so a killed run resumed with the same arguments continues at the first
missing shard and produces the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pandas as pd
import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from kdgap._checks import check_int
from kdgap.envs.transcript_format import TranscriptFormat
from kdgap.hooks.recorder import Recorder, dtype_name
from kdgap.hooks.store import ActivationStore, StoreWriter, tensor_key, write_shard_files
from kdgap.metrics.knowing_doing import action_class
from kdgap.models.fingerprint import model_fingerprint
from kdgap.models.runtime import model_tokenizer
from kdgap.records import StepRecord, read_records

if TYPE_CHECKING:  # annotations only: importing transformer-lens here would slow every import
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase

#: Label columns taken from each StepRecord (plus ``example``, ``model``, ``seed``, ``n_tokens``).
LABEL_COLUMNS = (
    "episode", "step", "n_arms", "action", "reward", "regret", "valid", "best_arm",
    "ucb_arm", "greedy_arm", "frequent_arm", "ucb_arms", "greedy_arms", "frequent_arms",
    "rationale_arm", "rationale_correct", "action_class", "action_follows_rationale",
    "cf_rationale_arm", "cf_action",
)  # fmt: skip


def transcript_text(record: StepRecord) -> str:
    """The full text the model saw for one step: ``prompt + completion``.

    A text agent stores the prompt exactly as the model saw it, chat template included
    (:meth:`kdgap.agent.text_agent.TextAgent.prompts`), so nothing is re-templated here:
    applying the template again would record a different, doubly wrapped text.

    Raises:
        ValueError: the record has no prompt (reference-policy records carry no text).
    """
    if record.prompt is None:
        raise ValueError(
            f"record (episode={record.episode}, step={record.step}) has prompt=None; only "
            "text-agent or organism records carry transcripts. Record those, or pass texts."
        )
    return record.prompt + (record.completion or "")


def record_labels(record: StepRecord) -> dict[str, object]:
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
    if has_records and len(df):
        # Nullable dtypes, so a None in some shard never changes a column's type.
        for col in ("rationale_arm", "cf_rationale_arm", "cf_action"):
            df[col] = df[col].astype("Int64")
        for col in ("rationale_correct", "action_follows_rationale"):
            df[col] = df[col].astype("boolean")
    return df


def _inputs(
    transcripts_or_records: Sequence[StepRecord] | Sequence[str] | str | os.PathLike,
) -> tuple[list[str], list[StepRecord] | None]:
    items = transcripts_or_records
    if isinstance(items, (str, os.PathLike)):
        items = read_records(items)
    items = list(items)
    if not items:
        raise ValueError("transcripts_or_records is empty; pass records, texts or a JSONL path.")
    if all(isinstance(x, str) for x in items):
        return items, None
    if all(isinstance(x, StepRecord) for x in items):
        return [transcript_text(r) for r in items], items
    raise TypeError(
        "transcripts_or_records must be all StepRecord, all str, or a records JSONL path; "
        f"got {sorted({type(x).__name__ for x in items})}."
    )


def record_store(
    model: TransformerBridge,
    fmt: TranscriptFormat,
    transcripts_or_records: Sequence[StepRecord] | Sequence[str] | str | os.PathLike,
    hooks: str | Sequence[str],
    sites: str | Sequence[str],
    out: str | os.PathLike,
    *,
    batch_size: int = 256,
    dtype: str | torch.dtype = "float32",
    shard_size: int = 256,
    model_id: str | None = None,
    seed: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    prepend_bos: bool | None = None,
    on_missing: str = "raise",
    progress: bool = True,
    max_batch_tokens: int | None = 2048,
    sort_by_length: bool = True,
    pad_multiple: int = 4,
    truncate: bool = True,
    fast: bool = True,
    model_identity: dict | None = None,
    map_shards: MapShards | None = None,
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
        batch_size: transcripts tokenised, site-resolved and recorded together. Forwards
            are bounded separately, by ``max_batch_tokens``, so a large batch costs no more
            forward memory: the default 256 keeps the per-batch overhead (tokenising, one
            forward's remainder) small without the user having to size it.
        dtype: stored dtype, ``"float32"`` | ``"float16"`` | ``"bfloat16"``.
        shard_size: inputs per shard: the unit of atomic writes and of resuming, and the
            activations held in memory before a write (``shard_size x hooks x sites x d``
            values, e.g. 1 MB on a 4-layer organism at 2 sites, 35 MB for SmolLM2's 30
            layers). The default 256 keeps that small for large models.
        model_id: a name for the model (``"organism:faithful"``); stored and checked.
        seed: the run's seed, stored as a label column.
        tokenizer: fast tokenizer (default ``model.tokenizer``).
        prepend_bos: None (default): the text agent's rule, per text (BOS when the model
            prepends one by default and the text does not start with the BOS string, as
            chat templates do); True/False forces it.
        on_missing: ``"raise"`` or ``"skip"`` examples lacking a site (ids in the manifest).
        progress: tqdm bar over transcripts.
        max_batch_tokens: forward budget in padded tokens (see
            :class:`~kdgap.hooks.recorder.Recorder`); bounds memory, not the results.
        sort_by_length: batch each shard's inputs in order of length (less padding, so
            less compute); the store's row order stays the input order either way.
        pad_multiple: forward widths are padded to a multiple of this (see
            :class:`~kdgap.hooks.recorder.Recorder`; keeps the heap from fragmenting).
        truncate: run each transcript only up to its last site (exact for causal models,
            see :class:`~kdgap.hooks.recorder.Recorder`).
        fast: record residual-stream hooks on a twin of the model (SDPA twin of a Hugging
            Face model, plain NativeModel of a native bridge; see
            :class:`~kdgap.hooks.recorder.Recorder`); False always runs the bridge.
        model_identity: provenance stored in the manifest (``LoadedModel.identity``).
        map_shards: who records the missing shards: ``map_shards(ranges)`` yields, range
            by range in order, what :func:`record_shards` returns for it, e.g. workers
            each running :func:`record_shards` on the same inputs and options (a shard's
            bytes depend only on its range). Default: this process, shard after shard.
            This process lists each shard in the manifest as its result arrives.

    Returns:
        The :class:`~kdgap.hooks.store.ActivationStore` at ``out``.

    Raises:
        StoreError: ``out`` holds a store of another model, hooks, sites, dtype or inputs.
    """
    options = dict(
        batch_size=batch_size, dtype=dtype, shard_size=shard_size, model_id=model_id, seed=seed,
        tokenizer=tokenizer, prepend_bos=prepend_bos, on_missing=on_missing,
        max_batch_tokens=max_batch_tokens, sort_by_length=sort_by_length,
        pad_multiple=pad_multiple, truncate=truncate, fast=fast, model_identity=model_identity,
    )  # fmt: skip
    job = _Job(model, fmt, transcripts_or_records, hooks, sites, options)
    writer = StoreWriter(out, job.header)
    n = len(job.texts)
    done = _segment(writer, _inputs_sha256(job.texts), n, out)
    ranges = [(a, min(a + shard_size, n)) for a in range(done, n, shard_size)]
    bar = tqdm(total=n, initial=done, desc="record", disable=not progress)
    if map_shards is None:
        results = (job.record(out, [r], bar)[0] for r in ranges)
    else:
        results = map_shards(ranges)
    for (start, stop), (entry, skipped) in zip(ranges, results):
        writer.commit(entry, skipped)
        if map_shards is not None:
            bar.update(stop - start)
    bar.close()
    writer.manifest["complete"] = True
    writer.save_manifest()
    return ActivationStore(out)


#: ``map_shards(ranges)`` of :func:`record_store`: one :func:`record_shards` result per
#: ``(start, stop)`` range, in order.
MapShards = Callable[[list[tuple[int, int]]], Iterable[tuple[dict, list[int]]]]


def record_shards(
    model: TransformerBridge,
    fmt: TranscriptFormat,
    transcripts_or_records: Sequence[StepRecord] | Sequence[str] | str | os.PathLike,
    hooks: str | Sequence[str],
    sites: str | Sequence[str],
    out: str | os.PathLike,
    ranges: Sequence[tuple[int, int]],
    **options: Any,
) -> list[tuple[dict, list[int]]]:
    """Record the shards ``ranges`` of the store :func:`record_store` builds at ``out`` and
    write their files, without listing them: a worker's half of a recording split across
    processes (:func:`record_store`'s ``map_shards``). Same arguments and ``options`` as
    :func:`record_store`.

    Returns:
        Per range, ``(manifest entry, skipped input ids)`` for
        :meth:`~kdgap.hooks.store.StoreWriter.commit`.
    """
    job = _Job(model, fmt, transcripts_or_records, hooks, sites, options)
    return job.record(out, ranges, None)


class _Job:
    """One recording's inputs, recorder and store header (shared by the process that
    lists shards and by the processes that record them)."""

    def __init__(self, model, fmt, inputs, hooks, sites, options: dict) -> None:
        o = {**_DEFAULTS, **options}
        check_int("batch_size", o["batch_size"])
        check_int("shard_size", o["shard_size"])
        self.texts, self.records = _inputs(inputs)
        self.rec = Recorder(
            model, fmt, hooks, sites, tokenizer=model_tokenizer(model, o["tokenizer"]),
            dtype=o["dtype"], prepend_bos=o["prepend_bos"], on_missing=o["on_missing"],
            max_batch_tokens=o["max_batch_tokens"], pad_multiple=o["pad_multiple"],
            truncate=o["truncate"], fast=o["fast"],
        )  # fmt: skip
        rec, self.options = self.rec, o  # rec: the header below reads it
        self.model_id = (
            o["model_id"] or getattr(model.cfg, "model_name", None) or type(model).__name__
        )
        self.header = {
            "model": {"id": self.model_id, "fingerprint": model_fingerprint(model),
                      "n_layers": int(model.cfg.n_layers), "d_model": int(model.cfg.d_model),
                      "identity": dict(o["model_identity"] or {})},
            "hooks": rec.hooks, "sites": rec.sites, "dtype": dtype_name(rec.dtype),
            "shard_size": o["shard_size"],
            "config": {"format": getattr(fmt, "name", type(fmt).__name__), "seed": o["seed"],
                       "prepend_bos": "agent" if rec.prepend_bos is None else rec.prepend_bos,
                       "batch_size": o["batch_size"], "sort_by_length": o["sort_by_length"],
                       "on_missing": o["on_missing"]},
        }  # fmt: skip

    def record(self, out, ranges, bar: tqdm | None) -> list[tuple[dict, list[int]]]:
        """Record and write each range's shard files; their entries and skipped ids."""
        o, out_list = self.options, []
        bufs: dict[str, torch.Tensor] = {}  # one set of shard buffers, reused by every shard
        for start, stop in ranges:
            # A shard's activations and labels are dropped before the next shard is
            # recorded: memory does not grow with the number of shards.
            shard = _record_shard(self.rec, self.texts, start, stop, bufs, o["batch_size"],
                                  o["sort_by_length"], bar)  # fmt: skip
            rows = []
            for i, n_tok in zip(shard.kept.tolist(), shard.n_tokens.tolist()):
                row = {"example": i, "model": self.model_id, "seed": o["seed"], "n_tokens": n_tok}
                if self.records is not None:
                    row.update(record_labels(self.records[i]))
                rows.append(row)
            labels = _labels_frame(rows, self.records is not None)
            entry = write_shard_files(out, self.header, start, stop, shard.acts, labels)
            out_list.append((entry, shard.skipped))
            del shard
        return out_list


#: record_store's keyword defaults: record_shards fills in the options it is not given
#: from the same place, so the two cannot drift apart.
_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(record_store).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name not in ("progress", "map_shards")
}


class _Shard(NamedTuple):
    """One shard's recording: ``acts`` ``{tensor_key: [n_kept, *shape]}`` (possibly views
    of the shared buffers), ``kept`` input ids (ascending), their ``n_tokens``, and the
    ``skipped`` input ids (ascending)."""

    acts: dict[str, torch.Tensor]
    kept: Int[torch.Tensor, " n_kept"]
    n_tokens: Int[torch.Tensor, " n_kept"]
    skipped: list[int]


def _record_shard(
    rec: Recorder,
    texts: list[str],
    start: int,
    stop: int,
    bufs: dict[str, torch.Tensor],
    batch_size: int,
    sort_by_length: bool,
    bar: tqdm | None,
) -> _Shard:
    """Record inputs ``[start, stop)`` in batches; results in input order.

    With ``sort_by_length`` the batches are formed from the inputs sorted by character
    length (a stable sort, so deterministic): similar lengths share a batch and little
    compute goes to padding. Rows are written back to their input positions in ``bufs``,
    ``{tensor_key: [rows, *shape]}`` buffers allocated by the first shard (``stop - start``
    rows) and reused by the later ones: no per-batch lists, no concatenation, and no
    allocation per shard. The returned activations may be views of ``bufs``: they are
    valid until the next call.

    Returns:
        A :class:`_Shard`.
    """
    order = list(range(start, stop))
    if sort_by_length:
        order.sort(key=lambda i: len(texts[i]))
    size = stop - start
    keep = torch.zeros(size, dtype=torch.bool)
    n_tokens = torch.zeros(size, dtype=torch.long)
    skipped: list = []
    for b0 in range(0, size, batch_size):
        ids = order[b0 : b0 + batch_size]
        res = rec.record([texts[i] for i in ids], ids=ids)
        local = torch.tensor(ids, dtype=torch.long)[res.kept] - start
        for (h, s), t in res.acts.items():
            key = tensor_key(h, s)
            if key not in bufs or bufs[key].shape[0] < size:
                bufs[key] = torch.empty((size, *t.shape[1:]), dtype=t.dtype)
            bufs[key][local] = t
        keep[local] = True
        n_tokens[local] = res.n_tokens[res.kept]
        skipped.extend(res.skipped)
        if bar is not None:
            bar.update(len(ids))
        del res  # not alive during the next batch's forwards
    keys = [tensor_key(h, s) for h in rec.hooks for s in rec.sites]
    full = bool(keep.all())
    acts = {
        k: (bufs[k][:size] if full else bufs[k][:size][keep]) if k in bufs else torch.empty(0)
        for k in keys
    }
    kept = torch.nonzero(keep).flatten()
    return _Shard(acts, kept + start, n_tokens[keep], sorted(skipped))


def _inputs_sha256(texts: list[str]) -> str:
    """sha256 of the texts joined by NUL, hashed text by text (no joined copy in memory)."""
    h = hashlib.sha256()
    for i, t in enumerate(texts):
        if i:
            h.update(b"\x00")
        h.update(t.encode())
    return h.hexdigest()


def _segment(writer: StoreWriter, inputs_sha: str, n: int, out: str | os.PathLike) -> int:
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
