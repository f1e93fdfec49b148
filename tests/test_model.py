"""The CLIP-CAER model (heads/model.py) and run directories (heads/run.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from heads import CaerModel, HeadConfig, load_run, save_run
from heads.model import TemporalTransformer, tokenize_prompts
from heads.run import RunError
from pipeline.clip import build_random_clip, load_clip, pooled_features
from cache.core.errors import CaerError
from cache.core.labels import RAER5, LabelSet

# Short descriptors that end at different places, so that truncating the text tower at the
# longest EOT really cuts positions off.
SHORT = LabelSet.from_dict({"name": "short", "classes": [
    {"name": "calm", "descriptor": "still face, soft light", "face_descriptor": "still"},
    {"name": "busy", "descriptor": "hands moving fast over a desk", "face_descriptor": "eyes"},
    {"name": "away", "descriptor": "empty chair", "face_descriptor": "gone"},
]})


@pytest.fixture(scope="module")
def tiny():
    return build_random_clip("tiny")


def make_model(clip, labels=SHORT, seed=0, **config):
    torch.manual_seed(seed)
    return CaerModel(HeadConfig(**config), clip, labels).eval()


def features(b=2, t=16, d=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, d, generator=g), torch.randn(b, t, d, generator=g)


def test_prompt_tokens_are_sos_placeholders_descriptor_eot(tiny):
    ids = tokenize_prompts(tiny.tokenizer, ["empty chair", "chair " * 100], n_ctx=8, context_length=77)
    sot, eot = tiny.tokenizer.bos_token_id, tiny.tokenizer.eos_token_id
    placeholder = tiny.tokenizer("X", add_special_tokens=False)["input_ids"]
    assert len(placeholder) == 1
    assert ids.shape == (2, 77)
    assert ids[0, 0] == sot and (ids[:, 1:9] == placeholder[0]).all()
    end = int((ids[0] == eot).int().argmax())
    assert tiny.tokenizer.decode(ids[0, 9:end]) == "empty chair"
    assert ids[0, end] == eot and (ids[0, end + 1:] == 0).all()  # zeros, as clip.tokenize pads
    assert ids[1, -1] == eot and (ids[1, 9:-1] != eot).all()  # truncated, EOT kept
    assert set(tiny.tokenizer.decode(ids[1, 9:-1]).split()) == {"chair"}


@pytest.mark.parametrize("labels", [SHORT, RAER5], ids=["short", "raer5"])
def test_prompt_encoding_with_x_context_equals_get_text_features(tiny, labels):
    model = make_model(tiny, labels)
    ids = model.prompt_learner.token_ids
    with torch.no_grad():
        token_embedding = model.clip.text_model.embeddings.token_embedding
        model.prompt_learner.ctx.copy_(token_embedding(ids[:, 1:9]))
        ours = model.encode_text()
        theirs = F.normalize(pooled_features(tiny.model.get_text_features(input_ids=ids)), dim=-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_truncated_text_tower_equals_full_length(tiny):
    model = make_model(tiny)
    eot = model.prompt_learner.eot_positions
    assert int(eot.max()) + 1 < 77 and len(set(eot.tolist())) == 3  # truncation really happens
    with torch.no_grad():
        model.prompt_learner.ctx.normal_()  # learned-looking context, not the init
        torch.testing.assert_close(model.encode_text(truncate=True),
                                   model.encode_text(truncate=False), atol=1e-6, rtol=0)


def test_encode_text_calls_the_mask_api_without_deprecation_warnings(tiny):
    import warnings

    model = make_model(tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' deprecate_kwarg warns FutureWarning
        with torch.no_grad():
            model.encode_text()


def test_logits_are_scaled_cosines_and_depend_on_frame_order(tiny):
    model = make_model(tiny)
    face, context = features()
    with torch.no_grad():
        logits = model.forward_features(face, context)
        video, text = model.encode_video(face, context), model.encode_text()
        shuffled = model.forward_features(face.flip(1), context.flip(1))
    assert logits.shape == (2, 3)
    torch.testing.assert_close(video.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(logits, 100 * video @ text.t())
    assert (logits - shuffled).abs().max() > 1e-3  # positional embeddings matter


def test_temporal_transformer_matches_an_explicit_computation():
    torch.manual_seed(0)
    net = TemporalTransformer(dim=32, segments=4, depth=1, heads=2, dim_head=8, mlp_dim=48,
                              dropout=0.1).eval()
    x = torch.randn(3, 4, 32)
    block = net.layers[0]
    h = torch.cat([net.cls_token.expand(3, -1, -1), x], 1) + net.pos_embedding
    q, k, v = block.qkv(block.attn_norm(h)).chunk(3, dim=-1)
    split = lambda t: t.view(3, 5, 2, 8).transpose(1, 2)  # noqa: E731
    attn = (split(q) @ split(k).transpose(-1, -2) * 8 ** -0.5).softmax(-1) @ split(v)
    h = h + block.attn_out(attn.transpose(1, 2).reshape(3, 5, 16))
    m = block.mlp_norm(h)
    u = block.mlp[0](m)
    gelu = 0.5 * u * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (u + 0.044715 * u ** 3)))
    expected = (h + block.mlp[3](gelu))[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(CaerError, match="positions for 4"):
            net(torch.randn(1, 5, 32))
    net.train()
    assert not torch.equal(net(x), net(x))  # dropout is on in training


def test_single_stream_models_have_no_fusion_and_use_face_descriptors(tiny):
    face_only = make_model(tiny, streams="face")
    assert face_only.fusion is None and face_only.context_temporal is None
    face_ids = tokenize_prompts(tiny.tokenizer, SHORT.descriptors("face"), 8, 77)
    assert torch.equal(face_only.prompt_learner.token_ids, face_ids)
    face, context = features()
    with torch.no_grad():
        expected = F.normalize(face_only.face_temporal(face), dim=-1)
        torch.testing.assert_close(face_only.encode_video(face, None), expected)
        context_only = make_model(tiny, streams="context")
        assert context_only.forward_features(None, context).shape == (2, 3)
    with pytest.raises(CaerError, match="--streams"):
        make_model(tiny, streams="body")
    with pytest.raises(CaerError, match="projection dim"):
        make_model(tiny, feature_dim=768)


def test_encode_frames_applies_the_run_normalisation(tiny):
    pixels = torch.rand(1, 2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    with torch.no_grad():
        clip_norm = CaerModel(HeadConfig(), tiny, SHORT, normalize="clip").encode_frames(pixels)
        raw = CaerModel(HeadConfig(), tiny, SHORT, normalize="none").encode_frames(pixels)
        torch.testing.assert_close(clip_norm[0], tiny.encode_images((pixels[0] - mean) / std))
        torch.testing.assert_close(raw[0], tiny.encode_images(pixels[0]))
    assert (clip_norm - raw).abs().max() > 1e-3


def test_param_groups_train_only_the_head_unless_finetuning():
    model = make_model(build_random_clip("tiny"))  # its own CLIP: this test unfreezes it
    model.train()
    groups = {g["name"]: g for g in model.param_groups(1e-2, 1e-3, 1e-5)}
    assert set(groups) == {"temporal", "prompt", "fusion"}
    assert groups["temporal"]["lr"] == 1e-2 and groups["prompt"]["params"] == [model.prompt_learner.ctx]
    face, context = features()
    model.forward_features(face, context).logsumexp(-1).sum().backward()
    assert model.prompt_learner.ctx.grad.abs().sum() > 0  # gradients flow through the text tower
    assert model.face_temporal.cls_token.grad is not None and model.fusion.weight.grad is not None
    assert all(not p.requires_grad for p in model.clip.parameters())
    assert not any(k.startswith("clip.") for k in model.trainable_state_dict())

    groups = {g["name"]: g for g in model.param_groups(1e-2, 1e-3, 1e-5, lr_image_encoder=1e-5)}
    assert groups["image_encoder"]["lr"] == 1e-5
    assert all(p.requires_grad for p in model.clip.vision_model.parameters())
    assert all(not p.requires_grad for p in model.clip.text_model.parameters())
    assert any(k.startswith("clip.vision_model.") for k in model.trainable_state_dict())


def test_a_fine_tuned_run_keeps_its_image_encoder(tmp_path):
    model = make_model(build_random_clip("tiny"))
    model.param_groups(1e-2, 1e-3, 1e-5, lr_image_encoder=1e-5)
    with torch.no_grad():
        model.clip.vision_model.post_layernorm.bias.add_(0.5)  # as if fine-tuned
    run = save_run(tmp_path / "ft", model, kind="finetune", train_options={}, cache_fingerprint=None)
    loaded = load_run(run)
    assert loaded.image_encoder_trained and (run / "clip").is_dir()
    pixels = torch.rand(1, 2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_pixels(pixels, pixels),
                                   model.eval().forward_pixels(pixels, pixels))


def test_run_round_trip_rebuilds_the_same_model(tiny, tmp_path):
    model = make_model(tiny)
    with torch.no_grad():
        model.prompt_learner.ctx.normal_()
    fingerprint = {"normalize": "clip", "face_resize": "squash", "segments": 16, "flip": True}
    run = save_run(tmp_path / "run", model, kind="train-head", train_options={"lr": 0.01},
                   cache_fingerprint=fingerprint)
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "train-head" and config["clip"]["dir"] == "clip"  # random: is copied
    assert config["model"]["n_ctx"] == 8 and config["labels"]["name"] == "short"
    assert config["preprocessing"] == {"normalize": "clip", "face_resize": "squash",
                                       "segments": 16, "image_size": 224}
    assert config["cache_fingerprint"] == fingerprint and config["train"] == {"lr": 0.01}
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt*"))  # no pickles

    loaded = load_run(run)
    assert not loaded.training and loaded.clip_spec == "random:tiny"
    face, context = features()
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(face, context),
                                   model.forward_features(face, context), atol=0, rtol=0)
        pixels = torch.rand(1, 2, 3, 224, 224)
        torch.testing.assert_close(loaded.forward_pixels(pixels, pixels),
                                   model.forward_pixels(pixels, pixels))


def test_run_with_a_referenced_clip_does_not_copy_it(tiny_clip_dir, tmp_path):
    clip = load_clip(str(tiny_clip_dir))
    model = make_model(clip, streams="face")
    run = save_run(tmp_path / "run", model, kind="train-head", train_options={},
                   cache_fingerprint=None)
    assert not (run / "clip").exists()
    face, _ = features(b=1)
    with torch.no_grad():
        torch.testing.assert_close(load_run(run).forward_features(face, None),
                                   model.forward_features(face, None))
    config = json.loads((run / "config.json").read_text())
    config["clip"]["revision"] = "0123456789abcdef"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="trained with 0123456789abcdef"):
        load_run(run)


def test_bad_runs_are_refused_with_what_to_do(tiny, tmp_path):
    with pytest.raises(RunError, match="no such directory"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no config.json"):
        load_run(tmp_path / "empty")

    run = save_run(tmp_path / "run", make_model(tiny), kind="train-head", train_options={},
                   cache_fingerprint=None)
    good_config, good_weights = (run / "config.json").read_text(), (run / "head.safetensors").read_bytes()

    (run / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="corrupt"):
        load_run(run)

    config = json.loads(good_config)
    config["model"]["n_ctx"] = 4  # weights from another configuration
    config["prompts"]["token_ids"] = [ids[:5] + ids[9:] + ids[-4:] for ids in config["prompts"]["token_ids"]]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="does not match.*prompt_learner.ctx"):
        load_run(run)

    (run / "config.json").write_text(good_config)
    (run / "head.safetensors").write_bytes(good_weights[:1000])
    with pytest.raises(RunError, match="head.safetensors: the weights file is damaged or cut short"):
        load_run(run)

    (run / "head.safetensors").write_bytes(good_weights)
    weights = (run / "clip" / "model.safetensors")
    from safetensors.torch import load_file, save_file
    state = load_file(str(weights))
    state["text_projection.weight"] = state["text_projection.weight"] + 1
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(RunError, match="differ from those saved"):
        load_run(run)
