"""Speech synthesis with espeak-ng, loaded through ``ctypes`` from the ``espeakng-loader`` wheel.

libespeak-ng keeps one synthesizer per process (global state), so every call here runs under one
process-wide lock; for parallel synthesis use one process per worker (as ``lobes.data.corpus``
does). The library also keeps synthesis state between utterances that ``espeak_Terminate`` does not
reset, so each call of :func:`synthesize` (and each :func:`synthesize_batch`) loads a private copy
of the library afresh and seeds its noise generators: the same arguments give the same samples.

A voice is a base voice (a language/accent such as ``"en-us"`` or ``"en-gb-scotland"``) optionally
combined with a variant (``"m3"``, ``"f2"``, ``"klatt"``, named ones such as ``"edward"``), written
``"en-us+m3"`` by espeak-ng. ``formant_scales`` and ``echo`` make a new voice from one of these on
the fly: the frequency and strength of chosen formants multiplied, an echo of its own (a voice file
written to a private overlay of espeak-ng's data folder for the call).

Example
-------
>>> wav = synthesize("hello world", voice="en-us", variant="m3")
>>> wav.dtype, wav.ndim
(dtype('float32'), 1)
"""

from __future__ import annotations

import _ctypes
import ctypes
import multiprocessing.util
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

from lobes.data.audio import resample

__all__ = [
    "ESPEAK_SAMPLE_RATE",
    "list_base_voices",
    "list_voice_variants",
    "split_voice",
    "synthesize",
    "synthesize_batch",
    "variant_echo",
]

ESPEAK_SAMPLE_RATE = 22050
"""Native output rate of libespeak-ng (what ``espeak_Initialize`` returns)."""

# espeak-ng C API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4
_EE_OK = 0
_NUM_FORMANTS = 9  # espeak-ng voices define formants 0..8
_MAX_ECHO_DELAY_MS = 249  # espeak-ng's echo ring holds 5500 samples at 22050 Hz
_SCALED_VOICE_PREFIX = "lobes-scaled-"  # file names of the voices made by formant_scales / echo

_LOCK = threading.RLock()
_CALLBACK_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def _private_library_path() -> str:
    """A private copy of libespeak-ng, so that this module alone loads and unloads it."""
    global _LIBRARY_COPY
    if _LIBRARY_COPY is None:
        try:
            import espeakng_loader
        except ImportError as err:  # pragma: no cover - dependency declared in setup.cfg
            raise ImportError(
                "lobes.data.espeak needs the 'espeakng-loader' package (pip install espeakng-loader)"
            ) from err
        folder = tempfile.mkdtemp(prefix="lobes-espeak-")
        path = os.path.join(folder, "libespeak-ng-lobes.so")
        shutil.copyfile(espeakng_loader.get_library_path(), path)
        # multiprocessing's finalizers run at the exit of the main process and of worker processes
        # (which skip atexit hooks); each process removes only the copy it made.
        multiprocessing.util.Finalize(None, _remove_copy, args=(folder, os.getpid()), exitpriority=10)
        _LIBRARY_COPY = path
    return _LIBRARY_COPY


@lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None)
    libc.srand.argtypes = [ctypes.c_uint]
    libc.srand.restype = None
    return libc


def _libc_srand(seed: int) -> None:
    _libc().srand(seed)


def _remove_copy(folder: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)


def _data_path() -> str:
    import espeakng_loader

    return espeakng_loader.get_data_path()


_OVERLAY: tuple[int, str] | None = None  # (process id, folder)


def _overlay_data_path() -> str:
    """This process's overlay of espeak-ng's data folder: links to every file, and a variant folder of
    its own where :func:`synthesize_batch` writes the voices made with ``formant_scales``. A forked
    worker makes its own, so that no two processes write voices into one folder."""
    global _OVERLAY
    if _OVERLAY is None or _OVERLAY[0] != os.getpid() or not os.path.isdir(_OVERLAY[1]):
        root = _data_path()
        folder = tempfile.mkdtemp(prefix="lobes-espeak-data-")
        for sub in ("", "voices", os.path.join("voices", "!v")):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
            for entry in os.listdir(os.path.join(root, sub)):
                if os.path.join(sub, entry) not in ("voices", os.path.join("voices", "!v")):
                    os.symlink(os.path.join(root, sub, entry), os.path.join(folder, sub, entry))
        multiprocessing.util.Finalize(None, _remove_copy, args=(folder, os.getpid()), exitpriority=10)
        _OVERLAY = (os.getpid(), folder)
    return _OVERLAY[1]


def _formant_lines(path: str) -> tuple[list[str], dict[int, list[str]]]:
    """A voice file's lines other than ``formant`` ones, and its formants (number -> values)."""
    other, formants = [], {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split("//")[0].split()
            if len(fields) >= 5 and fields[0] == "formant" and fields[1].isdigit():
                formants[int(fields[1])] = fields[2:]
            else:
                other.append(line.rstrip("\n"))
    return other, formants


def _made_voice_text(base: str, variant: str | None, scales: tuple, echo: tuple | None) -> str:
    """The variant file of ``base+variant`` with formant frequencies and strengths scaled, and with
    ``echo`` (delay, amplitude) instead of the variant's own echo when it is not None.

    A formant neither file sets starts from espeak-ng's default (100 % frequency, strength and width);
    one the base voice sets (``en-029`` lowers formants 1 and 2) starts from the base voice's values,
    as espeak-ng would otherwise keep them.
    """
    root = _data_path()
    _, formants = _formant_lines(os.path.join(root, "lang", _base_voice_table()[base]))
    lines = ["language variant", "name lobes-scaled"]
    if variant is not None:
        lines, own = _formant_lines(os.path.join(root, "voices", "!v", variant))
        formants.update(own)
    for number, frequency, strength in scales:
        values = list(formants.get(number, ["100", "100", "100"]))
        values[0] = str(max(1, round(int(values[0]) * frequency)))
        values[1] = str(max(0, round(int(values[1]) * strength)))
        formants[number] = values
    lines += [f"formant {number} {' '.join(formants[number])}" for number in sorted(formants)]
    if echo is not None:
        lines = [line for line in lines if line.split("//")[0].split()[:1] != ["echo"]]
        lines.append(f"echo {echo[0]} {echo[1]}")
    return "\n".join(lines) + "\n"


def _check_echo(echo) -> tuple[int, int]:
    """``echo`` as (delay in ms, amplitude), or a clear error."""
    try:
        delay, amplitude = echo
        ok = all(not isinstance(v, bool) and int(v) == v for v in (delay, amplitude))
        ok = ok and 0 <= delay <= _MAX_ECHO_DELAY_MS and 0 <= amplitude <= 100
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"echo must be (delay in ms, 0-{_MAX_ECHO_DELAY_MS}; amplitude in 256ths of the voice, 0-100), "
            f"e.g. (10, 100); got {echo!r}"
        )
    return int(delay), int(amplitude)


@lru_cache(maxsize=None)
def variant_echo(variant: str) -> tuple[int, int]:
    """The echo a bundled voice variant sets, as espeak-ng applies it.

    Arguments
    ---------
    variant : str
        One of :func:`list_voice_variants`.

    Returns
    -------
    tuple of int
        ``(delay in ms, amplitude in 256ths of the voice)``; ``(0, 0)`` for a variant without echo.
        espeak-ng caps the amplitude at 100 (several variants write 10000), and so does this.

    Example
    -------
    >>> variant_echo("m1"), variant_echo("anikaRobot")
    ((0, 0), (10, 100))
    """
    if variant not in _variant_names():
        raise ValueError(f"unknown espeak-ng voice variant {variant!r}; expected one of list_voice_variants()")
    delay = amplitude = 0
    with open(os.path.join(_data_path(), "voices", "!v", variant), encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split("//")[0].split()
            if len(fields) >= 3 and fields[0] == "echo":
                delay, amplitude = int(fields[1]), int(fields[2])
    if delay == 0:
        return 0, 0
    return min(delay, _MAX_ECHO_DELAY_MS), min(amplitude, 100)


def _check_formant_scales(scales) -> tuple:
    """``formant_scales`` as a tuple of (formant, frequency scale, strength scale), or a clear error."""
    expected = "a sequence of (formant 0-8, frequency scale > 0, strength scale >= 0), e.g. [(1, 0.9, 1.2)]"
    checked = []
    try:
        items = list(scales)
        for item in items:
            number, frequency, strength = item
            if isinstance(number, bool) or int(number) != number or not 0 <= int(number) < _NUM_FORMANTS:
                raise ValueError
            frequency, strength = float(frequency), float(strength)
            if not (np.isfinite(frequency) and np.isfinite(strength) and frequency > 0 and strength >= 0):
                raise ValueError
            checked.append((int(number), frequency, strength))
    except (TypeError, ValueError):
        raise ValueError(f"formant_scales must be {expected}; got {scales!r}") from None
    return tuple(checked)


class _Session:
    """One freshly loaded libespeak-ng: load, initialize, use, terminate and unload.

    libespeak-ng keeps synthesis state in static variables (pitch flutter phase, automatic gain,
    random generator) that ``espeak_Terminate`` does not reset, so the same text would not give the
    same samples twice in a process. Loading a fresh copy of the library for each call (about
    5 ms) and seeding its random generators (its own, and libc's ``rand`` that the Klatt voices
    use) makes every call a function of its arguments only.
    """

    def __init__(self, data_path: str | None = None) -> None:
        data_path = _data_path() if data_path is None else data_path
        lib = ctypes.CDLL(_private_library_path(), mode=ctypes.RTLD_LOCAL)
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK_TYPE]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.restype = None
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.restype = ctypes.c_int
        self.lib = lib
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            self.close()
            raise RuntimeError(f"espeak_Initialize failed (returned {rate}) with data path {data_path}")
        self.sample_rate = rate
        self._chunks: list[np.ndarray] = []
        # The ctypes callback must stay referenced while the library may call it.
        self._callback = _CALLBACK_TYPE(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, num_samples, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def close(self) -> None:
        lib, self.lib = self.lib, None
        if lib is not None:
            lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)

    def __enter__(self) -> "_Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def synth(self, name: str, text: str, rate: int, pitch: int, pitch_range: int, seed: int) -> np.ndarray:
        err = self.lib.espeak_SetVoiceByName(name.encode())
        if err != _EE_OK:
            raise ValueError(f"espeak-ng could not load voice {name!r} (error code {err})")
        self.lib.espeak_ng_SetRandSeed(int(seed))
        _libc_srand(int(seed) & 0xFFFFFFFF)  # the Klatt voices draw their noise from libc's rand()
        self.lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(_PARAM_VOLUME, 100, 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        self.lib.espeak_SetParameter(_PARAM_RANGE, int(pitch_range), 0)
        data = text.encode("utf-8") + b"\0"
        self._chunks = []
        err = self.lib.espeak_Synth(data, len(data), 0, 0, 0, _CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        if err != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with error code {err} for text {text!r}")
        if not self._chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self._chunks)


_LIBRARY_COPY: str | None = None


@lru_cache(maxsize=1)
def _variant_names() -> tuple[str, ...]:
    folder = os.path.join(_data_path(), "voices", "!v")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"espeak-ng variant folder not found: {folder}")
    return tuple(
        sorted(
            name
            for name in os.listdir(folder)
            if os.path.isfile(os.path.join(folder, name)) and not name.startswith(_SCALED_VOICE_PREFIX)
        )
    )


def _read_voice_file(path: str) -> list[str]:
    """Language codes declared by a voice file (``language <code> [priority]`` lines)."""
    codes = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "language":
                codes.append(fields[1].lower())
    return codes


@lru_cache(maxsize=1)
def _voice_tables() -> tuple[dict[str, str], dict[str, str]]:
    """Base voice code -> espeak identifier, and language alias -> base voice code.

    Base voice codes are the lower-cased file names under ``lang/`` (``en-gb-scotland`` for
    ``gmw/en-GB-scotland``); aliases are the other language codes a voice declares (``en-gb`` for
    ``en``). Reading the files directly is much faster than ``espeak_ListVoices``, which also scans
    every variant and MBROLA voice.
    """
    root = os.path.join(_data_path(), "lang")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"espeak-ng voice folder not found: {root}")
    voices = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            voices.append((os.path.relpath(path, root), _read_voice_file(path)))
    voices.sort()
    table = {os.path.basename(identifier).lower(): identifier for identifier, _ in voices}
    aliases: dict[str, str] = {}
    for identifier, codes in voices:
        for code in codes:
            if code not in table:
                aliases.setdefault(code, os.path.basename(identifier).lower())
    return table, aliases


def _base_voice_table() -> dict[str, str]:
    return _voice_tables()[0]


def list_voice_variants() -> list[str]:
    """Names of the voice variants bundled with espeak-ng (the files under ``voices/!v/``).

    Returns
    -------
    list of str
        Sorted variant names such as ``"f1"``, ``"klatt"``, ``"m3"``.

    Example
    -------
    >>> variants = list_voice_variants()
    >>> "m3" in variants and "f1" in variants
    True
    """
    return list(_variant_names())


def list_base_voices(language_prefix: str = "en") -> list[str]:
    """Base voices (language / accent codes) whose code starts with ``language_prefix``.

    Arguments
    ---------
    language_prefix : str
        A language code or prefix, e.g. ``"en"`` (all English accents) or ``"en-gb"``.

    Returns
    -------
    list of str
        Sorted lower-case codes accepted by :func:`synthesize`, e.g. ``["en", "en-029", ...]``.

    Example
    -------
    >>> voices = list_base_voices("en")
    >>> "en-us" in voices and "en-gb-scotland" in voices
    True
    """
    prefix = language_prefix.lower()
    return sorted(
        code for code in _base_voice_table() if code == prefix or code.startswith(prefix + "-") or not prefix
    )


def split_voice(voice: str) -> tuple[str, str | None]:
    """Split ``"en-us+m3"`` into ``("en-us", "m3")`` (``("en-us", None)`` without a variant)."""
    base, sep, variant = voice.partition("+")
    return base, (variant if sep else None)


def synthesize(
    text: str,
    voice: str = "en-us",
    variant: str | None = None,
    rate: int = 175,
    pitch: int = 50,
    pitch_range: int = 50,
    sample_rate: int = 16000,
    seed: int = 0,
    formant_scales=None,
    echo=None,
) -> np.ndarray:
    """Speak ``text`` with espeak-ng and return the waveform.

    Arguments
    ---------
    text : str
        The text to speak (UTF-8; punctuation shapes the prosody).
    voice : str
        Base voice, one of :func:`list_base_voices` (e.g. ``"en-us"``); ``"en-us+m3"`` is also
        accepted and then ``variant`` must be None.
    variant : str, optional
        One of :func:`list_voice_variants` (e.g. ``"m3"``, ``"f2"``, ``"klatt"``).
    rate : int
        Speaking rate in words per minute (80 to 450).
    pitch : int
        Base pitch, 0 to 100.
    pitch_range : int
        Pitch range (intonation), 0 (monotone) to 100.
    sample_rate : int
        Output sample rate in Hz; espeak-ng speaks at 22050 Hz and the audio is resampled.
    seed : int
        Seed of espeak-ng's noise generator (breathy and whispering variants use it). The same
        arguments always give the same samples.
    formant_scales : sequence of (int, float, float), optional
        A new voice made from ``voice`` and ``variant``: each ``(formant, frequency, strength)``
        multiplies the frequency and the strength of that formant (0 to 8; 1-3 shape the vowels,
        4-5 the voice quality) by the two factors. None or empty: the voice as bundled.
    echo : (int, int), optional
        The voice's echo instead of its variant's own (see :func:`variant_echo`): delay in ms
        (0 to 249) and amplitude in 256ths of the voice (0 to 100), fed back as espeak-ng does, so
        a short delay rings like a comb filter. ``(0, 0)``: no echo. None: the variant's own.

    Returns
    -------
    numpy.ndarray
        float32 mono waveform in [-1, 1], shape ``(num_samples,)``.

    Example
    -------
    >>> wav = synthesize("good morning", voice="en-gb", variant="f2", rate=160)
    >>> wav.shape[0] > 8000, float(abs(wav).max()) <= 1.0
    (True, True)
    """
    return synthesize_batch(
        [
            dict(
                text=text,
                voice=voice,
                variant=variant,
                rate=rate,
                pitch=pitch,
                pitch_range=pitch_range,
                seed=seed,
                formant_scales=formant_scales,
                echo=echo,
            )
        ],
        sample_rate=sample_rate,
    )[0]


def _voice_name(
    text, voice="en-us", variant=None, rate=175, pitch=50, pitch_range=50, seed=0, formant_scales=None, echo=None
) -> str:
    """Check one request's arguments; return the espeak voice name (``base`` or ``base+variant``)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected a non-empty text to synthesize, got {text!r}")
    base, inline_variant = split_voice(voice)
    if inline_variant is not None:
        if variant is not None:
            raise ValueError(f"voice {voice!r} already names a variant; do not also pass variant={variant!r}")
        variant = inline_variant
    bases, aliases = _voice_tables()
    base = aliases.get(base.lower(), base.lower())
    if base not in bases:
        raise ValueError(
            f"unknown espeak-ng voice {base!r}; expected one of list_base_voices(), e.g. "
            f"{', '.join(list_base_voices('en'))}"
        )
    if variant is not None and variant not in _variant_names():
        raise ValueError(
            f"unknown espeak-ng voice variant {variant!r}; expected one of list_voice_variants(), "
            f"e.g. m1-m8, f1-f5, klatt"
        )
    if not 80 <= rate <= 450:
        raise ValueError(f"rate must be within 80..450 words per minute, got {rate}")
    for name, value in (("pitch", pitch), ("pitch_range", pitch_range)):
        if not 0 <= value <= 100:
            raise ValueError(f"{name} must be within 0..100, got {value}")
    return base if variant is None else f"{base}+{variant}"


def synthesize_batch(requests: Sequence[Mapping], sample_rate: int = 16000) -> list[np.ndarray]:
    """Speak several texts with one load of the library (much faster than :func:`synthesize` each).

    The library's internal state carries over from one utterance to the next, so an output depends
    on the requests before it in the batch: the same batch always gives the same outputs, but an
    utterance synthesized alone or in another batch differs slightly (same words, same voice).

    Arguments
    ---------
    requests : sequence of mappings
        Keyword arguments of :func:`synthesize` (``text`` required; ``voice``, ``variant``,
        ``rate``, ``pitch``, ``pitch_range``, ``seed``, ``formant_scales``, ``echo`` optional).
    sample_rate : int
        Output sample rate in Hz.

    Returns
    -------
    list of numpy.ndarray
        One float32 mono waveform per request.

    Example
    -------
    >>> wavs = synthesize_batch([{"text": "yes"}, {"text": "no", "voice": "en-gb-scotland", "variant": "f3"}])
    >>> len(wavs), wavs[1].ndim
    (2, 1)
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    allowed = {"text", "voice", "variant", "rate", "pitch", "pitch_range", "seed", "formant_scales", "echo"}
    jobs, voices = [], {}
    for index, request in enumerate(requests):
        unknown = sorted(set(request) - allowed)
        if unknown:
            raise TypeError(f"request {index} has unknown keys {unknown}; expected some of {sorted(allowed)}")
        name = _voice_name(**request)
        scales = request.get("formant_scales")
        scales = () if scales is None else _check_formant_scales(scales)
        echo = request.get("echo")
        echo = None if echo is None else _check_echo(echo)
        if scales or echo is not None:
            base, variant = split_voice(name)
            file_name = f"{_SCALED_VOICE_PREFIX}{index}"
            voices[file_name] = _made_voice_text(base, variant, scales, echo)
            name = f"{base}+{file_name}"
        jobs.append(
            (
                name,
                request["text"],
                request.get("rate", 175),
                request.get("pitch", 50),
                request.get("pitch_range", 50),
                request.get("seed", 0),
            )
        )
    if not jobs:
        return []
    outputs = []
    with _LOCK:
        data_path = _overlay_data_path() if voices else None
        written = []
        try:
            for file_name, text in voices.items():
                path = os.path.join(data_path, "voices", "!v", file_name)
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(text)
                written.append(path)
            with _Session(data_path) as session:
                for job in jobs:
                    outputs.append(session.synth(*job))
                native = session.sample_rate
        finally:
            for path in written:
                os.remove(path)
    waves = []
    for pcm in outputs:
        wav = resample(pcm.astype(np.float32) / 32768.0, native, sample_rate)
        waves.append(np.clip(wav, -1.0, 1.0, out=wav))
    return waves
