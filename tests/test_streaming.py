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
from lobes.conformer import ConformerEncoder, hyperconformer_encoder
from lobes.hypermixing import ChunkCausalHyperMixing
from lobes.masks import lengths_to_padding_mask
from lobes.streaming import GlobalNormalization, StreamingASR, check_streamable, stream_audio

ROOT = Path(__file__).resolve().parents[1]
D = 16


def _encoder(kind: str, layers: int = 2) -> ConformerEncoder:
    torch.manual_seed(0)
    if kind == "hypermixing":
        mixer = partial(ChunkCausalHyperMixing, D, 32, num_heads=2, chunk_size=None)
        return ConformerEncoder(layers, D, 32, mixer, kernel_size=5, causal=True).eval()
    if kind == "mha":
        return ConformerEncoder(layers, D, 32, partial(MultiHeadAttention, 2, D), kernel_size=5, causal=True).eval()
    return ConformerEncoder(
        layers, D, 32, partial(RelPosMHAXL, D, 2), kernel_size=5, causal=True, pos_encoding=RelPosEncXL(D)
    ).eval()


def _model(kind: str) -> ASRModel:
    pe = None if kind == "relpos" else PositionalEncoding(D)
    model = ASRModel(
        _encoder(kind),
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
    with pytest.raises(ValueError, match="fbank_top_db=None.*feature_norm"):
        check_streamable(plain)


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
def test_full_context_presets_give_the_recorded_outputs_bit_for_bit(name):
    """tests/data/full_context_reference.pt holds the state dicts, inputs and outputs of tiny versions of the
    presets, recorded before the chunked mode existed; the same weights must give exactly the same outputs."""
    ref = torch.load(ROOT / "tests" / "data" / "full_context_reference.pt", weights_only=True)
    overrides = dict(TINY)
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
    assert torch.equal(ctc, recorded["ctc"])
    assert torch.equal(lengths, recorded["lengths"])
    if tokens is not None:
        assert torch.equal(seq, recorded["seq"])


@pytest.mark.parametrize("name", ["hyperconformer_streaming_small", "conformer_streaming_small"])
def test_streaming_presets_build_stream_and_run_full_context(name):
    overrides = dict(TINY, kernel_size=5)
    with open(ROOT / "hparams" / f"{name}.yaml") as f:
        model = load_hyperpyyaml(f, overrides)["model"].eval()
    check_streamable(model)
    wav = torch.randn(1, 8000) * 0.1
    with torch.no_grad():
        full_context, lengths, _ = model(wav, torch.ones(1))
        chunked, _, _ = model(wav, torch.ones(1), chunk=ChunkConfig(4))
    assert full_context.shape == chunked.shape == (1, 13, 12)
    steps = list(stream_audio(model, wav[0].split(1600), chunk=4))
    streamed = model.ctc_log_probs(torch.cat([s.frames for s in steps], 1))
    assert (streamed - chunked).abs().max() <= 1e-4
