"""Per-layer linear probes that separate what the model knows from what it does.

See docs/science.md section 4: probes split by episode, report chance, a difference-of-means
baseline and Hewitt-Liang selectivity, and are followed by a causal check.
"""

from kdgap.probes.batched import BatchedLogisticFit, fit_logistic_batched
from kdgap.probes.control import control_labels, selectivity
from kdgap.probes.dataset import DEFAULT_LABELS, ActivationSource
from kdgap.probes.estimators import DEFAULT_CS, DiffMeansProbe, LogisticProbe
from kdgap.probes.interventions import CausalReport, ablate, arm_distribution, causal_check, steer
from kdgap.probes.knowing_doing import KnowingDoingReport, knowing_doing
from kdgap.probes.latent import LATENT_LABELS, latent_knowledge
from kdgap.probes.splits import grouped_folds, grouped_train_test_split
from kdgap.probes.stats import accuracy_ci, chance_level, cluster_bootstrap, wilson_interval
from kdgap.probes.steering import steering_summary
from kdgap.probes.summary import knowing_doing_summary
from kdgap.probes.sweep import sweep

__all__ = [
    "DEFAULT_CS", "DEFAULT_LABELS", "LATENT_LABELS", "ActivationSource", "BatchedLogisticFit",
    "CausalReport", "DiffMeansProbe", "KnowingDoingReport", "LogisticProbe", "ablate",
    "accuracy_ci", "arm_distribution", "causal_check", "chance_level", "cluster_bootstrap",
    "control_labels", "fit_logistic_batched", "grouped_folds", "grouped_train_test_split",
    "knowing_doing", "knowing_doing_summary", "latent_knowledge", "selectivity", "steer",
    "steering_summary", "sweep", "wilson_interval",
]  # fmt: skip
