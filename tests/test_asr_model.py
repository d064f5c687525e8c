"""ASR model: front-end lengths, padding invariance of the whole model, sample rate and feature statistics,
presets, decoding with speechbrain's searchers."""

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from lobes.asr import ASRModel, AttentionDecoder, ConvFrontEnd, ctc_greedy_decode
from lobes.attention import MultiDConvHeadAttention, PositionalEncoding
from lobes.conformer import ConformerEncoder, hyperconformer_encoder

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {  # name -> (d_model, encoder layers, parameters in millions, tolerance)
    "hyperconformer_8M": (144, 10, 7.9, 0.3),
    "hyperconformer_22M": (256, 10, 21.7, 0.5),
    "hyperconformer_small": (144, 6, 2.7, 0.2),
    "conformer_small": (144, 6, 3.1, 0.2),
    "transformer_small": (144, 6, 1.6, 0.2),
    "primer_small": (144, 6, 1.6, 0.2),
}


def _tiny_model(decoder: bool = False, mixer: str = "hypermixing") -> ASRModel:
    if mixer == "hypermixing":
        enc = hyperconformer_encoder(2, 16, 32, 2, kernel_size=5)
    else:
        enc = ConformerEncoder(2, 16, 32, functools.partial(MultiDConvHeadAttention, 2, 16), kernel_size=5)
    dec = AttentionDecoder(12, 16, 1, 2, 32, PositionalEncoding(16)) if decoder else None
    return ASRModel(
        enc, 12, 16, n_mels=40, frontend_channels=(8, 4), pos_encoding=PositionalEncoding(16), decoder=dec
    ).eval()


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 101])
def test_frontend_lengths_match_output(frames):
    fe = ConvFrontEnd(40, channels=(4, 4))
    out, lens = fe(torch.randn(1, frames, 40), torch.tensor([frames]))
    assert out.shape == (1, lens.item(), fe.output_size)
    assert lens.item() == math.ceil(math.ceil(frames / 2) / 2)


def test_frontend_rejects_wrong_mel_count():
    with pytest.raises(ValueError, match=r"\(B, T, 40\)"):
        ConvFrontEnd(40)(torch.randn(1, 10, 80), torch.tensor([10]))


@pytest.mark.parametrize("mixer", ["hypermixing", "primer_dconv"])
@torch.no_grad()
def test_whole_model_is_padding_invariant(mixer):
    model = _tiny_model(mixer=mixer)
    lengths = [16000, 9123, 3210, 400]
    wavs = torch.randn(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wavs[i, n:] = 0.0
    rel = torch.tensor(lengths, dtype=torch.float) / max(lengths)
    batched, frames, _ = model(wavs, rel)
    for i, n in enumerate(lengths):
        alone, alone_frames, _ = model(wavs[i : i + 1, :n], torch.ones(1))
        assert alone_frames.item() == frames[i].item()
        assert (batched[i, : frames[i]] - alone[0]).abs().max().item() <= 1e-5


def test_model_rejects_bad_input():
    model = _tiny_model()
    with pytest.raises(ValueError, match="waveforms"):
        model(torch.randn(2, 1, 16000), torch.ones(2))
    with pytest.raises(ValueError, match="wav_lens"):
        model(torch.randn(2, 16000), torch.ones(3))
    with pytest.raises(RuntimeError, match="no attention decoder"):
        model(torch.randn(1, 16000), torch.ones(1), tokens_bos=torch.ones(1, 3, dtype=torch.long))


def test_model_checks_the_sample_rate_it_is_given():
    model = _tiny_model()
    assert model.sample_rate == 16000 and model.frame_samples == 160 * 4
    with pytest.raises(ValueError, match="expected 16000 Hz audio, got 44100 Hz"):
        model(torch.randn(1, 16000), torch.ones(1), sample_rate=44100)
    with pytest.raises(ValueError, match="expected 16000 Hz audio, got 8000 Hz"):
        model.features(torch.randn(1, 16000), torch.ones(1), sample_rate=8000)
    model(torch.randn(1, 16000), torch.ones(1), sample_rate=16000)
    eight_k = ASRModel(hyperconformer_encoder(1, 16, 32, 2, kernel_size=3), 10, 16, sample_rate=8000)
    assert eight_k.sample_rate == 8000 and eight_k.frame_samples == 80 * 4
    with pytest.raises(ValueError, match="expected 8000 Hz audio, got 16000 Hz"):
        eight_k(torch.randn(1, 8000), torch.ones(1), sample_rate=16000)


def test_features_with_given_statistics():
    """``stats`` replaces each row's own mean / variance; a row's own statistics give back the default."""
    model = _tiny_model()
    wavs = torch.randn(2, 8000)
    wavs[1, 4000:] = 0.0
    rel = torch.tensor([1.0, 0.5])
    own, frames = model.features(wavs, rel)
    raw = model.fbank(wavs)  # (B, T, F)
    n = int(frames[1])
    stats = (raw[1, :n].mean(0), raw[1, :n].var(0, unbiased=False))
    given, given_frames = model.features(wavs, rel, stats=stats)
    assert torch.equal(given_frames, frames)
    torch.testing.assert_close(given[1], own[1], atol=1e-4, rtol=0)
    assert given[1, n:].abs().max() == 0.0
    expected = (raw[0] - stats[0]) / torch.sqrt(stats[1] + model.norm_eps)
    torch.testing.assert_close(given[0], expected)


@torch.no_grad()
def test_decoder_outputs_and_speechbrain_searchers():
    from speechbrain.decoders import S2STransformerBeamSearcher
    from speechbrain.decoders.ctc import CTCBeamSearcher

    model = _tiny_model(decoder=True)
    wavs, rel = torch.randn(2, 8000), torch.tensor([1.0, 0.6])
    ctc_lp, frames, seq_lp = model(wavs, rel, tokens_bos=torch.randint(0, 12, (2, 5)))
    assert seq_lp.shape == (2, 5, 12)
    assert torch.allclose(seq_lp.exp().sum(-1), torch.ones(2, 5), atol=1e-5)

    greedy = ctc_greedy_decode(ctc_lp, frames)
    assert len(greedy) == 2 and all(0 not in h for h in greedy)

    vocab = ["<b>"] + [chr(ord("a") + i) for i in range(11)]
    beam = CTCBeamSearcher(blank_index=0, vocab_list=vocab, beam_size=3)(ctc_lp, frames.float() / ctc_lp.shape[1])
    assert len(beam) == 2

    enc, enc_frames = model.encode(*model.features(wavs, rel))
    searcher = S2STransformerBeamSearcher(
        modules=[model, model.seq_lin],
        bos_index=1,
        eos_index=2,
        min_decode_ratio=0.0,
        max_decode_ratio=1.0,
        beam_size=2,
        using_eos_threshold=False,
    )
    hyps, _, _, _ = searcher(enc, enc_frames.float() / enc.shape[1])
    assert len(hyps) == 2


def test_greedy_decode_merges_repeats_and_drops_blanks():
    lp = torch.full((1, 6, 4), -10.0)
    for t, k in enumerate([1, 1, 0, 1, 3, 3]):
        lp[0, t, k] = 0.0
    assert ctc_greedy_decode(lp, torch.tensor([6])) == [[1, 1, 3]]
    assert ctc_greedy_decode(lp, torch.tensor([3])) == [[1]]


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_run(name):
    d_model, layers, millions, tol = PRESETS[name]
    with open(ROOT / "hparams" / f"{name}.yaml") as f:
        hp = load_hyperpyyaml(f, {"vocab_size": 40} if "small" in name else None)
    model = hp["model"].eval()
    assert hp["d_model"] == d_model and len(model.encoder.layers) == layers
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n_params - millions) <= tol, f"{name}: {n_params:.2f} M parameters"
    ctc_lp, frames, _ = model(torch.randn(1, 4000), torch.ones(1))
    assert ctc_lp.shape == (1, 7, hp["vocab_size"]) and frames.tolist() == [7]


def test_speechbrain_layout_of_the_8m_preset():
    """d_model 144, d_ffn 576, 8 heads, 10 encoder and 4 decoder layers, 640-dim CNN output, like speechbrain's
    LibriSpeech hyperconformer_8M.yaml; its encoder state dict has speechbrain's key layout."""
    with open(ROOT / "hparams" / "hyperconformer_8M.yaml") as f:
        hp = load_hyperpyyaml(f)
    model = hp["model"]
    assert (hp["d_ffn"], hp["nhead"], hp["num_decoder_layers"]) == (576, 8, 4)
    assert model.frontend.output_size == 640
    assert len(model.decoder.decoder.layers) == 4
    keys = set(model.encoder.state_dict())
    assert "layers.0.convolution_module.conv.weight" in keys and "norm.norm.weight" in keys


@pytest.mark.parametrize("recipe", ["hyperconformer", "conformer", "transformer", "primer"])
def test_recipe_yaml_loads_a_preset(recipe, tmp_path):
    from lobes.data.speech import prepare_speech_corpus
    from lobes.recipe import load_hparams

    hp = load_hparams(
        ROOT / "recipes" / "ASR" / "hparams" / f"{recipe}.yaml", {"noise_csv": None, "output_folder": str(tmp_path)}
    )
    assert hp["model"] is hp["modules"]["model"]
    assert hp["model"].ctc_lin.out_features == hp["output_neurons"]
    assert hp["model"].sample_rate == hp["sample_rate"] == 16000 and hp["model"].frame_samples == 640
    assert list(hp)[0] == "seed" and hp["prepare"].func is prepare_speech_corpus


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_lexicon_corrector_distances_and_choices():
    from lobes.asr import LexiconCorrector

    rng = np.random.default_rng(0)
    vocab = ["".join(rng.choice(list("ABCDE"), rng.integers(1, 7))) for _ in range(40)]
    fix = LexiconCorrector(vocab)
    for _ in range(30):
        word = "".join(rng.choice(list("ABCDEF"), rng.integers(1, 9)))
        dist = fix.distances(word)
        assert dist.tolist() == [_levenshtein(word, w) for w in fix.words]
        out = fix.correct_word(word)
        assert out == word if word in fix.vocabulary else _levenshtein(word, out) == dist.min()
    # ties go to the more frequent word; max_distance keeps far words
    tied = LexiconCorrector(["CAT", "BAT", "BAT"])
    assert tied(["XAT", "CAT"]) == ["BAT", "CAT"]
    assert LexiconCorrector(["CAT"], max_distance=1)(["DOG", "CAR"]) == ["DOG", "CAT"]
    assert LexiconCorrector.from_transcripts(["A B", "B C"]).vocabulary == {"A", "B", "C"}
    with pytest.raises(ValueError, match="at least one"):
        LexiconCorrector([])


def test_frontend_dropout_and_float32_features_under_autocast():
    model = ASRModel(
        hyperconformer_encoder(1, 16, 32, 2, kernel_size=3),
        vocab_size=10,
        d_model=16,
        dropout=0.1,
        frontend_dropout=0.0,
    )
    assert model.frontend.dropout.p == 0.0 and model.proj[1].p == 0.1
    assert (
        ASRModel(
            hyperconformer_encoder(1, 16, 32, 2, kernel_size=3), vocab_size=10, d_model=16, dropout=0.1
        ).frontend.dropout.p
        == 0.1
    )
    wav = torch.randn(2, 8000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, _ = model.features(wav, torch.tensor([1.0, 0.5]))
        log_probs, _, _ = model.eval()(wav, torch.tensor([1.0, 0.5]))
    assert feats.dtype == torch.float32 and log_probs.dtype == torch.float32
    reference, _ = model.features(wav, torch.tensor([1.0, 0.5]))
    assert torch.equal(feats, reference)
