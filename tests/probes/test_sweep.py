"""Sweeps: planted signals found at their layers, tidy output, saving, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kdgap.probes import sweep
from kdgap.probes.control import control_types
from kdgap.probes.sweep import _site_control_types
from kdgap.testing.synthetic import Plant, SyntheticStore, bandit_labels

COLUMNS = {"hook", "layer", "site", "label", "probe", "accuracy", "ci_low", "ci_high", "chance",
           "control_accuracy", "selectivity", "C", "n_train", "n_test"}  # fmt: skip


def test_planted_signal_found_at_its_layer(bypass_store, tmp_path):
    df = sweep(bypass_store, labels=["action", "rationale_arm"], n_boot=200,
               out=tmp_path / "sweep.parquet")  # fmt: skip
    assert COLUMNS <= set(df.columns) and len(df) == 4 * 2 * 2
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "sweep.parquet"), df)
    act = df[(df.label == "action") & (df.probe == "logistic")].set_index("layer")
    # the action is planted from layer 2 on: found there with margin, well above layers 0-1
    assert (act.loc[[2, 3], "ci_low"] > act.loc[[2, 3], "chance"] + 0.3).all()
    assert act.loc[[2, 3], "accuracy"].min() > act.loc[[0, 1], "accuracy"].max() + 0.15
    rat = df[(df.label == "rationale_arm")]
    assert (rat.accuracy > 0.8).all()  # both probes, every layer
    assert (df.ci_low <= df.accuracy).all() and (df.accuracy <= df.ci_high).all()
    # controls sit near chance, so selectivity is high where the signal is
    assert (df.control_accuracy < 0.35).all()
    assert (act.loc[[2, 3], "selectivity"] > 0.5).all()


def test_csv_output_and_subsets(bypass_store, tmp_path):
    df = sweep(bypass_store, labels=["greedy_arm"], hooks=["blocks.3.hook_resid_post"],
               probes=("diffmeans",), out=tmp_path / "s.csv", n_boot=50)  # fmt: skip
    assert len(df) == 1 and df.probe.iloc[0] == "diffmeans" and df.layer.iloc[0] == 3
    assert len(pd.read_csv(tmp_path / "s.csv")) == 1
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_clear_errors(bypass_store, tmp_path):
    with pytest.raises(KeyError, match=r"labels=\['nope'\].*columns"):
        sweep(bypass_store, labels=["nope"])
    with pytest.raises(ValueError, match=r"hooks=\['blocks.9.hook_resid_post'\]: not recorded"):
        sweep(bypass_store, hooks=["blocks.9.hook_resid_post"])
    with pytest.raises(ValueError, match=r"sites=\['rationale.conclusion'\]: not recorded"):
        sweep(bypass_store, sites=["rationale.conclusion"])
    with pytest.raises(ValueError, match="trainer="):
        sweep(bypass_store, trainer="gpu")
    with pytest.raises(ValueError, match="control_feature='nope' is neither"):
        sweep(bypass_store, labels=["action"], control_feature="nope")
    with pytest.raises(ValueError, match="out="):
        sweep(bypass_store, labels=["action"], probes=("diffmeans",), out=tmp_path / "x.txt")
    labels = bandit_labels(n_episodes=8, n_steps=10)
    labels.loc[:2, "action"] = 9  # a class with 3 examples
    tiny = SyntheticStore(labels, n_layers=1, plants=[Plant("action")])
    with pytest.raises(ValueError, match=r"label='action': too few examples per class \{9: 3\}"):
        sweep(tiny, labels=["action"])


def test_control_types_of_a_site_read_every_recorded_step():
    """A site lacking some steps (skipped examples) still gets reward-history types built
    from the episode's full history, as the prompts show it."""
    rng = np.random.default_rng(0)
    full = pd.DataFrame({"episode": np.repeat(np.arange(4), 10), "step": np.tile(np.arange(10), 4),
                         "reward": rng.integers(0, 2, 40).astype(float)})  # fmt: skip

    class Source:
        labels = full

    site = full[full["step"] % 3 != 1].reset_index(drop=True)  # every third step missing
    got = _site_control_types(Source(), site, "reward_history")
    want = control_types(full, "reward_history")[(full["step"] % 3 != 1).to_numpy()]
    assert np.array_equal(got, want)
    # ...whereas the site's own rows would see the missing steps as absent: different types
    assert not np.array_equal(control_types(site, "reward_history"), want)
    assert np.array_equal(_site_control_types(Source(), site, "step"), site["step"].to_numpy())
