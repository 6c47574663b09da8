"""Activation store: round trip, labels, lazy reads, checksums, model mixing, resume, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdgap.hooks import store as store_mod
from kdgap.hooks.record import record_store
from kdgap.hooks.recorder import record_batch
from kdgap.hooks.store import ActivationStore, StoreError
from kdgap.models import fingerprint as fingerprint_mod
from kdgap.records import StepRecord
from kdgap.testing.texts import demo_format, demo_texts

SITES = ["action", "rationale.conclusion"]


def _records(n: int, seed: int = 0) -> list[StepRecord]:
    out = []
    for i, text in enumerate(demo_texts(n, seed=seed, min_steps=1, max_steps=6)):
        cut = text.index("<ucb_values>")
        out.append(StepRecord(
            episode=i // 4, step=i % 4, n_arms=5, action=i % 5, reward=0.5, regret=0.1,
            valid=True, best_arm=0, ucb_arms=(1, 2), greedy_arms=(2, 3), frequent_arms=(4,),
            rationale_arm=None if i % 7 == 6 else (i + 1) % 5,
            prompt=text[:cut], completion=text[cut:],
        ))  # fmt: skip
    return out


def _read_all(st: ActivationStore) -> dict:
    return {(h, s): st.load(h, s)[0] for h in st.hooks for s in st.sites}


def test_round_trip_labels_and_lazy_reads(tiny_native, tmp_path, monkeypatch):
    recs = _records(11)
    fmt = demo_format()
    kw = {"batch_size": 3, "shard_size": 4, "model_id": "tiny", "seed": 5, "progress": False}
    st = record_store(tiny_native, fmt, recs, "resid_post,z", SITES, tmp_path / "s", **kw)
    assert st.complete and st.n_examples == 11 and len(st.manifest["shards"]) == 3
    assert st.sites == SITES and st.hooks[0] == "blocks.0.hook_resid_post" and len(st.hooks) == 4
    texts = [r.prompt + r.completion for r in recs]
    ref = record_batch(tiny_native, fmt, texts, "resid_post,z", SITES)
    for (h, s), t in ref.acts.items():
        got, labels = st.load(h, s)
        assert torch.equal(got, t)  # batching and sharding change nothing
    assert st.load("blocks.1.attn.hook_z", "action")[0].shape == (11, 4, 8)
    lab = st.labels
    assert lab["example"].tolist() == list(range(11)) and (lab["seed"] == 5).all()
    assert (lab["model"] == "tiny").all() and lab["episode"].tolist() == [r.episode for r in recs]
    # action i%5 vs ucb (1,2) / greedy (2,3): optimal wins the tie at arm 2.
    expect = {0: "other", 1: "optimal", 2: "optimal", 3: "greedy", 4: "other"}
    assert lab["action_class"].tolist() == [expect[i % 5] for i in range(11)]
    assert lab["ucb_arm"].tolist() == [1] * 11 and lab["ucb_arms"][0].tolist() == [1, 2]
    assert lab["rationale_arm"].isna().tolist() == [i % 7 == 6 for i in range(11)]
    assert lab["rationale_correct"].tolist()[:3] == [True, True, False]
    assert lab["action_follows_rationale"].tolist()[:2] == [False, False]
    assert (lab["n_tokens"] > 50).all()
    # Lazy: a load reads exactly one tensor from each shard.
    read = []
    real_open = store_mod.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self._cm = real_open(*a, **k)

        def __enter__(self):
            self._g = self._cm.__enter__()
            return self

        def __exit__(self, *a):
            return self._cm.__exit__(*a)

        def get_tensor(self, key):
            read.append(key)
            return self._g.get_tensor(key)

    monkeypatch.setattr(store_mod, "safe_open", Spy)
    ActivationStore(tmp_path / "s").load("blocks.1.hook_resid_post", "rationale.conclusion")
    assert read == ["blocks.1.hook_resid_post@rationale.conclusion"] * 3
    with pytest.raises(KeyError, match="recorded hooks"):
        st.load("blocks.1.hook_resid_pre", "action")
    with pytest.raises(KeyError, match="recorded sites"):
        st.load("blocks.1.hook_resid_post", "prompt.end")


def _record_texts(model, out, n=10, **kw):
    kw = {"batch_size": 2, "shard_size": 3, "model_id": "tiny", "progress": False, **kw}
    return record_store(model, demo_format(), demo_texts(n, seed=1, min_steps=1), "resid_post",
                        SITES, out, **kw)  # fmt: skip


def test_corrupt_and_truncated_shards_are_named(tiny_native, tmp_path):
    st = _record_texts(tiny_native, tmp_path / "s")
    shard = tmp_path / "s" / st.manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF  # flip one byte inside the last tensor's data
    shard.write_bytes(bytes(data))
    st = ActivationStore(tmp_path / "s")  # same size: opening works
    with pytest.raises(StoreError, match=f"{shard}.*checksum"):
        st.load(st.hooks[-1], SITES[-1])
    with pytest.raises(StoreError, match=str(shard)):
        st.verify()
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(StoreError, match=f"{shard}.*truncated"):
        ActivationStore(tmp_path / "s")


def test_altered_labels_and_a_cut_manifest_are_named(tiny_native, tmp_path):
    st = _record_texts(tiny_native, tmp_path / "s")
    labels = tmp_path / "s" / st.manifest["shards"][0]["labels"]
    table = pd.read_parquet(labels)
    assert len(table) > 1
    table.iloc[::-1].reset_index(drop=True).to_parquet(labels)  # readable, rows reordered
    with pytest.raises(StoreError, match=f"{labels}.*checksum"):
        _ = ActivationStore(tmp_path / "s").labels
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(StoreError, match=f"{manifest} is not valid JSON"):
        ActivationStore(tmp_path / "s")


def test_refuses_other_model_inputs_or_hooks(tiny_native, tiny_hf_bridge, tmp_path):
    _record_texts(tiny_native, tmp_path / "s")
    before = (tmp_path / "s" / "manifest.json").read_text()
    with pytest.raises(StoreError, match="never mixes models"):
        _record_texts(tiny_hf_bridge, tmp_path / "s")
    with pytest.raises(StoreError, match="never mixes models"):
        _record_texts(tiny_native, tmp_path / "s", model_id="other-name")
    with pytest.raises(StoreError, match="dtype"):
        _record_texts(tiny_native, tmp_path / "s", dtype="float16")
    with pytest.raises(ValueError, match="other transcripts"):
        _record_texts(tiny_native, tmp_path / "s", n=12)
    assert (tmp_path / "s" / "manifest.json").read_text() == before
    # Same request again: already complete, nothing rewritten.
    assert _record_texts(tiny_native, tmp_path / "s").n_examples == 10
    assert (tmp_path / "s" / "manifest.json").read_text() == before


def _same_store(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma == mb  # includes every shard's sha256 and example range
    sa, sb = ActivationStore(a), ActivationStore(b)
    sa.verify()
    for key, t in _read_all(sa).items():
        assert torch.equal(t, _read_all(sb)[key])
    assert sa.labels.equals(sb.labels)
    assert sorted(p.name for p in (a / "shards").iterdir()) == sorted(
        p.name for p in (b / "shards").iterdir()
    )


def test_resume_after_crash_between_shard_and_manifest(tiny_native, tmp_path, monkeypatch):
    _record_texts(tiny_native, tmp_path / "ref")
    real = store_mod.StoreWriter.save_manifest

    def crash_on_third_shard(self):
        if len(self.manifest["shards"]) == 3:
            raise KeyboardInterrupt("simulated crash after shard files, before manifest")
        return real(self)

    monkeypatch.setattr(store_mod.StoreWriter, "save_manifest", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        _record_texts(tiny_native, tmp_path / "s")
    monkeypatch.setattr(store_mod.StoreWriter, "save_manifest", real)
    half = ActivationStore(tmp_path / "s")
    assert not half.complete and half.n_examples == 6  # the orphan third shard is not listed
    assert len(list((tmp_path / "s" / "shards").iterdir())) == 6
    _record_texts(tiny_native, tmp_path / "s")
    _same_store(tmp_path / "ref", tmp_path / "s")


CHILD = r"""
import os, sys, time
os.environ["OMP_NUM_THREADS"] = "1"
import torch
torch.set_num_threads(1)
from transformers import AutoTokenizer
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from kdgap.hooks import store
from kdgap.hooks.record import record_store
from kdgap.testing.texts import demo_format, demo_texts

tok_dir, outs, pause_at = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(tok_dir)
cfg = TransformerBridgeConfig(d_model=32, d_head=8, n_layers=2, n_ctx=2048, n_heads=4,
    d_mlp=64, d_vocab=len(tok), act_fn="gelu", normalization_type="LN", seed=0)
model = TransformerBridge.boot_native(cfg, tokenizer=tok).eval()
real = store._atomic_write
def slow_write(path, write):
    if path.suffix == ".safetensors" and path.name == f"shard-{pause_at:05d}.safetensors":
        def paused(tmp):
            write(tmp)
            # Tell the parent we are mid-shard-write, then wait to be killed.
            open(str(path.parent.parent) + ".paused", "w").close()
            time.sleep(60)
        return real(path, paused)
    return real(path, write)
store._atomic_write = slow_write
for out in outs:  # several stores from one process: each import costs seconds
    record_store(model, demo_format(), demo_texts(14, seed=4, min_steps=1), "resid_post",
                 ["action", "rationale.conclusion"], out, batch_size=2, shard_size=3,
                 model_id="tiny", progress=False)
"""


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_tokenizer_dir, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(outs, pause_at):
        outs = ",".join(str(o) for o in outs)
        return subprocess.Popen(
            [sys.executable, str(script), str(tiny_tokenizer_dir), outs, str(pause_at)],
            env=env, stderr=subprocess.PIPE,
        )  # fmt: skip

    killed = tmp_path / "killed"
    proc = run([killed], pause_at=2)
    deadline = time.time() + 60
    while not Path(f"{killed}.paused").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "child never reached shard 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    half = ActivationStore(killed)
    assert not half.complete and len(half.manifest["shards"]) == 2
    leftovers = [p.name for p in (killed / "shards").iterdir() if p.name.endswith(".tmp")]
    assert leftovers  # the kill left a half-written temp shard behind
    # Resume (no pause), then an uninterrupted reference run, in one fresh process.
    p = run([killed, tmp_path / "ref"], pause_at=-1)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    _same_store(tmp_path / "ref", killed)
    assert ActivationStore(killed).n_examples == 14


def test_skipped_examples_across_shards_with_reused_buffers(tiny_native, tmp_path):
    """Shard buffers are reused from shard to shard: a shard with skipped examples must hold
    exactly its own kept rows (no row left over from the previous shard)."""
    fmt, sites = demo_format(), ["action", "history.last"]
    texts = demo_texts(14, seed=2, min_steps=0, max_steps=3)
    missing = [i for i, t in enumerate(texts) if "history.last" not in fmt.site_spans(t)]
    assert missing and len(missing) < len(texts)
    st = record_store(tiny_native, fmt, texts, "resid_post", sites, tmp_path / "s", batch_size=3,
                      shard_size=5, on_missing="skip", progress=False)  # fmt: skip
    ref = record_batch(tiny_native, fmt, texts, "resid_post", sites, on_missing="skip")
    assert st.manifest["skipped"] == missing == ref.skipped
    assert st.labels["example"].tolist() == ref.kept.tolist()
    for (h, s), t in ref.acts.items():
        assert (st.load(h, s)[0] - t).abs().max() <= 1e-5


def test_model_fingerprint_ignores_thread_count_but_not_weights(tiny_native):
    """The fingerprint hashes integers, not a float reduction: the same weights give the same
    fingerprint under any torch thread count (a store recorded with 2 threads reopens with
    1), while any single perturbed weight changes it (sampled or not)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprint_mod.model_fingerprint(tiny_native)
        torch.set_num_threads(max(2, before))
        many = fingerprint_mod.model_fingerprint(tiny_native)
    finally:
        torch.set_num_threads(before)
    assert one == many
    name, p = max(tiny_native.state_dict().items(), key=lambda kv: kv[1].numel())
    assert p.numel() > 4096  # so not every value is sampled
    for index in (0, p.numel() // 2 + 1):  # index 0 is sampled; the middle one may not be
        with torch.no_grad():
            flat = p.view(-1)
            old = flat[index].clone()
            flat[index] += 1e-3
            try:
                assert fingerprint_mod.model_fingerprint(tiny_native) != one, (name, index)
            finally:
                flat[index] = old
    assert fingerprint_mod.model_fingerprint(tiny_native) == one


def test_model_fingerprint_indexes_large_tensors_exactly():
    """Float32 linspace rounds n - 1 up to n above 2**24 values (an IndexError on SmolLM2's
    28.3M-value embedding); the integer index arithmetic stays in range."""

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(28_311_552), requires_grad=False)

    m = Big()
    m.w.data[-1] = 1.0
    a = fingerprint_mod.model_fingerprint(m)
    m.w.data[-1] = 2.0
    assert fingerprint_mod.model_fingerprint(m) != a


def test_labels_are_written_through_the_system_pool_and_the_default_comes_back(tmp_path):
    import pandas as pd
    import pyarrow as pa

    seen = []
    before = pa.default_memory_pool().backend_name

    class Probe:  # records which pool pyarrow would allocate from while writing
        def to_parquet(self, path, index):
            seen.append(pa.default_memory_pool().backend_name)
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store_mod.write_labels(Probe(), tmp_path / "x.parquet")  # type: ignore[arg-type]
    assert seen == [pa.system_memory_pool().backend_name]
    assert pa.default_memory_pool().backend_name == before  # restored despite the error
    df = pd.DataFrame({"example": [0, 1], "rationale_arm": pd.array([2, None], dtype="Int64")})
    store_mod.write_labels(df, tmp_path / "y.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "y.parquet"), df)
