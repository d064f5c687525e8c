"""Optional native CPU kernels, compiled on first use with the system's C compiler and cached.

The kernels (``lobes/csrc/*.c``) are plain C loaded with :mod:`ctypes`: no Python or torch headers, so a
compile takes well under a second. The shared library is built for the machine it runs on
(``-march=native``) and cached under ``$LOBES_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lobes`` or
``~/.cache/lobes``), keyed by the source, the compiler, the flags and the CPU. Without a working compiler,
or with ``LOBES_NATIVE=0``, :func:`fbank_library` returns ``None`` and callers use their pure-torch path.
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

__all__ = ["cache_dir", "fbank_library", "fft_matches_torch", "native_status"]

_LOG = logging.getLogger(__name__)
_CSRC = Path(__file__).with_name("csrc")
# -ffp-contract=off: no fused multiply-adds, the frame pre-processing must round as torchaudio does
_BASE_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
               "-Werror=implicit-function-declaration"]
_ABI = 1

_lock = threading.Lock()
_loaded: dict[str, tuple[ctypes.CDLL | None, str]] = {}


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


def _compiler() -> str | None:
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


def _private_folder(folder: Path) -> str | None:
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


def _build(name: str, source: Path) -> tuple[ctypes.CDLL | None, str]:
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
    code = source.read_bytes()
    user = os.getuid() if hasattr(os, "getuid") else 0
    folders = (cache_dir(), Path(tempfile.gettempdir()) / f"lobes-{user}")  # the second if the first is unusable
    errors = []
    for arch in (["-march=native"], []):  # -march=native is unknown to some compilers and targets
        flags = _BASE_FLAGS + arch
        key = hashlib.sha256(b"\0".join([code, version.stdout.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode(), str(_ABI).encode()])).hexdigest()[:20]
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
                lib = ctypes.CDLL(str(target))
                lib.lobes_fbank_abi.restype = ctypes.c_int
                if lib.lobes_fbank_abi() != _ABI:
                    raise OSError("unexpected ABI version")
            except (OSError, AttributeError) as exc:
                errors.append(f"{target}: {exc}")
                continue
            return lib, f"{target}"
    return None, "could not build the native kernels: " + "; ".join(errors)


def _declare_fbank(lib: ctypes.CDLL) -> None:
    P, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    lib.lobes_fbank_frames.restype = None
    lib.lobes_fbank_frames.argtypes = [P, L, L, L, L, L, L, P, L, F, P, P, L]
    lib.lobes_fbank_mel.restype = None
    lib.lobes_fbank_mel.argtypes = [P, L, L, L, P, P, P, P, I, I, P, L, L, L, L, L, P]
    lib.lobes_fbank_mel_workspace.restype = L
    lib.lobes_fbank_mel_workspace.argtypes = [L, L]
    lib.lobes_fbank_set_dfti.restype = None
    lib.lobes_fbank_set_dfti.argtypes = [P, P, P, P, P]
    lib.lobes_rfft.restype = L
    lib.lobes_rfft.argtypes = [P, P, L, L]
    lib.lobes_fbank_part_workspace.restype = L
    lib.lobes_fbank_part_workspace.argtypes = [L, L, L]
    lib.lobes_fbank_part.restype = L
    lib.lobes_fbank_part.argtypes = [P, L, L, L, L, L, P, F, P, L, L, P, P, P, P, I, I, P, L, L, L, P]
    entry = _dfti_entry_points()
    lib.has_dfti = entry is not None
    if entry is not None:
        lib.lobes_fbank_set_dfti(*entry)


def _dfti_entry_points() -> tuple[int, ...] | None:
    """Addresses of MKL's DFTI functions inside torch's CPU library (torch.fft on CPU runs on them when torch
    is built with MKL), or ``None``."""
    import torch

    if not torch.backends.mkl.is_available():
        return None
    folder = Path(torch.__file__).resolve().parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (folder / name).exists():
            try:
                core = ctypes.CDLL(str(folder / name))
                names = ("DftiCreateDescriptor_s_1d", "DftiSetValue", "DftiCommitDescriptor", "DftiComputeForward",
                         "DftiFreeDescriptor")
                return tuple(ctypes.cast(getattr(core, n), ctypes.c_void_p).value for n in names)
            except (OSError, AttributeError):
                return None
    return None


def fbank_library() -> ctypes.CDLL | None:
    """The compiled fbank kernels, or ``None`` (see :func:`native_status` for why). Built once per process
    (and cached on disk across processes); thread-safe."""
    with _lock:
        if "fbank" not in _loaded:
            lib, why = _build("fbank", _CSRC / "fbank.c")
            if lib is not None:
                _declare_fbank(lib)
            else:  # a deliberate LOBES_NATIVE=0 is only worth an info line
                level = logging.INFO if why.startswith("disabled") else logging.WARNING
                _LOG.log(level, "native fbank kernels unavailable (%s); kaldi_fbank uses its pure-torch CPU path, "
                         "which is slower", why)
            _loaded["fbank"] = (lib, why)
        return _loaded["fbank"][0]


_fft_checked: dict[int, bool] = {}


def fft_matches_torch(lib: ctypes.CDLL, padded: int) -> bool:
    """Whether the kernels' direct FFT gives ``torch.fft.rfft``'s float32 results bit for bit for transforms of
    length ``padded`` (checked once per length and process; the fused path is used only then)."""
    import torch

    if not getattr(lib, "has_dfti", False):
        return False
    with _lock:
        if padded not in _fft_checked:
            ok = True
            g = torch.Generator().manual_seed(padded)
            for count in (1, 7, 64):
                x = torch.randn(count, padded, generator=g) * 3000.0
                out = torch.empty(count, padded // 2 + 1, dtype=torch.complex64)
                ok = ok and lib.lobes_rfft(x.data_ptr(), out.data_ptr(), padded, count) == 0
                ok = ok and torch.equal(out, torch.fft.rfft(x))
            _fft_checked[padded] = ok
            if not ok:
                _LOG.info("direct FFT differs from torch.fft.rfft for length %d; using torch's", padded)
        return _fft_checked[padded]


def native_status() -> dict[str, str]:
    """``{"fbank": "native: <library path>" | "torch: <reason>"}`` for the kernels loaded so far in this
    process (:func:`fbank_library` loads them)."""
    return {name: (f"native: {why}" if lib is not None else f"torch: {why}") for name, (lib, why) in _loaded.items()}


def _reset() -> None:
    """Forget the loaded kernels (tests use it to exercise the build and the fallback)."""
    with _lock:
        _loaded.clear()
        _fft_checked.clear()
