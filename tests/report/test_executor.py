"""Executors: a play or a recording split across workers equals the single-process one.

Without Ray: a range of episodes is that slice of the whole run, and shards recorded out
of order by another caller give the same store bytes. With a local Ray instance (2 CPUs,
no dashboard): analyses on 1 and 2 workers write the single-process summary, a worker
killed (SIGKILL) mid-recording leaves a complete store equal to the single-process one,
and ``--executor ray`` without Ray installed is a one-line error.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

from kdgap.cli import main
from kdgap.envs.bandit import BanditConfig
from kdgap.hooks.record import record_shards, record_store
from kdgap.hooks.store import ActivationStore
from kdgap.report.executor import RayExecutor, episode_ranges
from kdgap.report.pipeline import AnalyzeConfig, analyze
from kdgap.report.session import Session

SMALL = dict(episodes=3, horizon=10, record_episodes=3, n_pairs=4, freqbias_histories=1,
             decomposition_steps=4)  # fmt: skip


def test_episode_ranges_by_hand():
    assert episode_ranges(7, 3) == [(0, 3), (3, 2), (5, 2)]
    assert episode_ranges(2, 4) == [(0, 1), (1, 1)]
    with pytest.raises(ValueError, match="workers=0"):
        episode_ranges(4, 0)


@pytest.fixture(scope="module")
def faithful():
    return Session("organism:faithful")


def test_a_range_of_episodes_is_that_slice_of_the_run(faithful):
    cfg = BanditConfig(horizon=6)
    whole = faithful.play(cfg, 5, seed=3, driver="random", progress=False)
    part = faithful.play(cfg, 2, seed=3, driver="random", progress=False, first_episode=2)
    assert part == whole[2 * 6 : 4 * 6]


def _shards(store: ActivationStore) -> list[tuple]:
    return [(s["file"], s["sha256"], s["labels_sha256"], s["start"], s["stop"])
            for s in store.manifest["shards"]]  # fmt: skip


def test_shards_recorded_elsewhere_and_out_of_order_give_the_same_store(faithful, tmp_path):
    recs = faithful.play(BanditConfig(horizon=8), 3, seed=1, driver="random", progress=False)
    common = dict(shard_size=5, seed=1, progress=False)
    one = faithful.record(recs, "resid_post", ["action"], tmp_path / "one", **common)

    def map_shards(ranges):  # last range first, then listed in order
        opts = {k: v for k, v in common.items() if k != "progress"}
        done = {r: faithful.record_shards(recs, "resid_post", ["action"], tmp_path / "two",
                                          [r], **opts)[0] for r in reversed(ranges)}  # fmt: skip
        return (done[r] for r in ranges)

    two = faithful.record(recs, "resid_post", ["action"], tmp_path / "two",
                          map_shards=map_shards, **common)  # fmt: skip
    assert len(_shards(one)) == 5 and _shards(two) == _shards(one)
    assert two.complete and two.n_examples == len(recs) == 24
    assert record_store is not None and record_shards is not None  # the public pair


# ----------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _numbers(summary: dict) -> dict:
    """The summary without wall times (which differ from run to run)."""
    entry = dict(summary["models"]["organism:faithful"])
    entry.pop("timings", None)
    entry["behavior"] = {k: v for k, v in entry["behavior"].items() if k != "seconds"}
    return entry


@pytest.fixture(scope="module")
def local_summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return analyze(["organism:faithful"], out, AnalyzeConfig(**SMALL), progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_analysis_equals_the_single_process_one(ray_local, local_summary, workers, tmp_path):
    ex = RayExecutor(workers)
    try:
        got = analyze(["organism:faithful"], tmp_path, AnalyzeConfig(**SMALL), progress=False,
                      executor=ex)  # fmt: skip
    finally:
        ex.close()
    assert _numbers(got) == _numbers(local_summary)


def test_a_worker_killed_mid_recording_leaves_the_same_complete_store(ray_local, faithful,
                                                                      tmp_path):  # fmt: skip
    recs = faithful.play(BanditConfig(horizon=10), 4, seed=2, driver="random", progress=False)
    common = dict(shard_size=2, batch_size=1, seed=2)  # 20 shards: the kill lands mid-run
    want = faithful.record(recs, "resid_post", ["action"], tmp_path / "local", progress=False,
                           **common)  # fmt: skip
    ex = RayExecutor(2)
    try:
        actors = ex._pool(faithful)
        victim = ray_local.get(actors[1].pid.remote())
        out = tmp_path / "ray"
        fired, stop, listed = threading.Event(), threading.Event(), []

        def kill_after_first_shards():
            while not stop.is_set():
                store = out / "manifest.json"  # replaced atomically: always whole
                shards = json.loads(store.read_text())["shards"] if store.exists() else []
                if shards:
                    os.kill(victim, signal.SIGKILL)
                    listed.append(len(shards))
                    fired.set()
                    return
                time.sleep(0.01)

        watcher = threading.Thread(target=kill_after_first_shards, daemon=True)
        watcher.start()
        got = ex.record(faithful, recs, "resid_post", ["action"], out, **common)
        stop.set()
        watcher.join()
        # The victim died after the first shard was listed and before the last one: Ray
        # restarted it (a new process) and retried its shards.
        assert fired.is_set() and listed[0] < 20
        assert ray_local.get(actors[1].pid.remote()) != victim
    finally:
        ex.close()
    assert got.manifest["shards"][-1]["stop"] == len(recs)
    got.verify()  # every listed file present and intact
    examples = got.labels["example"].tolist()
    assert sorted(examples) == list(range(len(recs))) == examples  # no duplicate, none missing
    assert _shards(got) == _shards(want)


def test_more_workers_than_the_cluster_holds_is_refused(ray_local, faithful):
    ex = RayExecutor(5)  # the local instance has 2 CPUs: Ray would queue for ever
    with pytest.raises(ValueError, match="workers=5 need 5 CPUs and the Ray cluster has"):
        ex.play(faithful, BanditConfig(horizon=2), 5)


def test_executor_ray_without_ray_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    rc = main(["analyze", "--model", "organism:faithful", "--out", str(tmp_path / "a"),
               "--executor", "ray"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "pip install 'kdgap[ray]'" in err
    assert not (tmp_path / "a").exists()  # refused before any model work
