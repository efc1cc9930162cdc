"""The chunked loss (train.fused_loss: chunked) equals the full-logits path (none): loss and every gradient, on a tiny
model in fp32, for packed rows, completion-only and all-token labels, tied and untied heads, and LoRA."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from raysft import loss as raysft_loss
from raysft.config.schema import LoraConfig
from raysft.data.packing import make_rows
from raysft.modeling import apply_lora, collate

from make_assets import tiny_llama_config

VOCAB = 300


def packed_batch(all_tokens: bool, seed=0):
    """Three packed rows of several examples each; the first tokens of each example untrained unless all_tokens."""
    g = torch.Generator().manual_seed(seed)
    exs = []
    for i in range(7):
        ids = torch.randint(3, VOCAB, (6 + 5 * i,), generator=g).tolist()
        labels = [-100] + ids[1:] if all_tokens else [-100] * (3 + i) + ids[3 + i:]
        exs.append((ids, labels))
    rows = make_rows(exs, 64, packing=True)
    batch = collate({"input_ids": rows.input_ids, "labels": rows.labels, "position_ids": rows.position_ids}, 0)
    assert batch["input_ids"].shape[0] == 3 and max(len(s) for s in rows.seq_lengths) >= 2  # really packed
    return batch


def model_pair(tied: bool, lora: bool):
    """The same seeded model twice, one with each loss attached (before LoRA, as context.start does)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB, tie_word_embeddings=tied), dtype=torch.float32)
    base.config.use_cache = False
    models = {}
    for kind in ("none", "chunked"):
        model = copy.deepcopy(base)
        raysft_loss.attach(model, kind)
        if lora:
            torch.manual_seed(1)
            model = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["all-linear"]), vocab_grew=True)
            for name, p in model.named_parameters():  # lora_B starts at zero: move it so every gradient is non-trivial
                if "lora_B" in name:
                    with torch.no_grad():
                        p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        models[kind] = model
    return models


@pytest.mark.parametrize("tied, lora, all_tokens", [
    (False, False, False), (False, False, True), (True, False, False), (True, False, True),
    (False, True, False), (True, True, True)])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(tied, lora, all_tokens):
    models = model_pair(tied, lora)
    batch = packed_batch(all_tokens)
    losses, grads = {}, {}
    for kind, model in models.items():
        model.train()
        value = raysft_loss.loss_sum(model, batch)
        value.backward()
        losses[kind] = value.detach()
        grads[kind] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    n_trained = int((batch["labels"][:, 1:] != -100).sum())
    assert n_trained > 0 and losses["none"] > 0
    torch.testing.assert_close(losses["chunked"], losses["none"], rtol=1e-6, atol=0)
    assert grads["chunked"].keys() == grads["none"].keys()
    if lora:  # the head trains with the adapter (modules_to_save) and the LoRA matrices have gradients
        assert any("modules_to_save" in n and "lm_head" in n for n in grads["none"])
        assert any("lora_A" in n for n in grads["none"])
    for name, g in grads["none"].items():
        scale = g.abs().max().item()
        assert scale > 0, name
        err = (grads["chunked"][name] - g).abs().max().item()
        assert err <= 1e-6 * scale, f"{name}: max |chunked - none| {err:.3g} > 1e-6 x {scale:.3g}"


def test_chunked_loss_never_builds_the_full_logits():
    """The output head module is never called on the hidden states: the loss reads its weight in tiles."""
    model = model_pair(tied=False, lora=False)["chunked"]
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    batch = packed_batch(all_tokens=False)
    raysft_loss.loss_sum(model, batch).backward()
    assert calls == []
    with torch.no_grad():  # the plain call is the model's own forward: logits as usual
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert logits.shape == (*batch["input_ids"].shape, VOCAB) and len(calls) == 1


def test_unknown_loss_kind_is_refused():
    model = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB))
    with pytest.raises(ValueError, match="fused_loss: 'fast' is not one of chunked, liger, none"):
        raysft_loss.attach(model, "fast")


@pytest.mark.parametrize("family", ["gemma2-softcap", "cohere-logit-scale"])
def test_chunked_loss_applies_the_models_logit_softcap_and_scale(family):
    """Families that transform the logits (Gemma-2's final soft-capping, Cohere's logit scale): same numbers."""
    from transformers import CohereConfig, Gemma2Config

    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = (Gemma2Config(head_dim=16, final_logit_softcapping=3.0, **small) if family.startswith("gemma2")
              else CohereConfig(logit_scale=0.5, **small))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base.config.use_cache = False
    batch = packed_batch(all_tokens=False)
    out = {}
    for kind in ("none", "chunked"):
        model = copy.deepcopy(base)
        raysft_loss.attach(model, kind)
        value = raysft_loss.loss_sum(model, batch)
        value.backward()
        out[kind] = value.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(out["chunked"][0], out["none"][0], rtol=1e-6, atol=0)
    for name, g in out["none"][1].items():
        assert (out["chunked"][1][name] - g).abs().max() <= 1e-6 * g.abs().max(), name
