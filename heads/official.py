"""Import a checkpoint of the original CLIP-CAER release as a caer-kit run.

The release's ``model_best.pth`` is a ``torch.save`` zip whose ``data.pkl`` pickles a dict with
the model's state_dict, the optimizer state and an object of a class from the authors'
training script (``__main__.RecorderMeter``). Unpickling it with ``torch.load`` would run
whatever the pickle names. ``load_official_checkpoint`` instead uses a restricted unpickler:

- tensors are rebuilt by our own functions from the zip's raw storages, and ``OrderedDict``,
  ``torch.Size``, ``torch.device`` and dtypes are the only real objects it creates;
- the pickle is refused (CaerError, exit status 2, nothing executed) when it names anything
  that can run code: ``os``/``posix``/``subprocess``/``builtins``/``sys``/``importlib``/... or
  any torch global outside that list;
- every other global (the recorder's class, numpy's array helpers) becomes an inert
  placeholder: a class whose constructor, ``__setstate__`` and container methods do nothing, so
  even a pickle that calls it runs nothing. No module outside the list is ever imported;
- what the file may make us allocate is bounded by its size: torch.save stores every storage
  uncompressed, so the storages together cannot hold more bytes than the file has, and the
  tensors viewing them are bounded to a few times that (``_Budget``). A small file that
  declares huge (deflated) storages, or stride-0 views of huge shape, is refused before the
  memory is taken.

Conversion (``import_official``): the OpenAI-format CLIP becomes a transformers CLIPModel with
every size inferred from the tensors (attention heads = width // 64, as OpenAI's loader does),
saved in RUN/clip. The head maps ``temporal_net`` -> face_temporal, ``temporal_net_body`` ->
context_temporal, ``project_fc`` -> fusion, ``prompt_learner.ctx`` -> the prompt context; the
prompts' frozen token embeddings (``token_prefix``, ``token_suffix``) are kept exactly, since the
original encodes those and not a fresh lookup. Each prompt's end-of-text position is derived from
the checkpoint itself (see ``prompt_token_ids_from_checkpoint``). RUN/clip carries CLIP's own
BPE tokenizer (pipeline/tokenizer.py, built offline from OpenAI's vocabulary), so a head trained
later on ``extract --clip RUN/clip`` features tokenizes its descriptors into the ids the
original fed this CLIP; the imported run itself stores its prompts' token ids and embeddings,
so it never re-tokenizes. The run records the original's preprocessing:
pixels in [0, 1] without CLIP's mean/std (normalize "none") and squashed face crops.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch

from cache.atomic import refuse_symlink
from pipeline.config import PRESETS
from cache.core.errors import CaerError

log = logging.getLogger("caer")


class UnsafeCheckpointError(CaerError):
    """The pickle names something that can execute code; nothing was run."""


class CheckpointError(CaerError):
    pass


# ---- restricted unpickling -----------------------------------------------------------------

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}

# Modules and names that can reach code execution, the file system or the network. Naming one
# of them is refused outright: no honest checkpoint needs them.
_DENIED_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "importlib",
    "imp", "runpy", "pty", "socket", "ctypes", "pickle", "_pickle", "cPickle", "marshal", "code",
    "codeop", "types", "functools", "operator", "io", "_io", "webbrowser", "multiprocessing",
    "signal", "platform", "commands", "popen2", "asyncio", "threading", "_thread", "pathlib",
    "tempfile", "glob", "inspect", "pdb", "bdb", "timeit", "trace", "cProfile", "profile",
    "shelve", "dill", "joblib", "cloudpickle", "urllib", "http", "requests", "ftplib", "smtplib",
    "telnetlib", "pip", "setuptools", "distutils", "zipimport", "pkgutil", "sysconfig", "site",
    "gc", "weakref", "torch", "numpy.lib", "numpy.ctypeslib", "numpy.testing",
}
_DENIED_NAMES = {
    "eval", "exec", "execfile", "compile", "system", "popen", "__import__", "getattr", "setattr",
    "delattr", "open", "input", "globals", "locals", "vars", "apply", "breakpoint", "load",
    "loads", "Popen", "call", "check_call", "check_output", "run", "spawn", "fork", "remove",
    "unlink", "rmtree",
}


class _StorageType:
    """What ``torch.FloatStorage`` etc. become: a dtype tag for persistent_load, not callable."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Inert:
    """Stands in for a class the checkpoint names but the import does not need.

    Creating, calling, filling or restoring it does nothing, so a pickle cannot use it to run
    code; ``_inert_name`` records what it stands for.
    """

    _inert_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __repr__(self):
        return f"<inert {self._inert_name}>"


# Tensors may view one storage several times (the original model holds its CLIP under two
# names, so its state_dict shows each CLIP tensor twice); this many times the file is plenty.
VIEW_BYTES_PER_FILE_BYTE = 4


class _Budget:
    """Bytes a checkpoint of ``file_bytes`` may make the import allocate."""

    def __init__(self, source: str, file_bytes: int):
        self.source, self.file_bytes = source, file_bytes
        self.storage_bytes = 0
        self.view_bytes = 0

    def take_storage(self, key: str, nbytes: int) -> None:
        if self.storage_bytes + nbytes > self.file_bytes:
            raise CheckpointError(
                f"{self.source}: refused: storage {key} declares {_size(nbytes)}"
                + (f", with the storages before it {_size(self.storage_bytes + nbytes)},"
                   if self.storage_bytes else "")
                + f" more than the whole file ({_size(self.file_bytes)}); torch.save stores "
                f"storages uncompressed, so the file is crafted or damaged. Nothing from it "
                f"was executed")
        self.storage_bytes += nbytes

    def take_view(self, nbytes: int) -> None:
        limit = VIEW_BYTES_PER_FILE_BYTE * self.file_bytes + (1 << 20)
        if self.view_bytes + nbytes > limit:
            raise CheckpointError(
                f"{self.source}: refused: its tensors declare over {_size(limit)} in all, more "
                f"than {VIEW_BYTES_PER_FILE_BYTE} times the {_size(self.file_bytes)} file (views "
                f"of huge shape over small storages); the file is crafted or damaged. Nothing "
                f"from it was executed")
        self.view_bytes += nbytes


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    # torch._utils._rebuild_tensor_v2's arguments; requires_grad, backward hooks and metadata
    # are dropped (hooks would be callables from the file).
    if not isinstance(storage, _Storage):
        raise CheckpointError("malformed checkpoint: a tensor without a storage")
    if not (isinstance(storage_offset, int) and all(isinstance(v, int) for v in (*size, *stride))):
        raise CheckpointError("malformed checkpoint: non-integer tensor geometry")
    if any(v < 0 for v in (storage_offset, *size, *stride)):
        raise CheckpointError("malformed checkpoint: negative tensor geometry")
    storage.budget.take_view(math.prod(size) * storage.flat.element_size())
    try:
        return torch.as_strided(storage.flat, tuple(size), tuple(stride), storage_offset)
    except RuntimeError as err:  # out of bounds for its storage
        raise CheckpointError(f"malformed checkpoint: {err}".splitlines()[0]) from None


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


class _Storage:
    def __init__(self, flat: torch.Tensor, budget: _Budget):
        self.flat, self.budget = flat, budget


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str,
                 budget: _Budget):
        super().__init__(file)
        self.archive, self.prefix, self.source, self.budget = archive, prefix, source, budget
        self.storages: dict[str, _Storage] = {}
        self.placeholders: set[str] = set()

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        top = module.split(".")[0]
        if top == "torch":
            raise CheckpointError(
                f"{self.source}: the pickle holds a {module}.{name} object, which the import does "
                f"not rebuild (it reads state_dict checkpoints of dense tensors); nothing from "
                f"the file was executed")
        if (top in _DENIED_MODULES or module in _DENIED_MODULES
                or name.split(".")[0] in _DENIED_NAMES or name.startswith("__")):
            raise UnsafeCheckpointError(
                f"{self.source}: refused: the pickle asks for {module}.{name}, which could run "
                f"code; a checkpoint needs only tensors and containers. Nothing from the file "
                f"was executed. Do not load this file with torch.load.")
        qualname = f"{module}.{name}"
        self.placeholders.add(qualname)
        return type(f"Inert[{qualname}]", (_Inert,), {"_inert_name": qualname, "__module__": __name__})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and re.fullmatch(r"\w+", pid[2])):
            raise CheckpointError(f"{self.source}: malformed checkpoint: unexpected persistent "
                                  f"id {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            try:
                member = self.archive.getinfo(f"{self.prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"{self.source}: malformed checkpoint: storage {key} is "
                                      f"missing from the archive") from None
            dtype = storage_type.dtype
            itemsize = torch.empty((), dtype=dtype).element_size()
            declared = numel * itemsize if isinstance(numel, int) and numel >= 0 else 0
            # Both what the pickle declares and what the zip entry says it unpacks to, before
            # a byte of it is read.
            self.budget.take_storage(key, max(declared, member.file_size))
            if (isinstance(numel, int) and storage_type.dtype != torch.uint8
                    and member.file_size != declared):
                raise CheckpointError(f"{self.source}: malformed checkpoint: storage {key} has "
                                      f"{member.file_size} bytes, expected {declared}")
            raw = bytearray(member.file_size)
            with self.archive.open(member) as f:
                got = f.readinto(raw)
            if got != member.file_size:
                raise CheckpointError(f"{self.source}: malformed checkpoint: storage {key} is "
                                      f"cut short ({got} of {member.file_size} bytes)")
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self.storages[key] = _Storage(flat, self.budget)
        return self.storages[key]


def load_official_checkpoint(path: str | os.PathLike) -> dict:
    """Read a ``torch.save`` zip checkpoint without executing anything from it.

    Returns the unpickled object (a dict for the CLIP-CAER release); tensors are real, other
    objects are inert placeholders. Raises UnsafeCheckpointError for a pickle that names
    anything able to run code, CheckpointError for anything unreadable.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"{source}: no such file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{source}: not a torch.save zip archive (PyTorch >= 1.6 format); the legacy format "
            f"is not read. Re-save it in a trusted environment with a current PyTorch.")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{source}: expected one data.pkl in the archive, found "
                                      f"{len(pickles)}")
            prefix = pickles[0][:-len("data.pkl")]
            if f"{prefix}byteorder" in archive.namelist():
                order = archive.read(f"{prefix}byteorder").decode(errors="replace").strip()
                if order != "little":
                    raise CheckpointError(f"{source}: byte order '{order}' is not supported")
            budget = _Budget(source, path.stat().st_size)
            pickle_bytes = archive.getinfo(pickles[0]).file_size
            if pickle_bytes > budget.file_bytes:
                raise CheckpointError(f"{source}: refused: its data.pkl unpacks to "
                                      f"{_size(pickle_bytes)}, more than the whole file "
                                      f"({_size(budget.file_bytes)}); torch.save does not "
                                      f"compress it, so the file is crafted or damaged")
            with archive.open(pickles[0]) as f:
                unpickler = _RestrictedUnpickler(f, archive, prefix, source, budget)
                obj = unpickler.load()
    except CaerError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, ValueError,
            AttributeError, IndexError, KeyError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{source}: unreadable checkpoint ({type(err).__name__}: "
                              f"{err})".splitlines()[0]) from None
    if unpickler.placeholders:
        log.info("checkpoint objects kept as inert placeholders: %s",
                 ", ".join(sorted(unpickler.placeholders)))
    return obj


# ---- conversion ----------------------------------------------------------------------------

def _n_layers(sd: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not found or found != set(range(max(found) + 1)):
        raise CheckpointError(f"no complete layer stack under {prefix}*")
    return max(found) + 1


def _openai_blocks_to_hf(sd: dict, src: str, dst: str, n: int) -> dict:
    out = {}
    for i in range(n):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{s}attn.in_proj_{kind}"].chunk(3, dim=0)
            out[f"{d}self_attn.q_proj.{kind}"] = q
            out[f"{d}self_attn.k_proj.{kind}"] = k
            out[f"{d}self_attn.v_proj.{kind}"] = v
            out[f"{d}self_attn.out_proj.{kind}"] = sd[f"{s}attn.out_proj.{kind}"]
            out[f"{d}layer_norm1.{kind}"] = sd[f"{s}ln_1.{kind}"]
            out[f"{d}layer_norm2.{kind}"] = sd[f"{s}ln_2.{kind}"]
            out[f"{d}mlp.fc1.{kind}"] = sd[f"{s}mlp.c_fc.{kind}"]
            out[f"{d}mlp.fc2.{kind}"] = sd[f"{s}mlp.c_proj.{kind}"]
    return out


def convert_openai_clip(sd: dict) -> "transformers.CLIPModel":  # noqa: F821
    """An OpenAI-format CLIP state dict (``visual.*``, ``transformer.*``, ``token_embedding``,
    ...) -> a transformers CLIPModel; every size is read from the tensors."""
    from transformers import CLIPConfig, CLIPModel

    v_width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    if grid * grid + 1 != sd["visual.positional_embedding"].shape[0]:
        raise CheckpointError("the image positional embedding is not a square grid plus CLS")
    vocab, t_width = sd["token_embedding.weight"].shape
    context_length = sd["positional_embedding"].shape[0]
    projection_dim = sd["text_projection"].shape[1]
    if sd["visual.proj"].shape[1] != projection_dim:
        raise CheckpointError("the image and text projections have different output sizes")
    v_layers = _n_layers(sd, "visual.transformer.resblocks.")
    t_layers = _n_layers(sd, "transformer.resblocks.")
    config = CLIPConfig(
        projection_dim=projection_dim,
        logit_scale_init_value=float(sd["logit_scale"]) if "logit_scale" in sd else 2.6592,
        text_config=dict(
            hidden_size=t_width, num_hidden_layers=t_layers,
            intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_attention_heads=max(1, t_width // 64), max_position_embeddings=context_length,
            vocab_size=vocab, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0,
            projection_dim=projection_dim),
        vision_config=dict(
            hidden_size=v_width, num_hidden_layers=v_layers,
            intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_attention_heads=max(1, v_width // 64), image_size=grid * patch, patch_size=patch,
            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=projection_dim),
    )
    hf = {
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t(),
        **_openai_blocks_to_hf(sd, "visual.transformer.resblocks.", "vision_model.encoder.layers.", v_layers),
        **_openai_blocks_to_hf(sd, "transformer.resblocks.", "text_model.encoder.layers.", t_layers),
    }
    if "logit_scale" in sd:
        hf["logit_scale"] = sd["logit_scale"].reshape(())
    model = CLIPModel(config)
    own = model.state_dict()
    wrong = [k for k, t in hf.items() if k not in own or own[k].shape != t.shape]
    if wrong:
        raise CheckpointError(f"CLIP conversion produced unexpected tensors: {', '.join(wrong[:3])}")
    hf = {k: t.detach().to(torch.float32).contiguous().clone() for k, t in hf.items()}
    missing, _ = model.load_state_dict(hf, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise CheckpointError(f"the checkpoint's CLIP lacks {', '.join(missing[:3])}")
    return model.eval()


def clip_state_dict(state_dict: dict) -> dict:
    """The OpenAI-format CLIP inside a CLIP-CAER state_dict, taking the parts the original's
    forward used (``image_encoder.*``, ``text_encoder.*``) and the rest from ``clip_model_.*``."""
    sd = {k[len("clip_model_."):]: v for k, v in state_dict.items() if k.startswith("clip_model_.")}
    for k, v in state_dict.items():
        if k.startswith("image_encoder."):
            sd["visual." + k[len("image_encoder."):]] = v
        elif k.startswith("text_encoder."):
            sd[k[len("text_encoder."):]] = v
    if "token_embedding.weight" not in sd or "visual.conv1.weight" not in sd:
        raise CheckpointError("the state_dict holds no OpenAI-format CLIP (clip_model_.*); is this "
                              "a CLIP-CAER checkpoint?")
    return sd


def _temporal(state_dict: dict, src: str, dst: str) -> dict:
    out = {f"{dst}.cls_token": state_dict[f"{src}.cls_token"],
           f"{dst}.pos_embedding": state_dict[f"{src}.pos_embedding"]}
    for i in range(_n_layers(state_dict, f"{src}.temporal_transformer.layers.")):
        s, d = f"{src}.temporal_transformer.layers.{i}.", f"{dst}.layers.{i}."
        if f"{s}0.fn.fn.to_out.0.weight" not in state_dict:
            raise CheckpointError(f"{s}0: an attention without an output projection "
                                  f"(heads x dim_head == dim) is not supported")
        pairs = {"attn_norm": "0.fn.norm", "attn_out": "0.fn.fn.to_out.0", "mlp_norm": "1.fn.norm",
                 "mlp.0": "1.fn.fn.net.0", "mlp.3": "1.fn.fn.net.3"}
        for ours, theirs in pairs.items():
            for kind in ("weight", "bias"):
                out[f"{d}{ours}.{kind}"] = state_dict[f"{s}{theirs}.{kind}"]
        out[f"{d}qkv.weight"] = state_dict[f"{s}0.fn.fn.to_qkv.weight"]
    return out


def prompt_token_ids_from_checkpoint(prefix: torch.Tensor, suffix: torch.Tensor,
                                     token_embedding: torch.Tensor, n_ctx: int,
                                     placeholder_id: int = 343) -> tuple[torch.Tensor, bool]:
    """Each prompt's token ids, recovered from its frozen token embeddings.

    Returns ``(ids [C, 1 + n_ctx + S], exact)``. When every embedding equals a row of the CLIP's
    token embedding (a real release: the token embedding is frozen in training), the ids are
    exact. Otherwise (the token embedding changed after the prompts were embedded, as in the
    perturbed reference checkpoint) the end of text is found from the prompts' structure: the
    padding after EOT is one repeated vector at the end of every prompt, and the EOT vector
    is the same in every prompt; the other ids are then the nearest rows (informational only:
    the run encodes the stored embeddings, and only the EOT position is used).
    """
    vocab = token_embedding.shape[0]
    if vocab < 3:
        raise CheckpointError(f"a token embedding of {vocab} rows cannot hold the start, end and "
                              f"placeholder tokens")
    sot, eot = vocab - 2, vocab - 1
    # The context placeholder's id is never looked up (the learned context replaces it), but
    # it must index the vocabulary: CLIP's "X" (343) does not exist in a small one.
    placeholder_id = min(placeholder_id, vocab - 3)
    n_cls, length, width = suffix.shape
    distances = torch.cdist(suffix.reshape(-1, width).double(), token_embedding.double())
    nearest = distances.argmin(dim=1).reshape(n_cls, length)
    exact = bool((token_embedding[nearest] == suffix).all())
    if exact:
        ids = nearest
        has_eot = (ids == eot).any(dim=1)
        if not bool(has_eot.all()):
            raise CheckpointError("a prompt of the checkpoint has no end-of-text token")
        eot_pos = (ids == eot).int().argmax(dim=1)
    else:
        # Padding: the vector ending the most-padded prompt, stripped from every prompt's end.
        def trailing_run(rows):
            n = 1
            while n < len(rows) and torch.equal(rows[-n - 1], rows[-1]):
                n += 1
            return n
        runs = [trailing_run(suffix[i]) for i in range(n_cls)]
        pad_vector = suffix[max(range(n_cls), key=lambda i: runs[i]), -1]
        eot_pos = []
        for i in range(n_cls):
            p = length - 1
            while p >= 0 and torch.equal(suffix[i, p], pad_vector):
                p -= 1
            eot_pos.append(p)
        eot_pos = torch.tensor(eot_pos)
        eot_vectors = suffix[torch.arange(n_cls), eot_pos.clamp(min=0)]
        if bool((eot_pos < 0).any()) or not all(torch.equal(e, eot_vectors[0]) for e in eot_vectors):
            raise CheckpointError("cannot locate the end-of-text token of every prompt in the "
                                  "checkpoint's prompt embeddings")
        # Nearest rows, never the special tokens, for the positions before EOT.
        distances[:, [sot, eot]] = float("inf")
        ids = distances.argmin(dim=1).reshape(n_cls, length)
        for i in range(n_cls):
            ids[i, eot_pos[i]] = eot
            ids[i, eot_pos[i] + 1:] = 0  # the original tokenizer's padding id
    head = torch.tensor([[sot] + [placeholder_id] * n_ctx] * n_cls)
    return torch.cat([head, ids], dim=1), exact


def import_official(cfg: "ImportOfficialConfig") -> Path:  # noqa: F821 - heads.config
    """Convert a CLIP-CAER release checkpoint into a caer-kit run at ``cfg.out``."""
    from heads.model import CaerModel, HeadConfig
    from heads.run import save_run
    from pipeline.clip import LoadedClip, weights_digest
    from pipeline.tokenizer import VOCAB_SIZE, clip_tokenizer
    from cache.core.labels import load_label_set

    cfg.validate()
    checkpoint, out, labels, force = Path(cfg.checkpoint), Path(cfg.out), cfg.labels, cfg.force
    refuse_symlink(out, "--out")  # --force replaces a run, never what a link points to
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise CaerError(f"--out {out} exists and is not empty; choose another directory or "
                            f"pass --force to replace it")
        if not (out / "config.json").is_file():  # --force never deletes what is not a run
            raise CaerError(f"--out {out} is not a caer-kit run directory; --force replaces "
                            f"only a previous run")
    label_set = load_label_set(labels)
    obj = load_official_checkpoint(checkpoint)
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{checkpoint}: no state_dict of tensors inside")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DataParallel
    try:
        clip_model = convert_openai_clip(clip_state_dict(state_dict))
        ctx = state_dict["prompt_learner.ctx"]
        prefix = state_dict["prompt_learner.token_prefix"]
        suffix = state_dict["prompt_learner.token_suffix"]
        face = _temporal(state_dict, "temporal_net", "face_temporal")
        context = _temporal(state_dict, "temporal_net_body", "context_temporal")
        fusion_w, fusion_b = state_dict["project_fc.weight"], state_dict["project_fc.bias"]
    except KeyError as err:
        raise CheckpointError(f"{checkpoint}: not a CLIP-CAER checkpoint: {err} is missing") from None

    n_cls = prefix.shape[0]
    if ctx.dim() == 2:  # a generic context shared by all classes, as in CoOp's default
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
    n_ctx, width = ctx.shape[1:]
    if len(label_set) != n_cls:
        raise CaerError(f"--labels {labels} has {len(label_set)} classes but the checkpoint has "
                        f"{n_cls} prompts; pass the label set it was trained with")
    token_embedding = clip_model.text_model.embeddings.token_embedding.weight.detach()
    token_ids, exact = prompt_token_ids_from_checkpoint(prefix, suffix, token_embedding, n_ctx)
    if token_ids.shape[1] != clip_model.config.text_config.max_position_embeddings:
        raise CheckpointError("the prompts' length differs from the CLIP's context length")

    qkv = face["face_temporal.layers.0.qkv.weight"]
    dim = qkv.shape[1]
    config = HeadConfig(
        feature_dim=dim, n_ctx=n_ctx,
        temporal_layers=_n_layers(face, "face_temporal.layers."),
        # The original hard-codes 8 heads of 64; only their product is in the weights.
        temporal_heads=max(1, qkv.shape[0] // 3 // 64), temporal_dim_head=min(64, qkv.shape[0] // 3),
        temporal_mlp_dim=face["face_temporal.layers.0.mlp.0.weight"].shape[0],
        dropout=0.1, segments=face["face_temporal.pos_embedding"].shape[1] - 1, streams="both",
        logit_scale=100.0)
    if token_embedding.shape[0] != VOCAB_SIZE:
        raise CheckpointError(f"{checkpoint}: a text vocabulary of {token_embedding.shape[0]} "
                              f"tokens; CLIP's BPE tokenizer has {VOCAB_SIZE}")
    tokenizer = clip_tokenizer(token_ids.shape[1])
    digest = weights_digest(clip_model)
    clip = LoadedClip(clip_model, tokenizer, f"import-official:{checkpoint.name}", digest)
    model = CaerModel(config, clip, label_set, normalize="none", prompt_token_ids=token_ids)
    token_embeddings = torch.cat([prefix, torch.zeros(n_cls, n_ctx, width), suffix], dim=1)
    head = {**face, **context, "fusion.weight": fusion_w, "fusion.bias": fusion_b,
            "prompt_learner.ctx": ctx, "prompt_learner.token_embeddings": token_embeddings}
    own = model.state_dict()
    wrong = [k for k, v in head.items() if own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{checkpoint}: unexpected shapes for {', '.join(wrong[:3])}")
    model.load_state_dict({k: v.float() for k, v in head.items()}, strict=False)

    sha = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    extra = {"source": {"checkpoint": checkpoint.name, "sha256": sha.hexdigest(),
                        "epoch": obj.get("epoch"), "best_acc": _plain(obj.get("best_acc"))},
             "prompt_token_ids_exact": exact}
    if out.exists() and force:
        refuse_symlink(out, "--out")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    save_run(out, model, kind="import-official", train_options={}, cache_fingerprint=None,
             extra=extra, save_clip=True,
             preprocessing={**PRESETS["original"], "face_resize": "squash", "face_margin": 20})
    return out


def _plain(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value if isinstance(value, (int, float, str, type(None))) else str(value)
