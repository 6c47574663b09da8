"""Hook-spec resolution and the layer a hook lives in (kdgap.hooks.names)."""

from __future__ import annotations

import pytest

from kdgap.hooks.names import HOOK_KINDS, hook_layer, resolve_hooks, stop_layer_for


def test_resolve_short_kinds_expand_over_layers(tiny_native):
    assert resolve_hooks(tiny_native, "resid_post") == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]
    assert resolve_hooks(tiny_native, "z", layers=[1]) == ["blocks.1.attn.hook_z"]
    got = resolve_hooks(tiny_native, "resid_pre,attn_out", layers=[0])
    assert got == ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"]
    for kind in HOOK_KINDS:  # every advertised kind exists on a real bridge
        assert len(resolve_hooks(tiny_native, kind)) == 2


def test_resolve_full_names_pass_through_and_dedupe(tiny_native):
    got = resolve_hooks(tiny_native, ["blocks.1.hook_resid_post", "resid_post", "hook_embed"])
    assert got == ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post", "hook_embed"]


def test_resolve_errors_name_the_problem(tiny_native):
    with pytest.raises(ValueError, match="resid_psot.*resid_post"):
        resolve_hooks(tiny_native, "resid_psot")
    with pytest.raises(ValueError, match=r"layers=.*\[5\].*0\.\.1"):
        resolve_hooks(tiny_native, "resid_post", layers=[0, 5])
    with pytest.raises(ValueError, match="empty"):
        resolve_hooks(tiny_native, [])


def test_layers_and_stop_layer():
    assert hook_layer("blocks.12.attn.hook_z") == 12
    assert hook_layer("ln_final.hook_out") is None
    assert stop_layer_for(None, ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]) == 3
    assert stop_layer_for(None, ["hook_embed", "blocks.0.hook_resid_pre"]) == 1
    assert stop_layer_for(None, ["blocks.0.hook_resid_post", "ln_final.hook_out"]) is None
