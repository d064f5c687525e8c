"""BEATs: parity with SpeechBrain's BEATs (the oracle) submodule by submodule, exact padding, checkpoint
I/O, bad input, fine-tuning, reduced precision, pooling utilities.

The checkpoints are written here in Microsoft's format (``{"cfg", "model"[, "label_dict"]}``, weight-norm
names ``weight_g`` / ``weight_v``) from the reference implementation's own random initialisation, with every
tensor perturbed so that no parameter keeps a trivial value (LayerNorm 1/0, gate 1).
"""

import logging
import os
import stat
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from speechbrain.lobes.models import beats as sb_beats

import lobes.beats.model as beats_model
from lobes.beats import (
    AttentivePooling,
    BEATs,
    BEATsCheckpointError,
    BEATsConfig,
    WeightedLayerSum,
    config_from_weights,
    label_names,
    layer_index,
    load_beats,
    masked_mean,
    min_num_samples,
    read_audioset_names,
    read_config,
    token_padding_mask,
    top_k_labels,
    valid_token_counts,
)
from lobes.beats.config import HIDDEN_FORWARD_FIELDS, WEIGHT_FIELDS

ROOT = Path(__file__).resolve().parents[1]

TOL = 1e-4  # max abs, features and probabilities


def _released_cfg(layers, finetuned=False):
    cfg = BEATsConfig.released(encoder_layers=layers, finetuned_model=finetuned).to_dict()
    cfg.update(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, predictor_dropout=0.0)
    return cfg


def _write_microsoft_checkpoint(path, cfg, label_dict=None, seed=0):
    """Random weights from the reference's own init, perturbed, saved with Microsoft's key names."""
    torch.save({"cfg": cfg, "model": {}}, path)
    with mock.patch.object(sb_beats.BEATs, "load_state_dict", lambda self, sd: None):
        ref = sb_beats.BEATs(str(path), freeze=True)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in ref.state_dict().items():
        noise = torch.randn(value.shape, generator=g)
        if key.endswith("relative_attention_bias.weight"):
            continue  # one shared table, written once per layer below
        if "layer_norm" in key or key.endswith("grep_a"):
            value = (1.0 + 0.1 * noise) if key.endswith(("weight", "grep_a")) else 0.1 * noise
        elif key.endswith("bias"):
            value = value + 0.05 * noise
        else:
            value = value * (1.0 + 0.1 * noise) + 0.01 * noise
        state[key] = value
    if cfg.get("relative_position_embedding"):
        table = torch.randn(cfg["num_buckets"], cfg["encoder_attention_heads"], generator=g)
        for i in range(cfg["encoder_layers"]):
            state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = table
    for old, new in (
        ("parametrizations.weight.original0", "weight_g"),
        ("parametrizations.weight.original1", "weight_v"),
    ):
        state[f"encoder.pos_conv.0.{new}"] = state.pop(f"encoder.pos_conv.0.{old}")
    ckpt = {"cfg": cfg, "model": state}
    if label_dict is not None:
        ckpt["label_dict"] = label_dict
    torch.save(ckpt, path)
    return path


def _wav(batch, seconds, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(16000 * seconds)
    t = torch.arange(n) / 16000
    return 0.1 * torch.randn(batch, n, generator=g) + 0.2 * torch.sin(2 * torch.pi * 330 * t)


@pytest.fixture(scope="module")
def as2m_ckpt(tmp_path_factory):
    labels = {i: f"label_{i}" for i in range(527)}
    return _write_microsoft_checkpoint(tmp_path_factory.mktemp("beats") / "as2m.pt", _released_cfg(2, True), labels)


@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory):
    """A small pre-trained-style checkpoint (released structure, reduced widths) for I/O and precision tests."""
    cfg = _tiny_cfg(encoder_embed_dim=64, encoder_ffn_embed_dim=128, embed_dim=48).to_dict()
    return _write_microsoft_checkpoint(tmp_path_factory.mktemp("beats") / "small.pt", cfg, seed=1)


@pytest.fixture(scope="module")
def pair(as2m_ckpt):
    ours = BEATs(as2m_ckpt, output_all_hiddens=True)
    ref = sb_beats.BEATs(str(as2m_ckpt), freeze=True, output_all_hiddens=True).eval()
    return ours, ref


def _tiny_cfg(**kw):
    base = dict(
        encoder_layers=2,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=64,
        encoder_attention_heads=4,
        embed_dim=24,
        conv_pos=16,
        conv_pos_groups=4,
        dropout=0.0,
        attention_dropout=0.0,
    )
    base.update(kw)
    return BEATsConfig.released(**base)


# ---------------------------------------------------------------------------------------------- parity
def test_parity_fbank(pair):
    ours, ref = pair
    wav = _wav(2, 1.2)
    assert (ours.preprocess(wav) - ref.preprocess(wav)).abs().max() < TOL


def test_parity_patch_embedding(pair):
    ours, ref = pair
    fbank = ref.preprocess(_wav(2, 1.2))
    with torch.no_grad():
        r = ref.patch_embedding(fbank.unsqueeze(1))
        r = r.reshape(r.shape[0], r.shape[1], -1).transpose(1, 2)
        o = ours.embed_patches(fbank)
    assert o.shape == r.shape == (2, 56, 512)
    assert (o - r).abs().max() < TOL


def test_parity_positional_conv_and_bias(pair):
    ours, ref = pair
    x = torch.randn(2, 768, 40)
    with torch.no_grad():
        assert (ours.encoder.pos_conv(x) - ref.encoder.pos_conv(x)).abs().max() < TOL
        r_bias = ref.encoder.layers[0].self_attn.compute_bias(600, 600)
        o_bias = ours.encoder.position_bias(600, torch.device("cpu"))
    assert torch.equal(o_bias, r_bias)


def test_parity_one_layer(pair):
    ours, ref = pair
    x = torch.randn(2, 48, 768)
    with torch.no_grad():
        r, _, _ = ref.encoder.layers[0](x.transpose(0, 1), self_attn_padding_mask=None, pos_bias=None)
        o = ours.encoder.layers[0](x, ours.encoder.position_bias(48, x.device), None)
    assert (o - r.transpose(0, 1)).abs().max() < TOL


def test_parity_whole_model_every_layer_and_head(pair):
    ours, ref = pair
    wav = _wav(2, 2.0, seed=3)
    lens = torch.ones(2)
    o_feats, o_probs, o_pad = ours(wav, lens)
    r_feats, r_probs, r_pad = ref(wav, lens)
    r_feats = r_feats.transpose(1, 2)  # the reference stacks hiddens as (L + 1, T, B, C)
    assert o_feats.shape == r_feats.shape == (3, 2, 96, 768)
    for layer in range(3):
        assert (o_feats[layer] - r_feats[layer]).abs().max() < TOL, f"layer {layer}"
    assert o_probs.shape == (2, 527)
    assert (o_probs - r_probs).abs().max() < TOL
    assert torch.equal(o_pad, r_pad)


def test_wav_lens_optional(pair):
    ours, _ = pair
    wav = _wav(2, 1.0)
    a, pa, ma = ours(wav)
    b, pb, mb = ours(wav, torch.ones(2))
    assert torch.equal(a, b) and torch.equal(pa, pb) and not ma.any()


@pytest.mark.slow
def test_parity_full_released_depth(tmp_path):
    path = _write_microsoft_checkpoint(tmp_path / "full.pt", _released_cfg(12, True), seed=5)
    ours = BEATs(path, output_all_hiddens=True)
    ref = sb_beats.BEATs(str(path), freeze=True, output_all_hiddens=True).eval()
    wav = _wav(2, 3.0, seed=6)
    o, op, _ = ours(wav, torch.ones(2))
    r, rp, _ = ref(wav, torch.ones(2))
    assert (o - r.transpose(1, 2)).abs().max() < TOL
    assert (op - rp).abs().max() < TOL


# ---------------------------------------------------------------------------------------------- padding
def test_padded_clip_equals_clip_alone(pair):
    ours, _ = pair
    long, short = _wav(1, 3.0, seed=7), _wav(1, 1.5, seed=8)
    batch = torch.zeros(2, long.shape[1])
    batch[0], batch[1, : short.shape[1]] = long[0], short[0]
    lens = torch.tensor([1.0, short.shape[1] / long.shape[1]])
    b_feats, b_probs, b_pad = ours(batch, lens)
    s_feats, s_probs, s_pad = ours(short)
    n = s_feats.shape[2]
    assert int((~b_pad[1]).sum()) == n and not b_pad[1, :n].any() and b_pad[1, n:].all()
    assert (b_feats[:, 1, :n] - s_feats[:, 0]).abs().max() < TOL  # every layer
    assert (b_probs[1] - s_probs[0]).abs().max() < TOL
    l_feats, _, _ = ours(long)
    assert (b_feats[:, 0] - l_feats[:, 0]).abs().max() < TOL


def test_partial_patch_is_padding():
    # 8000 samples -> 48 frames -> 3 time patches; 4000 samples -> 23 frames -> one full 16-frame
    # patch, the 7 frames left over are not a token
    wav = torch.zeros(2, 8000)
    lens = torch.tensor([1.0, 0.5])
    assert valid_token_counts(wav, lens).tolist() == [24, 8]
    mask = token_padding_mask(wav, lens)
    assert mask.shape == (2, 24) and mask[1].sum() == 16 and not mask[1, :8].any()
    assert min_num_samples() == 2800


def test_minimum_length_works_one_below_fails():
    model = BEATs(cfg=_tiny_cfg())
    assert model(torch.randn(1, 2800))[0].shape == (1, 8, 32)
    with pytest.raises(ValueError, match="2800"):
        model(torch.randn(1, 2799))
    with pytest.raises(ValueError, match="2800"):
        model(torch.randn(2, 5600), torch.tensor([1.0, 0.4]))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "wav, lens, err, match",
    [
        (torch.zeros(1, 0), None, ValueError, "too short"),
        (torch.zeros(0, 4000), None, ValueError, r"empty batch: wav has shape \(0, 4000\)"),
        (torch.full((1, 4000), float("nan")), None, ValueError, "NaN"),
        (torch.tensor([[0.0] * 3999 + [float("inf")]]), None, ValueError, "Inf"),
        (torch.zeros(1, 2, 4000), None, ValueError, r"\(B, N\)"),
        (torch.zeros(1, 4000, dtype=torch.int16), None, TypeError, "32768"),
        (torch.zeros(2, 4000), torch.tensor([1.0, 1.2]), ValueError, r"\(0, 1\]"),
        (torch.zeros(2, 4000), torch.tensor([1.0, 0.0]), ValueError, r"\(0, 1\]"),
        (torch.zeros(2, 4000), torch.tensor([1.0]), ValueError, r"shape \(2,\)"),
        (torch.zeros(2, 4000), torch.tensor([[1.0, 1.0]]), ValueError, r"shape \(2,\)"),
        (torch.zeros(2, 4000), torch.tensor([4000, 4000]), TypeError, "relative lengths"),
    ],
)
def test_bad_input(wav, lens, err, match):
    model = BEATs(cfg=_tiny_cfg())
    with pytest.raises(err, match=match):
        model(wav, lens)


def test_unscaled_int16_values_warn_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(beats_model, "_loud_input_warned", False)
    model = BEATs(cfg=_tiny_cfg())
    with caplog.at_level(logging.WARNING, logger="lobes.beats"):
        model(_wav(1, 0.5))  # ordinary float audio: no warning
        model(_wav(1, 1.0) * 1.5)  # a little clipping is not int16 PCM either
        assert not caplog.records
        pcm = (_wav(2, 0.5) * 32767).round()  # int16 sample values in a float tensor
        model(pcm)
        model(pcm)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert "int16" in messages[0] and "32768" in messages[0] and "once per process" in messages[0]


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_reference_loads_ours(pair, tmp_path):
    ours, _ = pair
    old = os.umask(0o022)
    try:
        path = ours.save_checkpoint(tmp_path / "sub" / "copy.pt")
    finally:
        os.umask(old)
    assert sorted(p.name for p in path.parent.iterdir()) == ["copy.pt"]  # no temporary left behind
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the umask applies, not a private temporary's 0600
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"cfg", "model", "label_dict"} and "encoder.pos_conv.0.weight_g" in raw["model"]
    again = BEATs(path, output_all_hiddens=True)
    ref = sb_beats.BEATs(str(path), freeze=True).eval()
    wav = _wav(1, 1.0)
    a = ours(wav)
    b = again(wav)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert again.labels == ours.labels and again.cfg == ours.cfg
    assert (ref(wav, torch.ones(1))[1] - a[1]).abs().max() < TOL


def test_parametrization_key_names_load(pretrained_ckpt, tmp_path):
    raw = torch.load(pretrained_ckpt, weights_only=True)
    model = dict(raw["model"])
    model["encoder.pos_conv.0.parametrizations.weight.original0"] = model.pop("encoder.pos_conv.0.weight_g")
    model["encoder.pos_conv.0.parametrizations.weight.original1"] = model.pop("encoder.pos_conv.0.weight_v")
    torch.save({"cfg": raw["cfg"], "model": model}, tmp_path / "param.pt")
    wav = _wav(1, 1.0)
    a = BEATs(pretrained_ckpt)(wav)
    b = BEATs(tmp_path / "param.pt")(wav)
    assert len(a) == len(b) == 1 and torch.equal(a[0], b[0])


def _broken(tmp_path, pretrained_ckpt, edit):
    raw = torch.load(pretrained_ckpt, weights_only=True)
    edit(raw)
    torch.save(raw, tmp_path / "broken.pt")
    return tmp_path / "broken.pt"


def test_checkpoint_errors(pretrained_ckpt, tmp_path):
    key = "encoder.layers.1.fc1.weight"  # (128, 64)
    with pytest.raises(BEATsCheckpointError, match=f"missing keys.*{key}"):
        BEATs(_broken(tmp_path, pretrained_ckpt, lambda r: r["model"].pop(key)))
    with pytest.raises(BEATsCheckpointError, match="unexpected keys.*extra.weight"):
        BEATs(_broken(tmp_path, pretrained_ckpt, lambda r: r["model"].update({"extra.weight": torch.zeros(1)})))
    with pytest.raises(BEATsCheckpointError, match=rf"{key}: expected \(128, 64\), got \(128, 60\)"):
        BEATs(_broken(tmp_path, pretrained_ckpt, lambda r: r["model"].update({key: torch.zeros(128, 60)})))
    with pytest.raises(BEATsCheckpointError, match="'cfg' and 'model'"):
        BEATs(_broken(tmp_path, pretrained_ckpt, lambda r: r.pop("cfg")))
    data = pretrained_ckpt.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BEATsCheckpointError, match="truncated.pt.*cannot read"):
        BEATs(tmp_path / "truncated.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(BEATsCheckpointError, match="cannot read"):
        BEATs(tmp_path / "text.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        BEATs(tmp_path / "nope.pt")
    assert issubclass(BEATsCheckpointError, ValueError)


@pytest.mark.parametrize(
    "cfg",
    [
        _tiny_cfg(),
        _tiny_cfg(finetuned_model=True, predictor_class=5, conv_bias=True, num_buckets=40, input_patch_size=8),
        BEATsConfig(
            encoder_layers=3,
            encoder_embed_dim=32,
            encoder_ffn_embed_dim=48,
            encoder_attention_heads=2,
            embed_dim=32,
            conv_pos=12,
            conv_pos_groups=8,
        ),
    ],
)
def test_config_from_weights_reads_back_every_visible_field(cfg):
    found = config_from_weights(BEATs(cfg=cfg).state_dict())
    expected = (
        set(WEIGHT_FIELDS)
        if cfg.relative_position_embedding
        else (set(WEIGHT_FIELDS) - {"num_buckets", "encoder_attention_heads"})
    )
    if not cfg.finetuned_model:
        expected.discard("predictor_class")
    assert set(found) == expected
    for field, (value, key) in found.items():
        assert value == getattr(cfg, field), (field, key)


def _partial_checkpoint(tmp_path, pretrained_ckpt, drop=(), **changes):
    raw = torch.load(pretrained_ckpt, weights_only=True)
    cfg = {k: v for k, v in raw["cfg"].items() if k not in drop}
    cfg.update(changes)
    path = tmp_path / f"partial_{len(list(tmp_path.iterdir()))}.pt"
    torch.save({"cfg": cfg, "model": raw["model"]}, path)
    return path


def test_cfg_that_contradicts_the_weights_names_field_and_key(pretrained_ckpt, tmp_path):
    table = "encoder.layers.0.self_attn.relative_attention_bias.weight"  # (320, 4) in this checkpoint
    partial = _partial_checkpoint(tmp_path, pretrained_ckpt, num_buckets=64)
    with pytest.raises(
        BEATsCheckpointError,
        match=rf"cfg num_buckets=64 but the weights \({table}\) imply "
        "num_buckets=320",
    ):
        BEATs(partial)
    # A missing field whose default cannot be right given the weights is an error saying how to fix it.
    raw = torch.load(pretrained_ckpt, weights_only=True)
    model = dict(raw["model"])
    for i in range(2):
        model[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = torch.randn(64, 4)
    cfg = {k: v for k, v in raw["cfg"].items() if k != "num_buckets"}
    torch.save({"cfg": cfg, "model": model}, tmp_path / "buckets.pt")
    with pytest.raises(
        BEATsCheckpointError,
        match=r"cfg has no 'num_buckets', so 320 was assumed, but the "
        rf"weights \({table}\) imply 64.*cfg=\{{'num_buckets': 64\}}",
    ):
        BEATs(tmp_path / "buckets.pt")
    fixed = BEATs(tmp_path / "buckets.pt", cfg={"num_buckets": 64})  # the way out the message names
    assert fixed.encoder.num_buckets == 64
    with pytest.raises(BEATsCheckpointError, match="cfg has no 'relative_position_embedding'.*imply True"):
        BEATs(_partial_checkpoint(tmp_path, pretrained_ckpt, drop=("relative_position_embedding",)))
    with pytest.raises(BEATsCheckpointError, match=r"cfg has no 'gru_rel_pos'.*grep_a\) imply True"):
        BEATs(_partial_checkpoint(tmp_path, pretrained_ckpt, drop=("gru_rel_pos",)))


def test_missing_hidden_fields_warn_with_the_assumed_value(pretrained_ckpt, tmp_path, caplog):
    assert set(HIDDEN_FORWARD_FIELDS) >= {"deep_norm", "max_distance", "activation_fn", "layer_norm_first"}
    assert "layer_wise_gradient_decay_ratio" not in HIDDEN_FORWARD_FIELDS  # gradients only
    path = _partial_checkpoint(
        tmp_path, pretrained_ckpt, drop=("deep_norm", "max_distance", "layer_wise_gradient_decay_ratio", "dropout")
    )
    with caplog.at_level(logging.WARNING, logger="lobes.beats"):
        model = BEATs(path)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    deep, dist = sorted(messages, key=lambda m: "max_distance" in m)
    assert "cfg has no 'deep_norm'" in deep and "assuming False" in deep and "use True" in deep
    assert "cfg has no 'max_distance'" in dist and "assuming 1280" in dist and "use 800" in dist
    assert "cfg={'max_distance': ...}" in dist and str(path) in dist
    assert model.encoder.max_distance == 1280 and model.encoder.layers[0].alpha == 1.0  # what was announced
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lobes.beats"):
        model = BEATs(path, cfg={"deep_norm": True, "max_distance": 800})
    assert not caplog.records and model.encoder.max_distance == 800
    wav = _wav(1, 1.0)
    assert torch.equal(model(wav)[0], BEATs(pretrained_ckpt)(wav)[0])


def test_cfg_overrides_on_load(pretrained_ckpt):
    model = BEATs(pretrained_ckpt, freeze=False, cfg={"dropout": 0.3})
    assert model.cfg.dropout == 0.3 and model.cfg.encoder_layers == 2


def test_tagging(pair):
    ours, _ = pair
    tags = ours.tag(_wav(3, 1.0), k=4)
    assert len(tags) == 3 and all(len(t) == 4 for t in tags)
    probs = ours(_wav(3, 1.0))[1]
    top = probs[0].topk(4)
    assert [name for name, _ in tags[0]] == [f"label_{i}" for i in top.indices.tolist()]
    assert [p for _, p in tags[0]] == pytest.approx(top.values.tolist())
    assert top_k_labels(torch.tensor([[0.2, 0.7]]), None, k=1) == [[("class_1", pytest.approx(0.7))]]
    with pytest.raises(ValueError, match="fine-tuned"):
        BEATs(cfg=_tiny_cfg()).tag(_wav(1, 1.0))


# ---------------------------------------------------------------------------------------------- commands' helpers
def test_load_beats_checkpoint_or_seeded_random_model(pretrained_ckpt, caplog):
    model = load_beats(pretrained_ckpt, output_all_hiddens=True)
    assert not model.training and model.output_all_hiddens and model.cfg.encoder_embed_dim == 64
    with pytest.raises(ValueError, match="one or the other"):
        load_beats(pretrained_ckpt, config={"encoder_layers": 1})
    tiny = _tiny_cfg().to_dict()
    state = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="lobes.beats"):
        a, b = load_beats(config=tiny), load_beats(config=tiny, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = load_beats(config=tiny, seed=1)
    assert not torch.equal(a.encoder.layers[0].fc1.weight, c.encoder.layers[0].fc1.weight)
    assert sum("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records) == 3


def test_read_config_from_yaml_and_errors(tmp_path):
    cfg = read_config(ROOT / "hparams" / "beats_tiny.yaml")
    assert (cfg.encoder_layers, cfg.num_buckets, cfg.max_distance) == (3, 64, 800)
    (tmp_path / "typo.yaml").write_text("encoder_layer: 3\n")
    with pytest.raises(ValueError, match=r"unknown fields \['encoder_layer'\]"):
        read_config(tmp_path / "typo.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="YAML mapping of BEATsConfig fields"):
        read_config(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        read_config(tmp_path / "nope.yaml")


def test_layer_index():
    assert [layer_index(x, 4) for x in ("last", "all", "0", 4, "-1", -5)] == [None, None, 0, 4, 4, 0]
    for bad in ("5", -6):
        with pytest.raises(ValueError, match=r"layers 0\.\.4"):
            layer_index(bad, 4)
    with pytest.raises(ValueError, match="'last', 'all' or an integer"):
        layer_index("middle", 4)


def test_label_names(tmp_path, caplog):
    model = BEATs(cfg=_tiny_cfg(finetuned_model=True, predictor_class=3))
    with caplog.at_level(logging.WARNING, logger="lobes.beats"):
        assert label_names(model) == ["class_0", "class_1", "class_2"]
    assert "no label_dict" in caplog.text
    model.label_dict = {0: "/m/a", 1: "/m/b", 2: "/m/c"}
    csv_path = tmp_path / "class_labels_indices.csv"
    csv_path.write_text('index,mid,display_name\n0,/m/c,"Cat, domestic"\n1,/m/a,Alarm\n')
    assert read_audioset_names(csv_path) == {"/m/c": "Cat, domestic", "/m/a": "Alarm"}
    assert label_names(model, csv_path) == ["Alarm", "/m/b", "Cat, domestic"]  # predictor order, not CSV order
    (tmp_path / "bad.csv").write_text("index,name\n0,x\n")
    with pytest.raises(ValueError, match=r"'mid' and 'display_name'.*\['index', 'name'\]"):
        label_names(model, tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="no predictor"):
        label_names(BEATs(cfg=_tiny_cfg()))


# ---------------------------------------------------------------------------------------------- layers / pooling
def test_layer_selection_matches_all_hiddens(pair, pretrained_ckpt):
    ours, _ = pair
    wav = _wav(2, 1.0)
    all_h = ours(wav)[0]
    for layer in (0, 1, 2):
        with torch.no_grad():
            assert (ours.extract_features(wav, layer=layer)[0] - all_h[layer]).abs().max() < 1e-5
    pre = BEATs(pretrained_ckpt, output_all_hiddens=True)
    all_p = pre(wav)[0]
    with torch.no_grad():
        assert (pre.extract_features(wav, layer=1)[0] - all_p[1]).abs().max() < 1e-6
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        pre.extract_features(wav, layer=3)


def test_weighted_layer_sum_and_pooling():
    h = torch.randn(3, 2, 5, 4)
    wsum = WeightedLayerSum(3)
    assert torch.allclose(wsum(h), h.mean(0), atol=1e-6)
    wsum(h).sum().backward()
    assert wsum.weights.grad is not None
    with pytest.raises(ValueError, match=r"\(3, B, T, C\)"):
        wsum(h[:2])
    x = torch.randn(2, 6, 4)
    pad = torch.tensor([[0, 0, 0, 1, 1, 1], [0] * 6]).bool()
    assert torch.allclose(masked_mean(x, pad)[0], x[0, :3].mean(0))
    pool = AttentivePooling(4, 8)
    y = pool(x, pad)
    x2 = x.clone()
    x2[0, 3:] = 100.0  # padded values must not matter
    assert torch.allclose(pool(x2, pad), y) and torch.allclose(pool(x[:1, :3]), y[:1], atol=1e-6)


# ---------------------------------------------------------------------------------------------- training
def test_finetuning_gradients_and_loss_decreases():
    torch.manual_seed(0)
    model = BEATs(cfg=_tiny_cfg(finetuned_model=True, predictor_class=3, predictor_dropout=0.0), freeze=False)
    model.train()
    wav, lens = _wav(2, 0.5), torch.tensor([1.0, 0.7])
    feats, probs, pad = model(wav, lens)
    loss = masked_mean(feats, pad).pow(2).mean() + probs.sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    losses = []
    for _ in range(4):  # plain gradient descent steps
        model.zero_grad()
        loss = F.binary_cross_entropy(model(wav, lens)[1], target)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 1e-2 * p.grad
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:]))


def test_layer_gradcheck_float64():
    model = BEATs(
        cfg=_tiny_cfg(encoder_embed_dim=8, encoder_ffn_embed_dim=16, encoder_attention_heads=2), freeze=False
    ).double()
    layer, enc = model.encoder.layers[0], model.encoder
    x = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    key_mask = torch.tensor([[[[0.0] * 4 + [float("-inf")] * 2]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda t: layer(t, enc.position_bias(6, t.device), key_mask)[:, :4], (x,), fast_mode=True
    )


def test_frozen_model_stays_eval_without_grad(pretrained_ckpt):
    model = BEATs(pretrained_ckpt, freeze=True)
    model.train()
    assert not model.training
    out = model(_wav(1, 1.0))[0]
    assert not out.requires_grad


# ------------------------------------------------------------------------------------- speed structure / precision
def test_attention_goes_through_sdpa_and_buckets_are_cached():
    model = BEATs(cfg=_tiny_cfg(encoder_layers=3))
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["attn_mask"].shape)
        return real(*args, **kwargs)

    with mock.patch.object(F, "scaled_dot_product_attention", counting):
        model(_wav(2, 1.0), torch.tensor([1.0, 0.5]))
    assert calls == [torch.Size([2, 4, 48, 48])] * 3
    assert len(model.encoder._buckets) == 1


def _cosine_min(a, b):
    return F.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


def test_bfloat16_autocast_and_cast(pretrained_ckpt):
    model = BEATs(pretrained_ckpt)
    wav, lens = _wav(2, 1.0), torch.tensor([1.0, 0.8])
    ref = model(wav, lens)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(wav, lens)[0]
    assert _cosine_min(auto, ref) > 0.99
    model.to(torch.bfloat16)
    cast = model(wav, lens)[0]
    assert cast.dtype == torch.bfloat16 and _cosine_min(cast, ref) > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_half_precision(pretrained_ckpt):
    model = BEATs(pretrained_ckpt).cuda()
    wav = _wav(2, 1.5).cuda()
    ref = model(wav)[0]
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            out = model(wav)[0]
        assert _cosine_min(out, ref) > 0.99


@pytest.mark.parametrize("channels, groups", [(64, 8), (768, 16)])  # 8 and 48 channels per group
def test_bfloat16_positional_conv_any_group_width(channels, groups):
    """CPU bf16 grouped conv1d is wrong for groups not a multiple of 16 channels wide: ours must not be."""
    cfg = dict(
        encoder_embed_dim=channels,
        encoder_attention_heads=4,
        encoder_ffn_embed_dim=2 * channels,
        encoder_layers=1,
        conv_pos_groups=groups,
    )
    conv = BEATs(cfg=cfg).encoder.pos_conv.eval()
    x = torch.randn(2, channels, 120)
    ref = conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = conv(x)
    cast = conv.to(torch.bfloat16)(x.bfloat16())
    for out in (auto, cast):
        assert _cosine_min(out.transpose(1, 2), ref.transpose(1, 2)) > 0.999
