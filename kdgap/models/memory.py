"""Memory estimate before loading, plus dtype / device option parsing.

Loading a model that does not fit ends in the OOM killer or swap thrash, long after the
user could have been told. So :func:`estimate_memory` counts parameters from file headers
only (safetensors JSON headers, the GGUF tensor table; nothing is read into memory) and
:func:`check_memory` refuses with how much is needed and how much is free.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from kdgap.models.spec import ModelLoadError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# Safety factors. A GGUF load dequantises every tensor to float32 numpy on the host and then
# copies it into the model, so its peak holds both; HF safetensors folders are memory-mapped,
# so their peak is about the model plus a margin.
HF_OVERHEAD = 1.2
GGUF_DEQUANT_BYTES = 4  # the GGUF reader dequantises every tensor to float32 on the host first


class ModelTooLargeError(ModelLoadError, MemoryError):
    """The memory estimate exceeds what is available; the message says both numbers."""


@dataclass(frozen=True)
class MemoryEstimate:
    """What loading a model should cost.

    Attributes:
        n_params: parameter count from the file headers (None when unknown).
        weight_bytes: the loaded model's size in the requested dtype.
        host_bytes: peak extra host RAM the load needs.
        device_bytes: accelerator memory needed (0 on CPU).
        basis: how it was counted, for the error message.
    """

    n_params: int | None
    weight_bytes: int
    host_bytes: int
    device_bytes: int
    basis: str


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype name (float32, bfloat16, float16; fp32/bf16/fp16) or torch dtype -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPE_BYTES:
        raise ModelLoadError(
            f"dtype={dtype!r} is not supported; pass one of {sorted(DTYPE_BYTES)} "
            "(bfloat16/float16 are for GPUs; CPU runs should use float32)."
        )
    return getattr(torch, name)


def parse_device(device: str | torch.device) -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (a Hugging Face model spread over
    every visible GPU by accelerate's ``device_map="auto"``); checks that CUDA exists when
    asked for."""
    name = str(device).lower()
    if name == "cpu":
        return name
    if name in ("cuda", "auto") or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device={device!r} but torch sees no CUDA GPU (torch {torch.__version__}); "
                "pass device='cpu', or install a CUDA build of torch on a GPU machine."
            )
        return name
    raise ModelLoadError(
        f"device={device!r} is not supported; pass 'cpu', 'cuda', 'cuda:N' or 'auto' (every GPU)."
    )


def _safetensors_params(path: Path) -> int:
    """Parameter count from a safetensors file's JSON header (8-byte length + JSON)."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def weight_files(folder: Path) -> list[Path]:
    """A Hugging Face folder's weight files, safetensors preferred over pickled ``.bin``."""
    st = sorted(folder.glob("*.safetensors"))
    return st if st else sorted(folder.glob("pytorch_model*.bin"))


def count_params_hf_folder(folder: Path) -> tuple[int | None, int]:
    """``(n_params or None, total weight-file bytes)`` of a Hugging Face folder."""
    files = weight_files(folder)
    size = sum(f.stat().st_size for f in files)
    if files and all(f.suffix == ".safetensors" for f in files):
        return sum(_safetensors_params(f) for f in files), size
    # Pickled checkpoints have no cheap header; assume float32 (the common case, and an
    # over-estimate for half-precision files, which is the safe direction).
    return (size // 4 if size else None), size


def count_params_gguf(path: Path) -> int | None:
    """Total elements in a GGUF file's tensor table (None when the table cannot be read)."""
    try:
        # transformers' own GGUF reader (imported on use, like every transformers import of
        # kdgap.models): parses the header without the `gguf` package.
        from transformers.integrations.gguf import reader

        blob = reader._mapped(str(path))
        _, count, pos = reader._read_metadata(blob, str(path))
        entries, _ = reader._read_tensor_table(blob, count, pos)
        return sum(math.prod(shape) for _, shape, _, _ in entries)
    except Exception:  # noqa: BLE001 - an estimate; the loader will give the real error
        return None


def estimate_memory(kind: str, target: str, dtype: str, device: str) -> MemoryEstimate:
    """Estimate the memory needed to load ``target`` (a folder or ``.gguf`` path).

    Args:
        kind: ``"hf_folder"``, ``"gguf"`` or ``"organism"`` (a folder with model.safetensors).
        target: the folder or file path.
        dtype: the dtype name the model will be loaded in.
        device: ``"cpu"`` or a CUDA device; on CUDA the weights count against GPU memory.
    """
    nbytes = DTYPE_BYTES[dtype]
    on_gpu = device != "cpu"
    path = Path(target)
    if kind == "gguf":
        n = count_params_gguf(path)
        file_size = path.stat().st_size
        if n is None:  # fall back to a generous guess: 4-bit blocks expand ~8x to float32
            n = file_size * 2
        weights = n * nbytes
        host = n * GGUF_DEQUANT_BYTES + (0 if on_gpu else weights) + file_size
        basis = f"{n / 1e6:.1f}M params from the GGUF tensor table, dequantised on the host"
    else:
        n, size = count_params_hf_folder(path)
        n = n if n is not None else size // 4
        weights = n * nbytes
        host = int(weights * HF_OVERHEAD) if not on_gpu else int(0.1 * weights)
        basis = f"{n / 1e6:.1f}M params from the weight-file headers"
    device_bytes = int(weights * HF_OVERHEAD) if on_gpu else 0
    return MemoryEstimate(n, weights, host, device_bytes, basis)


def available_host_bytes() -> int:
    """Available host RAM in bytes (psutil, else /proc/meminfo MemAvailable)."""
    try:
        import psutil  # optional here: /proc/meminfo answers without it

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def available_device_bytes(device: str) -> int:
    """Free memory on a CUDA device in bytes (``"auto"``: on every visible GPU together)."""
    if device == "auto":
        return sum(int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count()))
    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_memory(
    estimate: MemoryEstimate, device: str, *, budget_bytes: int | None = None, label: str = ""
) -> None:
    """Raise :class:`ModelTooLargeError` when the estimate exceeds free memory.

    Args:
        estimate: from :func:`estimate_memory`.
        device: where the weights go.
        budget_bytes: compare against this instead of the measured free memory (host and
            device alike); for tests and for users who want a hard cap.
        label: the model name, for the message.
    """
    checks = [("host RAM", estimate.host_bytes, budget_bytes or available_host_bytes())]
    if device != "cpu":
        free = budget_bytes or available_device_bytes(device)
        checks.append((device, estimate.device_bytes, free))
    for where, need, free in checks:
        if need > free:
            raise ModelTooLargeError(
                f"model={label!r} needs about {_gb(need)} of {where} to load ({estimate.basis}) "
                f"but only {_gb(free)} is available. Free memory, pick a smaller dtype "
                "(bfloat16 on a GPU) or a smaller model, or pass check_memory=False "
                "(CLI: --no-memory-check) to load anyway."
            )
