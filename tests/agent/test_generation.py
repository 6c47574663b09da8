"""Batched generation and continuation scoring against independent references."""

import pytest
import torch
import torch.nn.functional as F

from kdgap.agent.generation import generate, score_continuations
from kdgap.models.tokens import encode

PROMPTS = ["Step=0 Action=green Reward=0.3", "red", "You are in a room with 5 buttons labeled red"]


@pytest.mark.parametrize("fast", [False, True], ids=["bridge_path", "hook_free_path"])
def test_bridge_generation_equals_hf_generate(tiny_hf_dir, tiny_hf_bridge, fast):
    """transformers 5.24 breaks the bridge path (KV cache ignored by the bridge's attention);
    pinned < 5.24. The hook-free path (kdgap.agent.hf_decoding on the twin) must agree too."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    out = generate(tiny_hf_bridge, PROMPTS, max_new_tokens=12, fast=fast)
    for j, ids in enumerate(encode(tiny_hf_bridge, PROMPTS)):
        x = torch.tensor([ids])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                          eos_token_id=hf.config.eos_token_id, pad_token_id=0)  # fmt: skip
        new = ref[0, len(ids) :].tolist()
        eos = hf.config.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        assert out.token_ids[j] == new


@pytest.mark.parametrize("fixture", ["tiny_native", "tiny_hf_bridge"])
def test_sampling_is_seeded_and_leaves_global_rng_alone(fixture, request):
    model = request.getfixturevalue(fixture)
    state = torch.random.get_rng_state()
    a = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    b = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    c = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=4)
    greedy = generate(model, PROMPTS, max_new_tokens=10)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids and a.token_ids != greedy.token_ids
    assert torch.equal(torch.random.get_rng_state(), state)


def test_stop_strings_cut_the_completion(tiny_native):
    free = generate(tiny_native, PROMPTS, max_new_tokens=16)
    piece = free.texts[0][3:6]  # a string the greedy completion is known to contain
    assert len(piece) == 3
    out = generate(tiny_native, PROMPTS, max_new_tokens=16, stop_strings=[piece])
    assert out.texts[0].endswith(piece) and free.texts[0].startswith(out.texts[0])
    assert out.n_tokens[0] < free.n_tokens[0]


@pytest.mark.parametrize("fixture", ["tiny_native", "tiny_hf_bridge"])
def test_generation_stops_at_the_end_of_the_context(fixture, request):
    model = request.getfixturevalue(fixture)
    n_ctx = int(model.cfg.n_ctx)
    ids = encode(model, PROMPTS[:1])[0]
    room = 5  # a prompt 5 tokens short of the context, sampled without a stop
    prompt = model.tokenizer.decode((ids * n_ctx)[: n_ctx - room], skip_special_tokens=True)
    ids = encode(model, [prompt])[0]
    out = generate(model, [prompt], max_new_tokens=64, temperature=1.0)
    assert len(ids) + len(out.token_ids[0]) <= n_ctx and out.n_tokens[0] <= n_ctx - len(ids)
    with pytest.raises(ValueError, match=f"fills the model's context n_ctx={n_ctx}"):
        generate(model, [prompt + prompt], max_new_tokens=4)


def test_generate_validates_arguments(tiny_native):
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(tiny_native, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        generate(tiny_native, PROMPTS, temperature=-1)


@torch.no_grad()
def _reference_logprob(model, ids, cont):
    logits = model(torch.tensor([ids + cont]), return_type="logits")[0]
    logp = F.log_softmax(logits.float(), dim=-1)
    return sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(cont))


@pytest.mark.parametrize("fixture", ["tiny_native", "tiny_hf_bridge"])
def test_score_continuations_matches_unpadded_forward(fixture, request, tiny_tokenizer):
    model = request.getfixturevalue(fixture)
    prefixes = ["Step=0 Action=green Reward=0.3 ACTION=", "ACTION="]
    conts = ["red", " yellow", "Orange", " red"]  # several of these are multi-token
    lens = [len(tiny_tokenizer(c, add_special_tokens=False)["input_ids"]) for c in conts]
    assert max(lens) >= 3
    scores = score_continuations(model, prefixes, conts, batch_size=3)
    assert scores.shape == (2, 4)
    for i, ids in enumerate(encode(model, prefixes)):
        for j, c in enumerate(conts):
            cid = tiny_tokenizer(c, add_special_tokens=False)["input_ids"]
            assert scores[i, j].item() == pytest.approx(
                _reference_logprob(model, ids, cid), abs=1e-4
            )


def test_score_continuations_errors(tiny_native):
    with pytest.raises(ValueError, match="at least one"):
        score_continuations(tiny_native, [], ["red"])
    with pytest.raises(ValueError, match="tokenises to nothing"):
        score_continuations(tiny_native, ["ACTION="], [""])
