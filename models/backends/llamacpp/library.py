"""llama-cpp-python in this process: imported, its log routed, its CPU backend loaded once.

ggml may be built with its CPU backend as loadable modules, one per instruction-set level
(``GGML_BACKEND_DL`` and ``GGML_CPU_ALL_VARIANTS``, as ``scripts/build-llama-cpp.sh``
builds it on x86-64). :func:`init_llama` loads the best of them for the running CPU from
the directory of llama-cpp-python's ``libggml`` and from nowhere else: ggml's own default
search also looks in the Python executable's directory and the working directory, where
any file named like a backend would be loaded. A build with one built-in CPU backend needs
no modules and is used as it is.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Any

from models.backends.base import GenerationError

__all__ = ["cpu_features", "import_llama_cpp", "init_llama", "meta_str"]

log = logging.getLogger(__name__)

_GGML_DEVICE_CPU = 0  # enum ggml_backend_dev_type: GGML_BACKEND_DEVICE_TYPE_CPU
_LOG_CALLBACK: Any = None  # keeps the ctypes callback alive for the process
_CPU_FEATURES: list[str] = []
_READY = False
_INIT_LOCK = threading.Lock()


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module.

    Raises
    ------
    GenerationError
        llama-cpp-python is not installed.
    """
    try:
        import llama_cpp
    except ImportError as exc:
        raise GenerationError(
            "llama-cpp-python is not installed: pip install 'llm-cxr-node[llamacpp]'"
        ) from exc
    return llama_cpp


def init_llama(llama_cpp: Any) -> list[str]:
    """Initialise llama.cpp once per process and return the CPU features in use.

    Routes llama.cpp's log to Python logging (warnings and errors), loads ggml's backends
    from the directory of ``libggml`` only (see the module's docstring), then calls
    ``llama_backend_init``, which loads nothing more once a backend is registered. Later
    calls return the same features.

    Parameters
    ----------
    llama_cpp
        The ``llama_cpp`` module (:func:`import_llama_cpp`).

    Returns
    -------
    list of str
        :func:`cpu_features` of the loaded CPU backend, e.g. ``["SSE3", ..., "AVX2"]``.

    Raises
    ------
    GenerationError
        No CPU backend could be loaded (e.g. its modules are not beside ``libggml``).
    """
    global _LOG_CALLBACK, _READY
    with _INIT_LOCK:
        if _READY:
            return list(_CPU_FEATURES)

        def _log(level: int, text: bytes | None, _user: Any) -> None:
            # ggml levels: 3 = warn (to debug), 4 = error (to warning); the rest is dropped
            if text and level in (3, 4):
                msg = text.decode("utf-8", "replace").rstrip()
                log.log(logging.WARNING if level == 4 else logging.DEBUG, "llama.cpp: %s", msg)

        _LOG_CALLBACK = llama_cpp.llama_log_callback(_log)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        lib_dir = _load_backends(llama_cpp)
        llama_cpp.llama_backend_init()
        features = cpu_features(llama_cpp.llama_print_system_info())
        if not features:
            raise _no_cpu_backend(llama_cpp, lib_dir)
        _CPU_FEATURES[:] = features
        _READY = True
        return list(features)


def _load_backends(llama_cpp: Any) -> Path:
    """Load ggml's backend modules from the directory of ``libggml`` unless a backend is
    registered already (a build with a built-in CPU backend, or an earlier load); return
    that directory.

    The ggml functions are looked up through llama-cpp-python's handle on ``libllama``
    (``dlsym`` searches a library's dependencies), so that they are those of the very
    ``libggml`` that ``libllama`` uses: a wheel holds ``libggml.so`` and ``libggml.so.0`` as
    two files, and loading the first by name would give a second ggml with its own
    registry.
    """
    lib_dir = Path(
        getattr(llama_cpp.llama_cpp, "_base_path", None) or Path(llama_cpp.__file__).parent / "lib"
    )
    ggml = llama_cpp.llama_cpp._lib
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_count.argtypes = []
    if ggml.ggml_backend_reg_count() == 0:
        ggml.ggml_backend_load_all_from_path.restype = None
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(str(lib_dir).encode("utf-8"))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    if not ggml.ggml_backend_dev_by_type(_GGML_DEVICE_CPU):
        # llama_backend_init would now search the executable's and the working directory
        raise _no_cpu_backend(llama_cpp, lib_dir)
    return lib_dir


def _no_cpu_backend(llama_cpp: Any, lib_dir: Path) -> GenerationError:
    return GenerationError(
        f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} loaded no CPU backend "
        f"from {lib_dir}; rebuild it with scripts/build-llama-cpp.sh"
    )


def cpu_features(system_info: bytes | str) -> list[str]:
    """The features of ggml's CPU backend, from ``llama_print_system_info()``.

    They name the instruction sets of the CPU backend in use, e.g. ``AVX2`` or ``AVX512``,
    ``AVX512_VNNI`` and ``AVX512_BF16``.

    Parameters
    ----------
    system_info
        The text, e.g. ``"CPU : SSE3 = 1 | AVX2 = 1 | LLAMAFILE = 1 | "``.

    Returns
    -------
    list of str
        The names set to 1 in the ``CPU`` section, in order; empty when there is none.
    """
    text = system_info.decode("utf-8", "replace") if isinstance(system_info, bytes) else system_info
    _, sep, rest = text.partition("CPU :")
    if not sep:
        return []
    feats: list[str] = []
    for item in rest.split("|"):
        name, eq, value = item.partition("=")
        if not eq or ":" in name:
            break  # the end, or the next backend's "NAME : FEATURE = ..." section
        if value.strip() == "1":
            feats.append(name.strip())
    return feats


def meta_str(llama_cpp: Any, model: Any, key: str) -> str | None:
    """A GGUF key/value of a loaded model as text (``None`` if absent)."""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode("utf-8"), buf, 256)
    return None if n < 0 else buf.value.decode("utf-8", "replace")
