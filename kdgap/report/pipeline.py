"""``kdgap analyze``: behaviour -> recording -> probes -> patching -> verdict, cached by stage.

Every stage writes one JSON file (atomically) under ``OUT/models/<slug>/`` holding its
result and its key: the model's files (:func:`kdgap.models.files_fingerprint`), device,
dtype, kdgap's version and the settings the stage depends on. A re-run skips a stage whose
file exists with the same key, so re-running a finished analysis does no model work, a
killed one resumes at the stage it was in (the activation store, one folder per key,
resumes mid-stage on its own), and a retrained model or a changed setting recomputes
exactly the stages it affects.
``force=True`` recomputes everything. Figures and the report are rendered from the saved
JSON only (:mod:`kdgap.report.render`), which is what ``kdgap figures`` re-runs.

The Alice-in-Wonderland study (:mod:`kdgap.report.aiw`) is an optional last stage
(``AnalyzeConfig(aiw=True)``, ``kdgap analyze --aiw``); when it runs, its result reaches
the summary as ``results["aiw"]``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from kdgap._checks import check_out_folder
from kdgap.envs.bandit import BanditConfig
from kdgap.hooks import ActivationStore
from kdgap.hooks.names import resolve_hooks
from kdgap.io import atomic_write_json
from kdgap.models import files_fingerprint
from kdgap.policies.reference import make_policy
from kdgap.probes import knowing_doing_summary, latent_knowledge
from kdgap.records import StepRecord, read_records, write_records
from kdgap.report.aiw import aiw_study
from kdgap.report.behavior import PlayConfig, play_summary, run_freqbias, run_play
from kdgap.report.config import AnalyzeConfig
from kdgap.report.executor import LocalExecutor, PlaySpec, RayExecutor
from kdgap.report.mediation_stage import decomposition_stage, patching_stage
from kdgap.report.render import render_all
from kdgap.report.session import Session
from kdgap.report.stages import _Stage, model_slug
from kdgap.report.summary import build_summary, model_entry, previous_entries

#: kdgap's version, part of every stage's cache key.
_VERSION = importlib.metadata.version("kdgap")


class Analysis:
    """The analysis of one model; loads it (one :class:`Session`) only when a stage must run.

    Args:
        model: the model spec.
        out: the analysis folder (this model's stages go to ``out/models/<slug>/``).
        cfg: sizes and settings; sizes left unset take ``model``'s preset
            (:meth:`~kdgap.report.config.AnalyzeConfig.for_model`).
        force: recompute every stage.
        session: an already loaded model to analyse (its device and dtype are used).
        executor: where the plays run (:mod:`kdgap.report.executor`; default: here).
    """

    def __init__(
        self,
        model: str,
        out: str | Path,
        cfg: AnalyzeConfig,
        *,
        force: bool = False,
        session: Session | None = None,
        executor: LocalExecutor | RayExecutor | None = None,
    ) -> None:
        self.spec, self.cfg, self.force = model, cfg.for_model(model), force
        self.executor = executor or LocalExecutor()
        self.dir = Path(out) / "models" / model_slug(model)
        self._session = session
        self.timings: dict[str, float] = {}
        self._weights = files_fingerprint(model)  # before any model work: a bad spec fails
        self.ran: set[str] = set()  # stages computed (not read from the cache) in this process
        self._played: dict[str, tuple[list[StepRecord], float]] = {}  # see play_ahead

    @property
    def session(self) -> Session:
        """The model, its format and agents (loaded on first use).

        Loading also checks what only the model can tell, before any stage plays: the
        hook spec, and that the horizon's last step fits the model's context.
        """
        if self._session is None:
            session = Session(self.spec, device=self.cfg.device, dtype=self.cfg.dtype,
                              rationale=self.cfg.rationale,
                              max_new_tokens=self.cfg.max_new_tokens)  # fmt: skip
            resolve_hooks(session.bridge, self.cfg.hooks)
            session.check_fits(self.bandit)
            self._session = session
        return self._session

    @property
    def bandit(self) -> BanditConfig:
        """The bandit family every stage plays."""
        return BanditConfig(horizon=self.cfg.horizon)

    def _stage_file(self, name: str, key: dict, compute: Callable[[], dict] = dict) -> _Stage:
        return _Stage(self.dir / f"{name}.json", {"stage": name, **key}, compute, self.force)

    def _stage(self, name: str, key: dict, compute: Callable[[], dict]) -> dict:
        # Timings are those of the computation that produced the cached result, so a
        # resumed or repeated analysis writes the same summary as an uninterrupted one.
        stage = self._stage_file(name, key, compute)
        out, self.timings[name] = stage.get()
        if stage.ran:
            self.ran.add(name)
        return out

    # ------------------------------------------------------------------ stages
    def behavior(self) -> dict:
        """The model's own play with the conclusion-edit counterfactual (``kdgap play``)."""

        def compute() -> dict:
            cfg = PlayConfig(bandit=self.bandit, n_episodes=self.cfg.episodes,
                             seed=self.cfg.seed, counterfactual=True)  # fmt: skip
            name = self.session.agent(counterfactual=True, seed=self.cfg.seed).name
            records, seconds = self._play("behavior")
            out = play_summary(name, records, cfg, seconds)
            write_records(self.dir / "behavior_records.jsonl", records)
            return out

        return self._stage("behavior", self._behavior_key(), compute)

    def _behavior_key(self) -> dict:
        return self._key("episodes", "horizon", "seed", "max_new_tokens")

    def _plays(self) -> dict[str, PlaySpec]:
        """The two plays: the model's own (behaviour, with the counterfactual) and the
        off-policy transcripts that recording, probes and patching read."""
        batch = PlayConfig(bandit=self.bandit, n_episodes=self.cfg.episodes).batch_size
        seed = self.cfg.seed
        return {
            "behavior": (self.bandit, self.cfg.episodes,
                         {"seed": seed, "counterfactual": True, "batch_size": batch}),
            "transcripts": (self.bandit, self.cfg.record_episodes,
                            {"seed": seed, "driver": self.cfg.driver}),
        }  # fmt: skip

    def _play(self, name: str) -> tuple[list[StepRecord], float]:
        """``(records, seconds)`` of play ``name``: played in advance, or now."""
        if name in self._played:
            return self._played.pop(name)
        cfg, n, kwargs = self._plays()[name]
        t0 = time.perf_counter()
        records = self.executor.play(self.session, cfg, n, **kwargs)
        return records, time.perf_counter() - t0

    def play_ahead(self) -> None:
        """Play both plays at once when neither is cached. In one process they run in
        lockstep (:meth:`Session.play_many`: a model's steps are sequential, so two plays
        cost about one's steps); on several workers whole plays go to different workers
        (:func:`~kdgap.report.executor.pack_plays`) instead of each play's episodes being
        halved (every worker would pay each play's per-step cost). The stages then take
        their records from here."""
        behavior = self._stage_file("behavior", self._behavior_key())
        if behavior.saved() is not None or self._transcripts() is not None:
            return
        plays = self._plays()
        t0 = time.perf_counter()
        got = self.executor.play_many(self.session, list(plays.values()))
        seconds = time.perf_counter() - t0
        self._played.update({k: (v, seconds) for k, v in zip(plays, got)})

    def baselines(self) -> dict:
        """The same study played by UCB and by a uniform random policy."""

        def compute() -> dict:
            cfg = PlayConfig(bandit=self.bandit, n_episodes=self.cfg.episodes, seed=self.cfg.seed)
            return {
                name: run_play(make_policy(name), cfg, progress=False)[0]
                for name in ("ucb", "random")
            }

        return self._stage("baselines", self._key("episodes", "horizon", "seed"), compute)

    def freqbias(self) -> dict:
        """The frequency-bias protocol (:func:`~kdgap.report.behavior.run_freqbias`)."""

        def compute() -> dict:
            # Histories must fit the model's context: organisms know steps 0..horizon only.
            max_reps = min(100, self.cfg.horizon - 10)
            reps = tuple(range(0, max_reps + 1, 5))
            agent = self.session.agent(seed=self.cfg.seed)
            return run_freqbias(agent, self.bandit, n_histories=self.cfg.freqbias_histories,
                                repetitions=reps, seed=self.cfg.seed)  # fmt: skip

        return self._stage(
            "freqbias",
            self._key("freqbias_histories", "horizon", "seed", "max_new_tokens"),
            compute,
        )

    def transcripts(self) -> list[StepRecord]:
        """Off-policy step records (cached as JSONL) used by recording, probes and patching."""
        if (cached := self._transcripts()) is not None:
            return cached
        recs, _ = self._play("transcripts")
        write_records(self.dir / "transcripts.jsonl", recs)
        atomic_write_json(self.dir / "transcripts.key.json", self._transcripts_key())
        return recs

    def _transcripts_key(self) -> dict:
        return self._key("record_episodes", "horizon", "driver", "seed", "max_new_tokens")

    def _transcripts(self) -> list[StepRecord] | None:
        """The cached transcripts when their key matches (None: to be played)."""
        path, key_path = self.dir / "transcripts.jsonl", self.dir / "transcripts.key.json"
        if not self.force and path.exists() and key_path.exists():
            if json.loads(key_path.read_text()) == self._transcripts_key():
                return read_records(path)
        return None

    def activations(self) -> ActivationStore:
        """The ``record`` stage: the transcripts' activations at the probe site and (when
        every transcript has one) the rationale's conclusion, every layer."""

        def compute() -> dict:
            recs = self.transcripts()
            # The rationale's conclusion is recorded when every transcript has one; a model
            # that did not always write one is recorded at the probe site only, so that no
            # step is dropped from the probes.
            sites = [self.cfg.site]
            if all(r.rationale_arm is not None for r in recs):
                sites.append("rationale.conclusion")
            # One store per key: a killed recording resumes into its own folder, and a
            # changed model or setting never resumes into (or reads) another's activations.
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
            folder = self.dir / "acts" / digest[:12]
            for old in folder.parent.glob("*"):
                if old != folder and old.is_dir():
                    shutil.rmtree(old)
            store = self.executor.record(self.session, recs, self.cfg.hooks, sites, folder,
                                         seed=self.cfg.seed)  # fmt: skip
            return {"path": str(store.path), "n_examples": store.n_examples,
                    "hooks": list(store.hooks), "sites": list(store.sites)}  # fmt: skip

        key = self._transcripts_key() | self._key("hooks", "site")
        info = self._stage("record", key, compute)
        return ActivationStore(info["path"])

    def probes(self) -> dict:
        """Knowing vs doing probes, layer by layer (:func:`~kdgap.probes.knowing_doing_summary`)."""

        def compute() -> dict:
            # A label that cannot be probed (e.g. a model that always picks one arm) makes
            # the measurement unavailable, with the probes' own reason, not a failed run.
            store = self.activations()
            try:
                out = knowing_doing_summary(store, site=self.cfg.site, seed=self.cfg.seed)
            except ValueError as err:
                out = {"unavailable": f"probes: {err}"}
            # What the history says, decodable or not, needs no rationale: always measured.
            out["latent"] = latent_knowledge(store, site=self.cfg.site, seed=self.cfg.seed)
            return out

        key = self._transcripts_key() | self._key("hooks", "site")
        return self._stage("probes", key, compute)

    def patching(self) -> dict:
        """Mediation of conclusion and history edits and one example heatmap
        (:func:`~kdgap.report.mediation_stage.patching_stage`)."""

        def compute() -> dict:
            return patching_stage(self.executor, self.session, self.transcripts(),
                                  n_pairs=self.cfg.n_pairs, seed=self.cfg.seed)  # fmt: skip

        key = self._transcripts_key() | self._key("n_pairs")
        return self._stage("patching", key, compute)

    def decomposition(self) -> dict:
        """The mediation decomposition and its activation-level split
        (:func:`~kdgap.report.mediation_stage.decomposition_stage`), which decide the verdict."""

        def compute() -> dict:
            steps, seed = self.cfg.decomposition_steps, self.cfg.seed
            recs = self.transcripts()
            return decomposition_stage(self.session, recs, self.bandit, n_steps=steps, seed=seed)

        key = self._transcripts_key() | self._key("decomposition_steps")
        return self._stage("decomposition", key, compute)

    def aiw(self) -> dict:
        """The Alice-in-Wonderland study (:func:`~kdgap.report.aiw.aiw_study`).

        The stage file holds every sample, the per-prompt-type summary and the settings
        (:meth:`~kdgap.report.aiw.AiwResult.to_dict`); the summary keeps the last two. The
        chat template is used exactly when the tokenizer has one (the transcript formats'
        rule).
        """

        def compute() -> dict:
            tok = self.session.tokenizer
            res = aiw_study(
                self.session.bridge, tokenizer=tok, n_samples=self.cfg.aiw_samples,
                seed=self.cfg.seed, chat_template=bool(getattr(tok, "chat_template", None)),
            )  # fmt: skip
            return res.to_dict()

        return self._stage("aiw", self._key("aiw_samples", "seed"), compute)

    def run(self, progress: bool = True) -> dict:
        """All stages; returns this model's entry of ``summary.json``."""
        steps: list[tuple[str, Callable[[], object]]] = [
            ("behavior", self.behavior),
            ("baselines", self.baselines),
            ("freqbias", self.freqbias),
            ("record", self.activations),
            ("probes", self.probes),
            ("patching", self.patching),
            ("decomposition", self.decomposition),
        ]
        if self.cfg.aiw:
            steps.append(("aiw", self.aiw))
        self.play_ahead()
        results = {}
        for name, fn in tqdm(steps, desc=f"analyze {self.spec}", disable=not progress):
            results[name] = fn()
        return model_entry(self.spec, results, self.cfg, self.timings)

    def _key(self, *names: str) -> dict:
        # The weights' files, how the model runs and kdgap's version key every stage, so a
        # retrained model, another dtype or a new kdgap never reads an old result.
        # A setting left at None (the agent's default budget) adds nothing, nor does the
        # default rationale, so the stage keys (and cached stages) of analyses without them
        # are those they always had.
        given = {n: getattr(self.cfg, n) for n in names}
        key = {"model": self.spec, "weights": self._weights, "device": self.cfg.device,
               "dtype": self.cfg.dtype, "kdgap": _VERSION,
               **{n: v for n, v in given.items() if v is not None}}  # fmt: skip
        if self.cfg.rationale != "model":
            key["rationale"] = self.cfg.rationale
        return key


def analyze(
    models: list[str],
    out: str | Path,
    cfg: AnalyzeConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    executor: LocalExecutor | RayExecutor | None = None,
) -> dict:
    """Analyse ``models`` into ``out`` (stage files, ``summary.json``, figures, ``report.html``),
    the plays on ``executor`` (default: this process). Returns the summary dict."""
    cfg = cfg or AnalyzeConfig()
    if len(set(models)) != len(models):
        raise ValueError(f"models={models!r} names a model twice; pass each --model once.")
    out = check_out_folder(out)
    # Every spec is checked (Analysis.__init__) before any model work.
    analyses = [Analysis(m, out, cfg, force=force, executor=executor) for m in models]
    entries = previous_entries(out / "summary.json", exclude=models)
    # Models whose worker pools all fit the cluster at once are analysed side by side.
    side_by_side = len(analyses) > 1 and isinstance(executor, RayExecutor)
    if side_by_side and executor.fits(len(analyses)):
        with ThreadPoolExecutor(len(analyses)) as pool:
            done = list(pool.map(lambda a: a.run(progress), analyses))
    else:
        done = [a.run(progress) for a in analyses]
    entries.update({a.spec: entry for a, entry in zip(analyses, done)})
    summary = build_summary(entries, cfg)
    atomic_write_json(out / "summary.json", summary)
    render_all(out)
    return summary
