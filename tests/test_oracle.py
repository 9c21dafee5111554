"""The transformers oracle of tests/models.py is right for any prompt, id 0 included."""

import torch

from models import make_checkpoint, reference_greedy, reference_model


@torch.inference_mode()
def test_reference_greedy_sees_prompt_tokens_with_id_0(tmp_path):
    """generate() without a mask would infer one from pad_token_id=0 and hide these tokens."""
    model = reference_model(make_checkpoint(tmp_path, "qwen2", tokenizer=False))
    prompt = [0, 17, 0, 0, 250, 3, 0]
    ids = list(prompt)
    for _ in range(6):  # greedy by hand: full forward passes, no mask, no cache
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    tokens, logprobs = reference_greedy(model, prompt, 6)
    assert tokens == ids[len(prompt):]
    assert reference_greedy(model, [t or 1 for t in prompt], 6)[0] != tokens  # the zeros matter to the model
    assert len(logprobs) == 6 and all(lp <= 0 for lp in logprobs)
