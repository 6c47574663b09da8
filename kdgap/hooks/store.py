"""On-disk activation store: sharded safetensors + Parquet labels + a checksummed manifest.

Layout of a store directory::

    manifest.json                 model identity, hooks, sites, dtype, shards, checksums
    shards/shard-00000.safetensors  one tensor per (hook, site): "<hook>@<site>" [n, *shape]
    shards/shard-00000.parquet      the labels of that shard's n examples, same row order

Writing is crash-safe: every file goes to a temp file that is fsynced and renamed, and the
manifest (also renamed atomically) lists a shard only after both of its files are in place.
A shard file that is not in the manifest is an orphan of a killed run and is rewritten on
resume; shards are recorded in fixed example ranges, so a resumed run writes exactly the
bytes an uninterrupted one would (``tests/hooks/test_store.py`` kills a run with SIGKILL).

Reading is lazy: :meth:`ActivationStore.load` opens each shard with ``safe_open`` and reads
only the requested tensor, checking that tensor's sha256 from the manifest; shard sizes
are checked on open (truncation) and :meth:`ActivationStore.verify` hashes whole files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file

from kdgap.io import atomic_write as _atomic_write  # module global: tests wrap it
from kdgap.io import atomic_write_json, file_sha256
from kdgap.models.runtime import release_free_memory

FORMAT = "kdgap-activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"


class StoreError(RuntimeError):
    """A store is corrupt, truncated, incomplete or incompatible with a request."""


def tensor_key(hook: str, site: str) -> str:
    """Name of the (hook, site) tensor inside a shard: ``"<hook>@<site>"``."""
    return f"{hook}@{site}"


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype; bfloat16 included)."""
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _read_manifest(path: Path) -> dict:
    """The manifest, or a :class:`StoreError` naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(
            f"{path} is not valid JSON ({err}): the manifest was cut off or edited; delete "
            "the store folder and record again."
        ) from err


def write_labels(labels: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a labels table to Parquet through pyarrow's *system* (malloc) memory pool.

    Why: pyarrow's default pool (mimalloc) keeps the segments it grows into, and
    ``release_unused`` does not hand them back, so a recorder's resident memory would step
    up a few shards into a run and grow with the number of transcripts. Memory from the
    system pool is returned by glibc's trim (:func:`release_write_memory`). The default
    pool is restored afterwards; buffers remember their pool, so switching it is safe for
    other users of pyarrow.
    """
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        labels.to_parquet(path, index=False)
    finally:
        pa.set_memory_pool(previous)


def release_write_memory() -> None:
    """Hand memory freed by a shard write back to the OS: glibc's heap keeps the
    serialisation buffers (and, through pyarrow's system pool, the labels' pages; pyarrow's
    default pool is released too, for anything that did not go through the system pool).
    Without this, every later forward runs on top of a write's leftovers, and resident
    memory grows with the number of shards."""
    pa.default_memory_pool().release_unused()
    release_free_memory()


class StoreWriter:
    """Appends shards to a store directory, creating or reopening it.

    Args:
        path: store directory.
        header: identity fields every shard must share: ``model`` (dict with ``id`` and
            ``fingerprint``), ``hooks``, ``sites``, ``dtype``, ``shard_size`` and
            ``config`` (free-form: format name, prepend_bos, seed, batch size).

    Raises:
        StoreError: the directory holds a store whose model, hooks, sites, dtype or shard
            size differ from ``header`` (a store never mixes two models), or a listed shard
            is corrupt.
    """

    def __init__(self, path: str | os.PathLike, header: dict) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if mpath.exists():
            self.manifest = _read_manifest(mpath)
            _check_compatible(self.manifest, header, self.path)
            store = ActivationStore(self.path)
            store.verify()  # a resumed store must be sound before we build on it
            self._clean_orphans()
        else:
            self.manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                **header,
                "segments": [],
                "shards": [],
                "skipped": [],
                "n_examples": 0,
                "complete": False,
            }
            (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            atomic_write_json(mpath, self.manifest)

    def _clean_orphans(self) -> None:
        """Delete shard files and temp files that the manifest does not list."""
        listed = {s[k] for s in self.manifest["shards"] for k in ("file", "labels")}
        for p in (self.path / SHARD_DIR).iterdir():
            if f"{SHARD_DIR}/{p.name}" not in listed:
                p.unlink()

    @property
    def covered(self) -> int:
        """Examples (input indices) covered by written shards: the next shard's start."""
        shards = self.manifest["shards"]
        return shards[-1]["stop"] if shards else 0

    def save_manifest(self) -> None:
        """Write the manifest atomically (a shard exists only once it is listed here)."""
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def write_shard(
        self, start: int, stop: int, acts: dict[str, torch.Tensor], labels: pd.DataFrame,
        skipped: list[int],
    ) -> None:  # fmt: skip
        """Write one shard covering input indices ``[start, stop)``, then list it.

        Args:
            start, stop: input range; ``start`` must equal :attr:`covered`.
            acts: ``{tensor_key(hook, site): Tensor[n, *shape]}`` for every (hook, site).
            labels: ``n`` rows, in the tensors' row order.
            skipped: input ids in the range dropped for missing sites.
        """
        if start != self.covered:
            raise StoreError(f"shard start={start} but the store covers 0..{self.covered}.")
        entry = write_shard_files(self.path, self.manifest, start, stop, acts, labels)
        self.commit(entry, skipped)

    def commit(self, entry: dict, skipped: list[int]) -> None:
        """List a shard whose files are written (:func:`write_shard_files`): from here on
        it exists. Shards are committed in input order, each starting where the last ended.
        """
        if entry["start"] != self.covered:
            raise StoreError(
                f"shard start={entry['start']} but the store covers 0..{self.covered}."
            )
        self.manifest["shards"].append(entry)
        self.manifest["skipped"].extend(skipped)
        self.manifest["n_examples"] += entry["n"]
        self.save_manifest()
        release_write_memory()


def write_shard_files(
    path: str | os.PathLike, header: dict, start: int, stop: int,
    acts: dict[str, torch.Tensor], labels: pd.DataFrame,
) -> dict:  # fmt: skip
    """Write the files of the shard covering inputs ``[start, stop)`` of the store at
    ``path`` (atomically) and return its manifest entry; the shard exists only once a
    :class:`StoreWriter` commits the entry. Shards are fixed input ranges, so the files'
    names and bytes depend only on the range: any process may write any shard.

    Args:
        path: store directory; header: the store's ``hooks``, ``sites`` and ``shard_size``.
        start, stop: input range (``start`` a multiple of ``shard_size``).
        acts: ``{tensor_key(hook, site): Tensor[n, *shape]}`` for every (hook, site).
        labels: ``n`` rows, in the tensors' row order.
    """
    n = len(labels)
    expected = {tensor_key(h, s) for h in header["hooks"] for s in header["sites"]}
    if set(acts) != expected or any(t.shape[0] != n for t in acts.values()):
        raise StoreError(f"shard [{start}, {stop}) needs {n} rows of every (hook, site).")
    if start % header["shard_size"]:
        raise StoreError(f"shard start={start} is not a multiple of {header['shard_size']}.")
    name = f"shard-{start // header['shard_size']:05d}"
    spath = Path(path) / SHARD_DIR / f"{name}.safetensors"
    lpath = Path(path) / SHARD_DIR / f"{name}.parquet"
    tensors = {k: v.contiguous() for k, v in acts.items()}
    # One metadata key: safetensors writes a dict's keys in hash order, which would make
    # otherwise identical shards differ byte-wise between processes.
    meta = {"kdgap": json.dumps({"format": FORMAT, "start": start, "stop": stop})}
    _atomic_write(spath, lambda tmp: save_file(tensors, tmp, metadata=meta))
    _atomic_write(lpath, lambda tmp: write_labels(labels, tmp))
    return {
        "file": f"{SHARD_DIR}/{spath.name}",
        "labels": f"{SHARD_DIR}/{lpath.name}",
        "start": start,
        "stop": stop,
        "n": n,
        "bytes": spath.stat().st_size,
        "sha256": file_sha256(spath),
        "labels_sha256": file_sha256(lpath),
        "tensors": {k: tensor_sha256(v) for k, v in sorted(tensors.items())},
    }


def _check_compatible(manifest: dict, header: dict, path: Path) -> None:
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{path / MANIFEST} is not a kdgap activation store manifest.")
    old, new = manifest["model"], header["model"]
    if old["fingerprint"] != new["fingerprint"] or old.get("id") != new.get("id"):
        raise StoreError(
            f"store {path} was recorded from model {old.get('id')!r} (fingerprint "
            f"{old['fingerprint'][:12]}), not {new.get('id')!r} ({new['fingerprint'][:12]}); "
            "a store never mixes models: record into a new directory (stores recorded by "
            "kdgap before the fingerprint hashed integers only need re-recording too)."
        )
    for key in ("hooks", "sites", "dtype", "shard_size"):
        if manifest[key] != header[key]:
            raise StoreError(
                f"store {path} has {key}={manifest[key]!r}, the request {key}={header[key]!r}; "
                "record into a new directory to change it."
            )


class ActivationStore:
    """Read access to a store written by :func:`kdgap.hooks.record_store`.

    ``store.load(hook="blocks.1.hook_resid_post", site="action")`` returns the
    ``[n_examples, d_model]`` activations and the labels table (same row order).

    Raises:
        StoreError: no manifest, or a shard file missing or of the wrong size (truncated).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise StoreError(f"{mpath} does not exist: path={str(path)!r} is not a store.")
        self.manifest: dict = _read_manifest(mpath)
        self._labels: pd.DataFrame | None = None
        for s in self.manifest["shards"]:
            f = self.path / s["file"]
            size = f.stat().st_size if f.exists() else None
            if size != s["bytes"]:
                raise StoreError(
                    f"shard {f} is missing or truncated ({size} bytes, manifest says "
                    f"{s['bytes']}); delete it and its manifest entry, then resume recording."
                )

    @property
    def hooks(self) -> list[str]:
        """Recorded hook names (full transformer-lens names)."""
        return list(self.manifest["hooks"])

    @property
    def sites(self) -> list[str]:
        """Recorded site keys."""
        return list(self.manifest["sites"])

    @property
    def n_examples(self) -> int:
        """Examples recorded so far (skipped ones excluded)."""
        return int(self.manifest["n_examples"])

    @property
    def complete(self) -> bool:
        """True once every input was recorded (False for a killed run awaiting resume)."""
        return bool(self.manifest["complete"])

    @property
    def labels(self) -> pd.DataFrame:
        """``[n_examples]`` rows of labels, in store order (one Parquet file per shard)."""
        if self._labels is None:
            frames = [self._read_labels(s) for s in self.manifest["shards"]]
            self._labels = (
                pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"example": []})
            )
        return self._labels

    def _read_labels(self, shard: dict) -> pd.DataFrame:
        p = self.path / shard["labels"]
        # Label tables are small: their checksum is checked on every read, so a readable
        # but altered table never loads silently.
        want = shard.get("labels_sha256")
        if want is not None and (not p.exists() or file_sha256(p) != want):
            raise StoreError(
                f"labels file {p} is missing or fails its sha256 checksum (it was altered or "
                "is corrupt); record the store again."
            )
        try:
            return pd.read_parquet(p)
        except Exception as e:  # pyarrow raises several types for damaged files
            raise StoreError(f"labels file {p} cannot be read ({e}); it is corrupt.") from e

    def load(
        self, hook: str, site: str, *, verify: bool = True
    ) -> tuple[Float[torch.Tensor, " n_examples *act_shape"], pd.DataFrame]:
        """Activations of one (hook, site) over every example, plus the labels.

        Args:
            hook: full hook name as recorded (see :attr:`hooks`), e.g.
                ``"blocks.1.hook_resid_post"``.
            site: site key (see :attr:`sites`), e.g. ``"action"``.
            verify: check each read tensor's sha256 against the manifest.

        Returns:
            ``(acts, labels)``: ``acts`` is ``[n_examples, d_model]`` (``[n_examples, n_heads,
            d_head]`` for ``z``) in the stored dtype; ``labels`` has ``n_examples`` rows.

        Raises:
            KeyError: unknown hook or site (the message lists the recorded ones).
            StoreError: a shard's tensor fails its checksum or cannot be read (names the file).
        """
        if hook not in self.manifest["hooks"]:
            raise KeyError(f"hook={hook!r} was not recorded; recorded hooks: {self.hooks}")
        if site not in self.manifest["sites"]:
            raise KeyError(f"site={site!r} was not recorded; recorded sites: {self.sites}")
        key = tensor_key(hook, site)
        # Shards where every example was skipped hold empty tensors of unknown shape.
        parts = [self._read_tensor(s, key, verify) for s in self.manifest["shards"] if s["n"]]
        if parts:
            acts = torch.cat(parts) if len(parts) > 1 else parts[0]
        else:
            acts = torch.empty(0)
        return acts, self.labels.copy()

    def _read_tensor(self, shard: dict, key: str, verify: bool) -> torch.Tensor:
        f = self.path / shard["file"]
        try:
            with safe_open(f, framework="pt") as g:
                t = g.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types on damaged headers
            raise StoreError(f"shard {f} cannot be read ({e}); it is corrupt.") from e
        if verify and tensor_sha256(t) != shard["tensors"][key]:
            raise StoreError(
                f"shard {f}: tensor {key!r} fails its sha256 checksum (the file is corrupt); "
                "delete the shard and its later shards from the manifest and resume recording."
            )
        return t

    def verify(self) -> None:
        """Check every shard and labels file against its sha256 (reads everything).

        Raises:
            StoreError: naming the first corrupt file.
        """
        for s in self.manifest["shards"]:
            for key, sha in (("file", "sha256"), ("labels", "labels_sha256")):
                f = self.path / s[key]
                if not f.exists() or file_sha256(f) != s[sha]:
                    raise StoreError(f"shard file {f} is missing or fails its sha256 checksum.")

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, n_examples={self.n_examples}, "
            f"hooks={len(self.hooks)}, sites={self.sites}, dtype={self.manifest['dtype']})"
        )
