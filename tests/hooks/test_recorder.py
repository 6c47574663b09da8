"""Recorded activations equal run_with_cache() sliced at the same positions.

Checked for the native model and a Hugging Face GPT-2 from a local folder, on left-padded
batches of unequal lengths, against two references: the padded batch's own cache, and each
example run *alone* without padding (which proves padding changes nothing).
"""

from __future__ import annotations

import pytest
import torch

from kdgap.hooks.recorder import Recorder, record_batch
from kdgap.models.tokens import tokenize_batch
from kdgap.testing.texts import demo_format, demo_texts

SITES = ["action", "rationale.conclusion", "rationale.arm[green]", "history.last"]
HOOKS = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z"]


def _texts():
    texts = demo_texts(5, seed=7, min_steps=1, max_steps=9)
    lengths = {len(t) for t in texts}
    assert len(lengths) == 5  # unequal lengths, so every batch has left padding
    return texts


@pytest.mark.parametrize("model_name", ["tiny_native", "tiny_hf_bridge"])
def test_recorder_equals_sliced_cache(model_name, request, tiny_tokenizer):
    model = request.getfixturevalue(model_name)
    fmt, texts = demo_format(), _texts()
    rec = Recorder(model, fmt, HOOKS, SITES, tokenizer=tiny_tokenizer)
    res = rec.record(texts)
    assert res.kept.tolist() == list(range(len(texts)))
    b = tokenize_batch(tiny_tokenizer, texts)
    assert (b.pad_left > 0).sum() == len(texts) - 1
    with torch.inference_mode():
        _, batch_cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask)
    worst = 0.0
    for i in range(len(texts)):
        n = int(b.lengths[i])
        with torch.inference_mode():
            _, alone = model.run_with_cache(b.tokens[i : i + 1, -n:])
        for h in rec.hooks:
            for j, s in enumerate(SITES):
                p = int(res.positions[i, j])
                got = res.acts[(h, s)][i]
                assert got.dtype == torch.float32 and got.shape == batch_cache[h][i, p].shape
                ref_alone = alone[h][0, p - int(b.pad_left[i])]
                worst = max(worst, (got - batch_cache[h][i, p]).abs().max().item())
                worst = max(worst, (got - ref_alone).abs().max().item())
    assert worst <= 1e-5, worst
    # Positions are not all equal, so a wrong row/position pairing would have shown.
    assert len(set(res.positions[:, 0].tolist())) > 1


def test_low_precision_dtypes_are_casts_of_float32(tiny_native, tiny_tokenizer):
    fmt, texts = demo_format(), _texts()
    ref = record_batch(tiny_native, fmt, texts, "resid_post", ["action"])
    for name, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        got = record_batch(tiny_native, fmt, texts, "resid_post", ["action"], dtype=name)
        for key, t in got.acts.items():
            assert t.dtype == dt
            assert torch.equal(t, ref.acts[key].to(dt))
    with pytest.raises(ValueError, match="dtype='float64'"):
        record_batch(tiny_native, fmt, texts, "resid_post", ["action"], dtype="float64")


def test_stops_after_last_needed_layer(tiny_native, tiny_tokenizer):
    fmt, texts = demo_format(), _texts()
    rec = Recorder(tiny_native, fmt, "blocks.0.hook_resid_post", ["action"])
    assert rec.stop_at_layer == 1
    fired = []
    hook = tiny_native.hook_dict["blocks.1.hook_resid_post"]
    handle = hook.register_forward_hook(lambda *a: fired.append(1))
    full = Recorder(tiny_native, fmt, "blocks.0.hook_resid_post", ["action"], stop_early=False)
    assert full.stop_at_layer is None
    try:
        early = rec.record(texts)
        assert fired == []  # block 1 never ran
        late = full.record(texts)
        assert fired == [1]  # ...while the full forward does run it (the probe works)
    finally:
        handle.remove()
    key = ("blocks.0.hook_resid_post", "action")
    assert torch.equal(early.acts[key], late.acts[key])


def test_skip_policy_drops_examples_and_keeps_rows_aligned(tiny_native):
    fmt = demo_format()
    texts = demo_texts(6, seed=2, min_steps=0, max_steps=3)
    res = record_batch(tiny_native, fmt, texts, "resid_post", SITES, on_missing="skip")
    missing = [i for i, t in enumerate(texts) if "history.last" not in fmt.site_spans(t)]
    assert missing and res.skipped == missing
    kept = [i for i in range(6) if i not in missing]
    assert res.kept.tolist() == kept
    alone = record_batch(tiny_native, fmt, [texts[kept[-1]]], "resid_post", SITES)
    key = ("blocks.1.hook_resid_post", "action")
    assert res.acts[key].shape[0] == len(kept)
    assert (res.acts[key][-1] - alone.acts[key][0]).abs().max() <= 1e-5


def test_training_model_is_refused(tiny_native):
    tiny_native.train()
    try:
        with pytest.raises(RuntimeError, match="eval mode"):
            Recorder(tiny_native, demo_format(), "resid_post", ["action"])
    finally:
        tiny_native.eval()


def test_micro_batches_give_the_same_activations(tiny_native):
    fmt, texts = demo_format(), _texts()
    small = Recorder(tiny_native, fmt, "resid_post,z", SITES, max_batch_tokens=300)
    batch = small.tokenize(texts)
    from kdgap.hooks.sites import resolve_sites

    need = small.needed_lengths(batch, resolve_sites(fmt, texts, batch, SITES).positions)
    groups = small._micro_batches(need)
    assert len(groups) > 2 and sorted(torch.cat(groups).tolist()) == list(range(len(texts)))
    for g in groups:  # within budget (width rounded up), unless a single row is over it
        assert len(g) == 1 or len(g) * small._width(int(need[g].max())) <= 300
    whole = Recorder(tiny_native, fmt, "resid_post,z", SITES, max_batch_tokens=None)
    a, b = small.record(texts), whole.record(texts)
    assert torch.equal(a.positions, b.positions)
    for key in a.acts:
        assert (a.acts[key] - b.acts[key]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="max_batch_tokens=0"):
        Recorder(tiny_native, fmt, "resid_post", SITES, max_batch_tokens=0)


@pytest.mark.parametrize("model_name", ["tiny_native", "tiny_hf_bridge"])
def test_truncated_forwards_equal_the_full_cache(model_name, request, tiny_tokenizer, monkeypatch):
    """Early sites only: each row runs up to its last site, far short of its end, and the
    activations still equal run_with_cache() over the whole left-padded batch."""
    model = request.getfixturevalue(model_name)
    fmt, texts = demo_format(), _texts()
    sites = ["prompt.end", "history.last"]
    hooks = ["resid_pre", "resid_post", "attn_out", "z"]
    rec = Recorder(model, fmt, hooks, sites, tokenizer=tiny_tokenizer, pad_multiple=1)
    assert rec.truncate
    widths = []
    forward = rec._forward
    monkeypatch.setattr(
        rec,
        "_forward",
        lambda t, m, p, plan=None: widths.append(t.shape[1]) or forward(t, m, p, plan),
    )
    res = rec.record(texts)
    b = tokenize_batch(tiny_tokenizer, texts)
    # The forwards really were shorter: every row stops at its history.last site.
    last = (res.positions.max(dim=1).values - b.pad_left + 1).max().item()
    assert max(widths) == last < b.tokens.shape[1] - 10
    with torch.inference_mode():
        _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask)
    worst = 0.0
    for h in rec.hooks:
        for j, s in enumerate(sites):
            ref = cache[h][torch.arange(len(texts)), res.positions[:, j]]
            worst = max(worst, (res.acts[(h, s)] - ref).abs().max().item())
    assert worst <= 1e-5, worst
    full = Recorder(model, fmt, hooks, sites, tokenizer=tiny_tokenizer, truncate=False)
    assert not torch.equal(
        full.needed_lengths(b, res.positions), rec.needed_lengths(b, res.positions)
    )


def test_bidirectional_models_are_never_truncated(tiny_native, monkeypatch):
    monkeypatch.setattr(tiny_native.cfg, "attention_dir", "bidirectional")
    rec = Recorder(tiny_native, demo_format(), "resid_post", ["prompt.end"])
    assert not rec.truncate
    texts = _texts()
    b = rec.tokenize(texts)
    from kdgap.hooks.sites import resolve_sites

    pos = resolve_sites(demo_format(), texts, b, ["prompt.end"]).positions
    assert torch.equal(rec.needed_lengths(b, pos), b.lengths)


def test_forward_is_abandoned_once_every_hook_fired(tiny_native, monkeypatch):
    """A hook inside block 0 (resid_mid) stops the forward before block 0's MLP; a hook after
    the blocks (ln_final) stops it before the unembedding. Both equal the full forward."""
    import kdgap.hooks.recorder as recorder_mod

    # The probe below is itself a torch hook, which the recorder would (rightly) treat as a
    # caller's hook that must run; pretend it is not there.
    monkeypatch.setattr(recorder_mod, "has_hooks", lambda model: False)
    fmt, texts = demo_format(), _texts()
    for hook, later in (
        ("blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"),
        ("ln_final.hook_normalized", "unembed.hook_out"),
    ):
        fired = []
        handle = tiny_native.hook_dict[later].register_forward_hook(lambda *a, f=fired: f.append(1))
        try:
            early = Recorder(tiny_native, fmt, hook, ["action"]).record(texts)
            assert fired == []  # nothing after the recorded hook ran
            late = Recorder(tiny_native, fmt, hook, ["action"], stop_early=False).record(texts)
            assert fired  # ...while the full forward does run it (the probe works)
        finally:
            handle.remove()
        key = (hook, "action")
        assert torch.equal(early.acts[key], late.acts[key])


def test_release_memory_changes_nothing_recorded(tiny_native):
    from kdgap.hooks.recorder import release_free_memory

    release_free_memory()  # glibc malloc_trim, a no-op elsewhere; never raises
    fmt, texts = demo_format(), _texts()
    a = Recorder(tiny_native, fmt, "resid_post", SITES).record(texts)
    b = Recorder(tiny_native, fmt, "resid_post", SITES, release_memory=False).record(texts)
    for key in a.acts:
        assert torch.equal(a.acts[key], b.acts[key])


def test_recorder_tokenises_like_the_agent(tiny_native, tiny_tokenizer):
    """A chat-style text that starts with BOS is recorded without a second BOS."""
    from kdgap.models.tokens import encode

    fmt, texts = demo_format(), _texts()[:2]
    texts = [tiny_tokenizer.bos_token + texts[0], texts[1]]
    rec = Recorder(tiny_native, fmt, "blocks.1.hook_resid_post", ["action"])
    res = rec.record(texts)
    forced = Recorder(tiny_native, fmt, "blocks.1.hook_resid_post", ["action"], prepend_bos=True)
    doubled = forced.record(texts)
    key = ("blocks.1.hook_resid_post", "action")
    for i, ids in enumerate(encode(tiny_native, texts)):
        with torch.inference_mode():
            _, cache = tiny_native.run_with_cache(torch.tensor([ids]))
        p = int(res.positions[i, 0]) - (int(res.n_tokens.max()) - len(ids))
        assert (res.acts[key][i] - cache[key[0]][0, p]).abs().max() <= 1e-5
    assert doubled.n_tokens.tolist() == [res.n_tokens[0] + 1, res.n_tokens[1]]
    assert (doubled.acts[key][0] - res.acts[key][0]).abs().max() > 1e-3  # BOS twice differs


def test_forward_is_not_abandoned_when_another_hook_is_attached(tiny_native):
    """A caller's permanent hook after the recorded one still fires (no early exit)."""
    fired = []
    hp = tiny_native.hook_dict["blocks.0.hook_mlp_out"]
    hp.add_hook(lambda act, hook: fired.append(1), is_permanent=True)
    try:
        Recorder(tiny_native, demo_format(), "blocks.0.hook_resid_mid", ["action"]).record(_texts())
    finally:
        hp.remove_hooks(including_permanent=True)
    assert fired
