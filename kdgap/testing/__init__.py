"""Fixtures for tests and benchmarks, never imported by the library itself.

- :mod:`~kdgap.testing.texts`: synthetic paper-style transcripts (``demo_texts``) and the
  site-only :class:`~kdgap.testing.texts.RegexFormat` that resolves their sites;
- :mod:`~kdgap.testing.synthetic`: :class:`~kdgap.testing.synthetic.SyntheticStore`, an
  in-memory activation store with planted signals (known ground truth for the probes);
- :mod:`~kdgap.testing.organisms`: ``organism_store``, recorded off-policy activation
  stores of the shipped organisms.

The submodules are imported on their own (``from kdgap.testing.synthetic import ...``):
the package imports none of them, so a probe benchmark on synthetic data does not load
the agent and the organisms that ``organisms`` needs.
"""

__all__ = ["organisms", "synthetic", "texts"]
