"""Hooks: record activations at named transcript sites into an on-disk store, and patch them.

Entry points (imported lazily, so ``import kdgap.hooks.plumbing`` stays light):

- :func:`record_store` (:mod:`kdgap.hooks.api`): records -> model forward -> activation store.
- :class:`ActivationStore` (:mod:`kdgap.hooks.store`): ``store.load(hook=..., site=...)``.
- :func:`record_batch` (:mod:`kdgap.hooks.recorder`): one batch, in memory.
- :func:`resolve_hooks` (:mod:`kdgap.hooks.plumbing`), :func:`parse_site`
  (:mod:`kdgap.hooks.sites`).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "record_store": "kdgap.hooks.api",
    "ActivationStore": "kdgap.hooks.store",
    "StoreError": "kdgap.hooks.store",
    "record_batch": "kdgap.hooks.recorder",
    "Recorder": "kdgap.hooks.recorder",
    "resolve_hooks": "kdgap.hooks.plumbing",
    "tokenize_batch": "kdgap.hooks.plumbing",
    "require_eval": "kdgap.hooks.plumbing",
    "parse_site": "kdgap.hooks.sites",
    "resolve_sites": "kdgap.hooks.sites",
    "MissingSites": "kdgap.hooks.sites",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdgap.hooks' has no attribute {name!r}")
