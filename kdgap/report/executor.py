"""Where the model work runs: in this process, or as tasks on Ray actors.

Both executors offer one engine, ``map(session, fn, items, shared)``: ``fn(session,
*shared, *item)`` for each item, results in order. On it run plays (whole plays, or
ranges of episodes: :func:`pack_plays`), recording shards (:func:`record_shard`) and the
patching stage's measurements (:mod:`kdgap.report.mediation_stage`).

A play is a function of the model, its settings and the episode index alone: every
bandit, reward and seeded draw (the agent's, the driver's) depends on the episode index,
not on which other episodes share a batch (:func:`kdgap.policies.play.play`), and a
model's forward on one episode does not depend on its batch neighbours. So the records
of episodes ``k .. k + n - 1`` played by one worker are those of the single-process run,
and the workers' ranges, concatenated, are the whole run: ``--executor ray`` with any
number of workers gives the same records and the same summary (tested bit for bit, every
process at one torch thread: other thread counts round float reductions differently).
Recording splits the same way: a store's shards are fixed input ranges whose bytes depend
only on the range, so workers record and write shards (files named by their range) and
this process lists each in the manifest, in order, as it arrives
(:func:`kdgap.hooks.record.record_store`'s ``map_shards``); a worker killed mid-shard
leaves an unlisted file that the retried task rewrites.

Each Ray worker is an actor that loads the model once (one :class:`Session`, on its GPU
share or a CPU slice with ``threads`` torch threads) and runs the tasks it is given;
an actor that dies is restarted by Ray and its task retried (``max_restarts``,
``max_task_retries``), which repeats a deterministic computation. Ray is an optional
extra (``pip install 'kdgap[ray]'``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdgap._checks import check_int
from kdgap.envs.bandit import BanditConfig
from kdgap.hooks.store import ActivationStore
from kdgap.records import StepRecord
from kdgap.report.session import Session

#: Executors of ``kdgap analyze --executor``.
EXECUTORS = ("local", "ray")


def import_ray() -> Any:
    """The ``ray`` module, or an ``ImportError`` naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            "executor='ray' needs Ray, which is not installed: pip install 'kdgap[ray]'."
        ) from None
    return ray


def episode_ranges(n_episodes: int, workers: int) -> list[tuple[int, int]]:
    """``[(first episode, count)]``: ``n_episodes`` split into at most ``workers`` contiguous
    ranges whose sizes differ by at most one (empty ranges left out)."""
    n_episodes, workers = check_int("n_episodes", n_episodes), check_int("workers", workers)
    base, extra = divmod(n_episodes, workers)
    out, start = [], 0
    for w in range(workers):
        count = base + (w < extra)
        if count:
            out.append((start, count))
        start += count
    return out


def pack_plays(sizes: Sequence[int], workers: int) -> list[list[tuple[int, int, int]]]:
    """Plays of ``sizes`` episodes shared by ``workers``: one list of
    ``(play index, first episode, count)`` pieces per worker (idle workers left out).

    With at least as many plays as workers, every play stays whole (the largest first, to
    the least loaded worker): a play's cost per step has a part that does not shrink with
    its episodes (one batched forward per step), which a split play pays on every worker.
    With fewer plays, the plays' episodes, end to end, are cut into :func:`episode_ranges`.
    A worker plays the pieces it holds in lockstep
    (:meth:`~kdgap.report.session.Session.play_many`), paying that part once.
    """
    sizes = [check_int("sizes", n, minimum=0) for n in sizes]
    workers = check_int("workers", workers)
    if len(sizes) >= workers:
        chunks: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
        loads = [0] * workers
        for i in sorted((i for i in range(len(sizes)) if sizes[i]), key=lambda i: -sizes[i]):
            w = loads.index(min(loads))
            chunks[w].append((i, 0, sizes[i]))
            loads[w] += sizes[i]
        return [sorted(c) for c in chunks if c]
    ends = np.cumsum([0, *sizes])
    chunks = []
    for start, count in episode_ranges(int(ends[-1]), workers):
        pieces, stop = [], start + count
        for i, (lo, hi) in enumerate(zip(ends[:-1], ends[1:])):
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                pieces.append((i, int(a - lo), int(b - a)))
        chunks.append(pieces)
    return chunks


#: A play to run: ``(bandit family, episodes, Session.play keyword arguments)``.
PlaySpec = tuple[BanditConfig, int, dict]


def play_pieces(session: Session, plays: Sequence[PlaySpec], pieces: list) -> list:
    """``[records]`` of each ``(play index, first, count)`` piece of ``plays``."""
    return session.play_many([
        (plays[i][0], count, {**plays[i][2], "progress": False, "first_episode": first})
        for i, first, count in pieces
    ])  # fmt: skip


def record_shard(session: Session, args: tuple, options: dict, shard: tuple[int, int]) -> tuple:
    """One shard of :meth:`Session.record` (``args``: its positional arguments)."""
    return session.record_shards(*args, [shard], **options)[0]


def _assemble(plays: Sequence[PlaySpec], chunks: list, results: Iterable[list]) -> list:
    parts: list[list[StepRecord]] = [[] for _ in plays]
    for pieces, got in zip(chunks, results):
        for (i, _, _), records in zip(pieces, got):
            parts[i].extend(records)
    return [sorted(p, key=lambda r: (r.episode, r.step)) for p in parts]


class _Executor:
    """What both executors share: a single play is :meth:`play_many` of one."""

    def play_many(self, session: Session, plays: Sequence[PlaySpec]) -> list[list[StepRecord]]:
        raise NotImplementedError

    def play(
        self, session: Session, cfg: BanditConfig, n_episodes: int, **kwargs: Any
    ) -> list[StepRecord]:
        """:meth:`Session.play` of ``n_episodes`` (``kwargs``: its keyword arguments)."""
        return self.play_many(session, [(cfg, n_episodes, kwargs)])[0]


class LocalExecutor(_Executor):
    """Runs everything in this process, on the analysis's own :class:`Session`."""

    name = "local"
    workers = 1

    def map(
        self, session: Session, fn: Callable, items: Iterable[tuple], shared: tuple = ()
    ) -> Iterator:
        """``fn(session, *shared, *item)`` for each item, in order (lazily)."""
        return (fn(session, *shared, *item) for item in items)

    def play_many(self, session: Session, plays: Sequence[PlaySpec]) -> list[list[StepRecord]]:
        """:meth:`Session.play` of each ``(cfg, n_episodes, kwargs)``
        (:meth:`Session.play_many`: compatible plays in lockstep)."""
        return session.play_many(plays)

    def record(
        self, session: Session, records: list[StepRecord], hooks: str, sites: list[str],
        out: str | Path, **options: Any,
    ) -> ActivationStore:  # fmt: skip
        """:meth:`Session.record` (``options``: its keyword arguments)."""
        return session.record(records, hooks, sites, out, **options)

    def close(self) -> None:
        """Nothing to release."""


class _Worker:
    """A Ray actor's state: one loaded model (a :class:`Session`)."""

    def __init__(self, settings: dict, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # a CPU slice: workers must not oversubscribe cores
        self.session = Session(**settings)

    def call(self, fn: Callable, *args: Any) -> Any:
        """``fn(session, *args)`` on this actor's model."""
        return fn(self.session, *args)

    def pid(self) -> int:
        """The actor's process id (to watch or stop it)."""
        return os.getpid()


class RayExecutor(_Executor):
    """Spreads plays, recording shards and patching across ``workers`` Ray actors per model.

    Args:
        workers: actors per model (each loads the model once).
        address: a running cluster's address (``ray.init(address=...)``); None starts or
            joins a local instance.
        gpus_per_worker: GPUs each actor reserves (0 on CPU; fractions share a GPU; more
            than one: the actor's GPUs are one placement-group bundle on one node and the
            model is spread over them, see :func:`actor_options`).
        threads: torch threads per actor on CPU (1: ``workers`` actors on ``workers``
            cores).
        max_restarts: times Ray restarts a dead actor (its task is retried as often).
    """

    name = "ray"

    def __init__(
        self,
        workers: int = 2,
        *,
        address: str | None = None,
        gpus_per_worker: float = 0.0,
        threads: int = 1,
        max_restarts: int = 2,
    ) -> None:
        self.workers = check_int("workers", workers)
        self.threads = check_int("threads", threads)
        if not gpus_per_worker >= 0:
            raise ValueError(f"gpus_per_worker={gpus_per_worker!r} must be >= 0 (0 on CPU).")
        self.ray = import_ray()  # before any model work
        if not self.ray.is_initialized():
            kw: dict = {"include_dashboard": False, "log_to_driver": False}
            self.ray.init(address=address, **kw)
        self._cpus, self._gpus = (self.threads if gpus_per_worker == 0 else 1), gpus_per_worker
        self._max_restarts = max_restarts
        self._actors: dict[tuple, list] = {}
        self._groups: list = []  # placement groups of multi-GPU workers
        self._next = 0  # round-robin position: successive submissions interleave
        self._lock = threading.Lock()  # models analysed concurrently share the executor

    def _pool(self, session: Session) -> list:
        # Actors are built once per model and settings, and reused by every later call.
        settings = {f.name: getattr(session, f.name)
                    for f in dataclasses.fields(session) if f.init}  # fmt: skip
        key = tuple(sorted(settings.items()))
        with self._lock:
            if key not in self._actors:
                self._check_resources(self.workers)
                self._actors[key] = [self._start(settings) for _ in range(self.workers)]
            return self._actors[key]

    def _start(self, settings: dict) -> Any:
        opts = actor_options(self.ray, self._cpus, self._gpus, self._max_restarts)
        if "scheduling_strategy" in opts:  # a bundle of several GPUs: released by close()
            self._groups.append(opts["scheduling_strategy"].placement_group)
            settings = {**settings, "device": "auto"}  # spread over the bundle's GPUs
        return self.ray.remote(_Worker).options(**opts).remote(settings, self.threads)

    def fits(self, n_models: int) -> bool:
        """Whether ``n_models`` pools of ``workers`` actors fit the cluster's free resources
        (beside the pools already started)."""
        try:
            self._check_resources(self.workers * n_models)
        except ValueError:
            return False
        return True

    def _check_resources(self, actors: int) -> None:
        # Ray queues an actor it cannot place and waits for ever: refuse instead.
        free = self.ray.available_resources()
        for name, each in (("CPU", self._cpus), ("GPU", self._gpus)):
            need, have = actors * each, free.get(name, 0.0)
            if need > have:
                raise ValueError(
                    f"workers={self.workers} need {need:g} {name}s and the Ray cluster has "
                    f"{have:g} free; lower --workers (or --gpus-per-worker), or add nodes."
                )

    def map(
        self, session: Session, fn: Callable, items: Iterable[tuple], shared: tuple = ()
    ) -> Iterator:
        """``fn(session, *shared, *item)`` for each item on the actors (round robin, all
        submitted at once); results in order. ``shared`` is sent to the cluster once."""
        actors = self._pool(session)
        refs = [self.ray.put(x) for x in shared]
        futures = []
        with self._lock:
            for item in items:
                actor = actors[self._next % len(actors)]
                self._next += 1
                futures.append(actor.call.remote(fn, *refs, *item))
        return (self.ray.get(f) for f in futures)

    def play_many(self, session: Session, plays: Sequence[PlaySpec]) -> list[list[StepRecord]]:
        """:meth:`Session.play` of each ``(cfg, n_episodes, kwargs)``: the episodes of all
        of them packed onto the actors (:func:`pack_plays`), the records reassembled."""
        chunks = pack_plays([n for _, n, _ in plays], len(self._pool(session)))
        # play_pieces turns each actor's progress bar off.
        results = self.map(session, play_pieces, [(c,) for c in chunks], shared=(plays,))
        return _assemble(plays, chunks, results)

    def record(
        self, session: Session, records: list[StepRecord], hooks: str, sites: list[str],
        out: str | Path, **options: Any,
    ) -> ActivationStore:  # fmt: skip
        """:meth:`Session.record`, the shards recorded by the actors and listed here in
        order (the store's folder must be reachable from every actor)."""
        options.pop("progress", None)
        args = (records, hooks, sites, str(out))

        def map_shards(ranges: list[tuple[int, int]]):
            # In order: the manifest lists shards contiguously.
            return self.map(session, record_shard, [(r,) for r in ranges],
                            shared=(args, options))  # fmt: skip

        return session.record(records, hooks, sites, out, map_shards=map_shards, **options)

    def close(self) -> None:
        """Kill this executor's actors and release their placement groups (the Ray
        instance stays up)."""
        for actors in self._actors.values():
            for actor in actors:
                self.ray.kill(actor)
        self._actors.clear()
        for group in self._groups:
            self.ray.util.remove_placement_group(group)
        self._groups.clear()


def actor_options(ray: Any, cpus: float, gpus: float, max_restarts: int) -> dict:
    """Ray actor options of one worker: its CPUs and GPUs, restarts and task retries.

    An actor with more than one GPU holds a placement group of one bundle
    (``{"CPU": cpus, "GPU": gpus}``, ``STRICT_PACK``: all on one node) and loads its model
    with ``device="auto"`` (accelerate's ``device_map="auto"`` over the GPUs it sees),
    so a model larger than one GPU is split across the bundle's GPUs inside the actor.
    """
    opts: dict = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": max_restarts,
                  "max_task_retries": max_restarts}  # fmt: skip
    if gpus > 1:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = ray.util.placement_group([{"CPU": cpus, "GPU": gpus}], strategy="STRICT_PACK")
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_capture_child_tasks=True
        )
    return opts


def make_executor(
    name: str = "local", *, workers: int = 2, address: str | None = None,
    gpus_per_worker: float = 0.0, threads: int = 1,
) -> LocalExecutor | RayExecutor:  # fmt: skip
    """The executor called ``name`` (one of :data:`EXECUTORS`)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(workers, address=address, gpus_per_worker=gpus_per_worker,
                           threads=threads)  # fmt: skip
    raise ValueError(f"executor={name!r} is unknown; use one of {EXECUTORS}.")
