"""Knowing vs doing: planted disagreement is separated, faithful agents agree."""

from __future__ import annotations

import numpy as np

from kdgap.probes import knowing_doing


def test_greedy_bypass_separates_knowing_from_doing(bypass_store):
    rep = knowing_doing(bypass_store, n_boot=300)
    pl = rep.per_layer.set_index("layer")
    assert list(pl.index) == [0, 1, 2, 3]
    # the rationale's arm is decodable everywhere (the "knowing")
    assert (pl.knowing_acc > 0.9).all()
    # on the disagreement subset the doing probe follows the rationale until layer 2,
    # where the planted action (the greedy arm) takes over
    assert list(pl.tracks) == ["rationale_arm", "rationale_arm", "greedy_arm", "greedy_arm"]
    assert rep.divergence_layer == 2 and rep.divergence_hook == "blocks.2.hook_resid_post"
    assert (pl.loc[[2, 3], "doing_acc_dis"] > 0.8).all()
    assert (pl.loc[[0, 1], "doing_acc_dis"] < 0.3).all()
    tr = rep.tracking.pivot(index="layer", columns="target", values="share")
    assert (tr.loc[[2, 3], "greedy_arm"] > tr.loc[[2, 3], "rationale_arm"] + 0.5).all()
    # knowing and doing directions coincide before the action signal arrives, not after
    cos = rep.cosines.groupby("layer")["cosine"].mean()
    assert cos[0] > 0.9 and cos[3] < cos[0] - 0.2
    assert "greedy_arm" in rep.summary()


def test_faithful_agent_knows_and_does_the_same(faithful_store):
    rep = knowing_doing(faithful_store, n_boot=200, trainer="sklearn", Cs=(0.01, 0.1), cv=3)
    last = rep.per_layer.iloc[-1]
    assert last.agreement >= 0.95 and last.n_dis == 0
    assert rep.divergence_layer is None
    np.testing.assert_array_less(0.9, rep.cosines.cosine.to_numpy())
