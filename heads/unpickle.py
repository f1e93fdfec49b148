"""Reading an untrusted ``torch.save`` checkpoint without executing anything from it.

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
"""

from __future__ import annotations

import collections
import logging
import math
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from cache.core.errors import CaerError

log = logging.getLogger("caer")


class UnsafeCheckpointError(CaerError):
    """The pickle names something that can execute code; nothing was run."""


class CheckpointError(CaerError):
    pass



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
