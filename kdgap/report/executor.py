"""Where a play runs: in this process, or split by episode ranges across Ray actors.

A play is a function of the model, its settings and the episode index alone: every
bandit, reward and seeded draw (the agent's, the driver's) depends on the episode index,
not on which other episodes share a batch (:func:`kdgap.policies.play.play`), and a
model's forward on one episode does not depend on its batch neighbours. So the records
of episodes ``k .. k + n - 1`` played by one worker are those of the single-process run,
and the workers' ranges, concatenated, are the whole run: ``--executor ray`` with any
number of workers gives the same records and the same summary (tested bit for bit).
Recording splits the same way: a store's shards are fixed input ranges whose bytes depend
only on the range, so workers record and write shards (files named by their range) and
this process lists each in the manifest, in order, as it arrives
(:func:`kdgap.hooks.record.record_store`'s ``map_shards``); a worker killed mid-shard
leaves an unlisted file that the retried task rewrites.

Each Ray worker is an actor that loads the model once (one :class:`Session`, on its GPU
share or a CPU slice with ``threads`` torch threads) and plays the ranges it is given;
an actor that dies is restarted by Ray and its task retried (``max_restarts``,
``max_task_retries``), which repeats a deterministic computation. Ray is an optional
extra (``pip install 'kdgap[ray]'``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

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


class LocalExecutor:
    """Plays in this process, on the analysis's own :class:`Session`."""

    name = "local"

    def play(
        self, session: Session, cfg: BanditConfig, n_episodes: int, **kwargs: Any
    ) -> list[StepRecord]:
        """:meth:`Session.play` (``kwargs``: its keyword arguments)."""
        return session.play(cfg, n_episodes, **kwargs)

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

    def play(self, cfg: BanditConfig, n_episodes: int, kwargs: dict) -> list[StepRecord]:
        return self.session.play(cfg, n_episodes, progress=False, **kwargs)

    def record_shards(self, args: tuple, ranges: list, options: dict) -> list:
        return self.session.record_shards(*args, ranges, **options)

    def pid(self) -> int:
        """The actor's process id (to watch or stop it)."""
        return os.getpid()


class RayExecutor:
    """Splits a play by episode ranges across ``workers`` Ray actors per model.

    Args:
        workers: actors per model (each loads the model once).
        address: a running cluster's address (``ray.init(address=...)``); None starts or
            joins a local instance.
        gpus_per_worker: GPUs each actor reserves (0 on CPU; fractions share a GPU).
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
        self._remote = self.ray.remote(
            num_cpus=self._cpus, num_gpus=self._gpus, max_restarts=max_restarts,
            max_task_retries=max_restarts,
        )(_Worker)  # fmt: skip
        self._actors: dict[tuple, list] = {}

    def _pool(self, session: Session) -> list:
        # Actors are built once per model and settings, and reused by every later play.
        settings = {f.name: getattr(session, f.name)
                    for f in dataclasses.fields(session) if f.init}  # fmt: skip
        key = tuple(sorted(settings.items()))
        if key not in self._actors:
            self._check_resources()
            self._actors[key] = [
                self._remote.remote(settings, self.threads) for _ in range(self.workers)
            ]
        return self._actors[key]

    def _check_resources(self) -> None:
        # Ray queues an actor it cannot place and waits for ever: refuse instead.
        free = self.ray.available_resources()
        for name, each in (("CPU", self._cpus), ("GPU", self._gpus)):
            need, have = self.workers * each, free.get(name, 0.0)
            if need > have:
                raise ValueError(
                    f"workers={self.workers} need {need:g} {name}s and the Ray cluster has "
                    f"{have:g} free; lower --workers (or --gpus-per-worker), or add nodes."
                )

    def play(
        self, session: Session, cfg: BanditConfig, n_episodes: int, **kwargs: Any
    ) -> list[StepRecord]:
        """:meth:`Session.play`'s records, each actor playing one range of episodes."""
        kwargs.pop("progress", None)
        actors = self._pool(session)
        futures = [
            actor.play.remote(cfg, count, {**kwargs, "first_episode": first})
            for actor, (first, count) in zip(actors, episode_ranges(n_episodes, len(actors)))
        ]
        records = [r for part in self.ray.get(futures) for r in part]
        return sorted(records, key=lambda r: (r.episode, r.step))

    def record(
        self, session: Session, records: list[StepRecord], hooks: str, sites: list[str],
        out: str | Path, **options: Any,
    ) -> ActivationStore:  # fmt: skip
        """:meth:`Session.record`, the shards recorded by the actors round-robin and listed
        here in order (the store's folder must be reachable from every actor)."""
        options.pop("progress", None)
        actors = self._pool(session)
        args = self.ray.put((records, hooks, sites, str(out)))

        def map_shards(ranges: list[tuple[int, int]]):
            futures = [actors[i % len(actors)].record_shards.remote(args, [r], options)
                       for i, r in enumerate(ranges)]  # fmt: skip
            for future in futures:  # in order: the manifest lists shards contiguously
                yield self.ray.get(future)[0]

        return session.record(records, hooks, sites, out, map_shards=map_shards, **options)

    def close(self) -> None:
        """Kill this executor's actors (the Ray instance stays up)."""
        for actors in self._actors.values():
            for actor in actors:
                self.ray.kill(actor)
        self._actors.clear()


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
