"""The bundled demo model: a standard Hugging Face layout that pprt loads as any checkpoint."""

import json

from pprt import LLM, SamplingParams
from pprt.entrypoints.demo_model import demo_model_path

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_demo_is_a_small_qwen3_in_the_old_spelling():
    path = demo_model_path()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and "rope_parameters" not in cfg and "rope_theta" in cfg
    assert sum(f.stat().st_size for f in path.iterdir()) <= 25 * 2**20
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert "chat_template" not in tok_cfg and not (path / "chat_template.jinja").exists()


def test_greedy_is_deterministic_and_identical_on_one_and_two_stages():
    prompts = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):"]
    with LLM(str(demo_model_path()), devices=["cpu"]) as llm:
        one = [c.token_ids for c in llm.generate(prompts, GREEDY)]
        again = [c.token_ids for c in llm.generate(prompts, GREEDY)]
        text = llm.generate(prompts[0], GREEDY)[0].text
    with LLM(str(demo_model_path()), devices=["cpu", "cpu"]) as llm:
        two = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    assert one == again == two
    assert all(len(t) == 24 for t in one)
    assert text.strip() and "\ufffd" not in text
