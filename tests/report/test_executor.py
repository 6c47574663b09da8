"""Executors: work split across workers equals the single-process work.

Without Ray: a range of episodes is that slice of the whole run, plays are packed onto
workers with every episode once, and shards recorded out of order by another caller give
the same store bytes. With a local Ray instance (2 CPUs, no dashboard): an analysis on 2
workers and two models analysed side by side on 1 worker each write the single-process
summary, ``play`` and ``record`` on Ray write the local records and store, a worker killed
(SIGKILL) mid-recording leaves a complete store equal to the single-process one, and
``--executor ray`` without Ray installed is a one-line error.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest
import torch

from kdgap.cli import main
from kdgap.envs.bandit import BanditConfig
from kdgap.hooks.record import record_shards, record_store
from kdgap.hooks.store import ActivationStore
from kdgap.records import read_records
from kdgap.report.api import PlayConfig, Player, play_study
from kdgap.report.executor import LocalExecutor, RayExecutor, episode_ranges, pack_plays
from kdgap.report.pipeline import AnalyzeConfig, analyze
from kdgap.report.session import Session

SMALL = dict(episodes=3, horizon=10, record_episodes=3, n_pairs=4, freqbias_histories=1,
             decomposition_steps=4)  # fmt: skip


def test_episode_ranges_by_hand():
    assert episode_ranges(7, 3) == [(0, 3), (3, 2), (5, 2)]
    assert episode_ranges(2, 4) == [(0, 1), (1, 1)]
    with pytest.raises(ValueError, match="workers=0"):
        episode_ranges(4, 0)


def test_pack_plays_by_hand():
    # As many plays as workers: whole plays, the largest to the least loaded worker.
    assert pack_plays([16, 24], 2) == [[(1, 0, 24)], [(0, 0, 16)]]
    assert pack_plays([3, 0, 2, 2], 2) == [[(0, 0, 3)], [(2, 0, 2), (3, 0, 2)]]
    # Fewer plays than workers: the episodes end to end, cut into near-equal ranges.
    assert pack_plays([10], 3) == [[(0, 0, 4)], [(0, 4, 3)], [(0, 7, 3)]]
    assert pack_plays([2, 3], 3) == [[(0, 0, 2)], [(1, 0, 2)], [(1, 2, 1)]]
    with pytest.raises(ValueError, match="sizes=-1"):
        pack_plays([4, -1], 2)


@pytest.mark.parametrize("sizes", [[5], [0, 7], [4, 4, 1], [9, 2], [1, 1, 1, 1, 1]])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_pack_plays_covers_every_episode_once(sizes, workers):
    chunks = pack_plays(sizes, workers)
    assert 1 <= len(chunks) <= workers and all(chunks)
    seen = sorted((i, e) for c in chunks for i, first, n in c for e in range(first, first + n))
    assert seen == [(i, e) for i, n in enumerate(sizes) for e in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Workers run one torch thread each; a float reduction split over another number of
    # threads rounds differently (1e-8 here), so the reference runs one thread too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def _numbers(summary: dict, model: str = "organism:faithful") -> dict:
    """A model's summary entry without wall times (which differ from run to run)."""
    entry = dict(summary["models"][model])
    entry.pop("timings", None)
    entry["behavior"] = {k: v for k, v in entry["behavior"].items() if k != "seconds"}
    return entry


@pytest.fixture(scope="module")
def local_summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return analyze(["organism:faithful"], out, AnalyzeConfig(**SMALL), progress=False)


def test_local_play_many_is_each_play(faithful):
    cfg = BanditConfig(horizon=4)
    plays = [(cfg, 2, {"seed": 1, "driver": "random", "progress": False}),
             (cfg, 3, {"seed": 2, "counterfactual": True, "progress": False})]  # fmt: skip
    got = LocalExecutor().play_many(faithful, plays)
    assert got == [faithful.play(c, n, **kw) for c, n, kw in plays]
    # An analysis's two plays share the seed: they run in lockstep, with the same records.
    plays = [(cfg, 3, {"seed": 1, "counterfactual": True, "progress": False}),
             (cfg, 2, {"seed": 1, "driver": "random", "progress": False}),
             (cfg, 2, {"seed": 1, "first_episode": 5, "progress": False})]  # fmt: skip
    got = LocalExecutor().play_many(faithful, plays)
    assert got == [faithful.play(c, n, **kw) for c, n, kw in plays]
    assert all(r.cf_action is None for r in got[1] + got[2])  # as without the counterfactual
    assert any(r.cf_action is not None for r in got[0])
    assert [r.episode for r in got[2]] == [e for e in (5, 6) for _ in range(4)]


def test_ray_analysis_equals_the_single_process_one(ray_local, local_summary, tmp_path):
    ex = RayExecutor(2)  # one worker per model: the side-by-side test below
    try:
        got = analyze(["organism:faithful"], tmp_path, AnalyzeConfig(**SMALL), progress=False,
                      executor=ex)  # fmt: skip
    finally:
        ex.close()
    assert _numbers(got) == _numbers(local_summary)


def test_two_models_side_by_side_equal_their_single_process_analyses(
    ray_local, local_summary, tmp_path
):
    models = ["organism:faithful", "organism:greedy-bypass"]
    local = analyze(models[1:], tmp_path / "local", AnalyzeConfig(**SMALL), progress=False)
    ex = RayExecutor(1)  # two pools of one worker fit the 2 CPUs: analysed concurrently
    try:
        assert ex.fits(2) and not ex.fits(3)
        got = analyze(models, tmp_path / "ray", AnalyzeConfig(**SMALL), progress=False,
                      executor=ex)  # fmt: skip
    finally:
        ex.close()
    assert _numbers(got) == _numbers(local_summary)
    assert _numbers(got, models[1]) == _numbers(local, models[1])


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


def test_play_and_record_on_ray_write_the_local_records_and_store(ray_local, tmp_path):
    common = ["--model", "organism:faithful", "--episodes", "3", "--steps", "6"]
    for ex in ("local", "ray"):
        assert main(["record", *common, "--out", str(tmp_path / ex), "--executor", ex]) == 0
    want, got = ActivationStore(tmp_path / "local"), ActivationStore(tmp_path / "ray")
    assert got.n_examples == 18 and _shards(got) == _shards(want)
    cfg = PlayConfig(bandit=BanditConfig(horizon=6), n_episodes=3, counterfactual=True)
    player = Player(model="organism:faithful")
    ex = RayExecutor(2)
    try:
        on_ray = play_study(player, cfg, records_out=tmp_path / "ray.jsonl", executor=ex)
    finally:
        ex.close()
    here = play_study(player, cfg, records_out=tmp_path / "local.jsonl")
    assert read_records(tmp_path / "ray.jsonl") == read_records(tmp_path / "local.jsonl")
    drop = ("seconds",)
    assert {k: v for k, v in on_ray.items() if k not in drop} == {
        k: v for k, v in here.items() if k not in drop
    }


def test_a_worker_with_several_gpus_holds_one_packed_bundle(ray_local):
    from kdgap.report.executor import actor_options

    assert "scheduling_strategy" not in actor_options(ray_local, 1, 0.5, 2)
    opts = actor_options(ray_local, 1, 2, 2)
    group = opts["scheduling_strategy"].placement_group
    try:
        assert group.bundle_specs == [{"CPU": 1, "GPU": 2}]
        assert (opts["num_gpus"], opts["max_restarts"], opts["max_task_retries"]) == (2, 2, 2)
    finally:
        ray_local.util.remove_placement_group(group)


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
