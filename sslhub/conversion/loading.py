"""Reading checkpoint files without executing code: safetensors, or ``torch.load(weights_only=True)`` with an
allow-list of the harmless types the official training checkpoints contain, and for files that pickle the authors'
own classes (InstDisc's ``lib.NCEAverage.NCEAverage``) inert stand-ins for those classes, registered by name."""

from __future__ import annotations

import _compat_pickle
import argparse
import importlib.util
import json
import os
import pickle
import pickletools
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

# Classes and functions a foreign checkpoint may name beyond torch's weights-only allow-list, by the name its pickle
# uses: DINO's and MAE's full checkpoints store their argparse arguments (``{'args': Namespace(...)}``); mmengine
# checkpoints (MMSelfSup) keep numpy arrays in their message hub (``HistoryBuffer``), rebuilt by numpy's own
# reconstruction functions under the names numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) pickle them with.
_NUMPY_RECONSTRUCT, _NUMPY_SCALAR = np.zeros(1).__reduce__()[0], np.float64(0).__reduce__()[0]
SAFE_GLOBALS: dict[str, object] = {
    "argparse.Namespace": argparse.Namespace,
    **{f"numpy.{core}.multiarray._reconstruct": _NUMPY_RECONSTRUCT for core in ("core", "_core")},
    **{f"numpy.{core}.multiarray.scalar": _NUMPY_SCALAR for core in ("core", "_core")},
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    # numpy 2's concrete dtype classes (``numpy.dtypes.Float64DType``...), which torch's reader checks; no object arrays
    **{f"numpy.dtypes.{name}": getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")},
}
del SAFE_GLOBALS["numpy.dtypes.ObjectDType"]
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the file and what is wrong."""


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state`` holding NaN or inf: weights no training produces that
    sslhub would otherwise load, convert or train from without a word."""
    return [
        key
        for key, value in state.items()
        if value.is_floating_point() and not value.is_meta and not torch.isfinite(value).all()
    ]


def _refusal_reason(err: Exception) -> str:
    """What torch's weights-only reader refused (``Unsupported global: GLOBAL os.system ...``), without its advice
    (rerunning with ``weights_only=False`` or allow-listing the global), which would run the file's code."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and "weights_only" not in line]
    line = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else type(err).__name__)
    return line.split(" Please use", 1)[0][:300]


def allowed_globals() -> dict[str, object]:
    """Every global a checkpoint may name, by full name: torch's weights-only allow-list and ``SAFE_GLOBALS``."""
    return {**torch._weights_only_unpickler._get_allowed_globals(), **SAFE_GLOBALS}


def _weights_only_globals(extra: dict[str, object] | None = None):
    """``torch.serialization.safe_globals`` for ``SAFE_GLOBALS`` and ``extra`` (stand-ins), under their names."""
    return torch.serialization.safe_globals([(item, name) for name, item in {**SAFE_GLOBALS, **(extra or {})}.items()])


def load_file_state(path: str | os.PathLike) -> dict:
    """The object stored in a checkpoint file: a ``.safetensors`` file, or a PyTorch file read with
    ``torch.load(weights_only=True)`` (only tensors, containers, numbers, strings and ``SAFE_GLOBALS``:
    ``argparse.Namespace``, numpy arrays). A file that stores objects of classes absent here (the authors' own, e.g. a
    pickled ``lib.NCEAverage``) gets inert :class:`StandIn` objects in their place; a file that names any real
    function or class beyond that allow-list (``os.system``, ``builtins.eval``...) is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        with _weights_only_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unknown = _unknown_classes(path)  # refuses a file that names real code
        if unknown:
            return load_with_stand_ins(path, unknown)
        if "unsupported global" not in str(err).lower():  # a corrupt pickle stream, not a refused type
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_refusal_reason(err)})") from err
        raise CheckpointError(
            f"{path}: refused to load: the file needs code beyond weights ({_refusal_reason(err)}); sslhub never "
            "unpickles arbitrary objects: re-save the state dict with torch.save(model.state_dict(), ...) or as "
            "safetensors"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err


class StandIn:
    """An inert object in place of a class the file names but sslhub does not have (the authors' own code): it
    only keeps the pickled state (for a pickled ``nn.Module``: ``__dict__`` with ``_buffers``, ``_parameters``...)."""

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.stands_for}>"


def _pickled_globals(stream) -> set[tuple[str, str]]:
    """The ``(module, name)`` pairs one pickle in ``stream`` names with GLOBAL / STACK_GLOBAL / INST (read, not
    run)."""
    found, strings, memo, previous = set(), [], {}, None  # previous: the string the last opcode pushed
    for opcode, arg, _ in pickletools.genops(stream):
        pushed = None
        if opcode.name in ("GLOBAL", "INST"):  # INST: protocol 0's "import module.name and call it"
            found.add(tuple(arg.split(" ", 1)))
        elif opcode.name == "STACK_GLOBAL":
            if len(strings) < 2:
                raise pickle.UnpicklingError("STACK_GLOBAL without a module and a name")
            found.add((strings[-2], strings[-1]))
        elif "UNICODE" in opcode.name or "STRING" in opcode.name:
            pushed = arg if isinstance(arg, str) else arg.decode("latin-1")
        elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            memo[len(memo) if arg is None else arg] = previous
            continue  # the memoised value stays the last one pushed
        elif opcode.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed = memo.get(arg)
        if pushed is not None:
            strings.append(pushed)
        previous = pushed
    return {_python3_name(module, name) for module, name in found}


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Python 2's names of a pickle of protocol < 3 (``__builtin__.set``) as Python 3 names them, as unpicklers do."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def checkpoint_globals(path: Path) -> set[tuple[str, str]]:
    """Every global a PyTorch file names: ``<archive>/data.pkl`` of the zip format, or the pickles of the legacy
    format (magic number, protocol, system info, the object; then raw storage bytes, not read). A file that is not
    such a pickle raises a ``CheckpointError`` naming it."""
    try:
        return _globals_in(path)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, ValueError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err


def _globals_in(path: Path) -> set[tuple[str, str]]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                raise CheckpointError(f"{path}: a zip file without data.pkl: not a PyTorch checkpoint")
            with archive.open(name) as stream:
                return _pickled_globals(stream)
    found = set()
    with open(path, "rb") as stream:
        for _ in range(4):
            found |= _pickled_globals(stream)
    return found


def _is_available(module: str, name: str) -> bool:
    """Whether ``module.name`` is real code here (the standard library, torch, an installed package), found without
    importing anything but torch's own sub-packages."""
    root = module.split(".", 1)[0]
    if root in sys.stdlib_module_names:
        return True
    if module in sys.modules:
        return hasattr(sys.modules[module], name)
    if root == "torch":
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False
    return importlib.util.find_spec(root) is not None


def _unknown_classes(path: Path) -> list[str]:
    """The globals of ``path`` beyond torch's weights-only allow-list, if all of them name modules that do not
    exist here (classes the file merely stores); a file that names any real function or class is refused."""
    allowed = allowed_globals()
    names = checkpoint_globals(path)
    unknown = sorted(f"{module}.{name}" for module, name in names if f"{module}.{name}" not in allowed)
    real = [full for full in unknown if _is_available(*full.rsplit(".", 1))]
    if real:
        raise CheckpointError(
            f"{path}: refused to load: the pickle calls code ({', '.join(real[:10])}), which sslhub never runs; "
            "only tensors, containers and stored objects of classes absent here are read"
        )
    return unknown


def _stand_ins(names: list[str]) -> dict[str, type]:
    """A fresh :class:`StandIn` subclass for each name."""
    return {name: type(name.rsplit(".", 1)[-1], (StandIn,), {"stands_for": name}) for name in names}


def load_with_stand_ins(path: Path, names: list[str]):
    """The object in ``path`` with stand-ins for the classes ``names``: the zip format through
    ``torch.load(weights_only=True)`` with the stand-ins registered by name; the legacy format through
    :class:`_LegacyReader` (torch's weights-only reader refuses the legacy format's pickled ``nn.Module`` classes,
    stored as persistent ids with their source code)."""
    stand_ins = _stand_ins(names)
    try:
        if zipfile.is_zipfile(path):
            with _weights_only_globals(stand_ins):
                return torch.load(path, map_location="cpu", weights_only=True)
        with open(path, "rb") as stream:
            return _LegacyReader(stream, stand_ins).read()
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: refused to load with stand-ins for {', '.join(names)} ({_refusal_reason(err)})"
        ) from err


class _PlainValues(pickle.Unpickler):
    """Numbers, strings and containers: every global refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed here")


class _LegacyReader(pickle.Unpickler):
    """The legacy (pre-1.6, non-zip) ``torch.save`` format: pickles of the magic number, the protocol version, the
    system info and the object, whose storages are persistent ids ``('storage', type, key, location, numel,
    view)`` and whose ``nn.Module`` classes are ``('module', class, file, source)``; then a pickle of the storage
    keys, followed by each storage as an int64 element count and its raw bytes. Globals resolve only to torch's
    weights-only allow-list (tensor rebuild functions, storage types, ``OrderedDict``...), ``SAFE_GLOBALS`` and the
    stand-ins; the module source recorded in the file is ignored."""

    def __init__(self, stream, stand_ins: dict[str, type]):
        super().__init__(stream, encoding="utf-8")
        self.stream = stream
        self.allowed = {**allowed_globals(), **stand_ins}
        self.storages: dict[str, torch.TypedStorage] = {}

    def find_class(self, module: str, name: str):
        full = ".".join(_python3_name(module, name))
        if full not in self.allowed:
            raise pickle.UnpicklingError(f"global {full} is not allowed")
        return self.allowed[full]

    def persistent_load(self, pid):
        if pid[0] == "module":
            return pid[1]
        if pid[0] != "storage" or len(pid) != 6:
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:100]}")
        storage_type, key, _, numel, view = pid[1:]
        dtype = storage_type.dtype
        if key not in self.storages:
            nbytes = numel * torch._utils._element_size(dtype)
            self.storages[key] = torch.TypedStorage(wrap_storage=torch.UntypedStorage(nbytes), dtype=dtype,
                                                    _internal=True)  # fmt: skip
        if view is None:
            return self.storages[key]
        view_key, offset, size = view
        if view_key not in self.storages:
            element = torch._utils._element_size(dtype)
            data = self.storages[key]._untyped_storage[offset * element : (offset + size) * element]
            self.storages[view_key] = torch.TypedStorage(wrap_storage=data, dtype=dtype, _internal=True)
        return self.storages[view_key]

    def _plain(self):
        """The next pickle of the stream, of plain values only (the header, the storage keys)."""
        return _PlainValues(self.stream, encoding="utf-8").load()

    def read(self):
        if self._plain() != torch.serialization.MAGIC_NUMBER:
            raise pickle.UnpicklingError("not a legacy PyTorch file (wrong magic number)")
        protocol, info = self._plain(), self._plain()
        if protocol != torch.serialization.PROTOCOL_VERSION or not info.get("little_endian", False):
            raise pickle.UnpicklingError(f"unsupported legacy file: protocol {protocol}, system {info}")
        result = self.load()
        for key in self._plain():
            storage = self.storages[key]
            element = torch._utils._element_size(storage.dtype)
            expected = storage._untyped_storage.nbytes() // element
            numel = int.from_bytes(self.stream.read(8), "little")
            data = self.stream.read(numel * element)
            if numel != expected or len(data) != numel * element:
                raise pickle.UnpicklingError(f"storage {key}: {len(data)} bytes, expected {expected} elements")
            storage._untyped_storage.copy_(torch.UntypedStorage.from_buffer(data, dtype=torch.uint8))
        return result


def load_hf_directory(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A Hugging Face model directory (``config.json`` + ``model.safetensors`` [sharded] or ``pytorch_model.bin``):
    ``(state_dict, config as a dict)``."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: a model directory needs a config.json")
    config = json.loads(config_file.read_text())
    weights = next((path / name for name in HF_WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: no weights file; expected one of {list(HF_WEIGHT_FILES)}")
    if weights.name.endswith(".index.json"):
        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file_state(path / shard))
        return state, config
    return load_file_state(weights), config
