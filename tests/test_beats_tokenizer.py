"""BEATs acoustic tokenizer: Microsoft-layout checkpoints, ids against an independent reference, padding,
errors, and the normalised EMA quantizer (nearest code, EMA update, k-means seeding, dead codes).

The tokenizer checkpoint is written here key by key from the documented layout of Microsoft's
``Tokenizers`` (``beats/Tokenizers.py`` + ``beats/quantizer.py``), not by the code under test. The reference
ids come from SpeechBrain's BEATs (equal to Microsoft's backbone) on the same backbone weights, followed by
the projection and the reference's squared-Euclidean nearest code written out here.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from speechbrain.lobes.models import beats as sb_beats

from lobes.beats import (
    PAD_TOKEN_ID,
    BEATsCheckpointError,
    BEATsTokenizer,
    NormEMAVectorQuantizer,
    TokenizersConfig,
    cosine_kmeans,
    token_padding_mask,
)

# every field of Microsoft's TokenizersConfig, with a small released-style architecture
CFG = dict(
    input_patch_size=16,
    embed_dim=24,
    conv_bias=False,
    encoder_layers=2,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=4,
    activation_fn="gelu",
    layer_norm_first=False,
    deep_norm=True,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    encoder_layerdrop=0.0,
    dropout_input=0.0,
    conv_pos=16,
    conv_pos_groups=4,
    relative_position_embedding=True,
    num_buckets=320,
    max_distance=800,
    gru_rel_pos=True,
    quant_n=64,
    quant_dim=16,
)


def _microsoft_state_dict(cfg, seed=0):
    """A tokenizer state dict with Microsoft's key names and shapes, random non-trivial values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return scale * torch.randn(shape, generator=g)

    p, E, D = cfg["input_patch_size"], cfg["embed_dim"], cfg["encoder_embed_dim"]
    Fd, H, K, G = cfg["encoder_ffn_embed_dim"], cfg["encoder_attention_heads"], cfg["conv_pos"], cfg["conv_pos_groups"]
    N, Q = cfg["quant_n"], cfg["quant_dim"]
    sd = {
        "patch_embedding.weight": rnd(E, 1, p, p, scale=0.1),
        "layer_norm.weight": 1 + rnd(E),
        "layer_norm.bias": rnd(E),
        "post_extract_proj.weight": rnd(D, E, scale=E**-0.5),
        "post_extract_proj.bias": rnd(D),
        "encoder.pos_conv.0.weight_g": 1 + rnd(1, 1, K).abs(),
        "encoder.pos_conv.0.weight_v": rnd(D, D // G, K),
        "encoder.pos_conv.0.bias": rnd(D),
    }
    table = rnd(cfg["num_buckets"], H, scale=1.0)  # one table, shared: stored under every layer
    for i in range(cfg["encoder_layers"]):
        pre = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            sd[pre + f"self_attn.{proj}.weight"] = rnd(D, D, scale=D**-0.5)
            sd[pre + f"self_attn.{proj}.bias"] = rnd(D)
        sd[pre + "self_attn.relative_attention_bias.weight"] = table
        sd[pre + "self_attn.grep_a"] = 1 + rnd(1, H, 1, 1)
        sd[pre + "self_attn.grep_linear.weight"] = rnd(8, D // H, scale=(D // H) ** -0.5)
        sd[pre + "self_attn.grep_linear.bias"] = rnd(8)
        sd[pre + "self_attn_layer_norm.weight"] = 1 + rnd(D)
        sd[pre + "self_attn_layer_norm.bias"] = rnd(D)
        sd[pre + "fc1.weight"] = rnd(Fd, D, scale=D**-0.5)
        sd[pre + "fc1.bias"] = rnd(Fd)
        sd[pre + "fc2.weight"] = rnd(D, Fd, scale=Fd**-0.5)
        sd[pre + "fc2.bias"] = rnd(D)
        sd[pre + "final_layer_norm.weight"] = 1 + rnd(D)
        sd[pre + "final_layer_norm.bias"] = rnd(D)
    sd["encoder.layer_norm.weight"] = 1 + rnd(D)
    sd["encoder.layer_norm.bias"] = rnd(D)
    sd["quantize_layer.0.weight"] = rnd(D, D, scale=D**-0.5)
    sd["quantize_layer.0.bias"] = rnd(D)
    sd["quantize_layer.2.weight"] = rnd(Q, D, scale=D**-0.5)
    sd["quantize_layer.2.bias"] = rnd(Q)
    sd["quantize.embedding.weight"] = F.normalize(rnd(N, Q, scale=1.0), dim=-1)
    sd["quantize.embedding.cluster_size"] = 10 * rnd(N).abs()
    sd["quantize.embedding.embed_avg"] = rnd(N, Q, scale=1.0)
    sd["quantize.embedding.initted"] = torch.tensor([1.0])
    sd["quantize.cluster_size"] = rnd(N).abs()
    return sd


def _write(path, cfg=CFG, state=None, seed=0):
    torch.save({"cfg": dict(cfg), "model": state if state is not None else _microsoft_state_dict(cfg, seed)}, path)
    return path


def _wav(batch, seconds, seed=0):
    """Chirps over noise with a random loudness envelope (varied patches, so varied tokens), peak 1."""
    g = torch.Generator().manual_seed(seed)
    n = int(16000 * seconds)
    t = torch.arange(n) / 16000
    envelope = torch.exp(2 * torch.randn(batch, n // 800 + 1, generator=g)).repeat_interleave(800, 1)[:, :n]
    f0 = 200 + 3000 * torch.rand(batch, 1, generator=g)
    x = 0.05 * envelope * torch.randn(batch, n, generator=g) + 0.2 * torch.sin(2 * torch.pi * (f0 * t + 400 * t**2))
    return x / x.abs().amax(1, keepdim=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("tokenizer") / "Tokenizer_tiny.pt")


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return BEATsTokenizer(ckpt)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_loads_and_tokenizes_with_shapes(tokenizer):
    wav, lens = _wav(3, 1.6), torch.tensor([1.0, 0.7, 0.25])
    ids, pad = tokenizer.tokenize(wav, lens)
    assert ids.shape == pad.shape == (3, 8 * 9) and ids.dtype == torch.int64 and pad.dtype == torch.bool
    assert torch.equal(pad, token_padding_mask(wav, lens))
    assert ((ids[~pad] >= 0) & (ids[~pad] < CFG["quant_n"])).all() and (ids[pad] == PAD_TOKEN_ID).all()
    assert len(ids[~pad].unique()) > 10  # not collapsed onto one code
    assert not tokenizer.training and tokenizer.cfg.quant_n == 64


def test_ids_match_independent_reference(ckpt, tmp_path, tokenizer):
    """Backbone from SpeechBrain's BEATs; head and the reference's distance ``|z|^2 + |e|^2 - 2 z.e`` here."""
    state = torch.load(ckpt, weights_only=True)["model"]
    backbone = {k: v for k, v in state.items() if not k.startswith("quantize")}
    torch.save({"cfg": dict(CFG), "model": backbone}, tmp_path / "backbone.pt")
    ref = sb_beats.BEATs(str(tmp_path / "backbone.pt"), freeze=True).eval()
    wav = _wav(2, 2.0, seed=4)
    with torch.no_grad():
        (x,) = ref.extract_features(wav, torch.ones(2))  # (B, T, C)
        h = torch.tanh(x @ state["quantize_layer.0.weight"].T + state["quantize_layer.0.bias"])
        z = F.normalize(h @ state["quantize_layer.2.weight"].T + state["quantize_layer.2.bias"], dim=-1)
        e = state["quantize.embedding.weight"]
        d = (z**2).sum(-1, keepdim=True) + (e**2).sum(-1) - 2 * z @ e.T  # (B, T, N)
        expected = d.argmin(-1)
    ids, pad = tokenizer.tokenize(wav)
    assert not pad.any() and ids.shape == expected.shape == (2, 8 * 12)
    assert torch.equal(ids, expected)


def test_padded_clip_gets_the_same_tokens_as_alone(tokenizer):
    long, short = _wav(1, 3.0, seed=7), _wav(1, 1.3, seed=8)
    batch = torch.zeros(2, long.shape[1])
    batch[0], batch[1, : short.shape[1]] = long[0], short[0]
    ids, pad = tokenizer.tokenize(batch, torch.tensor([1.0, short.shape[1] / long.shape[1]]))
    alone, alone_pad = tokenizer.tokenize(short)
    n = alone.shape[1]
    assert not alone_pad.any() and not pad[1, :n].any() and pad[1, n:].all()
    assert torch.equal(ids[1, :n], alone[0]) and (ids[1, n:] == PAD_TOKEN_ID).all()
    assert torch.equal(ids[0], tokenizer.tokenize(long).ids[0])


def test_deterministic_and_one_dimensional_input(ckpt, tokenizer):
    wav = _wav(2, 1.0, seed=2)
    a = tokenizer.tokenize(wav)
    assert torch.equal(a.ids, tokenizer.tokenize(wav).ids)
    assert torch.equal(a.ids, BEATsTokenizer(ckpt).tokenize(wav).ids)  # a second load
    one = tokenizer.tokenize(wav[1])
    assert one.ids.shape == (1, 48) and torch.equal(one.ids[0], a.ids[1]) and one.mask.all()
    assert torch.equal(tokenizer(wav).ids, a.ids)  # forward of a frozen tokenizer: same ids, no update


def test_bad_audio_is_refused(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        tokenizer.tokenize(torch.zeros(1, 2799))
    with pytest.raises(TypeError, match="floating point"):
        tokenizer.tokenize(torch.zeros(1, 4000, dtype=torch.int16))


def test_bfloat16_autocast(tokenizer):
    wav = _wav(2, 2.0, seed=11)
    ref = tokenizer.tokenize(wav).ids
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = tokenizer.tokenize(wav).ids
    assert ids.dtype == torch.int64 and ids.shape == ref.shape
    assert (ids == ref).float().mean() > 0.8  # bf16 flips near-ties only


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tokenizer.save_checkpoint(tmp_path / "out" / "tok.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"cfg", "model"}
    assert set(raw["model"]) == set(_microsoft_state_dict(CFG))  # Microsoft's layout, key for key
    assert raw["cfg"] == TokenizersConfig(CFG).to_dict() and "predictor_class" not in raw["cfg"]
    again = BEATsTokenizer(path)
    for key, value in tokenizer.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    wav = _wav(2, 1.0, seed=5)
    assert torch.equal(again.tokenize(wav).ids, tokenizer.tokenize(wav).ids)
    assert not list(path.parent.glob(".*"))  # no temporary left behind


def test_checkpoint_errors_name_the_key(tmp_path):
    def broken(edit, cfg=CFG):
        state = _microsoft_state_dict(CFG)
        edit(state)
        return _write(tmp_path / "broken.pt", cfg, state)

    with pytest.raises(BEATsCheckpointError, match=r"missing keys \['quantize.embedding.embed_avg'\]"):
        BEATsTokenizer(broken(lambda s: s.pop("quantize.embedding.embed_avg")))
    with pytest.raises(BEATsCheckpointError, match=r"unexpected keys \['quantize.extra'\]"):
        BEATsTokenizer(broken(lambda s: s.update({"quantize.extra": torch.zeros(1)})))
    with pytest.raises(BEATsCheckpointError, match=r"quantize_layer.0.bias: expected \(32,\), got \(31,\)"):
        BEATsTokenizer(broken(lambda s: s.update({"quantize_layer.0.bias": torch.zeros(31)})))
    with pytest.raises(BEATsCheckpointError, match="BEATs model checkpoint rather than a tokenizer"):
        BEATsTokenizer(broken(lambda s: [s.pop(k) for k in list(s) if k.startswith("quantize")]))
    with pytest.raises(BEATsCheckpointError, match=r"cfg quant_n=128 but the weights \(quantize.embedding.weight\)"):
        BEATsTokenizer(broken(lambda s: None, cfg={**CFG, "quant_n": 128}))
    with pytest.raises(BEATsCheckpointError, match="encoder_layers=3 but the weights"):
        BEATsTokenizer(broken(lambda s: None, cfg={**CFG, "encoder_layers": 3}))
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(BEATsCheckpointError, match="expected a dict with 'cfg' and 'model'"):
        BEATsTokenizer(tmp_path / "other.pt")


def test_uninitialised_codebook_is_refused_before_work(tmp_path, caplog):
    state = _microsoft_state_dict(CFG)
    state["quantize.embedding.initted"] = torch.tensor([0.0])
    tok = BEATsTokenizer(_write(tmp_path / "raw.pt", CFG, state))
    assert "uninitialised" in caplog.text
    with pytest.raises(RuntimeError, match="codebook is not initialised"):
        tok.tokenize(_wav(1, 1.0))


def test_training_seeds_updates_and_backpropagates():
    cfg = {**CFG, "quant_n": 8}
    tok = BEATsTokenizer(cfg=cfg, freeze=False)
    assert tok.training and not tok.quantize.initialised
    wav, lens = _wav(2, 1.5, seed=3), torch.tensor([1.0, 0.5])
    out = tok(wav, lens)
    assert tok.quantize.initialised and out.quantized.shape == (2, 72, CFG["quant_dim"])
    assert (out.ids[out.padding_mask] == PAD_TOKEN_ID).all()
    valid = int((~out.padding_mask).sum())
    assert int(tok.quantize.embedding.cluster_size.sum()) == valid  # seeded from valid tokens only
    out.loss.backward()
    assert tok.quantize_layer[0].weight.grad.abs().sum() > 0 and tok.patch_embedding.weight.grad is not None
    codes = tok.quantize.codebook.clone()
    tok(wav, lens)
    assert not torch.equal(codes, tok.quantize.codebook)
    assert torch.allclose(tok.quantize.codebook.norm(dim=-1), torch.ones(8), atol=1e-5)


# ---------------------------------------------------------------------------------------------- quantizer
def test_nearest_code_is_the_brute_force_cosine_argmax():
    vq = NormEMAVectorQuantizer(n_embed=50, embedding_dim=12, kmeans_init=False).eval()
    z = 3.0 * torch.randn(4, 30, 12)
    ids = vq.nearest(z)
    codes = vq.codebook
    for b in range(4):
        for t in range(30):
            sims = [F.cosine_similarity(z[b, t], codes[k], dim=0).item() for k in range(50)]
            assert ids[b, t].item() == max(range(50), key=sims.__getitem__)
    out = vq(z)
    assert torch.equal(out.ids, ids) and torch.equal(vq.codebook, codes)  # eval: no update
    assert torch.allclose(out.quantized, codes[ids], atol=1e-6)


def test_ema_update_moves_codes_toward_cluster_means_at_the_decay_rate():
    decay = 0.9
    vq = NormEMAVectorQuantizer(n_embed=3, embedding_dim=2, decay=decay, kmeans_init=False).train()
    start = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    vq.embedding.weight.copy_(start)
    # cluster A near code 0 at +30 degrees, cluster B near code 1 at 120 degrees; code 2 is never used
    a, b = math.pi / 6, 2 * math.pi / 3
    angles = torch.tensor([a - 0.1, a + 0.1, b - 0.05, b + 0.05])
    z = torch.stack([angles.cos(), angles.sin()], -1) * torch.tensor([[2.0], [0.5], [1.0], [3.0]])
    out = vq(z)
    assert out.ids.tolist() == [0, 0, 1, 1]
    mean_a, mean_b = torch.tensor([math.cos(a), math.sin(a)]), torch.tensor([math.cos(b), math.sin(b)])
    expect0 = F.normalize(decay * start[0] + (1 - decay) * mean_a, dim=0)  # one step, by hand
    expect1 = F.normalize(decay * start[1] + (1 - decay) * mean_b, dim=0)
    assert torch.allclose(vq.codebook[0], expect0, atol=1e-6) and torch.allclose(vq.codebook[1], expect1, atol=1e-6)
    assert torch.equal(vq.codebook[2], start[2])
    assert torch.allclose(vq.cluster_size, torch.tensor([0.2, 0.2, 0.0]))  # (1 - decay) * counts
    for _ in range(200):
        vq(z)
    assert torch.allclose(vq.codebook[:2], torch.stack([mean_a, mean_b]), atol=1e-5)  # converged onto the means
    assert torch.allclose(vq.cluster_size, torch.tensor([2.0, 2.0, 0.0]), atol=1e-6)
    # padded positions take no part in the update
    vq.embedding.weight.copy_(start)
    vq(torch.cat([z, -z]), padding_mask=torch.tensor([False] * 4 + [True] * 4))
    assert torch.allclose(vq.codebook[0], expect0, atol=1e-6) and torch.equal(vq.codebook[2], start[2])


def test_kmeans_finds_well_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    labels = torch.arange(6).repeat_interleave(40)
    samples = (centres[labels] + 0.05 * torch.randn(240, 16, generator=g)) * (1 + torch.rand(240, 1, generator=g))
    means, counts = cosine_kmeans(samples, 6, generator=g)
    match = (means @ centres.T).argmax(1)
    assert sorted(match.tolist()) == list(range(6)) and counts.tolist() == [40] * 6
    assert (means @ centres.T).max(1).values.min() > 0.99
    vq = NormEMAVectorQuantizer(n_embed=6, embedding_dim=16).train()
    vq(samples.view(4, 60, 16))  # first training batch seeds the codebook
    assert sorted((vq.codebook @ centres.T).argmax(1).tolist()) == list(range(6))


def test_dead_codes_are_replaced():
    vq = NormEMAVectorQuantizer(n_embed=4, embedding_dim=2, decay=0.5, kmeans_init=False, dead_code_threshold=0.5)
    vq.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    vq.cluster_size.fill_(1.0)
    z = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0]])
    vq.train()(z)
    # codes 2 and 3 win nothing: their usage is 0.5 after one step (not below 0.5), 0.25 after two
    assert torch.equal(vq.codebook[2:], torch.tensor([[-1.0, 0.0], [0.0, -1.0]]))
    vq(z)
    inputs = F.normalize(z, dim=-1)
    for code in vq.codebook[2:]:
        assert torch.isclose(inputs @ code, torch.ones(1), atol=1e-6).any()  # now a batch input


def test_quantizer_errors():
    vq = NormEMAVectorQuantizer(n_embed=4, embedding_dim=3)
    with pytest.raises(RuntimeError, match="not initialised"):
        vq.eval()(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        vq.nearest(torch.randn(2, 4))
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        vq.train()(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.bool))
