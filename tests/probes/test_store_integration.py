"""Probes read the real on-disk ActivationStore (kdgap.hooks.store) through the protocol."""

from __future__ import annotations

import pytest
import torch

from kdgap.probes import ActivationSource, knowing_doing, sweep
from kdgap.testing.synthetic import Plant, SyntheticStore, bandit_labels

store_mod = pytest.importorskip("kdgap.hooks.store")


def test_sweep_and_knowing_doing_on_an_on_disk_store(tmp_path):
    labels = bandit_labels(n_episodes=24, n_steps=20, mode="greedy-bypass", p_disagree=0.35)
    plants = [Plant("rationale_arm", 4.0), Plant("action", 4.0, layers=[2])]
    fake = SyntheticStore(labels, n_layers=3, d_model=16, seed=3, plants=plants)
    header = {"model": {"id": "synthetic", "fingerprint": "0"}, "hooks": fake.hooks,
              "sites": fake.sites, "dtype": "float32", "shard_size": 240, "config": {}}  # fmt: skip
    writer = store_mod.StoreWriter(tmp_path / "acts", header)
    for start in (0, 240):
        acts = {store_mod.tensor_key(h, s): fake.load(h, s)[0][start : start + 240]
                for h in fake.hooks for s in fake.sites}  # fmt: skip
        writer.write_shard(start, start + 240, acts, labels.iloc[start : start + 240], [])
    store = store_mod.ActivationStore(tmp_path / "acts")
    assert isinstance(store, ActivationSource)
    torch.testing.assert_close(
        store.load(fake.hooks[1], "action")[0], fake.load(fake.hooks[1], "action")[0]
    )

    df = sweep(store, labels=["action", "rationale_arm"], n_boot=50)
    ref = sweep(fake, labels=["action", "rationale_arm"], n_boot=50)
    torch.testing.assert_close(torch.tensor(df.accuracy.values), torch.tensor(ref.accuracy.values))
    rep = knowing_doing(store, n_boot=100)
    assert rep.divergence_layer == 2
    with pytest.raises(ValueError, match="not recorded"):
        sweep(store, sites=["rationale.conclusion"])
