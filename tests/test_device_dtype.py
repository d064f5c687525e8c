"""Every lobe on every device and dtype: a forward pass on {cpu, cuda} x {float32, bfloat16} has the right
shape, is finite, and stays close to the float32 CPU result.

Reduced precision is reached the way the project documents it: modules are cast with ``.to(dtype)``
(token mixers, encoders, BEATs), the ASR model runs under ``torch.autocast`` (as the recipe trains it, with
its fbank kept in float32), and ``kaldi_fbank`` takes bfloat16 waveforms and computes in float32.

Tolerances: float32 equals the reference to 1e-5 relative (max abs error / max abs value) on CPU and to 1e-4
on CUDA, where the test turns TF32 off (cuDNN convolutions use it by default: a precision setting, not a
device difference). bfloat16 (8 significant bits) is compared by
the cosine similarity of each output frame with the reference frame, which must be at least 0.995; the
fbank, computed in float32 from bfloat16 samples, must moreover equal the float32 fbank of the rounded
samples. Padded frames have no specified value and are left out.
"""

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

from lobes.asr import ASRModel
from lobes.attention import MultiDConvHeadAttention, MultiHeadAttention, PositionalEncoding
from lobes.beats import BEATs, BEATsConfig, token_padding_mask
from lobes.conformer import hyperconformer_encoder
from lobes.features import kaldi_fbank
from lobes.hypermixing import HyperMixing
from lobes.masks import lengths_to_mask, lengths_to_padding_mask
from lobes.transformer import TransformerEncoder

D, FFN, H = 32, 64, 4
LENGTHS = [20, 13]  # frames of the two rows of every sequence batch
FP32_REL_TOL = {"cpu": 1e-5, "cuda": 1e-4}
BF16_MIN_COSINE = 0.995

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
        ),
    ),
]
DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------------------------------------ cases
# Each case builds a float32 CPU module and its float32 CPU inputs, and runs it on a device / dtype,
# returning the output (B, T, C) and a (B, T) bool mask of the frames to compare.
def _sequence_inputs():
    lengths = torch.tensor(LENGTHS)
    return torch.randn(len(LENGTHS), max(LENGTHS), D), lengths


def _mixer_case(factory):
    def run(module, inputs, device, dtype):
        x, lengths = inputs
        x = x.to(device, dtype)
        pad = lengths_to_padding_mask(lengths, x.shape[1]).to(device)
        out = module.to(device, dtype)(x, x, x, key_padding_mask=pad, return_attn_weights=False)
        out = out[0] if isinstance(out, tuple) else out
        return out, ~pad

    return factory, _sequence_inputs, run


def _encoder_case(factory):
    def run(module, inputs, device, dtype):
        x, lengths = inputs
        x = x.to(device, dtype)
        pad = lengths_to_padding_mask(lengths, x.shape[1]).to(device)
        out, _ = module.to(device, dtype)(x, src_key_padding_mask=pad)
        return out, ~pad

    return factory, _sequence_inputs, run


def _waveforms():
    return torch.randn(2, 8000) * 0.1, torch.tensor([1.0, 0.6])


def _asr_model():
    encoder = hyperconformer_encoder(2, D, FFN, H, kernel_size=5)
    return ASRModel(
        encoder, vocab_size=12, d_model=D, n_mels=40, frontend_channels=(8, 8), pos_encoding=PositionalEncoding(D)
    )


def _run_asr(module, inputs, device, dtype):
    wav, rel = (t.to(device) for t in inputs)
    module = module.to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        log_probs, frames, _ = module(wav, rel)
    # log-probabilities of near-uniform outputs all sit near -log(V): compare their deviations from the mean
    return log_probs - log_probs.mean(dim=-1, keepdim=True), lengths_to_mask(frames, log_probs.shape[1])


def _beats():
    cfg = BEATsConfig.released(
        encoder_layers=2,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
        embed_dim=32,
        conv_pos=16,
        conv_pos_groups=4,
    )
    return BEATs(cfg=cfg)


def _run_beats(module, inputs, device, dtype):
    wav, rel = (t.to(device) for t in inputs)
    feats = module.to(device, dtype)(wav, rel)[0]  # (B, T, C); the waveform stays float32, as documented
    return feats, ~token_padding_mask(wav, rel)


def _run_fbank(module, inputs, device, dtype):
    del module
    wav, _ = inputs
    wav = (wav * 2**15).to(device, dtype)
    return kaldi_fbank(wav, num_mel_bins=40), None


CASES = {
    "HyperMixing": _mixer_case(lambda: HyperMixing(D, FFN, num_heads=H)),
    "MultiHeadAttention": _mixer_case(lambda: MultiHeadAttention(H, D)),
    "MultiDConvHeadAttention": _mixer_case(lambda: MultiDConvHeadAttention(H, D)),
    "ConformerEncoder": _encoder_case(lambda: hyperconformer_encoder(2, D, FFN, H, kernel_size=5)),
    "TransformerEncoder": _encoder_case(
        lambda: TransformerEncoder(2, D, FFN, functools.partial(MultiHeadAttention, H, D))
    ),
    "ASRModel": (_asr_model, _waveforms, _run_asr),
    "BEATs": (_beats, lambda: (torch.randn(2, 16000) * 0.1, torch.tensor([1.0, 0.6])), _run_beats),
    "kaldi_fbank": (lambda: None, _waveforms, _run_fbank),
}


# ------------------------------------------------------------------------------------------------ test
@contextlib.contextmanager
def _full_float32(device):
    """Float32 matrix products and convolutions without TF32 on CUDA (restored afterwards)."""
    if device != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _compare(out, ref, valid, device, dtype, name):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values on {device} / {dtype}"
    out = out.float().cpu()
    if valid is not None:
        out, ref = out[valid.cpu()], ref[valid.cpu()]  # (frames, C)
    if dtype == torch.float32:
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        assert err <= FP32_REL_TOL[device], f"{name}: relative error {err:.2e} on {device}"
    else:
        cosine = F.cosine_similarity(out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1]), dim=-1)
        assert cosine.min().item() >= BF16_MIN_COSINE, f"{name}: min frame cosine {cosine.min().item():.4f}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_forward_on_device_and_dtype(name, device, dtype):
    build, make_inputs, run = CASES[name]
    module = build()
    if module is not None:
        module.eval()
    inputs = make_inputs()
    ref, ref_valid = run(module, inputs, "cpu", torch.float32)  # runs before the module moves
    ref = ref.float()
    with _full_float32(device):
        out, valid = run(module, inputs, device, dtype)
    assert out.device.type == device
    expected_dtype = torch.float32 if name in ("ASRModel", "kaldi_fbank") else dtype
    assert out.dtype == expected_dtype, f"{name}: output dtype {out.dtype}, expected {expected_dtype}"
    if valid is not None:
        assert torch.equal(valid.cpu(), ref_valid.cpu()), f"{name}: valid frames differ from the reference"
    _compare(out, ref, valid, device, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_fbank_is_the_float32_fbank_of_the_rounded_samples(device):
    wav = torch.randn(2, 8000) * 2**12
    rounded = wav.to(torch.bfloat16)
    with _full_float32(device):
        ours = kaldi_fbank(rounded.to(device), num_mel_bins=40).cpu()
    reference = kaldi_fbank(rounded.float(), num_mel_bins=40)
    assert ours.dtype == torch.float32
    assert (ours - reference).abs().max().item() <= FP32_REL_TOL[device] * reference.abs().max().item()
