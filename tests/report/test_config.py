"""AnalyzeConfig: the size presets fill exactly the sizes left unset, per model."""

import pytest

from kdgap.cli import _analyze_config, build_parser
from kdgap.report.config import SIZES, AnalyzeConfig
from kdgap.report.pipeline import Analysis


def _sizes(cfg: AnalyzeConfig) -> dict:
    return {k: getattr(cfg, k) for k in SIZES["standard"]}


def test_auto_sizes_are_standard_for_organisms_and_quick_for_language_models_on_cpu():
    cfg = AnalyzeConfig()
    assert _sizes(cfg.for_model("organism:faithful")) == SIZES["standard"]
    assert cfg.for_model("organism:faithful").sizes == "standard"
    assert _sizes(cfg.for_model("smollm2")) == SIZES["quick"]
    assert cfg.for_model("/models/llama").sizes == "quick"
    # On an accelerator a language model gets the standard sizes.
    assert _sizes(AnalyzeConfig(device="cuda").for_model("smollm2")) == SIZES["standard"]


def test_a_size_given_explicitly_always_wins_and_a_named_preset_applies_to_every_model():
    cfg = AnalyzeConfig(horizon=30, n_pairs=5).for_model("smollm2")
    assert (cfg.horizon, cfg.n_pairs, cfg.episodes) == (30, 5, SIZES["quick"]["episodes"])
    assert _sizes(AnalyzeConfig(sizes="quick").for_model("organism:faithful")) == SIZES["quick"]
    assert _sizes(AnalyzeConfig(sizes="standard").for_model("smollm2")) == SIZES["standard"]
    resolved = cfg.for_model("smollm2")
    assert resolved == cfg  # resolving twice changes nothing


def test_the_standard_preset_equals_the_sizes_spelled_out(tmp_path):
    """An organism analysed with the defaults has the settings (and so the stage keys) of
    the same sizes given one by one."""
    spelled = AnalyzeConfig(**SIZES["standard"])
    got = Analysis("organism:faithful", tmp_path, AnalyzeConfig()).cfg
    assert got == spelled.for_model("organism:faithful")
    assert Analysis("organism:faithful", tmp_path, AnalyzeConfig())._key("episodes") == Analysis(
        "organism:faithful", tmp_path, spelled
    )._key("episodes")


def test_bad_sizes_fail_on_construction():
    with pytest.raises(ValueError, match="sizes='huge' is unknown"):
        AnalyzeConfig(sizes="huge")
    with pytest.raises(ValueError, match="horizon=5 must be an integer >= 10"):
        AnalyzeConfig(horizon=5)
    with pytest.raises(ValueError, match="freqbias_histories=0"):
        AnalyzeConfig(freqbias_histories=0)


def test_the_cli_leaves_unset_sizes_to_the_preset():
    parse = build_parser().parse_args
    cfg = _analyze_config(parse(["analyze", "--model", "smollm2", "--out", "x", "--steps", "12"]))
    assert (cfg.sizes, cfg.horizon, cfg.episodes) == ("auto", 12, None)
    cfg = _analyze_config(parse(["demo", "--out", "x", "--sizes", "quick",
                                 "--freqbias-histories", "3"]))  # fmt: skip
    assert (cfg.sizes, cfg.freqbias_histories) == ("quick", 3)
    with pytest.raises(SystemExit):
        parse(["analyze", "--model", "smollm2", "--out", "x", "--sizes", "huge"])
