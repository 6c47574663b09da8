"""``kdgap analyze``: behaviour -> recording -> probes -> patching -> verdict, cached by stage.

Every stage writes one JSON file (atomically) under ``OUT/models/<slug>/`` holding its
result and the settings it ran with; a re-run skips a stage whose file exists with the
same settings, so re-running a finished analysis does no model work and a killed one
resumes at the stage it was in (the activation store resumes mid-stage on its own).
``force=True`` recomputes everything. Figures and the report are rendered from the saved
JSON only (:mod:`kdgap.report.render`), which is what ``kdgap figures`` re-runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from kdgap.agent.prompts import format_for
from kdgap.agent.text_agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.hooks import ActivationStore, record_store
from kdgap.hooks.patch.mediation import example_heatmap, mediation_summary
from kdgap.io import atomic_write_json
from kdgap.models import load_model
from kdgap.policies.play import play
from kdgap.policies.reference import make_policy
from kdgap.probes import knowing_doing_summary
from kdgap.records import read_records, write_records
from kdgap.report.behavior import PlayConfig, run_freqbias, run_play
from kdgap.report.render import render_all
from kdgap.report.stages import _Stage, model_slug
from kdgap.report.summary import build_summary, model_entry


@dataclass(frozen=True)
class AnalyzeConfig:
    """Sizes and settings of one analysis (defaults fit a laptop CPU in about a minute).

    Attributes:
        episodes: bandits in the behaviour study (the model's own play).
        horizon: steps per bandit (organisms are trained for 50).
        record_episodes: bandits of off-policy transcripts for recording, probes and
            patching (the model decides at every step, ``driver`` builds the history).
        driver: reference policy that builds the off-policy histories.
        hooks: hook spec recorded at every layer.
        site: where probes read the residual stream.
        n_pairs: counterfactual pairs for the mediation analysis.
        freqbias_histories: bandits per repetition count in the frequency-bias protocol.
        seed: one seed for everything.
        device, dtype: where and how the model runs.
    """

    episodes: int = 16
    horizon: int = 50
    record_episodes: int = 24
    driver: str = "random"
    hooks: str = "resid_post"
    site: str = "action"
    n_pairs: int = 32
    freqbias_histories: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("episodes", "horizon", "record_episodes", "n_pairs", "freqbias_histories"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")


class Analysis:
    """The analysis of one model; lazily loads it only when a stage must run."""

    def __init__(self, model: str, out: str | Path, cfg: AnalyzeConfig, *, force: bool = False):
        self.spec, self.cfg, self.force = model, cfg, force
        self.dir = Path(out) / "models" / model_slug(model)
        self._loaded = None
        self.timings: dict[str, float] = {}
        self.stages_run = 0  # stages computed (not read from cache) in this process

    # ------------------------------------------------------------------ lazy pieces
    @property
    def loaded(self):
        if self._loaded is None:

            self._loaded = load_model(self.spec, device=self.cfg.device, dtype=self.cfg.dtype)
        return self._loaded

    @property
    def fmt(self):

        return format_for(self.loaded)

    def agent(self, *, counterfactual: bool = False):

        return TextAgent(self.loaded.bridge, self.fmt, mode="forced", seed=self.cfg.seed,
                         counterfactual=counterfactual)  # fmt: skip

    @property
    def bandit(self) -> BanditConfig:
        return BanditConfig(horizon=self.cfg.horizon)

    def _stage(self, name: str, key: dict, compute: Callable[[], dict]) -> dict:
        # Timings are those of the computation that produced the cached result, so a
        # resumed or repeated analysis writes the same summary as an uninterrupted one.
        stage = _Stage(self.dir / f"{name}.json", {"stage": name, **key}, compute, self.force)
        out, self.timings[name] = stage.get()
        self.stages_run += stage.ran
        return out

    # ------------------------------------------------------------------ stages
    def behavior(self) -> dict:

        def compute() -> dict:
            cfg = PlayConfig(bandit=self.bandit, n_episodes=self.cfg.episodes,
                             seed=self.cfg.seed, counterfactual=True)  # fmt: skip
            out, records = run_play(self.agent(counterfactual=True), cfg)
            write_records(self.dir / "behavior_records.jsonl", records)
            return out

        return self._stage("behavior", self._key("episodes", "horizon", "seed"), compute)

    def baselines(self) -> dict:

        def compute() -> dict:
            cfg = PlayConfig(bandit=self.bandit, n_episodes=self.cfg.episodes, seed=self.cfg.seed)
            return {
                name: run_play(make_policy(name), cfg, progress=False)[0]
                for name in ("ucb", "random")
            }

        return self._stage("baselines", self._key("episodes", "horizon", "seed"), compute)

    def freqbias(self) -> dict:

        def compute() -> dict:
            # Histories must fit the model's context: organisms know steps 0..horizon only.
            max_reps = min(100, self.cfg.horizon - 10)
            reps = tuple(range(0, max_reps + 1, 5))
            return run_freqbias(self.agent(), self.bandit, n_histories=self.cfg.freqbias_histories,
                                repetitions=reps, seed=self.cfg.seed)  # fmt: skip

        return self._stage("freqbias", self._key("freqbias_histories", "horizon", "seed"), compute)

    def records(self) -> list:
        """Off-policy transcripts (cached as JSONL) used by recording, probes and patching."""
        path = self.dir / "transcripts.jsonl"
        key = self._key("record_episodes", "horizon", "driver", "seed")
        key_path = self.dir / "transcripts.key.json"
        if not self.force and path.exists() and key_path.exists():
            if json.loads(key_path.read_text()) == key:
                return read_records(path)

        recs = play(self.agent(), self.bandit, n_episodes=self.cfg.record_episodes,
                    seed=self.cfg.seed, driver=make_policy(self.cfg.driver))  # fmt: skip
        write_records(path, recs)
        atomic_write_json(key_path, key)
        return recs

    def record(self):

        def compute() -> dict:
            store = record_store(
                self.loaded.bridge, self.fmt, self.records(), hooks=self.cfg.hooks,
                sites=[self.cfg.site, "rationale.conclusion"], out=self.dir / "acts",
                model_id=self.spec, seed=self.cfg.seed,
            )  # fmt: skip
            return {"path": str(store.path), "n_examples": store.n_examples,
                    "hooks": list(store.hooks), "sites": list(store.sites)}  # fmt: skip

        key = self._key("record_episodes", "horizon", "driver", "hooks", "site", "seed")
        info = self._stage("record", key, compute)
        return ActivationStore(info["path"])

    def probes(self) -> dict:

        def compute() -> dict:
            return knowing_doing_summary(self.record(), site=self.cfg.site, seed=self.cfg.seed)

        key = self._key("record_episodes", "horizon", "driver", "hooks", "site", "seed")
        return self._stage("probes", key, compute)

    def patching(self) -> dict:

        def compute() -> dict:
            recs = self.records()
            model, fmt = self.loaded.bridge, self.fmt
            out = mediation_summary(model, fmt, recs, n_pairs=self.cfg.n_pairs, seed=self.cfg.seed)
            out["heatmap"] = example_heatmap(model, fmt, _example_record(recs))
            return out

        key = self._key("record_episodes", "horizon", "driver", "n_pairs", "seed")
        return self._stage("patching", key, compute)

    def run(self, progress: bool = True) -> dict:
        """All stages; returns this model's entry of ``summary.json``."""

        steps = [
            self.behavior,
            self.baselines,
            self.freqbias,
            self.record,
            self.probes,
            self.patching,
        ]
        results = {}
        for fn in tqdm(steps, desc=f"analyze {self.spec}", disable=not progress):
            results[fn.__name__] = fn()
        return model_entry(self.spec, results, self.cfg, self.timings)

    def _key(self, *names: str) -> dict:
        return {"model": self.spec, **{n: getattr(self.cfg, n) for n in names}}


def _example_record(records: list):
    """A late step whose rationale parsed and whose action follows the model's decision."""
    parsed = [r for r in records if r.rationale_arm is not None and r.completion]
    if not parsed:
        raise ValueError("no transcript with a parsed rationale: cannot build a patching pair.")
    return max(parsed, key=lambda r: (r.step, -r.episode))


def analyze(
    models: list[str],
    out: str | Path,
    cfg: AnalyzeConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Analyse ``models`` into ``out``: per-model stage files, ``summary.json``, figures and
    ``report.html``. Returns the summary dict."""

    cfg = cfg or AnalyzeConfig()
    out = Path(out)
    entries = {m: Analysis(m, out, cfg, force=force).run(progress) for m in models}
    summary = build_summary(entries, cfg)
    atomic_write_json(out / "summary.json", summary)
    render_all(out)
    return summary
