import torch


def test_tiny_models_agree_on_shapes_and_tokenizer_roundtrips(
    tiny_native, tiny_hf_bridge, tiny_tokenizer
):
    text = "Step=3 Action=red Reward=0.25 ACTION=blue"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    toks = torch.tensor([ids])
    assert tiny_native(toks).shape == (1, len(ids), len(tiny_tokenizer))
    assert tiny_hf_bridge(toks).shape[-1] >= len(tiny_tokenizer)
    assert not tiny_native.training and not tiny_hf_bridge.training
