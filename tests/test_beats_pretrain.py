"""BEATs pre-training: random-projection tokenizer, masking, encoder on unmasked patches, label predictor,
tokenizer distillation, code usage, ``lobes.extract --tokens``.

References are written here independently: the random-projection ids from torchaudio's fbank, ``unfold``
patches and a brute-force Euclidean nearest code; the encoder on unmasked patches against the model's own
full forward pass (nothing masked) and against a pass on the visible patches alone; the tokenizer checkpoint
layout against Microsoft's key list built key by key in ``test_beats_tokenizer``.
"""

import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio
from test_beats_tokenizer import CFG as TOKENIZER_CFG
from test_beats_tokenizer import _microsoft_state_dict

from lobes.beats import (
    PAD_TOKEN_ID,
    BEATs,
    BEATsConfig,
    BEATsTokenizer,
    RandomProjectionTokenizer,
    TokenizersConfig,
    load_tokenizer,
    token_padding_mask,
)
from lobes.beats.model import _relative_buckets
from lobes.beats.pretraining import (
    CodeUsage,
    FeatureEstimator,
    LabelPredictor,
    MaskedTokenPretraining,
    TokenizerDistillation,
    encode_visible,
    random_token_mask,
    relative_position_buckets,
    tokenizer_config,
    visible_index,
)

SMALL = dict(
    encoder_layers=2,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=4,
    embed_dim=24,
    conv_pos=16,
    conv_pos_groups=4,
    num_buckets=64,
    dropout=0.0,
    attention_dropout=0.0,
)


def _wav(batch, seconds, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(16000 * seconds)
    t = torch.arange(n) / 16000
    env = torch.exp(torch.randn(batch, n // 800 + 1, generator=g)).repeat_interleave(800, 1)[:, :n]
    f0 = 200 + 3000 * torch.rand(batch, 1, generator=g)
    x = 0.05 * env * torch.randn(batch, n, generator=g) + 0.2 * torch.sin(2 * torch.pi * (f0 * t + 300 * t**2))
    return x / x.abs().amax(1, keepdim=True)


def _model(seed=0):
    torch.manual_seed(seed)
    return BEATs(cfg=BEATsConfig.released(**SMALL), freeze=False).eval()


# ------------------------------------------------------------------------------------------ random projection
def test_random_projection_ids_match_independent_reference():
    rp = RandomProjectionTokenizer(quant_n=64, quant_dim=8, seed=3)
    wav = _wav(2, 1.3, seed=1)
    ids, pad = rp.tokenize(wav)
    for row in range(2):
        fb = torchaudio.compliance.kaldi.fbank(
            wav[row : row + 1] * 2**15, num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10
        )
        fb = (fb - 15.41663) / (2 * 6.55582)  # (frames, 128)
        t = fb.shape[0] // 16
        patches = fb[: t * 16].unfold(0, 16, 16).unfold(1, 16, 16)  # (t, 8, 16 time, 16 freq)
        patches = patches.reshape(t * 8, 256)  # time-major tokens, each patch frame by frame
        z = F.normalize(patches @ rp.projection, dim=-1)
        dist = torch.cdist(z, F.normalize(rp.codebook, dim=-1))  # Euclidean, as the paper's argmin
        ref = dist.argmin(-1)
        assert torch.equal(ids[row][~pad[row]], ref)
    assert len(set(ids[~pad].tolist())) > 5  # varied ids: the check above is not trivially passing


def test_random_projection_padding_seed_and_round_trip(tmp_path):
    rp = RandomProjectionTokenizer(quant_n=32, quant_dim=8, seed=5)
    a, b = _wav(1, 1.0, seed=2), _wav(1, 2.0, seed=3)
    batch = torch.zeros(2, 32000)
    batch[0, :16000], batch[1] = a[0], b[0]
    ids, pad = rp.tokenize(batch, torch.tensor([0.5, 1.0]))
    alone = rp.tokenize(a).ids
    assert torch.equal(ids[0][~pad[0]], alone[0]) and (ids[0][pad[0]] == PAD_TOKEN_ID).all()
    assert torch.equal(RandomProjectionTokenizer(quant_n=32, quant_dim=8, seed=5).tokenize(a).ids, alone)
    assert not torch.equal(RandomProjectionTokenizer(quant_n=32, quant_dim=8, seed=6).codebook, rp.codebook)
    path = rp.save_checkpoint(tmp_path / "rp.pt")
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"cfg", "model"} and ckpt["cfg"]["tokenizer"] == "random_projection"
    loaded = load_tokenizer(path)
    assert isinstance(loaded, RandomProjectionTokenizer) and torch.equal(loaded.tokenize(a).ids, alone)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 whatever the autocast
        assert torch.equal(rp.tokenize(a).ids, alone)


# ------------------------------------------------------------------------------------------ masking
def test_mask_ratio_padding_and_randomness():
    pad = token_padding_mask(torch.zeros(3, 32000), torch.tensor([1.0, 0.5, 0.2]))  # 96, 48, 16 valid tokens
    valid = (~pad).sum(1)
    g = torch.Generator().manual_seed(0)
    masks = [random_token_mask(pad, 0.75, generator=g) for _ in range(20)]
    for m in masks:
        assert torch.equal(m.sum(1), torch.round(valid * 0.75).long())  # 72, 36, 12
        assert not (m & pad).any()
    assert len({tuple(m[0].tolist()) for m in masks}) == 20  # a new draw each time
    share = torch.stack(masks)[:, 0].float().mean(0)  # each valid token masked ~75 % of the time
    assert share.min() > 0.3 and share.max() < 1.0
    one = torch.tensor([[False, False, True]])
    assert random_token_mask(one, 0.99).sum() == 1  # always one token left visible
    assert random_token_mask(one, 0.01).sum() == 1  # and one masked
    with pytest.raises(ValueError, match="mask ratio"):
        random_token_mask(one, 1.5)


def test_visible_index_is_time_ordered_and_padded():
    masked = torch.tensor([[True, False, False, True, False], [False, True, True, True, False]])
    pad = torch.tensor([[False] * 5, [False, False, False, False, True]])
    index, index_pad = visible_index(masked, pad)
    assert index[0].tolist() == [1, 2, 4]
    assert index[1, :1].tolist() == [0] and index_pad.tolist() == [[False] * 3, [False, True, True]]


def test_relative_buckets_equal_the_encoder_table():
    for length, buckets, distance in ((50, 320, 800), (300, 64, 800), (37, 32, 100)):
        pos = torch.arange(length)
        ours = relative_position_buckets(pos[None, :] - pos[:, None], buckets, distance)
        assert torch.equal(ours, _relative_buckets(length, buckets, distance))


# ------------------------------------------------------------------------------------------ encoder on visible patches
def test_encode_visible_without_masking_is_the_full_forward():
    model = _model()
    wav = _wav(2, 2.0)
    lens = torch.tensor([1.0, 0.7])
    pad = token_padding_mask(wav, lens)
    (full,) = model.extract_features(wav, lens)
    feats, index, index_pad = encode_visible(model, model.preprocess(wav), pad, torch.zeros_like(pad))
    for row in range(2):
        n = int((~pad[row]).sum())
        assert torch.equal(index[row, :n], torch.arange(n))
        torch.testing.assert_close(feats[row, :n], full[row, :n], atol=1e-5, rtol=1e-5)


def test_only_unmasked_patches_are_encoded_and_nothing_leaks():
    model = _model()
    wav = _wav(2, 2.0, seed=4)
    pad = token_padding_mask(wav, torch.tensor([1.0, 0.6]))
    torch.manual_seed(1)
    masked = random_token_mask(pad, 0.75)
    seen = []
    hook = model.encoder.layers[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    fbank = model.preprocess(wav)
    feats, index, index_pad = encode_visible(model, fbank, pad, masked)
    hook.remove()
    visible = (~masked & ~pad).sum(1)
    assert seen == [torch.Size([2, int(visible.max()), 32])]  # the layers see the visible patches only
    assert feats.shape[1] == int(visible.max()) and torch.equal((~index_pad).sum(1), visible)
    # masked patches replaced by anything: the visible features do not change
    noisy = fbank + 5 * torch.randn_like(fbank) * _patch_mask_to_frames(masked, fbank.shape[1])
    feats2, _, _ = encode_visible(model, noisy, pad, masked)
    torch.testing.assert_close(feats2[~index_pad], feats[~index_pad])
    # but a visible patch changes them
    changed = fbank + 5 * torch.randn_like(fbank) * _patch_mask_to_frames(~masked & ~pad, fbank.shape[1])
    feats3, _, _ = encode_visible(model, changed, pad, masked)
    assert (feats3[~index_pad] - feats[~index_pad]).abs().max() > 1e-2


def _patch_mask_to_frames(token_mask, frames):
    """(B, T) token mask -> (B, frames, 128) float mask over the fbank cells of those tokens."""
    B, T = token_mask.shape
    t = T // 8
    cells = token_mask.view(B, t, 1, 8, 1).expand(B, t, 16, 8, 16).reshape(B, t * 16, 128).float()
    return F.pad(cells, (0, 0, 0, frames - t * 16))


def test_encode_visible_equals_a_pass_on_the_visible_patches_alone_with_true_positions():
    """Reference: the same layers run on the gathered tokens, with the bias table indexed by true positions."""
    model = _model()
    wav = _wav(1, 2.0, seed=6)
    pad = token_padding_mask(wav)
    torch.manual_seed(2)
    masked = random_token_mask(pad, 0.75)
    fbank = model.preprocess(wav)
    feats, index, _ = encode_visible(model, fbank, pad, masked)
    keep = (~masked[0]).nonzero().flatten()
    x = model.layer_norm(model.embed_patches(fbank))
    x = model.post_extract_proj(x) * (~masked[0])[None, :, None]
    x = x + model.encoder.pos_conv(x.transpose(1, 2)).transpose(1, 2)
    x = model.encoder.layer_norm(x[:, keep])
    full_table = _relative_buckets(masked.shape[1], 64, 800)[keep][:, keep]  # (K, K) of the full sequence
    bias = model.encoder.layers[0].self_attn.relative_attention_bias.weight[full_table].permute(2, 0, 1)
    for layer in model.encoder.layers:
        x = layer(x, bias, None)
    torch.testing.assert_close(feats, x, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ masked token prediction
class _FixedTokenizer(torch.nn.Module):
    """Ids = token position modulo the codes (a known target), for checking the loss positions."""

    def __init__(self, quant_n):
        super().__init__()
        self.cfg = {"quant_n": quant_n}

    def tokenize_fbank(self, fbank, padding_mask):
        ids = torch.arange(padding_mask.shape[1]).expand_as(padding_mask) % self.cfg["quant_n"]
        return ids.masked_fill(padding_mask, PAD_TOKEN_ID)


def test_loss_is_cross_entropy_on_the_masked_positions_only():
    model = _model()
    predictor = LabelPredictor(32, 40, layers=1, conv_pos=16, conv_pos_groups=4)
    task = MaskedTokenPretraining(model, _FixedTokenizer(40), predictor, mask_ratio=0.75).eval()
    wav, lens = _wav(2, 2.0, seed=8), torch.tensor([1.0, 0.55])
    torch.manual_seed(7)
    step = task(wav, lens)
    pad = token_padding_mask(wav, lens)
    torch.manual_seed(7)
    masked = random_token_mask(pad, 0.75)  # the same draw
    targets = (torch.arange(pad.shape[1]).expand_as(pad) % 40)[masked & ~pad]
    assert torch.equal(step.ids, targets) and step.ids.numel() == int(torch.round((~pad).sum(1) * 0.75).sum())
    fbank = model.preprocess(wav)
    visible, index, index_pad = encode_visible(model, fbank, pad, masked)
    logits = predictor(visible, index, index_pad, masked, pad)
    torch.testing.assert_close(step.loss, F.cross_entropy(logits, targets))
    step.loss.backward()
    assert model.patch_embedding.weight.grad.abs().sum() > 0 and predictor.mask_embedding.grad.abs().sum() > 0


def test_pretraining_loss_falls_and_export_loads(tmp_path):
    torch.manual_seed(0)
    model = BEATs(cfg=BEATsConfig.released(**SMALL), freeze=False)
    task = MaskedTokenPretraining(
        model,
        RandomProjectionTokenizer(quant_n=16, quant_dim=8),
        LabelPredictor(32, 16, layers=1, conv_pos=16, conv_pos_groups=4),
    )
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    wav = _wav(4, 1.5, seed=9)
    losses = []
    for _ in range(40):
        step = task(wav)
        opt.zero_grad()
        step.loss.backward()
        opt.step()
        losses.append(float(step.loss.detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert not any(p.requires_grad for p in task.tokenizer.parameters())
    path = task.export(tmp_path / "beats.pt")
    loaded = BEATs(path)
    torch.testing.assert_close(loaded(wav)[0], model.eval()(wav)[0])


def test_mismatched_predictor_is_refused():
    with pytest.raises(ValueError, match="1024 codes"):
        MaskedTokenPretraining(_model(), RandomProjectionTokenizer(), LabelPredictor(32, 10, layers=1))


# ------------------------------------------------------------------------------------------ tokenizer distillation
def _distillation(quant_n=16, dead=0.0):
    torch.manual_seed(0)
    tok = BEATsTokenizer(
        cfg=tokenizer_config(BEATsConfig.released(**SMALL), quant_n=quant_n, quant_dim=8),
        freeze=False,
        dead_code_threshold=dead,
    )
    est = FeatureEstimator(8, 32, embed_dim=32, layers=1, conv_pos=16, conv_pos_groups=4)
    return TokenizerDistillation(tok, _model(seed=1), est)


def test_distillation_trains_tokenizer_and_estimator_not_the_teacher():
    task = _distillation()
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    teacher_before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    wav = _wav(4, 1.5, seed=10)
    task.train()
    first = task(wav)  # seeds the codebook by k-means
    assert task.tokenizer.quantize.initialised
    codes = task.tokenizer.quantize.codebook.clone()
    scores = []
    for _ in range(30):
        step = task(wav)
        opt.zero_grad()
        step.loss.backward()
        opt.step()
        scores.append(float(step.score))
    assert not torch.equal(codes, task.tokenizer.quantize.codebook)  # EMA updates
    assert task.tokenizer.patch_embedding.weight.grad is not None and task.estimator.out.weight.grad is not None
    assert all(torch.equal(v, task.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert all(p.grad is None for p in task.teacher.parameters())
    assert np.mean(scores[-5:]) > float(first.score) + 0.1  # cosine to the teacher rises
    assert torch.allclose(task.tokenizer.quantize.codebook.norm(dim=-1), torch.ones(16), atol=1e-5)


def test_distilled_tokenizer_checkpoint_has_microsoft_layout_and_loads(tmp_path):
    task = _distillation()
    task.train()
    task(_wav(4, 1.5, seed=11))
    path = task.export(tmp_path / "tok.pt")
    ckpt = torch.load(path, weights_only=True)
    layout_cfg = {**SMALL, "input_patch_size": 16, "quant_n": 16, "quant_dim": 8, "max_distance": 800}
    reference = _microsoft_state_dict(layout_cfg)
    assert set(ckpt["model"]) == set(reference)
    assert {k: tuple(v.shape) for k, v in ckpt["model"].items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert ckpt["cfg"]["quant_n"] == 16 and "finetuned_model" not in ckpt["cfg"]
    tok = load_tokenizer(path)
    assert isinstance(tok, BEATsTokenizer) and not tok.training
    wav = _wav(2, 1.0, seed=12)
    a = tok.tokenize(wav)
    assert torch.equal(a.ids, tok.tokenize(wav).ids)  # deterministic
    fbank, pad = tok.preprocess(wav), token_padding_mask(wav)
    assert torch.equal(tok.tokenize_fbank(fbank, pad), a.ids)


def test_tokenizer_config_and_estimator_mismatch():
    cfg = tokenizer_config({**SMALL, "finetuned_model": False, "layer_wise_gradient_decay_ratio": 0.6}, 8, 4)
    assert isinstance(cfg, TokenizersConfig) and "finetuned_model" not in cfg.to_dict() and cfg.quant_dim == 4
    tok = BEATsTokenizer(cfg=cfg, freeze=False)
    with pytest.raises(ValueError, match="teacher_dim"):
        TokenizerDistillation(tok, _model(), FeatureEstimator(4, 64, embed_dim=32, layers=1, conv_pos=16))
    with pytest.raises(ValueError, match="freeze=False"):
        TokenizerDistillation(BEATsTokenizer(cfg=cfg), _model(), FeatureEstimator(4, 32, embed_dim=32, layers=1))


# ------------------------------------------------------------------------------------------ code usage
def test_code_usage_known_answer():
    usage = CodeUsage(8)
    usage.update(torch.tensor([[0, 1, 2, 3], [0, 1, 2, PAD_TOKEN_ID]]))
    usage.update(torch.tensor([3]))
    s = usage.summary()
    assert s["count"] == 8 and s["used_share"] == 0.5
    assert math.isclose(s["perplexity"], 4.0, rel_tol=1e-9)  # four codes, equally often


# ------------------------------------------------------------------------------------------ extract --tokens
def test_extract_tokens_writes_int16_ids_resumes_and_reports_errors(tmp_path):
    from lobes.extract import main

    audio = tmp_path / "audio"
    audio.mkdir()
    wavs = {"a.wav": _wav(1, 1.0, seed=13)[0], "b.wav": _wav(1, 2.3, seed=14)[0]}
    for name, w in wavs.items():
        sf.write(audio / name, w.numpy(), 16000)
    sf.write(audio / "short.wav", np.zeros(1000, dtype="float32"), 16000)
    tok_path = tmp_path / "tok.pt"
    torch.save({"cfg": dict(TOKENIZER_CFG), "model": _microsoft_state_dict(TOKENIZER_CFG)}, tok_path)
    out = tmp_path / "tokens"
    args = ["--input", str(audio), "--output", str(out), "--checkpoint", str(tok_path), "--tokens", "--quiet"]
    assert main(args) == 1  # short.wav fails, the others are written
    tok = BEATsTokenizer(tok_path)
    for name, w in wavs.items():
        ids = np.load(out / f"{name}.npy")
        ref = tok.tokenize(w).ids[0]
        assert ids.dtype == np.int16 and ids.shape == (ref.numel(),)
        assert np.array_equal(ids, ref.numpy())
    assert "too short" in (out / "errors.csv").read_text()
    mtime = (out / "a.wav.npy").stat().st_mtime_ns
    assert main(args) == 1 and (out / "a.wav.npy").stat().st_mtime_ns == mtime  # resumed: nothing redone
    # features into the same folder: other settings, refused before work
    assert main(["--input", str(audio), "--output", str(out), "--quiet"]) == 2
    assert main(["--input", str(audio), "--output", str(tmp_path / "x"), "--tokens", "--quiet"]) == 2
    rp = RandomProjectionTokenizer(quant_n=32, quant_dim=8).save_checkpoint(tmp_path / "rp.pt")
    args_rp = ["--input", str(audio / "a.wav"), "--output", str(tmp_path / "rp"), "--checkpoint", str(rp), "--tokens"]
    assert main([*args_rp, "--quiet", "--precision", "bf16"]) == 0
    assert np.load(tmp_path / "rp" / "a.wav.npy").max() < 32
