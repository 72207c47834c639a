"""Pick the TFLite runtime and open interpreters on a model file.

``auto`` prefers LiteRT (``ai_edge_litert``, the maintained successor) and falls back to
``tflite_runtime`` 2.14 (Raspberry Pi OS Bookworm's Python 3.11). Both are imported lazily
here and nowhere else, so the rest of ``device`` imports in milliseconds.
"""

from __future__ import annotations

import importlib
import os
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from device.detect.flatbuffer import FlatbufferError, check_flatbuffer
from device.errors import ModelError

RuntimeName = Literal["auto", "ai_edge_litert", "tflite_runtime"]
RUNTIMES: tuple[str, ...] = ("ai_edge_litert", "tflite_runtime")
_DISTRIBUTIONS = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}
TFLITE_MAGIC = b"TFL3"


def _interpreter_module(runtime: str) -> Any:
    return importlib.import_module(f"{runtime}.interpreter")


def resolve_runtime(runtime: str = "auto") -> str:
    """Return the runtime module name to use; raise ``ModelError`` if none is installed.

    ``auto`` honours ``DOORSTEP_RUNTIME`` when set (to pin a runtime without editing configs).
    """
    if runtime not in ("auto", *RUNTIMES):
        raise ModelError(f"unknown runtime {runtime!r}: choose auto, {', '.join(RUNTIMES)}")
    pinned = os.environ.get("DOORSTEP_RUNTIME", "")
    if runtime == "auto" and pinned:
        if pinned not in RUNTIMES:
            raise ModelError(f"DOORSTEP_RUNTIME={pinned!r}: choose one of {', '.join(RUNTIMES)}")
        runtime = pinned
    candidates = RUNTIMES if runtime == "auto" else (runtime,)
    for name in candidates:
        try:
            _interpreter_module(name)
        except ImportError:
            continue
        return name
    wanted = " or ".join(_DISTRIBUTIONS[c] for c in candidates)
    raise ModelError(f"no TFLite runtime installed: pip install {wanted} (or doorstep[device])")


def runtime_version(runtime: str) -> str:
    """The installed version of a runtime's distribution, e.g. ``tflite-runtime 2.14.0``."""
    dist = _DISTRIBUTIONS[runtime]
    try:
        return f"{dist} {metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return f"{dist} (version unknown)"


def first_line(exc: BaseException) -> str:
    """The first line of what a runtime raised (TFLite's messages run on with node details)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_tflite_file(path: Path) -> None:
    """Refuse a missing, empty, or non-TFLite file before a runtime sees it."""
    if not path.exists():
        raise ModelError(f"{path}: model file not found")
    if not path.is_file():
        raise ModelError(f"{path}: is not a file (a bundle directory needs a manifest.json)")
    data = path.read_bytes()
    head = data[:8]
    if len(head) < 8:
        raise ModelError(f"{path}: file is {len(head)} bytes long: not a TFLite model (truncated?)")
    if head[4:8] != TFLITE_MAGIC:
        raise ModelError(
            f"{path}: not a TFLite model (no 'TFL3' identifier at byte 4; starts with {head[:8]!r})"
        )
    try:
        check_flatbuffer(data)
    except FlatbufferError as exc:
        raise ModelError(f"{path}: corrupt or truncated TFLite model: {exc}") from None


def open_interpreter(
    path: str | Path,
    runtime: str = "auto",
    num_threads: int | None = None,
    *,
    inspect: bool = False,
    preserve_all_tensors: bool = False,
) -> tuple[Any, str]:
    """Open ``path`` and allocate its tensors; return ``(interpreter, runtime_name)``.

    ``inspect`` disables the default delegates (XNNPACK), so that the op list shows the
    model's own ops rather than delegate nodes. ``num_threads`` ``None`` means all cores.
    """
    path = Path(path)
    check_tflite_file(path)
    name = resolve_runtime(runtime)
    module = _interpreter_module(name)
    kwargs: dict[str, Any] = {
        "model_path": str(path),
        "num_threads": num_threads or os.cpu_count() or 1,
    }
    if inspect:
        kwargs["experimental_op_resolver_type"] = (
            module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    if preserve_all_tensors:
        kwargs["experimental_preserve_all_tensors"] = True
    try:
        with warnings.catch_warnings():
            # LiteRT warns that preserving all tensors costs memory: asked for on purpose.
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
            interpreter = module.Interpreter(**kwargs)
        interpreter.allocate_tensors()
        # Read what the callers will, here, so that a name the runtime cannot decode or a
        # table it cannot read fails now, as this one error, rather than later as a traceback.
        interpreter.get_input_details()
        interpreter.get_output_details()
        interpreter.get_signature_list()
        if inspect:
            interpreter.get_tensor_details()
            interpreter._get_ops_details()
    except (ValueError, RuntimeError, MemoryError, OverflowError, IndexError) as exc:
        # ValueError includes UnicodeDecodeError; MemoryError is a C++ std::bad_alloc.
        first = first_line(exc)
        raise ModelError(
            f"{path}: {name} cannot load this model (truncated, corrupt, or an op this "
            f"runtime lacks): {first}"
        ) from None
    return interpreter, name


MADV_DONTNEED = 4  # Linux <sys/mman.h>


def release_model_pages(path: str | Path) -> int:
    """Give back the resident pages of ``path``'s read-only mappings; bytes released.

    The interpreter maps the .tflite file and reads its weights once, when XNNPACK packs them
    into its own buffers; from then on the file's pages are resident but untouched (3.3 MB of
    the default model's 3.4). ``madvise(MADV_DONTNEED)`` drops them from this process; a read
    of the file later (an op that XNNPACK did not take) faults them in again from the page
    cache, so this changes memory use only, never results. Linux only; elsewhere, or if
    anything is off, nothing happens."""
    try:
        import ctypes

        target = os.path.realpath(path)
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        released = 0
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[5].rstrip("\n") != target or "w" in fields[1]:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if madvise(start, end - start, MADV_DONTNEED) == 0:
                    released += end - start
        return released
    except (OSError, ValueError, AttributeError):
        return 0
