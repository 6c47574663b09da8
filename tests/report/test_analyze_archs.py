"""``analyze`` completes on every architecture of the test zoo and on a GGUF file.

One random chat model per architecture of ``ARCHS`` (GPT-2, Llama, Qwen2, Gemma-2, Gemma-3,
Qwen3, Mistral, Phi-3; 2 layers, width 32, each with its own features such as sliding
windows and soft-capping) is saved as a local Hugging Face folder, and the Llama is also
written as a GGUF file. One ``analyze`` call at the smallest sizes runs all nine, with a
scripted rationale so that every stage has a rationale to work on. For each model: the
summary entry has exactly the documented keys, every measurement marked unavailable says
why (and leaves its numbers null), the behaviour numbers are in range, the latent probes and
whatever probes and patching could run cover both layers, and the model has its own stage
folder and the figures its entry calls for.

A random model may always pick one arm (no probe of its action can be trained) or prefer
no arm of a pair by a positive logit difference (no pair to patch): those measurements are
then unavailable, with the reason, which is what is checked for them.
"""

from __future__ import annotations

import pytest
import torch

from kdgap.report.pipeline import AnalyzeConfig, analyze
from kdgap.report.stages import model_slug
from tests.conftest import ARCHS, _arch_config
from tests.report.test_summary_schema import DOC, documented_paths, written_paths

# The smallest sizes every stage accepts (probes need 5 recorded episodes: one held out,
# four cross-validation folds).
TINY = dict(episodes=1, horizon=10, record_episodes=5, n_pairs=4, freqbias_histories=1,
            decomposition_steps=2)  # fmt: skip
RATES = ("rationale_correct", "action_follows_rationale", "invalid_rate",
         "counterfactual_flip_rate", "action_coverage", "suffix_failure_rate")  # fmt: skip
ENTRY = "models.<model>."


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, paper_tokenizer) -> dict[str, str]:
    """``{arch: spec}``: a local folder per architecture of ``ARCHS``, and ``"gguf"``: the
    same Llama written as a GGUF file (absent without the gguf package)."""
    from transformers import AutoModelForCausalLM

    tok = paper_tokenizer
    specs = {}
    for i, arch in enumerate(ARCHS):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(_arch_config(arch, tok))
        path = tmp_path_factory.mktemp(f"zoo_{arch}")
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        specs[arch] = str(path)
        if arch == "llama":
            try:
                import gguf  # noqa: F401

                from tests.models.conftest import write_llama_gguf
            except ImportError:
                continue
            gguf_path = tmp_path_factory.mktemp("zoo_gguf") / "tiny-llama-f32.gguf"
            write_llama_gguf(gguf_path, model, tok)
            specs["gguf"] = str(gguf_path)
    return specs


@pytest.fixture(scope="module")
def analysed(zoo, tmp_path_factory):
    """``(out, summary)`` of one ``analyze`` call over the whole zoo."""
    out = tmp_path_factory.mktemp("zoo_analysis")
    summary = analyze(list(zoo.values()), out, AnalyzeConfig(**TINY, rationale="scripted"),
                      progress=False)  # fmt: skip
    return out, summary


@pytest.fixture(params=[*ARCHS, "gguf"])
def model(request, zoo) -> str:
    """The spec of each model of the zoo in turn."""
    if request.param not in zoo:
        pytest.skip("needs the gguf package: pip install gguf==0.19.0")
    return zoo[request.param]


def _unavailable(node: object, path: str = "") -> list[tuple[str, object]]:
    """``(path, value)`` of every key named ``*unavailable`` anywhere under ``node``; a map
    of reasons (``probes.latent.unavailable``) gives one pair per label."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else key
            if key.endswith("unavailable") and isinstance(value, dict):
                found += [(f"{here}.{k}", v) for k, v in value.items()]
            elif key.endswith("unavailable"):
                found.append((here, value))
            else:
                found += _unavailable(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _unavailable(value, f"{path}[{i}]")
    return found


def test_one_call_analyses_the_whole_zoo(analysed, zoo):
    _, summary = analysed
    assert list(summary["models"]) == list(zoo.values())
    assert summary["config"] == {**summary["config"], **TINY, "rationale": "scripted"}
    written, documented = written_paths(summary), documented_paths(DOC.read_text())
    assert written - documented == set(), "keys summary.json holds but the doc does not list"


def test_entry_has_the_documented_keys(analysed, model):
    _, summary = analysed
    entry = summary["models"][model]
    documented = documented_paths(DOC.read_text())
    keys = {p[len(ENTRY) :].split(".")[0] for p in documented if p.startswith(ENTRY)}
    assert set(entry) == keys
    # Every size was given, so the preset only names itself: a language model on the CPU.
    assert entry["config"] == {**summary["config"], "sizes": "quick"}
    stages = {"behavior", "baselines", "freqbias", "record", "probes", "patching", "decomposition"}
    assert set(entry["timings"]) == stages


def test_every_unavailable_measurement_says_why(analysed, model):
    entry = analysed[1]["models"][model]
    found = dict(_unavailable(entry))
    assert {"probes.unavailable", "patching.unavailable", "decomposition.unavailable",
            "battery.unavailable"} <= set(found)  # fmt: skip
    for path, reason in found.items():
        assert reason is None or (isinstance(reason, str) and reason.strip()), path
    # An unavailable section says which stage could not measure, and measured nothing.
    for section in ("probes", "patching"):
        why = entry[section]["unavailable"]
        if why is not None:
            assert why.startswith(f"{section}: ")
            rest = {k: v for k, v in entry[section].items() if k not in ("unavailable", "latent")}
            assert all(v is None for v in rest.values()), section
    assert entry["verdict"] in ("rationale-mediated", "bypass", "mixed", "undetermined")
    if entry["verdict"] == "undetermined":  # two decomposition steps: too few, and it says so
        assert entry["verdict_reason"].strip()


def test_behaviour_numbers_are_in_range(analysed, model):
    beh = analysed[1]["models"][model]["behavior"]
    assert beh["rationale_correct"] == 1.0  # kdgap wrote the UCB rationale on every step
    for key in RATES:
        assert 0.0 <= beh[key] <= 1.0, key
    assert all(0.0 <= v <= 1.0 for v in beh["action_matches"].values())
    assert beh["cumulative_regret"] >= 0.0
    assert len(beh["coverage_curve"]) == len(beh["regret_curve"]) == TINY["horizon"]
    assert beh["coverage_curve"][-1] == beh["action_coverage"]
    kd = beh["kd_matrix"]
    assert sum(v for row in kd.values() for v in row.values()) == pytest.approx(1.0)
    assert kd["incorrect"] == {"optimal": 0.0, "greedy": 0.0, "other": 0.0}


def test_probes_and_patching_cover_both_layers(analysed, model):
    entry = analysed[1]["models"][model]
    probes, patching = entry["probes"], entry["patching"]
    # What the history says is probed from the recorded residual stream, whatever the
    # model does: measured at both layers on every architecture.
    latent = probes["latent"]
    assert latent["layers"] == [0, 1]
    assert all(why is None for why in latent["unavailable"].values())
    assert all(len(acc) == 2 for acc in latent["accuracy"].values())
    if probes["unavailable"] is None:
        assert probes["layers"] == [0, 1]
        assert len(probes["knowing_acc"]) == len(probes["doing_acc"]) == 2
    if patching["unavailable"] is None:
        assert patching["layers"] == [0, 1] and patching["n_pairs"] >= 1
        assert len(patching["layer_profile"]) == 2
        heat = patching["heatmap"]
        assert heat is None or (heat["layers"] == [0, 1] and len(heat["values"]) == 2)
    dec = entry["decomposition"]
    assert dec["unavailable"] is None and dec["n_steps"] >= 1
    assert 0.0 <= dec["reading_share"] <= 1.0 and entry["battery"]["n_steps"] >= 1


def test_gguf_plays_as_the_folder_it_was_written_from(analysed, zoo):
    if "gguf" not in zoo:
        pytest.skip("needs the gguf package: pip install gguf==0.19.0")
    models = analysed[1]["models"]
    folder, gguf = models[zoo["llama"]]["behavior"], models[zoo["gguf"]]["behavior"]
    assert gguf["action_matches"] == folder["action_matches"]
    assert gguf["coverage_curve"] == folder["coverage_curve"]


def test_each_model_has_its_folder_and_figures(analysed, model):
    out, summary = analysed
    entry, slug = summary["models"][model], model_slug(model)
    stages = {p.stem for p in (out / "models" / slug).glob("*.json")}
    assert set(entry["timings"]) <= stages
    act = entry["decomposition"]["activation"] or {}
    want = {"kd_matrix"}  # the figures the entry calls for (kdgap.report.render)
    want |= {"probes"} if entry["probes"]["layers"] else set()
    want |= {"patching"} if entry["patching"]["heatmap"] else set()
    want |= {"mediation"} if entry["patching"]["layer_profile"] is not None else set()
    has_profile = any(act.get(k) is not None for k in ("read_layer_profile", "layer_profile"))
    want |= {"indirect"} if has_profile else set()
    for ext in ("png", "pdf"):
        assert {p.stem for p in (out / "figures" / slug).glob(f"*.{ext}")} == want
    assert model in (out / "report.html").read_text()
