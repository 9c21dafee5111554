"""LoRA adapters through python -m pprt.serve, driven by the official `openai` client.

One server serves a tiny random Qwen3 ("tiny", one CPU stage) with two adapters made by
peft (`--lora a=PATH --lora b=PATH`). /v1/models lists each adapter as a model whose
parent is "tiny"; a request naming an adapter (completions and chat, whole and streamed)
gets what LLM.generate gives with SamplingParams(lora=that adapter), and requests of
both adapters and the base model streamed at once each get their solo result.
"""

from __future__ import annotations

import asyncio

import pytest

openai = pytest.importorskip("openai", reason="the test extra (openai) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
pytest.importorskip("peft", reason="the test extra (peft) is not installed")

from lora_helpers import make_adapter  # noqa: E402
from models import make_checkpoint  # noqa: E402
from serve_helpers import running_server  # noqa: E402

from pprt import LLM, SamplingParams  # noqa: E402
from pprt.entrypoints.serve.output_parser import parse  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
CONTEXT = 96
PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef walk(path):", "class Stack:"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_lora")
    tiny = make_checkpoint(root / "tiny", "qwen3", seed=11, eos_token_id=2)
    make_adapter(tiny, root / "a", 1, r=8, lora_alpha=16,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    make_adapter(tiny, root / "b", 2, r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"])
    return tiny, {"a": str(root / "a"), "b": str(root / "b")}


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    tiny, adapters = files
    log = tmp_path_factory.mktemp("serve-lora-log") / "server.log"
    with running_server("--model", str(tiny), "--served-model-name", "tiny", "--devices", "cpu",
                        "--max-context", str(CONTEXT), "--lora", f"a={adapters['a']}", "--lora",
                        f"b={adapters['b']}", log=log) as (url, proc):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def library(files):
    tiny, adapters = files
    with LLM(str(tiny), devices=["cpu"], max_context=CONTEXT, lora=adapters) as llm:
        yield llm


def greedy(max_tokens: int, lora: str | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, lora=lora)


def test_models_lists_each_adapter_with_its_parent(client):
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert set(models) == {"tiny", "a", "b"}
    assert models["tiny"]["parent"] is None
    assert models["a"]["parent"] == models["b"]["parent"] == "tiny"
    assert models["a"]["max_model_len"] == CONTEXT


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_of_an_adapter_equals_the_library(client, library, stream):
    texts = {}
    for model in ("a", "b", "tiny"):
        lora = None if model == "tiny" else model
        for prompt in PROMPTS[:2]:
            expected = library.generate(prompt, greedy(8, lora))[0]
            if stream:
                chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                                        stream=True))
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                assert {c.model for c in chunks} == {model}
            else:
                r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
                text = r.choices[0].text
                assert r.model == model
            assert text == expected.text
            texts[model, prompt] = text
    # the adapters change the answers (else the comparison above proves nothing)
    assert any(texts["a", p] != texts["tiny", p] for p in PROMPTS[:2])
    assert any(texts["b", p] != texts["tiny", p] for p in PROMPTS[:2])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_with_an_adapter_equals_the_library(client, library, stream):
    messages = [{"role": "user", "content": "Name a fox."}]
    prompt = library.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    expected = library.generate(prompt, greedy(10, "a"))[0]
    assert expected.token_ids != library.generate(prompt, greedy(10, None))[0].token_ids
    reply = parse(expected.text, reasoning=True)
    kw = dict(model="a", messages=messages, max_completion_tokens=10, temperature=0,
              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                            for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        r = client.chat.completions.create(**kw)
        content, usage = r.choices[0].message.content, r.usage
        reasoning = (r.choices[0].message.model_extra or {}).get("reasoning_content") or ""
    assert content == (reply.content or "")
    assert reasoning == (reply.reasoning or "")
    assert usage.completion_tokens == len(expected.token_ids)


def test_streams_of_both_adapters_and_the_base_at_once_get_their_solo_results(server, library):
    jobs = [(model, prompt) for prompt in PROMPTS for model in ("a", "tiny", "b")]
    solo = [library.generate(p, greedy(6, None if m == "tiny" else m))[0].text for m, p in jobs]
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)

    async def one(model: str, prompt: str) -> str:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them():
        return await asyncio.gather(*(one(m, p) for m, p in jobs))

    assert asyncio.run(asyncio.wait_for(all_of_them(), timeout=120)) == solo


def test_an_unknown_model_is_a_404_naming_it_and_the_adapters(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="c", prompt="x", max_tokens=1)
    message = str(e.value)
    assert "'c' does not exist" in message and "'a' (an adapter of 'tiny')" in message


@pytest.mark.parametrize("args, text", [
    (["--model", "m", "--lora", "a"], "NAME=PATH"),
    (["--model", "m", "--lora", "=p"], "NAME=PATH"),
    (["--model", "m", "--lora", "a=p", "--lora", "a=q"], "'a' is given twice"),
    (["--model", "m", "--lora", "m=p"], "name of a served model"),
    (["--model", "m", "--lora", "a=p", "--model", "n", "--lora", "a=q"], "two models have a LoRA adapter named 'a'"),
])
def test_bad_lora_arguments_exit_2_naming_the_flag(args, text, capsys):
    from pprt.entrypoints.serve.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(args)
    assert e.value.code == 2 and text in capsys.readouterr().err


def test_lora_arguments_reach_the_llm():
    from pprt.entrypoints.serve.cli import parse_args

    _, specs = parse_args(["--model", "m", "--lora", "a=/x/a", "--lora", "b=hub/b", "--model", "n"])
    assert specs[0].options == {"lora": {"a": "/x/a", "b": "hub/b"}} and specs[1].options == {}
