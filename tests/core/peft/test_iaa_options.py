"""The bottleneck options of issue 15: placement (block | houlsby), init (zero | small), first_c (drop | use).

Tiny BERT (the MiniLM layout) and tiny Gemma-3 (a Llama-like decoder) models built from configs; parameter
counts computed by hand; the step-0 gradient fact; identity at init; old checkpoints (a C on the first
adapter, no option fields in peft_config.json) still load.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Gemma3TextConfig, Gemma3TextModel

from core.peft import PeftError, apply_peft, count_parameters, load_peft, peft_config, save_peft
from core.peft.iaa import ADAPTER_ATTR, BottleneckAdapter
from tests.core.peft.conftest import VOCAB, WIDTH, build_bert, build_t5

R = 4
LAYERS = 2


def build_gemma(seed: int = 0, layers: int = LAYERS) -> nn.Module:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                           sliding_window=16, pad_token_id=0)
    return Gemma3TextModel(cfg).eval()


BUILD = {"bert": build_bert, "gemma": build_gemma}


def hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def readout(model: nn.Module, batch: dict) -> torch.Tensor:
    out = hidden(model, batch)
    return (out * torch.linspace(-1, 1, out.shape[-1])).pow(2).mean()


def adapters(model: nn.Module) -> list[BottleneckAdapter]:
    return [m for m in model.modules() if isinstance(m, BottleneckAdapter)]


ARCHS = pytest.mark.parametrize("arch", sorted(BUILD))
PLACEMENTS = pytest.mark.parametrize("placement", ["block", "houlsby"])


def test_defaults_and_validation():
    cfg = peft_config("iaa")
    assert (cfg.placement, cfg.init, cfg.init_std, cfg.first_c) == ("block", "zero", 1e-3, "drop")
    assert not hasattr(peft_config("adapter"), "first_c")
    for bad in ({"placement": "middle"}, {"init": "xavier"}, {"init_std": 0.0}, {"init_std": float("nan")},
                {"first_c": "keep"}):
        with pytest.raises(PeftError):
            peft_config("iaa", **bad)


@ARCHS
@PLACEMENTS
@pytest.mark.parametrize("method,first_c", [("iaa", "drop"), ("iaa", "use"), ("adapter", None)])
def test_zero_init_is_the_identity(arch, placement, method, first_c, batch):
    extra = {"first_c": first_c} if first_c else {}
    with torch.no_grad():
        base = hidden(BUILD[arch](), batch)
        model = apply_peft(BUILD[arch](), method, r=R, placement=placement, **extra)
        torch.testing.assert_close(hidden(model, batch), base, rtol=0, atol=1e-6)


@ARCHS
@PLACEMENTS
def test_small_init_moves_off_the_base_a_little(arch, placement, batch):
    with torch.no_grad():
        base = hidden(BUILD[arch](), batch)
        out = hidden(apply_peft(BUILD[arch](), "iaa", r=R, placement=placement, init="small", init_std=1e-3), batch)
    assert not torch.equal(out, base)
    assert torch.allclose(out, base, atol=0.1)


@ARCHS
@PLACEMENTS
@pytest.mark.parametrize("first_c", ["drop", "use"])
def test_step0_gradients_of_d_and_c(arch, placement, first_c, batch):
    """init=zero: z feeds nothing at step 0, so D and C (and D_0) get exactly zero gradient, U a non-zero
    one; init=small: all of them get a gradient on the first step."""
    for init in ("zero", "small"):
        model = apply_peft(BUILD[arch](), "iaa", r=R, placement=placement, init=init, first_c=first_c)
        readout(model, batch).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        kinds = {"down", "chain", "entry", "up"} if first_c == "use" else {"down", "chain", "up"}
        assert {n.rsplit(".", 2)[-2] for n in grads} == kinds
        for name, grad in grads.items():
            kind = name.rsplit(".", 2)[-2]
            if init == "zero" and kind != "up":
                assert grad is not None and torch.count_nonzero(grad) == 0, name
            else:
                assert grad is not None and grad.abs().sum() > 0, name


def _by_hand(method: str, placement: str, first_c: str | None, d: int = WIDTH, r: int = R, layers: int = LAYERS) -> int:
    n_adapters = layers * (2 if placement == "houlsby" else 1)
    count = n_adapters * 2 * d * r  # D and U of every adapter
    if method == "iaa":
        count += (n_adapters - 1) * r * r  # C of every adapter but the first
        if first_c == "use":
            count += r * r + d * r  # the first adapter's C and D_0
    return count


@ARCHS
@PLACEMENTS
@pytest.mark.parametrize("method,first_c", [("iaa", "drop"), ("iaa", "use"), ("adapter", None)])
def test_trainable_parameter_counts_by_hand(arch, placement, method, first_c):
    extra = {"first_c": first_c} if first_c else {}
    model = apply_peft(BUILD[arch](), method, r=R, placement=placement, **extra)
    assert count_parameters(model)["trainable_params"] == _by_hand(method, placement, first_c)
    # d=32, r=4, 2 layers: the numbers themselves, for the record
    expected = {("iaa", "block", "drop"): 528, ("iaa", "block", "use"): 672, ("adapter", "block", None): 512,
                ("iaa", "houlsby", "drop"): 1072, ("iaa", "houlsby", "use"): 1216, ("adapter", "houlsby", None): 1024}
    assert _by_hand(method, placement, first_c) == expected[(method, placement, first_c)]


@ARCHS
def test_houlsby_puts_two_adapters_in_every_layer_inside_the_residual(arch, batch):
    model = apply_peft(BUILD[arch](), "iaa", r=R, placement="houlsby")
    layers = model.encoder.layer if arch == "bert" else model.layers
    assert len(adapters(model)) == 2 * len(layers)
    for layer in layers:
        holder = getattr(layer, ADAPTER_ATTR)
        assert isinstance(holder, nn.ModuleDict) and sorted(holder) == ["attn", "ffn"]
    # the chain runs attn_1 -> ffn_1 -> attn_2 -> ...: every adapter but the first has a C
    order = [a for layer in layers for a in (getattr(layer, ADAPTER_ATTR)["attn"], getattr(layer, ADAPTER_ATTR)["ffn"])]
    assert order[0].chain is None and all(a.chain is not None for a in order[1:])
    # each adapter edits its sub-layer's output: record what the FFN adapter of layer 1 sees and returns
    seen = []
    ffn = layers[0].output.dense if arch == "bert" else layers[0].mlp
    ffn.register_forward_hook(lambda m, a, out: seen.append(out))  # runs after the adapter's hook
    with torch.no_grad():
        for a in order:
            a.up.weight.normal_(std=0.1)
        hidden(model, batch)
    assert len(seen) == 1 and seen[0].shape[-1] == WIDTH


def test_houlsby_chain_reaches_the_first_adapter():
    """With every U but the last at zero, D of the first (attention) adapter is reached only via the chain."""
    model = apply_peft(build_bert(layers=2), "iaa", r=R, placement="houlsby")
    order = [a for layer in model.encoder.layer for a in (layer.peft_adapter["attn"], layer.peft_adapter["ffn"])]
    with torch.no_grad():
        torch.manual_seed(7)
        order[-1].up.weight.normal_()
    captured = {}
    order[-1].up.register_forward_hook(lambda mod, args, out: captured.setdefault("u", out))
    model(input_ids=torch.randint(3, VOCAB, (2, 5)))
    captured["u"].pow(2).sum().backward()
    assert order[0].down.weight.grad.abs().sum() > 1e-6


def test_houlsby_refuses_unknown_layouts_naming_the_class():
    with pytest.raises(PeftError, match="T5Block.*T5ForConditionalGeneration.*placement=block"):
        apply_peft(build_t5(), "iaa", r=R, placement="houlsby")


def test_first_c_use_feeds_the_embeddings_into_the_chain(batch):
    """z_0 = act(D_0 h_0): with U of the first adapter alone non-zero, the output depends on D_0."""
    model = apply_peft(build_bert(), "iaa", r=R, first_c="use")
    first = model.encoder.layer[0].peft_adapter
    assert first.chain is not None and first.entry is not None
    with torch.no_grad():
        first.up.weight.normal_(std=0.5)
        before = hidden(model, batch)
        first.entry.weight.zero_()
        assert not torch.allclose(hidden(model, batch), before)


@ARCHS
@PLACEMENTS
@pytest.mark.parametrize("first_c", ["drop", "use"])
def test_save_load_round_trip_with_options(arch, placement, first_c, batch, tmp_path):
    model = apply_peft(BUILD[arch](), "iaa", r=R, placement=placement, init="small", init_std=0.05,
                       first_c=first_c)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        trained = hidden(model, batch)
    save_peft(model, tmp_path)
    meta = json.loads((tmp_path / "peft_config.json").read_text())["config"]
    assert meta["placement"] == placement and meta["first_c"] == first_c
    with torch.no_grad():
        torch.testing.assert_close(hidden(load_peft(BUILD[arch](), tmp_path), batch), trained, rtol=0, atol=1e-6)


@ARCHS
def test_checkpoint_from_before_the_options_still_loads(arch, batch, tmp_path):
    """What iaa saved before issue 15: config {r, activation} and a C on every layer, the first one unused."""
    model = apply_peft(BUILD[arch](), "iaa", r=R)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        trained = hidden(model, batch)
    save_peft(model, tmp_path)
    first = "encoder.layer.0" if arch == "bert" else "layers.0"
    weights = load_file(tmp_path / "peft_weights.safetensors")
    assert f"{first}.{ADAPTER_ATTR}.chain.weight" not in weights
    weights[f"{first}.{ADAPTER_ATTR}.chain.weight"] = torch.randn(R, R)  # never used: z_0 was 0
    save_file(weights, str(tmp_path / "peft_weights.safetensors"), metadata={"method": "iaa"})
    meta = json.loads((tmp_path / "peft_config.json").read_text())
    meta["config"] = {"r": R, "activation": "gelu"}
    (tmp_path / "peft_config.json").write_text(json.dumps(meta))
    loaded = load_peft(BUILD[arch](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(hidden(loaded, batch), trained, rtol=0, atol=1e-6)


def test_houlsby_adapter_under_gradient_checkpointing(batch):
    """The scattered adapter has no state, so houlsby hooks recomputed inside a checkpointed layer are fine;
    iaa's chain cannot be recomputed there and says so."""
    from core.training.hf import enable_gradient_checkpointing

    def grads(method: str, checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = apply_peft(build_bert(), method, r=R, placement="houlsby", init="small", init_std=0.1)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        readout(model, batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads("adapter", False), grads("adapter", True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-6)
    with pytest.raises(PeftError, match="houlsby.*gradient checkpointing"):
        grads("iaa", True)


def test_minilm_houlsby_identity_and_count():
    """The packaged MiniLM (6 BERT layers, d=384) with the default r=32."""
    from sentence_transformers import SentenceTransformer

    from core.models import resolve_model

    st = SentenceTransformer(resolve_model("minilm"), device="cpu")
    texts = ["What is the capital of France?", "Paris is the capital of France."]
    with torch.no_grad():
        base = st.encode(texts, convert_to_tensor=True)
    st = apply_peft(st, "iaa", placement="houlsby")
    assert count_parameters(st)["trainable_params"] == 12 * 2 * 384 * 32 + 11 * 32 * 32
    with torch.no_grad():
        torch.testing.assert_close(st.encode(texts, convert_to_tensor=True), base, rtol=0, atol=1e-6)
