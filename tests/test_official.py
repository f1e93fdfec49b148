"""import-official: safe reading of the release's pickles, CLIP conversion, exact parity."""

from __future__ import annotations

import collections
import importlib
import io
import json
import os
import pickle
import subprocess
import sys
import uuid
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from heads import load_run
from heads.official_convert import convert_openai_clip, prompt_token_ids_from_checkpoint
from heads.unpickle import CheckpointError, _Inert, load_official_checkpoint
from pipeline.clip import pooled_features
from tests.conftest import REFERENCE_DIR

CHECKPOINT = REFERENCE_DIR / "model_best.pth"


def write_torch_zip(path, payload: bytes, storages: dict[str, bytes] | None = None):
    """A file laid out like torch.save's zip archive, with a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


class _Call:
    """Pickles as a call of ``function(*args)``: what an attacker's object does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args

    def __call__(self, *args):  # pickle wants a callable; only its __reduce__ is ever used
        raise AssertionError("never called")


def _marker():
    return f"/tmp/pwned_{uuid.uuid4().hex}"


@pytest.mark.parametrize("make_payload", [
    lambda m: _Call(os.system, f"touch {m}"),
    lambda m: _Call(eval, f"__import__('os').system('touch {m}')"),
    lambda m: _Call(subprocess.check_call, ["touch", m]),
    lambda m: _Call(_Call(getattr, _Call(__import__, "os"), "system"), f"touch {m}"),
    lambda m: _Call(importlib.import_module, "antigravity"),
], ids=["os.system", "builtins.eval", "subprocess", "getattr", "importlib"])
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, make_payload):
    marker = _marker()
    payload = pickle.dumps({"state_dict": {}, "recorder": make_payload(marker)}, protocol=2)
    checkpoint = write_torch_zip(tmp_path / "evil.pth", payload)
    result = CliRunner().invoke(main, ["import-official", str(checkpoint), "--out",
                                       str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "refused" in result.output and "Nothing from the file was executed" in result.output
    assert not os.path.exists(marker)
    assert not (tmp_path / "run").exists()


def test_unknown_classes_become_inert_even_when_called(tmp_path):
    marker = _marker()
    # __main__.touch would run a command if it were resolved; here it must stay inert, whether
    # called (REDUCE), instantiated (NEWOBJ) or restored (BUILD).
    payload = (b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01c__main__\ntouch\nq\x02X"
               + len(marker).to_bytes(4, "little") + marker.encode()
               + b"\x85R"  # touch(marker)
               + b"X\x01\x00\x00\x00b"
               + b"c__main__\nRecorderMeter\n)\x81}X\x01\x00\x00\x00xK\x01sb"  # NEWOBJ + BUILD
               + b"u.")
    obj = load_official_checkpoint(write_torch_zip(tmp_path / "odd.pth", payload))
    assert isinstance(obj["a"], _Inert) and isinstance(obj["b"], _Inert)
    assert "RecorderMeter" in repr(obj["b"]) and not hasattr(obj["b"], "x")
    assert not os.path.exists(marker)


def test_tensors_are_rebuilt_from_the_archive_storages(tmp_path):
    buffer = io.BytesIO()
    tensors = {"w": torch.arange(12, dtype=torch.float32).view(3, 4), "n": torch.tensor([7, 8])}
    tensors["t"] = tensors["w"].t()  # a view sharing storage, non-contiguous
    torch.save(tensors, buffer)
    path = tmp_path / "plain.pth"
    path.write_bytes(buffer.getvalue())
    loaded = load_official_checkpoint(path)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a torch.save zip"):
        load_official_checkpoint(junk)
    with zipfile.ZipFile(path, "a") as archive:  # a storage that does not hold the tensor
        name = next(n for n in archive.namelist() if "/data/" in n)
    truncated = tmp_path / "truncated.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(truncated, "w") as dst:
        for item in src.namelist():
            dst.writestr(item, src.read(item)[:4] if item == name else src.read(item))
    with pytest.raises(CheckpointError, match="malformed"):
        load_official_checkpoint(truncated)


def _openai_from_hf(model) -> dict:
    """The inverse of the conversion, written independently: HF CLIPModel -> OpenAI keys."""
    sd, out = model.state_dict(), {}
    for tower, src, dst in (("v", "vision_model.encoder.layers.", "visual.transformer.resblocks."),
                            ("t", "text_model.encoder.layers.", "transformer.resblocks.")):
        n = sum(1 for k in sd if k.startswith(src) and k.endswith("self_attn.q_proj.weight"))
        for i in range(n):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for kind in ("weight", "bias"):
                out[f"{d}attn.in_proj_{kind}"] = torch.cat(
                    [sd[f"{s}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"{d}attn.out_proj.{kind}"] = sd[f"{s}self_attn.out_proj.{kind}"]
                out[f"{d}ln_1.{kind}"] = sd[f"{s}layer_norm1.{kind}"]
                out[f"{d}ln_2.{kind}"] = sd[f"{s}layer_norm2.{kind}"]
                out[f"{d}mlp.c_fc.{kind}"] = sd[f"{s}mlp.fc1.{kind}"]
                out[f"{d}mlp.c_proj.{kind}"] = sd[f"{s}mlp.fc2.{kind}"]
    out.update({
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t(),
        "logit_scale": sd["logit_scale"],
    })
    return out


def test_clip_conversion_infers_every_size():
    from transformers import CLIPConfig, CLIPModel

    # A ViT-B/16-like layout at toy size: 2 vision heads, 3 vision layers, patch 16 on 48 px,
    # a short context and a small vocabulary; QuickGELU as in OpenAI's weights.
    config = CLIPConfig(projection_dim=24, text_config=dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=16, vocab_size=100, hidden_act="quick_gelu", eos_token_id=99,
        bos_token_id=98, pad_token_id=0), vision_config=dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
        image_size=48, patch_size=16, hidden_act="quick_gelu"))
    torch.manual_seed(0)
    original = CLIPModel(config).eval()
    converted = convert_openai_clip(_openai_from_hf(original))
    c, v = converted.config.text_config, converted.config.vision_config
    assert (v.hidden_size, v.num_attention_heads, v.num_hidden_layers, v.patch_size,
            v.image_size) == (128, 2, 3, 16, 48)
    assert (c.hidden_size, c.num_attention_heads, c.max_position_embeddings, c.vocab_size) == (64, 1, 16, 100)
    pixels = torch.randn(2, 3, 48, 48)
    ids = torch.tensor([[98, 5, 6, 7, 99] + [0] * 11, [98, 9, 99] + [0] * 13])
    with torch.no_grad():
        for get, kwargs in (("get_image_features", {"pixel_values": pixels}),
                            ("get_text_features", {"input_ids": ids})):
            torch.testing.assert_close(pooled_features(getattr(converted, get)(**kwargs)),
                                       pooled_features(getattr(original, get)(**kwargs)))


def test_prompt_tokens_and_eot_are_recovered_from_embeddings():
    g = torch.Generator().manual_seed(0)
    token_embedding = torch.randn(100, 8, generator=g)
    ids = torch.zeros(3, 1 + 2 + 12, dtype=torch.long)  # [SOS] ctx ctx descriptor EOT pad(0)
    ids[:, 0] = 98
    for row, descriptor in zip(ids, ([5, 6, 7], [9], [11, 12, 13, 14, 15])):
        row[3:3 + len(descriptor)] = torch.tensor(descriptor)
        row[3 + len(descriptor)] = 99
    embedded = token_embedding[ids]
    prefix, suffix = embedded[:, :1], embedded[:, 3:]
    # A real release: the prompts' embeddings are rows of the (frozen) token embedding.
    recovered, exact = prompt_token_ids_from_checkpoint(prefix, suffix, token_embedding, 2, 1)
    assert exact and torch.equal(recovered[:, 3:], ids[:, 3:])
    # The token embedding changed after the prompts were embedded: EOT from the structure.
    moved = token_embedding + 0.3 * torch.randn(100, 8, generator=g)
    recovered, exact = prompt_token_ids_from_checkpoint(prefix, suffix, moved, 2, 1)
    assert not exact
    assert (recovered == 99).int().argmax(1).tolist() == (ids == 99).int().argmax(1).tolist()


# ---- the reference produced by the original code -------------------------------------------

def _reference():
    if not CHECKPOINT.is_file():
        pytest.skip(f"reference folder {REFERENCE_DIR} is absent (CI keeps it beside the clone)")
    return np.load(REFERENCE_DIR / "inputs_and_logits.npz")


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    _reference()
    run = tmp_path_factory.mktemp("official") / "run"
    result = CliRunner().invoke(main, ["import-official", str(CHECKPOINT), "--out", str(run)])
    assert result.exit_code == 0, result.output
    return run


def test_reference_checkpoint_loads_without_its_training_script():
    _reference()
    checkpoint = load_official_checkpoint(CHECKPOINT)
    assert set(checkpoint) == {"epoch", "state_dict", "best_acc", "optimizer", "recorder"}
    assert isinstance(checkpoint["recorder"], _Inert)
    keys = [line.split("\t")[0] for line in
            (REFERENCE_DIR / "state_dict_keys.txt").read_text().splitlines() if line.strip()]
    assert list(checkpoint["state_dict"]) == keys
    assert checkpoint["state_dict"]["project_fc.weight"].shape == (512, 1024)


def test_imported_run_reproduces_the_original_logits(imported_run):
    reference = _reference()
    model = load_run(imported_run)
    face = torch.from_numpy(reference["face_uint8"]).float() / 255
    context = torch.from_numpy(reference["context_uint8"]).float() / 255
    with torch.no_grad():
        logits = model.forward_pixels(face, context)
        text = model.encode_text()
    torch.testing.assert_close(logits, torch.from_numpy(reference["logits"]), atol=1e-3, rtol=0)
    torch.testing.assert_close(text, torch.from_numpy(reference["text_features"]), atol=1e-5, rtol=0)
    assert logits.argmax(1).tolist() == reference["logits"].argmax(1).tolist()


def test_imported_run_records_the_original_setup(imported_run):
    reference = _reference()
    config = json.loads((imported_run / "config.json").read_text())
    assert config["kind"] == "import-official" and config["labels"]["name"] == "raer5"
    assert config["preprocessing"]["normalize"] == "none"
    assert config["preprocessing"]["face_resize"] == "squash"
    assert config["model"]["segments"] == 16 and config["model"]["n_ctx"] == 8
    assert config["extra"]["source"]["epoch"] == 20
    # EOT positions come from the checkpoint alone and agree with the original tokenizer.
    ids = np.array(config["prompts"]["token_ids"])
    expected = reference["tokenized_prompts"]
    assert ids.argmax(1).tolist() == expected.argmax(1).tolist()
    assert (ids[:, :9] == expected[:, :9]).all()
    # RUN/clip is a CLIP directory the shared loader (and so `extract --clip`) accepts.
    from pipeline.clip import load_clip
    clip = load_clip(str(imported_run / "clip"))
    assert clip.feature_dim == 512 and clip.model.config.vision_config.hidden_act == "quick_gelu"
    assert not any(p.suffix in (".pth", ".pt", ".bin") for p in imported_run.rglob("*"))


def test_a_head_on_the_imported_clip_tokenizes_as_the_original(imported_run):
    # What train-head does after `extract --clip RUN/clip`: RUN/clip's saved tokenizer is
    # CLIP's own BPE, so the descriptors become exactly the original's prompt ids.
    from heads import CaerModel, HeadConfig
    from pipeline.clip import load_clip
    from cache.core.labels import RAER5

    expected = _reference()["tokenized_prompts"]
    clip = load_clip(str(imported_run / "clip"))
    model = CaerModel(HeadConfig(), clip, RAER5)
    np.testing.assert_array_equal(model.prompt_learner.token_ids.numpy(), expected)
    assert type(clip.tokenizer).__name__.startswith("CLIPTokenizer")


def test_import_refuses_a_wrong_label_set_and_an_existing_out(imported_run, tmp_path):
    result = CliRunner().invoke(main, ["import-official", str(CHECKPOINT), "--out",
                                       str(tmp_path / "r"), "--labels", "caer7"])
    assert result.exit_code == 2 and "7 classes but the checkpoint has 5" in result.output
    assert not (tmp_path / "r").exists()
    result = CliRunner().invoke(main, ["import-official", str(CHECKPOINT), "--out", str(imported_run)])
    assert result.exit_code == 2 and "--force" in result.output


# ---- bounded loading: what a small file may make the import allocate -----------------------

class _DeclaredStorage:
    """Pickled as torch.save's persistent id of a float32 storage of ``numel`` elements."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _DeclaredStorage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _tensor(storage, size, stride):
    return _Call(torch._utils._rebuild_tensor_v2, storage, 0, size, stride, False,
                 collections.OrderedDict())


def _bomb(path, declared_mb: int, marker: str):
    """A torch.save-shaped zip whose pickle declares a storage of ``declared_mb`` MB that is
    really in the archive, as deflated zeros (a file of ~1/1000 that size), then a call of
    os.system that must never run."""
    numel = declared_mb * 2 ** 20 // 4
    state = collections.OrderedDict(
        token_embedding=_tensor(_DeclaredStorage("0", numel), (numel,), (1,)))
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump(
        {"state_dict": state, "recorder": _Call(os.system, f"touch {marker}")})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        entry = zipfile.ZipInfo("archive/data/0")
        entry.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(entry, "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(declared_mb):
                f.write(chunk)
    return path


_MEASURE = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import heads.model, heads.official, heads.run, transformers  # imported before the baseline
from click.testing import CliRunner
from cli import main
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = CliRunner().invoke(main, ["import-official", sys.argv[2], "--out", sys.argv[3]])
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"exit": result.exit_code, "output": result.output, "grew_kib": grew}))
"""


@pytest.mark.slow
def test_a_small_file_declaring_a_huge_storage_is_refused_with_little_memory(tmp_path):
    from conftest import ROOT

    marker = _marker()
    checkpoint = _bomb(tmp_path / "bomb.pth", 160, marker)
    assert checkpoint.stat().st_size < 400_000  # 160 MB declared in a few hundred KB
    with zipfile.ZipFile(checkpoint) as archive:
        assert archive.getinfo("archive/data/0").file_size == 160 * 2 ** 20
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(ROOT), str(checkpoint),
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["exit"] == 2, report
    line = report["output"].strip()
    assert "\n" not in line and line.startswith(f"error: {checkpoint}: refused: storage 0 "
                                                f"declares 160.0 MB")
    assert "more than the whole file" in line and "Nothing from it was executed" in line
    assert report["grew_kib"] < 32 * 1024, report  # reading it in full would take 320 MB
    assert not os.path.exists(marker) and not (tmp_path / "run").exists()


def test_views_of_huge_shape_over_a_small_storage_are_refused(tmp_path):
    marker = _marker()
    storage = _DeclaredStorage("0", 4)
    state = collections.OrderedDict(  # 40000 x 40000 floats (6.4 GB) from 16 bytes
        w=_tensor(storage, (40000, 40000), (0, 0)))
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump({"state_dict": state,
                                              "x": _Call(os.system, f"touch {marker}")})
    checkpoint = write_torch_zip(tmp_path / "views.pth", buffer.getvalue(), {"0": bytes(16)})
    result = CliRunner().invoke(main, ["import-official", str(checkpoint), "--out",
                                       str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "refused: its tensors declare over" in result.output
    assert "views of huge shape over small storages" in result.output
    assert not os.path.exists(marker) and not (tmp_path / "run").exists()


def test_a_small_vocabulary_gets_a_placeholder_id_inside_it():
    g = torch.Generator().manual_seed(1)
    token_embedding = torch.randn(40, 8, generator=g)  # far below CLIP's "X" (id 343)
    ids = torch.zeros(2, 1 + 2 + 6, dtype=torch.long)
    ids[:, 0], ids[0, 3:5], ids[0, 5], ids[1, 3], ids[1, 4] = 38, torch.tensor([5, 6]), 39, 7, 39
    embedded = token_embedding[ids]
    recovered, exact = prompt_token_ids_from_checkpoint(embedded[:, :1], embedded[:, 3:],
                                                        token_embedding, 2)
    assert exact and int(recovered.max()) < 40 and recovered[:, 1:3].eq(37).all()
