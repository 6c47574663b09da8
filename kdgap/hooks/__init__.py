"""Hooks: resolve sites, record activations into an on-disk store, and patch them.

- :func:`record_store` (:mod:`~kdgap.hooks.record`): transcripts -> activation store.
- :class:`ActivationStore` (:mod:`~kdgap.hooks.store`): ``store.load(hook=..., site=...)``.
- :func:`record_batch`, :class:`Recorder` (:mod:`~kdgap.hooks.recorder`): one batch, in memory.
- :func:`resolve_hooks` (:mod:`~kdgap.hooks.names`), :func:`parse_site`,
  :func:`resolve_sites` (:mod:`~kdgap.hooks.sites`).
- :mod:`kdgap.hooks.twin_capture`: residual streams captured on the hook-free twins.
- :mod:`kdgap.hooks.patch`: activation patching, path patching, attribution, mediation.
"""

from kdgap.hooks.names import HOOK_KINDS, resolve_hooks, valid_hook_names
from kdgap.hooks.record import record_store
from kdgap.hooks.recorder import Recorder, record_batch
from kdgap.hooks.sites import MissingSites, parse_site, resolve_sites
from kdgap.hooks.store import ActivationStore, StoreError

__all__ = [
    "HOOK_KINDS",
    "ActivationStore",
    "MissingSites",
    "Recorder",
    "StoreError",
    "parse_site",
    "record_batch",
    "record_store",
    "resolve_hooks",
    "resolve_sites",
    "valid_hook_names",
]
