"""Reading PEFT adapters: what is read, which layers a stage reads, and every refusal naming its cause.

One random adapter is written by peft for a tiny qwen3; the bad ones are copies of it
with a tensor dropped, reshaped or renamed, or a config field set.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import make_checkpoint, reference_model
from pprt import LLM, SamplingParams
from pprt.errors import CheckpointError
from pprt.weights import lora as lora_mod
from pprt.weights.checkpoint import ModelSource, load_config
from pprt.weights.lora import read_adapter

PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora_load")
    path = make_checkpoint(root / "base", "qwen3", tokenizer=False)
    torch.manual_seed(0)
    model = get_peft_model(reference_model(path), LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,
                                                             target_modules=["q_proj", "o_proj", "up_proj"]))
    model.save_pretrained(root / "good")
    return path, load_config(ModelSource(path)), root / "good"


def variant(good, tmp_path, *, config=None, edit=None):
    """A copy of the good adapter with config fields set and/or its tensors edited (edit(dict) in place)."""
    out = tmp_path / "bad"
    shutil.copytree(good, out)
    if config:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg.update(config)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if edit:
        tensors = load_file(out / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, out / "adapter_model.safetensors")
    return str(out)


def test_reads_targets_scales_and_only_own_layers(base, tmp_path, monkeypatch):
    path, config, good = base
    adapter = read_adapter("good", str(good), config)
    assert sorted({t.module.rsplit(".", 1)[1] for t in adapter.targets}) == ["o_proj", "q_proj", "up_proj"]
    assert len(adapter.targets) == 3 * config.num_layers
    assert all(t.rank == 4 and t.scale == 3.0 for t in adapter.targets)  # alpha / r
    rs = read_adapter("rs", variant(good, tmp_path, config={"use_rslora": True}), config)
    assert all(t.scale == 12 / math.sqrt(4) for t in rs.targets)

    read = []
    real_open = lora_mod.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(lora_mod, "safe_open", Spy)
    got = adapter.stage_tensors((1, 2), "cpu", torch.float32)
    assert sorted(got) == [f"model.layers.1.{m}" for m in ("mlp.up_proj", "self_attn.o_proj", "self_attn.q_proj")]
    assert read and all(k.startswith(f"{PREFIX}.1.") for k in read)  # no other layer's tensor was read
    file = load_file(good / "adapter_model.safetensors")
    a, b = got["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(a, file[f"{PREFIX}.1.self_attn.q_proj.lora_A.weight"])
    torch.testing.assert_close(b, 3.0 * file[f"{PREFIX}.1.self_attn.q_proj.lora_B.weight"])


def _drop(key):
    return lambda t: t.pop(key)


def _rename(old, new):
    return lambda t: t.__setitem__(new, t.pop(old))


Q0 = f"{PREFIX}.0.self_attn.q_proj"


@pytest.mark.parametrize("config,edit,words", [
    (None, _drop(f"{Q0}.lora_B.weight"), [f"{Q0}.lora_B.weight", "missing"]),
    (None, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4, 65)}), [f"{Q0}.lora_A.weight", "[4, 65]",
                                                                             "[4, 64]"]),
    (None, _rename(f"{Q0}.lora_A.weight", f"{PREFIX}.0.self_attn.c_attn.lora_A.weight"),
     ["c_attn.lora_A.weight", "not a linear layer"]),
    (None, lambda t: (t.pop(f"{Q0}.lora_A.weight"), t.pop(f"{Q0}.lora_B.weight")), [f"{Q0}.lora_A.weight", "missing"]),
    ({"target_modules": ["o_proj", "up_proj"]}, None, [f"{Q0}.lora_", "do not select"]),
    ({"layers_to_transform": [1, 2]}, None, [f"{PREFIX}.0.", "do not select"]),
    ({"r": 8}, None, ["has shape [4, 64]", "r=8"]),
    ({"modules_to_save": ["lm_head"]}, None, ["modules_to_save", "replace base weights"]),
    ({"use_dora": True}, None, ["use_dora", "DoRA"]),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, None, ["target_parameters", "experts"]),
    ({"bias": "all"}, None, ["bias='all'"]),
    ({"peft_type": "IA3"}, None, ["IA3", "only LORA"]),
    ({"target_modules": ["nothing_here"]}, lambda t: t.clear(), ["select no linear layer"]),
    (None, lambda t: t.update({f"{Q0}.lora_magnitude_vector": torch.zeros(4)}), ["lora_magnitude_vector", "DoRA"]),
])
def test_bad_adapters_are_refused_naming_the_cause(base, tmp_path, config, edit, words):
    path, model_config, good = base
    bad = variant(good, tmp_path, config=config, edit=edit)
    with pytest.raises(CheckpointError) as err:
        read_adapter("bad", bad, model_config)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_prefixes_regex_rank_pattern_and_vision_keys(base, tmp_path):
    path, config, good = base

    def multimodal(t):  # a Qwen3.5 release's names, with a vision-tower tensor pprt does not run
        for k in list(t):
            t[k.replace("model.model.layers", "model.model.language_model.layers")] = t.pop(k)
        t["base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight"] = torch.zeros(4, 32)

    regex = r".*language_model\.layers\.\d+\.(self_attn\.(q|o)_proj|mlp\.up_proj)"
    adapter = read_adapter("mm", variant(good, tmp_path, edit=multimodal,
                                         config={"target_modules": regex, "alpha_pattern": {"o_proj": 2}}), config)
    assert len(adapter.targets) == 3 * config.num_layers
    assert {t.scale for t in adapter.targets if t.module.endswith("o_proj")} == {0.5}
    assert {t.scale for t in adapter.targets if not t.module.endswith("o_proj")} == {3.0}
    assert all(t.module.startswith("model.layers.") for t in adapter.targets)


def test_pickled_adapter_and_not_an_adapter(base, tmp_path):
    path, config, good = base
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(good / "adapter_config.json", d)
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="adapter_model.bin is a pickle"):
        read_adapter("x", str(d), config)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        read_adapter("x", str(path), config)  # the base model's directory


def test_hub_id_fetches_only_the_adapter_files(base, tmp_path, monkeypatch):
    """A hub id resolves from the hub cache (offline): a snapshot holding only the two adapter files."""
    from huggingface_hub import constants

    path, config, good = base
    cache = tmp_path / "cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--org--adapter" / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(good / f, snap / f)
    (cache / "models--org--adapter" / "refs").mkdir()
    (cache / "models--org--adapter" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    adapter = read_adapter("hub", "org/adapter", config)
    assert len(adapter.targets) == 3 * config.num_layers and adapter.weights.startswith(str(cache))


def test_llm_refuses_before_starting_stages(base, tmp_path):
    path, _, good = base
    bad = variant(good, tmp_path, edit=_drop(f"{Q0}.lora_B.weight"))
    with pytest.raises(CheckpointError, match="lora_B.weight' is missing"):
        LLM(str(path), devices=["cpu"], lora={"bad": bad})
    with pytest.raises(ValueError, match="max_loras=1 is fewer than the 2"):
        LLM(str(path), devices=["cpu"], lora={"a": str(good), "b": str(good)}, max_loras=1)
    with pytest.raises(ValueError, match="lora must be the name"):
        SamplingParams(lora="")


def test_planner_counts_adapter_slots(base):
    """Each site holds max_loras x (its parts' largest ranks, summed) x (in + out of the whole site) elements,
    counted with its weights: q_proj's delta lives in the merged qkv_proj, up_proj's in gate_up_proj."""
    from pprt.plan import DeviceBudget, GiB, plan
    from pprt.weights.lora import slot_bytes

    path, config, good = base
    adapter = read_adapter("good", str(good), config)
    per_layer = slot_bytes([adapter], 3, config.num_layers, 2)
    H, I, q = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    # q (in qkv_proj), o, up (in gate_up_proj) at r=4
    assert per_layer == [3 * 4 * ((H + q + 2 * kv) + (q + H) + (H + 2 * I)) * 2] * config.num_layers
    budgets = [DeviceBudget("a", GiB), DeviceBudget("b", GiB)]
    without = plan(config, budgets, split=[2, 1], max_context=64)
    with_lora = plan(config, budgets, split=[2, 1], max_context=64, lora_layer_bytes=per_layer)
    assert [s.weight_bytes - w.weight_bytes for s, w in zip(with_lora.stages, without.stages)] == \
        [2 * per_layer[0], per_layer[0]]
    with pytest.raises(ValueError, match="lora_layer_bytes needs 3"):
        plan(config, budgets, lora_layer_bytes=[1])


def test_registry_and_scheduler_carry_slot_changes_in_step_order():
    """A load travels with the next plan (before that plan's tokens), a plan that never reached the
    stages gives its changes back, and every chunk names its sequence's slot."""
    from pprt.engine.blocks import BlockManager
    from pprt.engine.loras import LoraRegistry
    from pprt.engine.scheduler import Scheduler
    from pprt.weights.lora import LoraAdapter

    loras = LoraRegistry(2)
    sched = Scheduler(BlockManager(64, 4), max_context=64, loras=loras)
    assert loras.add(LoraAdapter("x", "x.safetensors", ())) == 0
    assert loras.add(LoraAdapter("y", "y.safetensors", ())) == 1
    with pytest.raises(ValueError, match="all 2 LoRA slots are in use"):
        loras.add(LoraAdapter("z", "z.safetensors", ()))
    with pytest.raises(ValueError, match="already loaded"):
        loras.add(LoraAdapter("x", "x.safetensors", ()))
    seqs = {s.seq_id: s for s in (sched.add([1, 2, 3], SamplingParams(lora="y")), sched.add([4], SamplingParams()))}
    with pytest.raises(ValueError, match="no LoRA adapter named 'w'"):
        sched.add([5], SamplingParams(lora="w"))
    plan = sched.schedule()
    assert [(c.slot, c.adapter.name) for c in plan.loras] == [(0, "x"), (1, "y")]
    assert [c.lora_slot for c in plan.chunks] == [1, -1]
    sched.abort(plan, seqs)
    loras.remove("x")  # after the failed plan's loads: sent after them
    again = sched.schedule()
    assert [(c.slot, c.adapter and c.adapter.name) for c in again.loras] == [(0, "x"), (1, "y"), (0, None)]
    assert sched.uses_lora("y") == 1 and sched.uses_lora("x") == 0


# ---- routed experts: PEFT's target_parameters on transformers 5's fused expert parameters ----------------

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
X1 = f"{PREFIX}.1.mlp.experts"


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora_load_moe")
    path = make_checkpoint(root / "base", "qwen3_moe", tokenizer=False)
    torch.manual_seed(0)
    model = get_peft_model(reference_model(path), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                             target_modules=["q_proj"],
                                                             target_parameters=EXPERT_PARAMS))
    model.save_pretrained(root / "good")
    return path, load_config(ModelSource(path)), root / "good"


def test_fused_expert_parameters_are_read_per_expert(moe):
    """PEFT's ParamWrapper layout: gate_up_proj (the module's first parameter) is the inner wrapper
    `experts.base_layer.lora_*`, down_proj the outer `experts.lora_*`; A [r*E, in] is expert-major,
    B [out, r*E] rank-major. stage_tensors gives A [E, r, in] and scale * B [E, out, r]."""
    path, config, good = moe
    E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
    adapter = read_adapter("good", str(good), config)
    experts = {t.module: t for t in adapter.targets if t.experts}
    assert sorted(experts) == [f"model.layers.1.mlp.experts.{p}" for p in ("down_proj", "gate_up_proj")]
    gu = experts["model.layers.1.mlp.experts.gate_up_proj"]
    assert (gu.experts, gu.rank, gu.in_features, gu.out_features, gu.scale) == (E, 4, H, 2 * I, 2.0)
    assert gu.a_key == f"{X1}.base_layer.lora_A.weight"
    got = adapter.stage_tensors((1, 2), "cpu", torch.float32)
    file = load_file(good / "adapter_model.safetensors")
    for proj, nest, (k, n) in (("gate_up_proj", ".base_layer", (H, 2 * I)), ("down_proj", "", (I, H))):
        a, b = got[f"model.layers.1.mlp.experts.{proj}"]
        fa, fb = file[f"{X1}{nest}.lora_A.weight"], file[f"{X1}{nest}.lora_B.weight"]
        assert a.shape == (E, 4, k) and b.shape == (E, n, 4)
        for e in (0, 5):
            torch.testing.assert_close(a[e], fa[e * 4:(e + 1) * 4])
            torch.testing.assert_close(b[e], 2.0 * fb[:, e::E])
    # the planner: max_loras x E x (rank) x (in + out) per expert site, plus q (in the merged qkv_proj)
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = lora_mod.slot_bytes([adapter], 2, config.num_layers, 4)
    attention = 2 * 4 * (H + q + 2 * kv) * 4
    assert per_layer[1] == attention + 2 * 4 * E * ((H + 2 * I) + (I + H)) * 4
    assert per_layer[0] == attention  # layer 1 is this tiny qwen3_moe's one sparse layer


@pytest.mark.parametrize("config,edit,words", [
    ({"target_parameters": ["mlp.experts.down_proj"]}, None,
     [f"{X1}.base_layer.lora_A.weight", "select 1 of its parameters", "down_proj"]),
    ({"target_parameters": ["mlp.experts.w1"]}, None, ["'mlp.experts.w1'", "selects no parameter"]),
    (None, lambda t: t.update({f"{X1}.lora_A.weight": torch.zeros(4 * 7, 32)}),
     [f"{X1}.lora_A.weight", "[28, 32]", "[32, 32]", "8 experts"]),
    (None, lambda t: (t.pop(f"{X1}.lora_A.weight"), t.pop(f"{X1}.lora_B.weight")),
     ["'model.layers.1.mlp.experts.down_proj'", "missing"]),
    (None, _drop(f"{X1}.base_layer.lora_B.weight"), [f"{X1}.base_layer.lora_B.weight", "missing"]),
])
def test_bad_expert_adapters_are_refused_naming_the_cause(moe, tmp_path, config, edit, words):
    path, model_config, good = moe
    with pytest.raises(CheckpointError) as err:
        read_adapter("bad", variant(good, tmp_path, config=config, edit=edit), model_config)
    for w in words:
        assert w in str(err.value), str(err.value)
