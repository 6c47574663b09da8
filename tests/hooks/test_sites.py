"""Site specs, the char-span -> token rule, padding shifts and missing-site reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdgap.hooks.sites import (
    MissingSites,
    SiteSpec,
    chars_to_positions,
    parse_site,
    parse_sites,
    resolve_sites,
)
from kdgap.models.tokens import tokenize_batch
from kdgap.testing.texts import DEMO_ARMS, RegexFormat, demo_format, demo_text, demo_texts

SITES = ["action", "rationale.conclusion", "rationale.arm[blue]", "history.last", "prompt.end"]


def test_parse_site_specs():
    assert parse_site("action") == SiteSpec("action")
    assert parse_site(" rationale.arm[red] ") == SiteSpec("rationale.arm", "red")
    assert parse_site("rationale.arm[red]").key == "rationale.arm[red]"
    for bad in ["", "arm[", "1abc", "a..b", "a[b][c]", "a[]"]:
        with pytest.raises(ValueError, match="site spec"):
            parse_site(bad)
    keys = parse_sites("action, rationale.arm[red],action,rationale.conclusion")
    assert keys == ["action", "rationale.arm[red]", "rationale.conclusion"]
    with pytest.raises(ValueError, match="empty"):
        parse_sites(" , ")


def test_chars_to_positions_rule():
    # Batch of one: pad, BOS, then tokens covering "ab" [0,2), gap at 2 (trimmed space),
    # " cd" -> [3,5), "e" -> [5,6).
    offsets = torch.tensor([[[-1, -1], [-1, -1], [0, 2], [3, 5], [5, 6]]])
    chars = torch.tensor([[0, 1, 2, 3, 4, 5, -1]])
    got = chars_to_positions(chars, offsets)[0].tolist()
    # char 2 lies in the gap: the token before it (2), never a later one.
    assert got == [2, 2, 2, 3, 3, 4, -1]


def test_site_token_contains_last_char(tiny_tokenizer):
    fmt = demo_format()
    texts = demo_texts(6, seed=3, min_steps=1, max_steps=7)
    b = tokenize_batch(tiny_tokenizer, texts)
    sp = resolve_sites(fmt, texts, b, SITES)
    assert sp.keep.all() and sp.skipped == []
    for i, text in enumerate(texts):
        spans = fmt.site_spans(text)
        for j, site in enumerate(SITES):
            p = int(sp.positions[i, j])
            s, e = b.offsets[i, p].tolist()
            last = spans[site][1] - 1
            assert s <= last < e, (site, text[s:e], text[last])
    # The action site's token is the final "=" of ACTION=, the token predicting the arm.
    j = SITES.index("action")
    for i, text in enumerate(texts):
        s, e = b.offsets[i, int(sp.positions[i, j])].tolist()
        assert text[s:e].endswith("=") and text[e:].strip() in DEMO_ARMS


def test_positions_shift_exactly_with_left_padding(tiny_tokenizer):
    fmt = demo_format()
    rng = np.random.default_rng(0)
    short, long = demo_text(rng, 1), demo_text(rng, 9)
    alone = resolve_sites(fmt, [short], tokenize_batch(tiny_tokenizer, [short]), SITES)
    b = tokenize_batch(tiny_tokenizer, [long, short])
    both = resolve_sites(fmt, [long, short], b, SITES)
    pad = int(b.pad_left[1])
    assert pad > 0
    assert torch.equal(both.positions[1], alone.positions[0] + pad)


def test_missing_sites_raise_with_ids_or_skip(tiny_tokenizer):
    fmt = demo_format()
    rng = np.random.default_rng(1)
    texts = [demo_text(rng, 2), demo_text(rng, 0), demo_text(rng, 3, arms_in_rationale=2)]
    b = tokenize_batch(tiny_tokenizer, texts)
    with pytest.raises(MissingSites) as err:
        resolve_sites(fmt, texts, b, SITES, ids=[10, 11, 12])
    # Example 11 has no history, example 12 names only red and green in its rationale.
    assert err.value.missing == {"rationale.arm[blue]": [12], "history.last": [11]}
    assert "11" in str(err.value) and "on_missing='skip'" in str(err.value)
    sp = resolve_sites(fmt, texts, b, SITES, ids=[10, 11, 12], on_missing="skip")
    assert sp.keep.tolist() == [True, False, False] and sp.skipped == [11, 12]
    assert (sp.positions[1, SITES.index("history.last")] == -1).item()
    with pytest.raises(ValueError, match="on_missing='drop'"):
        resolve_sites(fmt, texts, b, SITES, on_missing="drop")


def test_bad_span_from_a_format_is_reported(tiny_tokenizer):
    class Broken:
        name = "broken"

        def site_spans(self, text):
            return {"action": (0, len(text) + 5)}

    b = tokenize_batch(tiny_tokenizer, ["ACTION=red"])
    with pytest.raises(ValueError, match="broken.*'action'.*span"):
        resolve_sites(Broken(), ["ACTION=red"], b, ["action"])


def test_regex_format_expands_arms():
    fmt = RegexFormat("t", {"a[{arm}]": r"(?P<site>{arm})!"}, arm_names=["x", "y.z"])
    assert fmt.site_spans("x! y.z! x!") == {"a[x]": (8, 9), "a[y.z]": (3, 6)}


def test_organism_format_sites(tmp_path):
    org = pytest.importorskip("kdgap.organisms.transcript")
    lang_mod = pytest.importorskip("kdgap.organisms.language")
    lang = lang_mod.OrganismLanguage(n_arms=5, horizon=20)
    tok = lang.save_tokenizer(tmp_path / "tok")
    fmt = org.OrganismFormat()
    texts = [
        lang.prompt_text([0, 1, 1], [1, 0, 1])
        + lang.completion_text([1, 2, 0, 0, 0], [1, 1, 0, 0, 0], 2, 3),
        lang.prompt_text([4], [0]) + lang.completion_text([0, 0, 0, 0, 1], [0, 0, 0, 0, 0], 0, 1),
    ]
    sites = ["prompt.end", "history.last", "rationale.conclusion", "rationale.arm[green]", "action"]
    b = tokenize_batch(tok, texts)
    sp = resolve_sites(fmt, texts, b, sites)
    words = [
        [tok.convert_ids_to_tokens(int(b.tokens[i, p])) for p in sp.positions[i]] for i in (0, 1)
    ]
    # One word = one token: each site is the word ending its span (arm triples end in wins);
    # the action site is the ``act`` word, whose next token is the action (yellow, green).
    assert words[0] == ["think", "green1", "blue", "1", "act"]
    assert words[1] == ["think", "orange0", "red", "0", "act"]
    after = [tok.convert_ids_to_tokens(int(b.tokens[i, sp.positions[i, 4] + 1])) for i in (0, 1)]
    assert after == ["yellow", "green"]


def test_paper_format_sites(tiny_tokenizer):
    prompts = pytest.importorskip("kdgap.agent.prompts")
    from kdgap.envs.bandit import BanditConfig

    fmt = prompts.PaperFormat(knowing_doing=True, use_chat_template=False)
    cfg = BanditConfig(n_arms=5)
    completion = (
        "<ucb_values> red: 0.71, green: 0.52, blue: 0.90, yellow: 0.10, orange: 0.33 "
        "</ucb_values> ACTION=green"
    )
    texts = [fmt.render_prompt(cfg, [0, 2, 1], [1.0, 0.0, 1.0]) + completion,
             fmt.render_prompt(cfg, [3], [0.0]) + completion]  # fmt: skip
    spans = fmt.site_spans(texts[0])
    sites = [s for s in ("action", "rationale.conclusion", "prompt.end") if s in spans]
    assert "action" in sites
    b = tokenize_batch(tiny_tokenizer, texts)
    sp = resolve_sites(fmt, texts, b, sites)
    for i, text in enumerate(texts):
        s, e = b.offsets[i, int(sp.positions[i, sites.index("action")])].tolist()
        assert text[s:e].endswith("=") and text[e:] == "green"  # predicts the action
        if "rationale.conclusion" in sites:  # the top-UCB entry: blue (0.90)
            cs, ce = fmt.site_spans(text)["rationale.conclusion"]
            assert "blue" in text[cs:ce] and "green" not in text[cs:ce]
            j = sites.index("rationale.conclusion")
            s, e = b.offsets[i, int(sp.positions[i, j])].tolist()
            assert s <= ce - 1 < e
