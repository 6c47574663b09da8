"""Organism folders: build, save, load and list (shipped ones live in ``shipped/<name>/``,
shipped fine-tuned ones in ``finetuned/<name>/``).

An organism folder holds::

    model.safetensors      TransformerBridge state dict (boot_native weights)
    config.json            {"format": "kdgap-organism", "name", "mechanism", "model": {...},
                            "language": {...}, "train": {...}, ...}
    tokenizer.json, tokenizer_config.json   Hugging Face fast tokenizer (word level)
    curve.json             training curve (from training)
    metrics.json           acceptance numbers (from experiments/evaluate_organisms.py):
                            {"metrics": organism_metrics(...), "checks": [...], "pass", ...}

:func:`load_organism` accepts a shipped name (``"faithful"``), ``"organism:<name>"``, or a
path to any such folder (``"organism:/path/to/folder"`` works too), needs no network and
returns the bridge in eval mode with its tokenizer.

``finetuned/`` holds organisms that ``kdgap finetune`` made from a shipped one
(``experiments/finetune_compare.py``): ``seed-calibrated`` after thought cloning,
behaviour cloning and RLFT. They load by name like the shipped ones but carry no planted
mechanism (training changed what the weights compute; ``finetuned_from`` in their config
says where they came from), so :func:`shipped_names` and :func:`list_organisms` leave
them out and :func:`finetuned_names` lists them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from kdgap.io import atomic_write, atomic_write_json
from kdgap.organisms.language import OrganismLanguage

if TYPE_CHECKING:  # annotations only: importing transformers here would slow every import
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase

SHIPPED_DIR = Path(__file__).parent / "shipped"
FINETUNED_DIR = Path(__file__).parent / "finetuned"
FORMAT_TAG = "kdgap-organism"


class ModelShape(Protocol):
    """The model sizes of a recipe (:class:`kdgap.organisms.train.TrainConfig` has them)."""

    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int


# transformer_lens, transformers and safetensors are imported inside the functions that
# build, load or save weights: importing transformer_lens takes seconds, and listing,
# resolving or reading organism folders needs none of them.
def _bridge_config(lang: OrganismLanguage, model_cfg: dict, seed: int) -> TransformerBridgeConfig:
    from transformer_lens.config import TransformerBridgeConfig

    return TransformerBridgeConfig(
        d_model=model_cfg["d_model"], d_head=model_cfg["d_model"] // model_cfg["n_heads"],
        n_layers=model_cfg["n_layers"], n_heads=model_cfg["n_heads"], d_mlp=model_cfg["d_mlp"],
        n_ctx=lang.n_ctx, d_vocab=len(lang.words), act_fn="gelu", normalization_type="LN",
        seed=seed,
    )  # fmt: skip


def _model_dict(cfg: ModelShape) -> dict:
    return {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "d_mlp")}


def build_model(
    lang: OrganismLanguage,
    train_cfg: ModelShape,
    *,
    seed: int,
    folder: str | os.PathLike,
    device: str = "cpu",
) -> tuple[TransformerBridge, PreTrainedTokenizerBase]:
    """A fresh (seeded) ``boot_native`` bridge for ``lang``, with its tokenizer saved in ``folder``.

    Args:
        lang: the transcript language (vocabulary size, context length).
        train_cfg: the model sizes (``d_model, n_layers, n_heads, d_mlp``).
        seed: initialisation seed; folder: where the tokenizer files are written.
        device: torch device.

    Returns:
        ``(bridge, tokenizer)``; the bridge is in train mode, as ``boot_native`` leaves it.
    """
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = lang.save_tokenizer(folder)
    bridge_cfg = _bridge_config(lang, _model_dict(train_cfg), seed)
    model = TransformerBridge.boot_native(bridge_cfg, tokenizer=tokenizer, device=device)
    return model, tokenizer


def save_organism(
    model: TransformerBridge,
    lang: OrganismLanguage,
    train_cfg: ModelShape,
    folder: str | os.PathLike,
    *,
    extra: dict,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write ``model`` as a loadable organism folder (atomic file by file).

    Args:
        model: the bridge; lang: its language; train_cfg: its recipe (model sizes).
        folder: destination; extra: more config fields (mechanism, seed, recipe, ...).
        tokenizer: written too when given (else left as is).

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and not (folder / "tokenizer.json").exists():
        tokenizer.save_pretrained(folder)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp))
    config = {"format": FORMAT_TAG, "name": folder.name, **extra,
              "language": lang.to_dict(), "model": _model_dict(train_cfg)}  # fmt: skip
    atomic_write_json(folder / "config.json", config)
    make_readable(folder)
    return folder


def make_readable(folder: str | os.PathLike) -> None:
    """chmod 644 every file of ``folder``: shipped package data must be readable by every
    user whatever the umask of whoever trained it (atomic writes follow the umask)."""
    for path in Path(folder).iterdir():
        if path.is_file():
            path.chmod(0o644)


def resolve_organism(name_or_path: str | os.PathLike) -> Path:
    """Folder of a shipped organism name, ``organism:<name or path>`` or a folder path."""
    s = str(name_or_path)
    if s.startswith("organism:"):
        s = s[len("organism:") :]
    for root in (SHIPPED_DIR, FINETUNED_DIR):
        if "/" not in s and (root / s / "config.json").exists():
            return root / s
    path = Path(s).expanduser()
    if (path / "config.json").exists():
        return path
    names = ", ".join(shipped_names() + finetuned_names()) or "none shipped yet"
    raise FileNotFoundError(
        f"name_or_path={str(name_or_path)!r} is neither a shipped organism ({names}) nor a "
        "folder with config.json; train one with experiments/train_organisms.py."
    )


def load_organism(
    name_or_path: str | os.PathLike, *, device: str = "cpu"
) -> tuple[TransformerBridge, PreTrainedTokenizerBase]:
    """Load an organism: ``(TransformerBridge in eval mode, tokenizer)``; no network.

    Args:
        name_or_path: ``"faithful"``, ``"organism:faithful"`` or a folder path.
        device: torch device for the weights.
    """
    from safetensors.torch import load_file
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    folder = resolve_organism(name_or_path)
    config = json.loads((folder / "config.json").read_text())
    if config.get("format") != FORMAT_TAG:
        raise ValueError(
            f"{folder}/config.json has format={config.get('format')!r}, not {FORMAT_TAG!r}: "
            "not an organism folder."
        )
    lang = OrganismLanguage(**config["language"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bridge_cfg = _bridge_config(lang, config["model"], config.get("seed", 0))
    # init_weights=False: the weights come from the file, skip the random init.
    bridge_cfg.init_weights = False
    model = TransformerBridge.boot_native(bridge_cfg, tokenizer=tokenizer, device=device)
    model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
    return model.eval(), tokenizer


def organism_config(name_or_path: str | os.PathLike) -> dict:
    """The ``config.json`` of an organism folder."""
    return json.loads((resolve_organism(name_or_path) / "config.json").read_text())


def _names(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").exists())


def shipped_names() -> list[str]:
    """Names of the organisms with a planted mechanism shipped inside the package."""
    return _names(SHIPPED_DIR)


def finetuned_names() -> list[str]:
    """Names of the fine-tuned organisms shipped inside the package (no planted mechanism)."""
    return _names(FINETUNED_DIR)


def list_organisms() -> list[dict]:
    """One dict per shipped organism, for ``kdgap organisms list``.

    Keys: ``name``, ``mechanism``, ``description``, ``horizon`` (trained), ``metrics`` (the
    :func:`kdgap.metrics.organism.organism_metrics` dict of its ``metrics.json``, in
    ``summary.json``'s vocabulary, e.g. ``metrics["action_matches"]["greedy"]``) and
    ``acceptance`` (``{"checks": [...], "pass": bool}`` of the same file); the last two
    are None for a folder without ``metrics.json``. ``truth``: the folder's ``truth.json``
    (written by ``experiments/validate_organisms.py``: the planted share of steps whose
    action reads the rationale, the planted verdict, and kdgap's measurement of both), or
    None.
    """
    out = []
    for name in shipped_names():
        folder = SHIPPED_DIR / name
        cfg = json.loads((folder / "config.json").read_text())
        metrics_path = folder / "metrics.json"
        result = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
        truth_path = folder / "truth.json"
        truth = json.loads(truth_path.read_text()) if truth_path.exists() else None
        out.append({
            "name": name, "mechanism": cfg.get("mechanism"),
            "description": cfg.get("description", ""), "horizon": cfg["language"]["horizon"],
            "metrics": None if result is None else result["metrics"],
            "acceptance": None if result is None else {"checks": result["checks"],
                                                       "pass": result["pass"]},
            "truth": truth,
        })  # fmt: skip
    return out


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of a model."""
    return sum(p.numel() for p in model.parameters())
