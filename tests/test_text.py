"""heads/text.py's TextTower: every saving gives the plain transformers text tower's features
and context gradients (fp32), the frozen tower gets no gradients, and a weight changed after
the first call is picked up."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from heads import CaerModel, HeadConfig
from heads.text import TowerOptions
from pipeline.clip import LoadedClip, build_random_clip
from cache.core.labels import LabelSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Prompts that end at different positions, so that packing and the EOT-only layer matter.
LABELS = LabelSet.from_dict({"name": "short", "classes": [
    {"name": "calm", "descriptor": "still face, soft light", "face_descriptor": "still"},
    {"name": "busy", "descriptor": "hands moving fast over a desk", "face_descriptor": "eyes"},
    {"name": "away", "descriptor": "empty chair", "face_descriptor": "gone"},
    {"name": "dark", "descriptor": "a dark room with one lamp at the back", "face_descriptor": "x"},
]})
ALL_OFF = TowerOptions(pack=False, last_layer_eot_only=False, fused_qkv=False, prepare_once=False)
VARIANTS = {"all": TowerOptions(), "none": ALL_OFF,
            **{f"no-{name}": replace(TowerOptions(), **{name: False})
               for name in ("pack", "last_layer_eot_only", "fused_qkv", "prepare_once")}}


@pytest.fixture(scope="module")
def clip():
    """A text tower with several layers and heads (random:tiny has one of each)."""
    from transformers import CLIPConfig, CLIPModel

    tiny = build_random_clip("tiny")
    text = tiny.model.config.text_config
    config = CLIPConfig(projection_dim=512, text_config=dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, vocab_size=text.vocab_size, bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id, projection_dim=512),
        vision_config=tiny.model.config.vision_config.to_dict())
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # trained-looking scales: attention that is not uniform
        for layer in model.text_model.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return LoadedClip(model, tiny.tokenizer, "test:text-3x128", "test")


def make_model(clip, options=TowerOptions()):
    torch.manual_seed(0)
    model = CaerModel(HeadConfig(), clip, LABELS)
    model.param_groups(1e-2, 1e-3, 1e-5)
    model.text_tower.options = options
    with torch.no_grad():
        model.prompt_learner.ctx.normal_()  # a learned-looking context, not the init
    return model


def features_and_grad(model, encode):
    model.prompt_learner.ctx.grad = None
    features = encode()
    weights = torch.linspace(-1, 1, features.numel()).view_as(features)
    (features * weights).sum().backward()
    return features.detach(), model.prompt_learner.ctx.grad.clone()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_saving_equals_the_plain_transformers_tower(clip, variant):
    model = make_model(clip, VARIANTS[variant])
    eot = model.prompt_learner.eot_positions
    assert len(set(eot.tolist())) == len(LABELS)  # the prompts end at different positions
    ours, our_grad = features_and_grad(model, model.encode_text)
    plain, plain_grad = features_and_grad(model, model.encode_text_reference)  # all 77 positions
    torch.testing.assert_close(ours, plain, atol=2e-6, rtol=0)
    scale = float(plain_grad.abs().max())
    torch.testing.assert_close(our_grad, plain_grad, atol=1e-4 * scale, rtol=0)  # fp32 sums
    assert our_grad.abs().min(dim=-1).values.gt(0).any()  # the context really gets gradients


def test_the_frozen_tower_gets_no_gradient_and_builds_no_weight_copies_in_fp32(clip):
    model = make_model(clip)
    model.encode_text().sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.clip.parameters())
    prepared = model.text_tower.prepared(torch.device("cpu"), torch.float32)
    attn = model.clip.text_model.encoder.layers[0].self_attn
    assert prepared.layers[0].out[0].data_ptr() == attn.out_proj.weight.data_ptr()  # no copy in fp32
    model.encode_text()
    assert model.text_tower.prepared(torch.device("cpu"), torch.float32) is prepared  # once


def test_a_weight_or_embedding_changed_after_the_first_call_is_picked_up(clip):
    """Loading a checkpoint (load_state_dict copies in place) after a first encode must not
    leave the tower on stale weights, in fp32 or in its bf16 copies."""
    model = make_model(clip)
    with torch.no_grad():
        model.encode_text()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.encode_text()
        state = {k: v.clone() for k, v in model.clip.text_model.state_dict().items()}
        model.clip.text_model.encoder.layers[-1].mlp.fc2.weight.mul_(3.0)
        model.prompt_learner.token_embeddings.mul_(0.5)
        torch.testing.assert_close(model.encode_text(), model.encode_text_reference(),
                                   atol=2e-6, rtol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model.encode_text()
        plain = model.encode_text_reference()
        assert float((fast * plain).sum(-1).min()) > 0.99  # bf16: the new weights, rounded
        model.clip.text_model.load_state_dict(state)
    torch.testing.assert_close(model.encode_text().detach(), model.encode_text_reference().detach(),
                               atol=2e-6, rtol=0)


def test_bf16_runs_on_weights_cast_once_and_stays_close_to_fp32(clip):
    model = make_model(clip)
    fp32, grad32 = features_and_grad(model, model.encode_text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, grad16 = features_and_grad(model, model.encode_text)
    prepared = model.text_tower.prepared(torch.device("cpu"), torch.bfloat16)
    assert prepared.layers[0].fc1[0].dtype == torch.bfloat16
    assert float((fp32 * bf16).sum(-1).min()) > 0.99
    assert float(torch.nn.functional.cosine_similarity(grad32.flatten(), grad16.flatten(), 0)) > 0.95
