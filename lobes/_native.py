"""Optional native CPU kernels, compiled on first use with the system's C compiler and cached.

The kernels (``lobes/csrc/<name>.c``) are plain C loaded with :mod:`ctypes`: no Python or torch headers, so a
compile takes well under a second. The shared library is built for the machine it runs on
(``-march=native``) and cached under ``$LOBES_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lobes`` or
``~/.cache/lobes``), keyed by the source, the compiler, the flags and the CPU. Without a working compiler,
or with ``LOBES_NATIVE=0``, :func:`library` returns ``None`` and callers use their pure-torch path.

Kernels share their work between OpenMP threads. They are linked with ``-fopenmp``, whose ``libgomp.so.1`` is
the one torch has already loaded in the process (the loader reuses a library of the same name), so the kernels
run on torch's own thread pool, with ``torch.get_num_threads()`` threads passed by the caller, and never
compete with idle torch threads still spinning for work. Where ``-fopenmp`` does not build, they run on the
calling thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

__all__ = ["cache_dir", "library", "native_status"]

_LOG = logging.getLogger(__name__)
_CSRC = Path(__file__).with_name("csrc")
# no errno and no floating-point exception state to preserve, so the vectorizer is free; no -ffast-math: NaN and
# infinity keep their meaning and sums are not reordered beyond the kernels' own `omp simd` reductions
_BASE_FLAGS = [
    "-O3",
    "-std=gnu11",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-Werror=implicit-function-declaration",
]
# the first set that compiles: -march=native is unknown to some compilers and targets, -fopenmp needs libgomp
_VARIANTS = [
    threads + arch
    for threads in (["-fopenmp"], ["-fopenmp-simd"])
    for arch in (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], [])
]
_P, _L = ctypes.c_void_p, ctypes.c_long
# per kernel: its ABI version (lobes_<name>_abi() must return it) and its functions' (restype, argtypes)
_KERNELS: dict[str, tuple[int, dict[str, tuple]]] = {
    "causal_mixing": (
        1,
        {
            "lobes_causal_mixing_forward": (ctypes.c_int, [_L] * 6 + [_P] * 5),
            "lobes_causal_mixing_backward": (ctypes.c_int, [_L] * 7 + [_P] * 9),
        },
    ),
}

_lock = threading.Lock()
_loaded: dict[str, tuple[Optional[ctypes.CDLL], str]] = {}


def cache_dir() -> Path:
    """Folder of the compiled kernels: ``$LOBES_CACHE_DIR``, else ``$XDG_CACHE_HOME/lobes`` or
    ``~/.cache/lobes``."""
    explicit = os.environ.get("LOBES_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lobes"


def _cpu_signature() -> str:
    """The CPU's model and feature flags (a library built with -march=native is only valid there)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            lines = []
            for line in fh:
                if not line.strip():
                    break  # the first processor describes them all
                key = line.split(":", 1)[0].strip()
                if key in ("vendor_id", "model name", "flags", "Features", "CPU implementer", "CPU part"):
                    lines.append(line.strip())
            if lines:
                return "\n".join(lines)
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _private_folder(folder: Path) -> Optional[str]:
    """Create ``folder`` (mode 0700) if needed; return why it must not hold libraries we load, or ``None``.
    A folder that another user owns or may write to could hand us someone else's code."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.stat()
    except OSError as exc:
        return f"{folder}: {exc}"
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        return f"{folder}: owned by another user or writable by others"
    return None


def _load(path: Path, name: str) -> ctypes.CDLL:
    abi, functions = _KERNELS[name]
    lib = ctypes.CDLL(str(path))
    version = getattr(lib, f"lobes_{name}_abi")
    version.restype = ctypes.c_int
    if version() != abi:
        raise OSError(f"ABI version {version()}, expected {abi}")
    for function, (restype, argtypes) in functions.items():
        entry = getattr(lib, function)
        entry.restype, entry.argtypes = restype, argtypes
    return lib


def _build(name: str) -> tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get("LOBES_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by LOBES_NATIVE=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    try:
        version = _run([cc, "--version"])
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"C compiler {cc!r} does not run: {exc}"
    if version.returncode != 0:
        return None, f"C compiler {cc!r} does not run: {version.stderr.strip()[:200]}"
    source = _CSRC / f"{name}.c"
    code = source.read_bytes()
    user = os.getuid() if hasattr(os, "getuid") else 0
    folders = (cache_dir(), Path(tempfile.gettempdir()) / f"lobes-{user}")  # the second if the first is unusable
    errors = []
    cpu = _cpu_signature().encode()
    for variant in _VARIANTS:
        flags = _BASE_FLAGS + variant
        key = hashlib.sha256(b"\0".join([code, version.stdout.encode(), " ".join(flags).encode(), cpu])).hexdigest()[
            :20
        ]
        for folder in folders:
            problem = _private_folder(folder)
            if problem:
                errors.append(problem)
                continue
            target = folder / f"{name}-{key}.so"
            if not target.exists():
                try:
                    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=folder)
                    os.close(fd)
                except OSError as exc:
                    errors.append(f"{folder}: {exc}")
                    continue
                try:
                    done = _run([cc, *flags, "-o", tmp, str(source), "-lm"])
                    if done.returncode != 0:
                        errors.append(f"{cc} {' '.join(flags)}: {done.stderr.strip()[-400:]}")
                        break  # the same flags fail in any folder
                    os.replace(tmp, target)  # atomic: concurrent processes never load a partial file
                except (OSError, subprocess.SubprocessError) as exc:
                    errors.append(f"{cc}: {exc}")
                    continue
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            try:
                return _load(target, name), str(target)
            except (OSError, AttributeError) as exc:
                errors.append(f"{target}: {exc}")
    return None, "could not build the native kernels: " + "; ".join(errors)


def library(name: str) -> Optional[ctypes.CDLL]:
    """The compiled kernels of ``lobes/csrc/<name>.c``, or ``None`` (see :func:`native_status` for why). Built
    once per process (and cached on disk across processes); thread-safe."""
    if name not in _KERNELS:
        raise ValueError(f"unknown native kernel {name!r}; expected one of {sorted(_KERNELS)}")
    with _lock:
        if name not in _loaded:
            lib, why = _build(name)
            if lib is not None:
                _LOG.info("native %s kernels: %s", name, why)
            else:  # a deliberate LOBES_NATIVE=0 is only worth an info line
                level = logging.INFO if why.startswith("disabled") else logging.WARNING
                _LOG.log(
                    level, "native %s kernels unavailable (%s); the pure-torch path is used, which is slower", name, why
                )
            _loaded[name] = (lib, why)
        return _loaded[name][0]


def native_status() -> dict[str, str]:
    """``{name: "native: <library path>" | "torch: <reason>"}`` for the kernels loaded so far in this process."""
    return {name: (f"native: {why}" if lib is not None else f"torch: {why}") for name, (lib, why) in _loaded.items()}


def _reset() -> None:
    """Forget the loaded kernels (tests use it to exercise the build and the fallback)."""
    with _lock:
        _loaded.clear()
