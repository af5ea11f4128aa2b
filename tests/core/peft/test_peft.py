"""PEFT methods on tiny BERT / T5 / BART models: identity at start, trainable sets, save/load,
the iaa gradient pathway, generate(), EncoderDecoderModel and sentence-transformers support."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertModel

from core.peft import (
    PEFT_METHODS,
    apply_peft,
    count_parameters,
    find_layer_stacks,
    load_peft,
    peft_config,
    save_peft,
    trainable_state_dict,
)
from core.peft.iaa import ADAPTER_ATTR
from tests.core.peft.conftest import BUILDERS, WIDTH, build_bert, build_bert2bert

METHODS = sorted(PEFT_METHODS)
ARCHS = sorted(BUILDERS)
SMALL = {"iaa": {"r": 4}, "adapter": {"r": 4}, "lora": {"r": 4}, "prefix": {"num_virtual_tokens": 3}}

# Which parameters each method may train, by name in the adapted model.
TRAINABLE = {
    "iaa": lambda n: f".{ADAPTER_ATTR}." in n and n.rsplit(".", 2)[-2] in {"down", "chain", "up"},
    "adapter": lambda n: f".{ADAPTER_ATTR}." in n and n.rsplit(".", 2)[-2] in {"down", "up"},
    "lora": lambda n: ".lora_A." in n or ".lora_B." in n,
    "prefix": lambda n: n.startswith("prompt_encoder."),
    "bitfit": lambda n: n.endswith(".bias"),
    "full": lambda n: True,
}
UNSUPPORTED = {("bitfit", "t5")}  # T5 has no biases: see test_bitfit_on_t5_raises
COMBOS = pytest.mark.parametrize(
    "method,arch", [(m, a) for m in METHODS for a in ARCHS if (m, a) not in UNSUPPORTED])


def adapt(method: str, arch: str, seed: int = 0) -> nn.Module:
    return apply_peft(BUILDERS[arch](seed), method, **SMALL.get(method, {}))


def outputs(model: nn.Module, arch: str, batch: dict) -> torch.Tensor:
    if arch == "bert":
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=batch["labels"]).logits


def loss_of(model: nn.Module, arch: str, batch: dict) -> torch.Tensor:
    if arch == "bert":  # a fixed random readout: the sum of LayerNorm outputs alone is ~constant
        out = outputs(model, arch, batch)
        return (out * torch.linspace(-1, 1, out.shape[-1])).pow(2).mean()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def train_steps(model: nn.Module, arch: str, batch: dict, steps: int = 3) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, arch, batch).backward()
        opt.step()


# --- configs and registry ------------------------------------------------------------------

def test_unknown_method_names_allowed_values():
    with pytest.raises(ValueError, match="allowed: \\['adapter', 'bitfit', 'full', 'iaa', 'lora', 'prefix'\\]"):
        peft_config("ia3")


@pytest.mark.parametrize("method", ["iaa", "adapter", "lora", "prefix"])
@pytest.mark.parametrize("rank", [0, -3])
def test_non_positive_rank_rejected(method, rank):
    with pytest.raises(ValueError, match="positive integer"):
        peft_config(method, rank=rank)


@pytest.mark.parametrize("method", ["iaa", "adapter", "lora"])
def test_rank_above_hidden_size_names_limit(method):
    assert peft_config(method, rank=WIDTH).rank == WIDTH
    with pytest.raises(ValueError, match=f"exceeds the model's hidden size {WIDTH}; it must be between 1 and {WIDTH}"):
        apply_peft(build_bert(), method, rank=WIDTH + 1)


def test_config_fields_aliases_and_validation():
    assert peft_config("iaa").r == 32 and peft_config("iaa").activation == "gelu"
    assert peft_config("lora", rank=4).r == 4
    assert peft_config("prefix", rank=7).num_virtual_tokens == 7
    with pytest.raises(ValueError, match="unknown field"):
        peft_config("iaa", bottleneck=3)
    with pytest.raises(ValueError, match="unknown activation"):
        peft_config("iaa", activation="nope")
    with pytest.raises(ValueError, match="no rank"):
        peft_config("bitfit", rank=2)
    with pytest.raises(ValueError, match="takes a IAAConfig"):
        apply_peft(build_bert(), "iaa", peft_config("adapter"))
    for name, method in PEFT_METHODS.items():
        config_cls = method.config_cls
        assert all("help" in f.metadata for f in dataclasses.fields(config_cls)), name


def test_layer_discovery_covers_all_architectures():
    names = {arch: [s.name for s in find_layer_stacks(build())] for arch, build in BUILDERS.items()}
    assert names == {"bert": ["encoder.layer"], "t5": ["encoder.block", "decoder.block"],
                     "bart": ["model.encoder.layers", "model.decoder.layers"]}
    stacks = find_layer_stacks(build_bert2bert())
    assert [(s.name, s.width, len(s.layers)) for s in stacks] == [
        ("encoder.encoder.layer", WIDTH, 2), ("decoder.bert.encoder.layer", WIDTH, 2)]


# --- every method on every architecture ----------------------------------------------------

@COMBOS
def test_starts_at_base_model(method, arch, batch):
    model = adapt(method, arch)
    with torch.no_grad():  # both in no-grad mode: grad mode may pick other (equally valid) kernels
        base = outputs(BUILDERS[arch](), arch, batch)
        out = outputs(model, arch, batch)
    assert out.shape == base.shape
    if method == "prefix":
        # Prefix tuning adds attended key/value positions, so it changes outputs from step 0 by design;
        # here we only check it runs (training is checked in test_only_intended_parameters_train).
        assert torch.isfinite(out).all()
    else:
        assert torch.equal(out, base)


@COMBOS
def test_only_intended_parameters_train(method, arch, batch):
    model = adapt(method, arch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert names and all(TRAINABLE[method](n) for n in names)
    assert not any(TRAINABLE[method](n) for n in frozen)
    loss_of(model, arch, batch).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    if method == "iaa":  # U gets the first gradient (z != 0); C starts at I and U at 0
        for n, p in model.named_parameters():
            if n.endswith("up.weight") and ADAPTER_ATTR in n:
                assert grads[n].abs().sum() > 0
            if n.endswith("chain.weight"):
                assert torch.equal(p, torch.eye(4))


@COMBOS
def test_trainable_fraction_reported(method, arch):
    counts = count_parameters(adapt(method, arch))
    assert set(counts) == {"trainable_params", "total_params", "trainable_fraction"}
    assert counts["trainable_fraction"] == counts["trainable_params"] / counts["total_params"]
    if method == "full":
        assert counts["trainable_fraction"] == 1.0
    else:
        assert 0 < counts["trainable_fraction"] < 1


def test_bitfit_on_t5_raises():
    with pytest.raises(ValueError, match="no bias parameters"):
        apply_peft(BUILDERS["t5"](), "bitfit")


@COMBOS
def test_save_load_round_trip(method, arch, batch, tmp_path):
    model = adapt(method, arch)
    train_steps(model, arch, batch)
    with torch.no_grad():
        trained = outputs(model, arch, batch)
        base = outputs(BUILDERS[arch](), arch, batch)
    assert not torch.allclose(trained, base, atol=1e-6)  # training moved the model
    save_peft(model, tmp_path, method, peft_config(method, **SMALL.get(method, {})))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft_config.json", "peft_weights.safetensors"]
    meta = json.loads((tmp_path / "peft_config.json").read_text())
    assert meta["method"] == method
    assert set(load_file(tmp_path / "peft_weights.safetensors")) == set(trainable_state_dict(model))
    loaded = load_peft(BUILDERS[arch](0), tmp_path)
    with torch.no_grad():
        assert torch.allclose(outputs(loaded, arch, batch), trained, atol=1e-6)


def test_load_rejects_mismatched_base(tmp_path):
    model = apply_peft(build_bert(layers=2), "iaa", r=4)
    save_peft(model, tmp_path)  # name and config default to those apply_peft recorded
    with pytest.raises(ValueError, match="missing"):
        load_peft(build_bert(layers=3), tmp_path)


def test_minilm_sized_iaa_trains_under_one_percent():
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                     vocab_size=30522)
    counts = {m: count_parameters(apply_peft(BertModel(cfg), m)) for m in ("iaa", "adapter")}
    # D and U per layer, C per layer but the first (first_c=drop: with z_0 = 0 the first C never acts)
    assert counts["iaa"]["trainable_params"] == 6 * (2 * 384 * 32) + 5 * 32 * 32
    assert counts["adapter"]["trainable_params"] == 6 * (2 * 384 * 32)  # same without C
    assert counts["iaa"]["trainable_fraction"] < 0.01


# --- the iaa pathway -------------------------------------------------------------------------

def _first_adapter_grad(method: str, cut_chain_at: int | None = None) -> torch.Tensor:
    """Grad on D_1 from a loss on the LAST layer's U output only, with U_1..U_{L-1} = 0.

    With those U's zero, h_1..h_{L-1} do not depend on D_1 at all, so the frozen layers offer D_1
    no route to the loss: any gradient on D_1 must have travelled down the z chain through C.
    """
    model = apply_peft(build_bert(layers=3), method, r=4)
    adapters = [layer.peft_adapter for layer in model.encoder.layer]
    with torch.no_grad():
        torch.manual_seed(7)
        adapters[-1].up.weight.normal_()
        if cut_chain_at is not None:
            adapters[cut_chain_at].chain.weight.zero_()
    assert all(a.up.weight.abs().sum() == 0 for a in adapters[:-1])
    captured = {}
    adapters[-1].up.register_forward_hook(lambda mod, args, out: captured.setdefault("u_last", out))
    model(input_ids=torch.randint(3, 100, (2, 5)))
    captured["u_last"].pow(2).sum().backward()
    grad = adapters[0].down.weight.grad
    return torch.zeros_like(adapters[0].down.weight) if grad is None else grad


def test_gradient_reaches_first_adapter_through_chain_in_iaa():
    assert _first_adapter_grad("iaa").abs().sum() > 1e-6


def test_gradient_does_not_reach_first_adapter_in_scattered_adapter():
    assert torch.count_nonzero(_first_adapter_grad("adapter")) == 0


def test_cutting_one_link_blocks_the_iaa_pathway():
    # Control: zeroing C_2 (the link z_1 -> z_2) removes the gradient, so it did flow through C.
    assert torch.count_nonzero(_first_adapter_grad("iaa", cut_chain_at=1)) == 0


def test_chain_state_is_per_forward(batch):
    model = apply_peft(build_bert(), "iaa", r=4)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.peft_adapter.up.weight.normal_()
        first = outputs(model, "bert", batch)
        outputs(model, "bert", {k: v[:1, :3] for k, v in batch.items()})  # different shape in between
        again = outputs(model, "bert", batch)
    assert torch.equal(first, again)
    assert all(layer.peft_adapter._state.z is None for layer in model.encoder.layer)


# --- generation ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_generate_with_iaa(arch, num_beams, batch):
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5,
              min_new_tokens=5, num_beams=num_beams, do_sample=False)
    reference = BUILDERS[arch]().generate(**kw)
    model = apply_peft(BUILDERS[arch](), "iaa", r=4)
    assert torch.equal(model.generate(**kw), reference)  # identity at start, also step by step
    with torch.no_grad():
        torch.manual_seed(3)
        for stack in find_layer_stacks(model):
            for layer in stack.layers:
                layer.peft_adapter.up.weight.normal_(std=0.5)
    out = model.generate(**kw, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, reference.shape[1])
    if num_beams == 1:
        # Cached one-token decoder steps must match a full teacher-forced pass over the same tokens.
        with torch.no_grad():
            forced = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=out.sequences[:, :-1]).logits
        assert torch.allclose(torch.stack(out.logits, dim=1), forced, atol=1e-5)


def test_bert2bert_encoder_decoder(batch):
    base = build_bert2bert()
    model = apply_peft(build_bert2bert(), "iaa", r=4)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              decoder_input_ids=batch["labels"])
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, base(**kw).logits)
    assert sum(ADAPTER_ATTR in n for n, _ in model.named_parameters()) == 4 * 3 - 2  # 2 stacks x 2 layers x (D,C,U), no C on each stack's first
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=3, num_beams=2)
    assert out.shape[0] == 2
    with pytest.raises(ValueError, match="prefix tuning does not support EncoderDecoderModel"):
        apply_peft(build_bert2bert(), "prefix")


def test_apply_with_config_and_overrides():
    model = apply_peft(build_bert(), "iaa", peft_config("iaa", r=8), r=2)
    assert model.encoder.layer[0].peft_adapter.down.weight.shape == (2, WIDTH)


def test_gradient_checkpointing_gives_iaa_the_same_gradients(batch):
    """The layers are recomputed in the backward pass; the adapters (hooks) run once, so nothing changes."""
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = apply_peft(build_bert(), "iaa", r=4)
        with torch.no_grad():
            for layer in model.encoder.layer:
                layer.peft_adapter.up.weight.normal_(0, 0.1)
        if checkpointing:
            enable_gradient_checkpointing(model)
        calls = []
        model.encoder.layer[0].attention.register_forward_hook(lambda *a: calls.append(1))
        model.train()
        outputs(model, "bert", batch).pow(2).sum().backward()
        ran[checkpointing] = len(calls)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    from core.training.hf import enable_gradient_checkpointing

    ran: dict[bool, int] = {}
    plain, recomputed = grads(False), grads(True)
    assert ran == {False: 1, True: 2}  # the layer's inside was recomputed in the backward pass
    assert plain.keys() == recomputed.keys() and len(plain) >= 4
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-6)


def test_deepcopy_keeps_hooks_on_the_copy(batch):
    model = apply_peft(build_bert(), "iaa", r=4)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        before = outputs(model, "bert", batch)
        for layer in twin.encoder.layer:
            layer.peft_adapter.up.weight.normal_()
        assert torch.equal(outputs(model, "bert", batch), before)
        assert not torch.allclose(outputs(twin, "bert", batch), before)
