"""Streaming HyperConformer: chunked encoder = streamed encoder, causality, padding, the streaming front-end and
fbank, global normalisation, dynamic chunk sampling, and the full-context models unchanged bit for bit."""

from functools import partial
from pathlib import Path

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.nnet.attention import RelPosEncXL, RelPosMHAXL

from lobes.asr import ASRModel
from lobes.attention import MultiHeadAttention, PositionalEncoding
from lobes.chunking import ChunkConfig, DynamicChunkSampler, chunk_attention_mask, ms_to_frames
from lobes.conformer import ConformerEncoder, ConvolutionModule, hyperconformer_encoder
from lobes.hypermixing import ChunkCausalHyperMixing
from lobes.masks import lengths_to_padding_mask
from lobes.streaming import GlobalNormalization, StreamingASR, check_streamable, stream_audio

ROOT = Path(__file__).resolve().parents[1]
D = 16


def _encoder(kind: str, layers: int = 2, causal=True) -> ConformerEncoder:
    torch.manual_seed(0)
    if kind == "hypermixing":
        mixer = partial(ChunkCausalHyperMixing, D, 32, num_heads=2, chunk_size=None)
        return ConformerEncoder(layers, D, 32, mixer, kernel_size=5, causal=causal).eval()
    if kind == "mha":
        return ConformerEncoder(layers, D, 32, partial(MultiHeadAttention, 2, D), kernel_size=5, causal=causal).eval()
    return ConformerEncoder(
        layers, D, 32, partial(RelPosMHAXL, D, 2), kernel_size=5, causal=causal, pos_encoding=RelPosEncXL(D)
    ).eval()


def _model(kind: str, causal=True) -> ASRModel:
    pe = None if kind == "relpos" else PositionalEncoding(D)
    model = ASRModel(
        _encoder(kind, causal=causal),
        7,
        D,
        frontend_channels=(4, 4),
        fbank_top_db=None,
        feature_norm=GlobalNormalization(80),
        pos_encoding=pe,
    )
    model.train()
    model.normalise(torch.randn(2, 40, 80) * 2 + 1, torch.tensor([40, 25]))  # statistics that are not 0 / 1
    return model.eval()


CONFIGS = {
    "hypermixing": [ChunkConfig(1), ChunkConfig(4), ChunkConfig(7)],
    "mha": [ChunkConfig(1), ChunkConfig(4), ChunkConfig(5, 2), ChunkConfig(3, 0)],
    "relpos": [ChunkConfig(4), ChunkConfig(8, 1)],
}
CASES = [(kind, cfg) for kind, cfgs in CONFIGS.items() for cfg in cfgs]


# ------------------------------------------------------------------------------------------- chunking
def test_chunk_mask_and_config():
    mask = chunk_attention_mask(6, ChunkConfig(2, 1))
    expected = torch.tensor(
        [[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0],
         [1, 1, 0, 0, 0, 0]], dtype=torch.bool
    )  # fmt: skip
    assert torch.equal(mask, expected)
    assert ms_to_frames(640) == 16
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkConfig(0)
    with pytest.raises(ValueError, match="whole number"):
        ms_to_frames(50)


def test_dynamic_chunk_sampler_draws_in_range_and_full_context():
    torch.manual_seed(0)
    sampler = DynamicChunkSampler(0.5, 4, 16, limited_left_context_prob=0.5, left_context_chunks_min=2,
                                  left_context_chunks_max=3)  # fmt: skip
    draws = [sampler() for _ in range(400)]
    chunked = [d for d in draws if d is not None]
    assert 120 < len(chunked) < 280  # about half
    assert {d.chunk_size for d in chunked} == set(range(4, 17))
    assert {d.left_context_chunks for d in chunked} == {None, 2, 3}
    with pytest.raises(ValueError, match="chunked_prob"):
        DynamicChunkSampler(chunked_prob=1.5)


# -------------------------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("kind,cfg", CASES)
@pytest.mark.parametrize("length", [1, 13, 23])
def test_encoder_streamed_equals_chunked_forward(kind, cfg, length):
    enc = _encoder(kind)
    x = torch.randn(2, length, D)
    with torch.no_grad():
        full, _ = enc(x, chunk=cfg)
        C = cfg.chunk_size
        cuts = [0, min(length, 2 * C), min(length, 3 * C), length]  # whole chunks, then the rest
        state, outs = None, []
        for a, b in zip(cuts, cuts[1:]):
            out, state = enc.forward_chunk(x[:, a:b], state, cfg)
            outs.append(out)
    assert (torch.cat(outs, 1) - full).abs().max() <= 1e-5
    assert state.offset == length


@pytest.mark.parametrize("kind,cfg", CASES)
def test_future_frames_never_change_earlier_chunks(kind, cfg):
    enc = _encoder(kind)
    x = torch.randn(1, 24, D)
    cut = 13
    y = x.clone()
    y[:, cut:] = torch.randn(1, 24 - cut, D) * 3
    with torch.no_grad():
        a, _ = enc(x, chunk=cfg)
        b, _ = enc(y, chunk=cfg)
    done = (cut // cfg.chunk_size) * cfg.chunk_size  # chunks that end before the change
    assert torch.equal(a[:, :done], b[:, :done])
    assert not torch.allclose(a[:, cut:], b[:, cut:])


@pytest.mark.parametrize("kind,cfg", CASES)
def test_chunked_padding_in_a_batch_equals_alone(kind, cfg):
    enc = _encoder(kind)
    x = torch.randn(3, 17, D)
    lengths = torch.tensor([17, 9, 4])
    with torch.no_grad():
        batch, _ = enc(x, src_key_padding_mask=lengths_to_padding_mask(lengths, 17), chunk=cfg)
        for i, n in enumerate(lengths.tolist()):
            alone, _ = enc(x[i : i + 1, :n], chunk=cfg)
            assert (batch[i, :n] - alone[0]).abs().max() <= 1e-5


def test_chunked_mode_errors():
    x = torch.randn(1, 5, D)
    full_context = hyperconformer_encoder(1, D, 32, nhead=2, kernel_size=3, causal=True)
    with pytest.raises(ValueError, match="ChunkCausalHyperMixing"):
        full_context(x, chunk=2)
    not_causal = ConformerEncoder(1, D, 32, partial(MultiHeadAttention, 2, D), kernel_size=3)
    with pytest.raises(ValueError, match="causal"):
        not_causal(x, chunk=2)
    with pytest.raises(ValueError, match="whole past"):
        _encoder("hypermixing")(x, chunk=ChunkConfig(2, 1))
    enc = _encoder("hypermixing")
    _, state = enc.forward_chunk(x[:, :3], None, 2)
    with pytest.raises(ValueError, match="inside a chunk"):
        enc.forward_chunk(x[:, 3:], state, 2)


def test_chunked_training_step_reaches_every_parameter_under_bf16_autocast():
    enc = _encoder("hypermixing").train()
    x = torch.randn(2, 11, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = enc(x, chunk=3)
    out.float().sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


# ------------------------------------------------------------------------------ chunk convolution
CHUNK_CONV_CASES = [
    ("hypermixing", ChunkConfig(1)),
    ("hypermixing", ChunkConfig(3)),
    ("hypermixing", ChunkConfig(4)),
    ("mha", ChunkConfig(2)),
    ("mha", ChunkConfig(5, 1)),
    ("relpos", ChunkConfig(4)),
]


def _reference_chunk_conv(module, x: torch.Tensor, chunk_size) -> torch.Tensor:
    """The convolution module frame by frame: frame t of chunk c sums the kernel taps over inputs t - p .. t + p,
    those outside [0, end of chunk c) (or [0, T) with full context) counting as zero."""
    z = module.bottleneck(module.layer_norm(x).transpose(1, 2))  # (B, D, T)
    T, p = z.size(-1), module.padding
    w, b = module.conv.weight[:, 0], module.conv.bias  # (D, K), (D,)
    out = torch.zeros_like(z)
    for t in range(T):
        end = T if chunk_size is None else min(T, (t // chunk_size + 1) * chunk_size)
        acc = b.expand(z.size(0), -1).clone()
        for j in range(w.size(1)):
            i = t - p + j
            if 0 <= i < end:
                acc = acc + w[:, j] * z[:, :, i]
        out[:, :, t] = acc
    return module.after_conv(out.transpose(1, 2))


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 4, 7, 30])
def test_chunk_conv_module_equals_the_frame_by_frame_reference(chunk_size):
    torch.manual_seed(1)
    module = ConvolutionModule(D, kernel_size=7, causal="chunk").eval()
    x = torch.randn(2, 13, D)
    with torch.no_grad():
        got = module(x, chunk_size=chunk_size)
        ref = _reference_chunk_conv(module, x, chunk_size)
    assert (got - ref).abs().max() <= 1e-5


def test_chunk_conv_full_context_is_the_centred_convolution():
    torch.manual_seed(2)
    chunk = ConvolutionModule(D, kernel_size=5, causal="chunk").eval()
    centred = ConvolutionModule(D, kernel_size=5, causal=False).eval()
    centred.load_state_dict(chunk.state_dict(), strict=True)  # the same parameters
    x = torch.randn(3, 11, D)
    pad = lengths_to_padding_mask(torch.tensor([11, 8, 3]), 11)
    with torch.no_grad():
        assert torch.equal(chunk(x, pad), centred(x, pad))
        z = chunk.bottleneck(chunk.layer_norm(x).transpose(1, 2)).masked_fill(pad.unsqueeze(1), 0.0)
        plain = torch.nn.functional.conv1d(z, chunk.conv.weight, chunk.conv.bias, padding=2, groups=D)
        ref = chunk.after_conv(plain.transpose(1, 2)).masked_fill(pad.unsqueeze(-1), 0.0)
        assert (chunk(x, pad) - ref).abs().max() <= 1e-6
    with pytest.raises(ValueError, match='"chunk"'):
        ConvolutionModule(D, kernel_size=5, causal="left")
    enc_chunk, enc_centred = _encoder("mha", causal="chunk"), _encoder("mha", causal=False)
    enc_centred.load_state_dict(enc_chunk.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(enc_chunk(x)[0], enc_centred(x)[0])


@pytest.mark.parametrize("kind,cfg", CHUNK_CONV_CASES)
@pytest.mark.parametrize("length", [1, 9, 13, 23])
def test_chunk_conv_encoder_streamed_equals_chunked_forward(kind, cfg, length):
    enc = _encoder(kind, causal="chunk")
    x = torch.randn(2, length, D)
    C = cfg.chunk_size
    with torch.no_grad():
        full, _ = enc(x, chunk=cfg)
        for cuts in ([0, min(length, 2 * C), min(length, 3 * C), length], list(range(0, length, C)) + [length]):
            state, outs = None, []
            for a, b in zip(cuts, cuts[1:]):  # pieces of several chunks, then chunk by chunk
                out, state = enc.forward_chunk(x[:, a:b], state, cfg)
                outs.append(out)
            assert (torch.cat(outs, 1) - full).abs().max() <= 1e-5
            assert state.offset == length
    assert all(la.conv.shape == (2, D, 2) for la in state.layers)  # (kernel_size - 1) / 2 inputs


@pytest.mark.parametrize("kind,cfg", CHUNK_CONV_CASES)
def test_chunk_conv_padded_batch_equals_alone_and_streamed(kind, cfg):
    enc = _encoder(kind, causal="chunk")
    x = torch.randn(3, 17, D)
    lengths = torch.tensor([17, 10, 3])
    with torch.no_grad():
        batch, _ = enc(x, src_key_padding_mask=lengths_to_padding_mask(lengths, 17), chunk=cfg)
        for i, n in enumerate(lengths.tolist()):
            alone, _ = enc(x[i : i + 1, :n], chunk=cfg)
            streamed, _ = enc.forward_chunk(x[i : i + 1, :n], None, cfg)
            assert (batch[i, :n] - alone[0]).abs().max() <= 1e-5
            assert (batch[i, :n] - streamed[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("kind,cfg", CHUNK_CONV_CASES)
def test_chunk_conv_sees_its_chunk_and_nothing_after(kind, cfg):
    enc = _encoder(kind, causal="chunk")
    x = torch.randn(1, 24, D)
    C = cfg.chunk_size
    cut = (13 // C + 1) * C if C > 1 else 13  # a chunk boundary
    y = x.clone()
    y[:, cut:] = torch.randn(1, 24 - cut, D) * 3
    with torch.no_grad():
        a, _ = enc(x, chunk=cfg)
        b, _ = enc(y, chunk=cfg)
    assert torch.equal(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])
    if C > 1:  # unlike a causal convolution, a frame sees the later frames of its own chunk
        module = enc.layers[0].convolution_module
        z = x.clone()
        z[:, cut - 1] = torch.randn(1, D) * 3
        with torch.no_grad():
            before, after = module(x, chunk_size=C), module(z, chunk_size=C)
        assert not torch.allclose(before[:, cut - 2], after[:, cut - 2])
        assert torch.equal(before[:, : cut - C], after[:, : cut - C])


@pytest.mark.parametrize("samples,piece", [(12345, 2560), (16000, 7), (300, 160)])
def test_chunk_conv_stream_equals_full_forward(samples, piece):
    model = _model("hypermixing", causal="chunk")
    check_streamable(model)
    cfg = ChunkConfig(4)
    wav = torch.randn(1, samples) * 0.1
    with torch.no_grad():
        feats, lens = model.features(wav, torch.ones(1))
        full, _ = model.encode(feats, lens, cfg)
    streamer = StreamingASR(model, cfg)
    steps = [streamer.accept(p) for p in wav[0].split(piece)] + [streamer.finish()]
    frames = torch.cat([s.frames for s in steps], 1)
    assert frames.shape == full.shape
    assert (frames - full).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("kind,cfg", [("hypermixing", ChunkConfig(4)), ("relpos", ChunkConfig(3, 2))])
@pytest.mark.parametrize("samples", [16000, 12345, 300])
@pytest.mark.parametrize("piece", [160, 2560, 7])
def test_stream_equals_full_forward_with_the_same_chunks(kind, cfg, samples, piece):
    model = _model(kind)
    wav = torch.randn(1, samples) * 0.1
    with torch.no_grad():
        feats, lens = model.features(wav, torch.ones(1))
        full, _ = model.encode(feats, lens, cfg)
        full_lp = model.ctc_log_probs(full)
    streamer = StreamingASR(model, cfg)
    steps = [streamer.accept(p) for p in wav[0].split(piece)] + [streamer.finish()]
    frames = torch.cat([s.frames for s in steps], 1)
    assert frames.shape == full.shape
    assert (frames - full).abs().max() <= 1e-5
    assert all(s.frames.shape[1] % cfg.chunk_size == 0 for s in steps[:-1])  # whole chunks until the end
    from lobes.asr import ctc_greedy_decode

    assert steps[-1].tokens[0] == ctc_greedy_decode(full_lp, lens.new_tensor([full.shape[1]]))[0]
    assert steps[-1].final and not any(s.final for s in steps[:-1])


def test_stream_batch_of_streams_and_partial_text():
    model = _model("hypermixing")
    wavs = torch.randn(2, 6400) * 0.1

    class Pieces:  # a SentencePiece-like tokenizer
        def decode_ids(self, ids):
            return "".join("abcdefg"[i] for i in ids)

    streamer = model.stream(2, tokenizer=Pieces(), batch=2)
    steps = [streamer.accept(p) for p in wavs.split(1280, dim=1)] + [streamer.finish()]
    frames = torch.cat([s.frames for s in steps], 1)
    with torch.no_grad():
        feats, lens = model.features(wavs, torch.ones(2))
        full, _ = model.encode(feats, lens, 2)
    assert (frames - full).abs().max() <= 1e-5
    assert steps[-1].text == ["".join("abcdefg"[i] for i in t) for t in steps[-1].tokens]
    with pytest.raises(RuntimeError, match="finished"):
        streamer.accept(wavs[:, :10])


def test_stream_generator_and_empty_stream():
    model = _model("hypermixing")
    steps = list(stream_audio(model, torch.rand(3200).split(640), chunk=2))
    assert steps[-1].final and sum(s.frames.shape[1] for s in steps) == 6  # 3200 // 160 + 1 = 21 fbank -> 6
    empty = StreamingASR(model, 2).finish()
    assert empty.final and empty.frames.shape[1] == 1  # 0 samples: one fbank frame, one encoder frame


def test_stream_state_does_not_grow():
    model = _model("hypermixing")
    streamer = model.stream(2)
    sizes = []
    for i in range(60):
        streamer.accept(torch.randn(1280) * 0.1)
        if i in (5, 59):
            sums = [la.mixer.sums.shape for la in streamer._state.layers]
            sizes.append((sums, streamer._fbank.buffer.shape, [b.pending.shape for b in streamer._blocks]))
    assert sizes[0] == sizes[1]


def test_models_that_cannot_stream_are_refused():
    plain = ASRModel(hyperconformer_encoder(1, D, 32, nhead=2, kernel_size=3), 5, D, frontend_channels=(4, 4))
    with pytest.raises(ValueError, match="fbank_top_db=None.*feature_norm.*causal=.chunk"):
        check_streamable(plain)


def test_global_normalization_floor_and_frame_mean_make_it_level_invariant():
    torch.manual_seed(0)
    feats = torch.randn(2, 30, 8) * 10 - 30
    feats[0, :5] = -100.0  # digital silence
    lengths = torch.tensor([30, 21])
    norm = GlobalNormalization(8, floor_db=-70.0, subtract_frame_mean=True).train()
    out, _ = norm(feats, lengths)
    norm.eval()
    quiet, _ = norm(feats - 12.0, lengths)  # the same recording 12 dB quieter
    loud, _ = norm(feats, lengths)
    assert torch.allclose(quiet[1], loud[1], atol=1e-5)  # no frame near the floor: the gain cancels
    assert torch.equal(loud[1, 21:], torch.zeros(9, 8))
    floor_frame = (torch.full((8,), -70.0) - (-70.0) - norm.mean) / torch.sqrt(norm.var + norm.eps)
    assert torch.allclose(loud[0, 0], floor_frame, atol=1e-5)  # -100 dB raised to the floor, then normalised
    plain = GlobalNormalization(8).eval()
    assert not torch.allclose(plain(feats - 12.0, lengths)[0][1], plain(feats, lengths)[0][1])


def test_global_normalization_matches_the_statistics_of_everything_seen():
    norm = GlobalNormalization(4, update_steps=2).train()
    a, b, c = torch.randn(2, 10, 4), torch.randn(1, 7, 4) * 3 + 2, torch.randn(1, 5, 4) + 100
    norm(a, torch.tensor([10, 6]))
    norm(b, torch.tensor([7]))
    norm(c, torch.tensor([5]))  # beyond update_steps: ignored
    seen = torch.cat([a[0], a[1, :6], b[0]]).double()
    assert torch.allclose(norm.mean.double(), seen.mean(0), atol=1e-5)
    assert torch.allclose(norm.var.double(), seen.var(0, unbiased=False), atol=1e-4)
    assert set(norm.state_dict()) == {"mean", "var", "count", "steps"}


# ------------------------------------------------------------------------ full-context models unchanged
PRESETS = ["hyperconformer_small", "conformer_small", "transformer_small", "primer_small", "hyperconformer_8M"]
TINY = {"d_model": 16, "d_ffn": 32, "nhead": 2, "num_encoder_layers": 2, "frontend_channels": [4, 4], "vocab_size": 12}


@pytest.mark.parametrize("name", PRESETS)
def test_full_context_presets_give_the_recorded_outputs(name):
    """tests/data/full_context_reference.pt holds the state dicts, inputs and outputs of tiny versions of the
    presets, recorded before the chunked mode existed; the same weights must give the same outputs, to a few
    float32 ulps (CPU kinds round differently)."""
    ref = torch.load(ROOT / "tests" / "data" / "full_context_reference.pt", weights_only=True)
    overrides = dict(TINY, n_mels=80)  # recorded with 80 mels (the small presets now have 40)
    if name not in ("transformer_small", "primer_small"):
        overrides["kernel_size"] = 5
    if name == "hyperconformer_8M":
        overrides["num_decoder_layers"] = 1
    with open(ROOT / "hparams" / f"{name}.yaml") as f:
        model = load_hyperpyyaml(f, overrides)["model"]
    recorded = ref["models"][name]
    model.load_state_dict(recorded["state_dict"], strict=True)
    assert set(model.state_dict()) == set(recorded["state_dict"])
    model.eval()
    tokens = ref["tokens"] if model.decoder is not None else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: bit-for-bit equality holds for one thread count (reductions split by it)
    try:
        with torch.no_grad():
            ctc, lengths, seq = model(ref["wavs"], ref["wav_lens"], tokens)
    finally:
        torch.set_num_threads(threads)
    # Bit for bit only on the CPU they were recorded on: an AVX2-only CPU and another AVX-512 / AMX one each differed
    # by up to 9.5e-7 on these outputs of magnitude ~3 (2026-12-02); any change of behaviour moves them far more.
    tolerance = 2e-6
    assert (ctc - recorded["ctc"]).abs().max().item() <= tolerance
    assert torch.equal(lengths, recorded["lengths"])
    if tokens is not None:
        assert (seq - recorded["seq"]).abs().max().item() <= tolerance


@pytest.mark.parametrize("name", ["hyperconformer_streaming_small", "conformer_streaming_small"])
def test_streaming_presets_build_stream_and_run_full_context(name):
    overrides = dict(TINY, kernel_size=5)
    with open(ROOT / "hparams" / f"{name}.yaml") as f:
        model = load_hyperpyyaml(f, overrides)["model"].eval()
    check_streamable(model)
    assert all(layer.convolution_module.chunk_conv for layer in model.encoder.layers)
    wav = torch.randn(1, 8000) * 0.1
    with torch.no_grad():
        full_context, lengths, _ = model(wav, torch.ones(1))
        chunked, _, _ = model(wav, torch.ones(1), chunk=ChunkConfig(4))
    assert full_context.shape == chunked.shape == (1, 13, 12)
    steps = list(stream_audio(model, wav[0].split(1600), chunk=4))
    streamed = model.ctc_log_probs(torch.cat([s.frames for s in steps], 1))
    assert (streamed - chunked).abs().max() <= 1e-4
