"""``load_model``: one function for every model source kdgap reads.

Every source ends as a ``TransformerBridge`` in eval mode plus its tokenizer, wrapped in a
:class:`LoadedModel` that also carries an identity dict for run manifests. Nothing here
touches the network unless the spec is a hub name and the hub is reachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdgap.models.gguf import infer_architectures, load_gguf
from kdgap.models.memory import (
    check_memory,
    estimate_memory,
    parse_device,
    parse_dtype,
    weight_files,
)
from kdgap.models.spec import LOCAL_FORMS, ModelLoadError, ModelSpec, parse_model_spec
from kdgap.organisms.registry import load_organism, resolve_organism

# transformers and transformer-lens are imported inside the functions that load a model,
# so `import kdgap.models` stays light for commands that never load one.
if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Hash weight files byte for byte up to this total; past it (multi-GB user checkpoints) hash
# the config and file headers instead, so a manifest costs seconds, not minutes.
FULL_HASH_LIMIT = 4 * 2**30


@dataclass
class LoadedModel:
    """A loaded model and what a manifest needs to name it.

    Attributes:
        bridge: ``TransformerBridge`` in eval mode (logits ``[batch, pos, d_vocab]``).
        tokenizer: the matching Hugging Face tokenizer.
        spec: the parsed :class:`ModelSpec`.
        source: ``spec.kind`` (organism, hf_folder, gguf, preset, hub).
        identity: JSON-serialisable dict: name, source, path, hash, hash_of, n_params,
            dtype, device, architecture, n_layers, d_model, load_seconds.
    """

    bridge: TransformerBridge
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    source: str
    identity: dict[str, Any] = field(default_factory=dict)


def _sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(2**20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_identity(files: list[Path], folder: Path | None = None) -> tuple[str, str]:
    """``(sha256 hex, what was hashed)``: the files' bytes, or config + headers if huge."""
    files = [Path(f) for f in files]
    if sum(f.stat().st_size for f in files) <= FULL_HASH_LIMIT:
        return _sha256_files(files), "weights"
    h = hashlib.sha256()
    if folder is not None and (folder / "config.json").is_file():
        h.update((folder / "config.json").read_bytes())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(2**20))  # safetensors / GGUF headers (tensor names and shapes)
    return h.hexdigest(), "config+headers"


def _offline() -> bool:
    """Whether the user has switched the Hugging Face hub off."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


def _load_hf(
    name_or_folder: str,
    torch_dtype: torch.dtype,
    device: str,
    trust_remote_code: bool,
    local: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(hf_model in eval mode, tokenizer)`` from a folder (or hub id / cache when local=False)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local}
    folder = Path(name_or_folder)
    model_kwargs: dict[str, Any] = dict(kwargs, dtype=torch_dtype, attn_implementation="eager")
    if folder.is_dir():
        files = weight_files(folder)
        if not files:
            raise ModelLoadError(
                f"model={name_or_folder!r}: the folder has config.json but no weight files "
                "(*.safetensors or pytorch_model*.bin); save them with "
                "model.save_pretrained(folder)."
            )
        # safetensors cannot run code on load; for pickled .bin, transformers' loader calls
        # torch.load(weights_only=True) by default and we never turn that off.
        model_kwargs["use_safetensors"] = files[0].suffix == ".safetensors"
    if device != "cpu":
        # Straight to the GPU(s), no full host copy; "auto" spreads the layers over them.
        model_kwargs["device_map"] = device
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model={name_or_folder!r}: no usable tokenizer ({exc}). Save one into the folder "
            "with tokenizer.save_pretrained(folder)."
        ) from exc
    model = AutoModelForCausalLM.from_pretrained(name_or_folder, **model_kwargs)
    model.config.architectures = infer_architectures(model.config, model)
    return model.eval(), tokenizer


def _load_hub(
    spec: ModelSpec, torch_dtype: torch.dtype, device: str, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Hub id: the local cache first; the network only when the hub is not switched off."""
    try:
        return _load_hf(spec.target, torch_dtype, device, trust_remote_code, local=True)
    except Exception:  # noqa: BLE001 - OSError, HF validation errors, missing tokenizer
        pass  # not cached: fall through to the network, or to the offline error
    if _offline():
        raise ModelLoadError(
            f"model={spec.raw!r} is not a local path and is not in the Hugging Face cache, and "
            f"the hub is switched off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set): {LOCAL_FORMS}."
        )
    try:
        return _load_hf(spec.target, torch_dtype, device, trust_remote_code, local=False)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - connection errors come as OSError or httpx types
        raise ModelLoadError(
            f"model={spec.raw!r} could not be fetched from the Hugging Face hub ({exc}). "
            f"Without network, {LOCAL_FORMS}."
        ) from exc


def _load_organism(
    spec: ModelSpec, device: str
) -> tuple[TransformerBridge, PreTrainedTokenizerBase]:
    try:
        return load_organism(spec.target, device=device)
    except (FileNotFoundError, KeyError) as exc:
        raise ModelLoadError(
            f"model={spec.raw!r}: no such organism ({exc}). List them with "
            "`kdgap organisms list`, or pass organism:PATH to a trained organism folder."
        ) from exc


def _organism_files(spec: ModelSpec) -> tuple[Path | None, list[Path]]:
    """The organism's folder and weight file, when the registry can name them."""
    try:
        folder = Path(resolve_organism(spec.target))
    except Exception:  # noqa: BLE001 - identity only; the load itself already succeeded
        return None, []
    weights = folder / "model.safetensors"
    return folder, [weights] if weights.is_file() else []


def load_model(
    spec: str | os.PathLike | ModelSpec,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    check_memory_first: bool = True,
    memory_budget_bytes: int | None = None,
) -> LoadedModel:
    """Load any model kdgap reads as a ``TransformerBridge`` (eval mode) and its tokenizer.

    Args:
        spec: ``organism:NAME`` / ``organism:PATH``, a local Hugging Face folder, a ``.gguf``
            file, a preset (``smollm2``) or a hub id (see :func:`parse_model_spec`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``"auto"``: a Hugging Face model
            spread over every visible GPU (accelerate's ``device_map="auto"``, for models
            larger than one GPU); organisms and GGUF files then load on ``"cuda"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        trust_remote_code: allow a folder's own modelling code to run (off by default).
        check_memory_first: estimate memory from file headers and refuse if it will not fit.
        memory_budget_bytes: compare the estimate against this many bytes instead of the
            measured free memory.

    Returns:
        :class:`LoadedModel`. ``bridge(tokens)`` maps ``[batch, pos]`` token ids to logits
        ``[batch, pos, d_vocab]`` equal to the underlying Hugging Face model's.

    Raises:
        ModelLoadError: a bad spec, dtype or device, an unreadable GGUF architecture, a missing
            preset package, an offline hub name; ``ModelTooLargeError`` when it will not fit.
    """
    torch_dtype = parse_dtype(dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    device = parse_device(device)
    spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    t0 = time.perf_counter()

    n_params_file = None
    if spec.kind in ("hf_folder", "gguf", "preset") and check_memory_first:
        kind = "hf_folder" if spec.kind == "hf_folder" else "gguf"
        est = estimate_memory(kind, spec.target, dtype_name, device)
        check_memory(est, device, budget_bytes=memory_budget_bytes, label=spec.raw)
        n_params_file = est.n_params

    path: Path | None = None
    files: list[Path] = []
    arch = None
    one_device = "cuda" if device == "auto" else device  # where single-device loaders go
    if spec.kind == "organism":
        bridge, tokenizer = _load_organism(spec, one_device)
        bridge = bridge.eval()
        path, files = _organism_files(spec)
    else:
        if spec.kind == "hf_folder":
            path = Path(spec.target)
            files = weight_files(path)
            hf_model, tokenizer = _load_hf(
                spec.target, torch_dtype, device, trust_remote_code, local=True
            )
        elif spec.kind in ("gguf", "preset"):
            path = Path(spec.target)
            files = [path]
            hf_model, tokenizer, arch = load_gguf(path, torch_dtype, one_device)
        else:
            hf_model, tokenizer = _load_hub(spec, torch_dtype, device, trust_remote_code)
        # "auto": accelerate placed the layers; the bridge reads where from the model.
        bridge = _wrap(spec, hf_model, tokenizer, None if device == "auto" else device,
                       torch_dtype)  # fmt: skip

    identity = {
        "name": spec.label,
        "spec": spec.raw,
        "source": spec.kind,
        "path": str(path.resolve()) if path is not None else None,
        "n_params": int(sum(p.numel() for p in bridge.parameters())),
        "n_params_file": n_params_file,
        "dtype": dtype_name,
        "device": device,
        "n_layers": int(bridge.cfg.n_layers),
        "d_model": int(bridge.cfg.d_model),
    }
    if spec.kind != "organism":
        identity["architecture"] = hf_model.config.architectures[0]
        identity["gguf_architecture"] = arch
    if files:
        folder = path if path is not None and path.is_dir() else None
        identity["hash"], identity["hash_of"] = file_identity(files, folder)
    else:  # organisms / hub: hash the config (the weights live elsewhere or are seeded)
        cfg = bridge.cfg.to_dict() if hasattr(bridge.cfg, "to_dict") else vars(bridge.cfg)
        blob = json.dumps(cfg, sort_keys=True, default=str).encode()
        identity["hash"], identity["hash_of"] = hashlib.sha256(blob).hexdigest(), "config"
    identity["load_seconds"] = round(time.perf_counter() - t0, 2)
    return LoadedModel(bridge, tokenizer, spec, spec.kind, identity)


def _wrap(
    spec: ModelSpec,
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    device: str | None,
    torch_dtype: torch.dtype,
) -> TransformerBridge:
    """Wrap a loaded HF model; tokenizer= always, or the bridge goes to the hub. ``device``
    None: the model is already placed by a device map (the bridge reads it from there)."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(
            spec.label, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=torch_dtype
        )
    except (ValueError, NotImplementedError, KeyError) as exc:
        arch = (hf_model.config.architectures or ["?"])[0]
        raise ModelLoadError(
            f"model={spec.raw!r}: TransformerBridge cannot wrap architecture {arch!r} ({exc}). "
            "Use a model of an architecture transformer-lens 4.3 supports (GPT-2, Llama, "
            "Qwen2, Gemma 2/3, Mistral, ...)."
        ) from exc
    return bridge.eval()
