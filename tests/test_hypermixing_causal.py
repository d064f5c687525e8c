"""Chunk-causal HyperMixing: full context = HyperMixing bit for bit, parity with an explicit O(L²) reference,
streaming = full forward, causality, padding invariance, constant state, protocol, gradients, bfloat16."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lobes.attention import sinusoidal_table
from lobes.hypermixing import ChunkCausalHyperMixing, HyperMixing, HyperMixingState
from lobes.mixers import TokenMixer, check_token_mixer, make_mixers

D, HYPER = 16, 32


def _mixer(chunk_size=1, heads=2, normalize=False, tied=False, fix=False, d=D, hyper=HYPER, **kw):
    return ChunkCausalHyperMixing(
        d, hyper, tied=tied, num_heads=heads, fix_tm_hidden_size=fix, chunk_size=chunk_size, normalize=normalize, **kw
    )


def _padding_mask(lengths, total):
    return torch.arange(total).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)  # (B, L), True = pad


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _reference(mixer, x, keep=None):
    """Chunk-causal HyperMixing written out: generate W1 and W2 for every frame from the parameters, then for
    every frame t sum x_s ⊗ W1_s over s up to the end of t's chunk (O(L²)), in float64."""
    p = {name: t.detach().double() for name, t in mixer.state_dict().items()}
    B, L, d = x.shape
    H, C = mixer.num_heads, mixer.chunk_size
    dh = d // H
    keep = torch.ones(B, L, dtype=torch.float64) if keep is None else keep.double()
    x = x.detach().double() * keep.unsqueeze(-1)
    hyp_in = (x + sinusoidal_table(L, d).double()).view(B, L, H, dh)

    def generate(prefix):  # (B, L, H, hs): one row of W per frame and head
        hidden = F.gelu(torch.einsum("blhf,hkf->blhk", hyp_in, p[prefix + "fc1_weights"]) + p[prefix + "fc1_biases"])
        return torch.einsum("blhk,hok->blho", hidden, p[prefix + "fc2_weights"]) + p[prefix + "fc2_biases"]

    w1 = generate("hyper.w1_gen.")
    w2 = w1 if mixer.hyper.tied else generate("hyper.w2_gen.")
    xs = x.view(B, L, H, dh)
    out = torch.zeros(B, L, H, dh, dtype=torch.float64)
    for t in range(L):
        end = min(L, (t // C + 1) * C)
        hidden = torch.einsum("bshc,bsho->bhco", xs[:, :end], w1[:, :end])  # (B, H, dh, hs)
        if mixer.normalize:
            hidden = hidden / keep[:, :end].sum(1).clamp(min=1).view(B, 1, 1, 1)
        out[:, t] = torch.einsum("bhco,bho->bhc", F.gelu(hidden), w2[:, t])
    out = out.reshape(B, L, d) * keep.unsqueeze(-1)
    return F.layer_norm(out, (d,), p["layer_norm.weight"], p["layer_norm.bias"], eps=mixer.layer_norm.eps)


# ------------------------------------------------------------------------------ full context / weights
@pytest.mark.parametrize("heads,tied,fix", [(1, False, False), (4, True, False), (2, False, True)])
def test_full_context_is_hypermixing_bit_for_bit(heads, tied, fix):
    full = HyperMixing(D, HYPER, tied=tied, num_heads=heads, fix_tm_hidden_size=fix)
    mixer = _mixer(None, heads, tied=tied, fix=fix)
    assert mixer.state_dict().keys() == full.state_dict().keys()
    mixer.load_state_dict(full.state_dict())
    x = torch.randn(3, 21, D)
    mask = _padding_mask([21, 9, 1], 21)
    for kwargs in ({}, {"key_padding_mask": mask}):
        assert torch.equal(mixer(x, x, x, **kwargs)[0], full(x, x, x, **kwargs)[0])
    full.load_state_dict(_mixer(3, heads, tied=tied, fix=fix).state_dict())  # and the other way round


def test_one_chunk_without_normalisation_is_hypermixing():
    """A chunk as long as the sequence sees everything: the regrouped chunk path equals HyperMixing."""
    full = HyperMixing(D, HYPER, num_heads=4)
    mixer = _mixer(25, 4, normalize=False)
    mixer.load_state_dict(full.state_dict())
    x = torch.randn(2, 25, D)
    assert _max_diff(mixer(x, x, x)[0], full(x, x, x)[0]) <= 1e-5


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize(
    "chunk,normalize,heads,tied,fix",
    [
        (1, True, 1, False, False),
        (1, False, 4, False, False),
        (3, True, 4, False, False),
        (3, False, 2, True, True),
        (8, True, 2, True, True),
        (8, False, 1, False, False),
    ],
)
def test_matches_explicit_reference(chunk, normalize, heads, tied, fix):
    mixer = _mixer(chunk, heads, normalize=normalize, tied=tied, fix=fix).double()
    x = torch.randn(2, 19, D, dtype=torch.float64)
    mask = _padding_mask([19, 12], 19)
    out, weights = mixer(x, x, x, key_padding_mask=mask)
    ref = _reference(mixer, x, keep=(~mask).double())
    valid = ~mask
    assert _max_diff(out[valid], ref[valid]) <= 1e-10
    assert weights.shape == (2, 19, 19)


def test_float32_matches_reference_across_blocks():
    """float32, sequences longer than one internal block (forced small here) and than the positional table."""
    mixer = _mixer(2, 4, max_length=10)
    mixer._block_frames = 6
    x = torch.randn(2, 31, D)
    assert _max_diff(mixer(x, x, x)[0], _reference(mixer, x).float()) <= 1e-5


@pytest.mark.parametrize("chunk", [1, 3])
def test_block_length_does_not_change_the_output(chunk):
    mixer = _mixer(chunk, 2)
    x = torch.randn(2, 40, D)
    whole = mixer(x, x, x)[0]
    mixer._block_frames, mixer._block_chunks = 5, 2
    assert _max_diff(mixer(x, x, x)[0], whole) <= 1e-5


# ------------------------------------------------------------------------------------ streaming
def _splits(total, chunk, generator):
    """Random piece lengths, multiples of ``chunk`` except the last, summing to ``total``."""
    sizes, left = [], total
    while left > 0:
        n = chunk * int(torch.randint(0, 4, (), generator=generator))
        n = left if n == 0 or n >= left else n
        sizes.append(n)
        left -= n
    return sizes


@pytest.mark.parametrize("chunk,normalize", [(1, True), (1, False), (2, True), (5, True), (4, False)])
def test_streaming_equals_full_forward(chunk, normalize):
    mixer = _mixer(chunk, 2, normalize=normalize, max_length=12)  # streams past the precomputed positions
    mixer._block_frames = 7
    x = torch.randn(2, 37, D)
    mask = _padding_mask([37, 30], 37)
    full = mixer(x, x, x, key_padding_mask=mask)[0]
    gen = torch.Generator().manual_seed(chunk)
    for _ in range(2):
        sizes = _splits(37, chunk, gen)
        state, outs, start = None, [], 0
        for n in sizes:
            y, state = mixer.forward_chunk(x[:, start : start + n], state, key_padding_mask=mask[:, start : start + n])
            outs.append(y)
            start += n
        assert state.offset == 37 and state.count.tolist() == [37.0, 30.0]
        valid = ~mask
        assert _max_diff(torch.cat(outs, 1)[valid], full[valid]) <= 1e-5, sizes


def test_causal_streaming_one_frame_at_a_time():
    mixer = _mixer(1, 2)
    x = torch.randn(1, 13, D)
    state, outs = None, []
    for t in range(13):
        y, state = mixer.forward_chunk(x[:, t : t + 1], state)
        outs.append(y)
    assert _max_diff(torch.cat(outs, 1), mixer(x, x, x)[0]) <= 1e-5


def test_state_size_does_not_grow():
    mixer = _mixer(2, 2)
    state, sizes = None, []
    for n in (2, 20, 200):
        _, state = mixer.forward_chunk(torch.randn(3, n, D), state)
        sizes.append([tuple(state.sums.shape), tuple(state.count.shape)])
    assert isinstance(state, HyperMixingState) and state.offset == 222
    assert sizes[0] == sizes[1] == sizes[2] == [(3, 2, D // 2, D // 2 + 1), (3,)]


def test_empty_piece_and_empty_sequence():
    mixer = _mixer(2, 2)
    _, state = mixer.forward_chunk(torch.randn(1, 4, D))
    y, same = mixer.forward_chunk(torch.zeros(1, 0, D), state)
    assert y.shape == (1, 0, D) and same.offset == 4 and torch.equal(same.sums, state.sums)
    out, weights = mixer(torch.zeros(2, 0, D), None, None)
    assert out.shape == (2, 0, D) and weights.shape == (2, 0, 0)


# ------------------------------------------------------------------------------------ causality
@pytest.mark.parametrize("chunk", [1, 4])
def test_future_frames_never_change_past_chunks(chunk):
    mixer = _mixer(chunk, 2)
    mixer._block_frames = 8
    x = torch.randn(2, 30, D)
    out = mixer(x, x, x)[0]
    for k in (0, 3, 5):
        end = (k + 1) * chunk  # frames of chunks <= k
        changed = x.clone()
        changed[:, end:] = torch.randn_like(changed[:, end:]) * 3
        out2 = mixer(changed, changed, changed)[0]
        assert _max_diff(out2[:, :end], out[:, :end]) <= 1e-6
        assert _max_diff(out2[:, end:], out[:, end:]) > 1e-2  # the test can see a change


@pytest.mark.parametrize("chunk", [1, 3])
def test_no_gradient_from_the_future(chunk):
    mixer = _mixer(chunk, 2)
    mixer._block_frames = 6
    x = torch.randn(1, 20, D, requires_grad=True)
    out = mixer(x, x, x)[0]
    t = 7
    (out[:, t] * torch.randn(D)).sum().backward()  # a plain sum of a layer norm's output has no gradient
    end = (t // chunk + 1) * chunk
    assert x.grad[:, end:].abs().max().item() == 0.0
    assert x.grad[:, :end].abs().amax(-1).min().item() > 0.0


# ------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("chunk,normalize", [(1, True), (3, True), (3, False)])
def test_padded_in_a_batch_equals_alone(chunk, normalize):
    mixer = _mixer(chunk, 2, normalize=normalize)
    lengths = [17, 11, 4]
    seqs = [torch.randn(1, n, D) for n in lengths]
    batch = torch.randn(3, 17, D) * 5  # padding holds garbage
    for i, s in enumerate(seqs):
        batch[i, : lengths[i]] = s[0]
    out = mixer(batch, batch, batch, key_padding_mask=_padding_mask(lengths, 17))[0]
    for i, s in enumerate(seqs):
        alone = mixer(s, s, s)[0]
        assert _max_diff(out[i, : lengths[i]], alone[0]) <= 1e-5


# ------------------------------------------------------------------------------------ interface
def test_token_mixer_protocol():
    mixer = check_token_mixer(_mixer(2, 2))
    assert isinstance(mixer, TokenMixer)
    mixers = make_mixers(partial(ChunkCausalHyperMixing, D, HYPER, num_heads=2, chunk_size=4), 2)
    assert mixers[0] is not mixers[1] and mixers[1].chunk_size == 4
    x = torch.randn(2, 9, D)
    out = mixer(x, x, x, attn_mask=None, key_padding_mask=None, return_attn_weights=False, pos_embs=None)
    assert isinstance(out, tuple) and out[0].shape == (2, 9, D)
    assert torch.equal(mixer(x)[0], out[0])  # forward(x) alone: the query is also key and value


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_rejects_bad_chunk_size(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkCausalHyperMixing(D, HYPER, chunk_size=bad)


def test_errors_name_the_problem():
    mixer = _mixer(4, 2)
    with pytest.raises(ValueError, match=r"\(batch, time, 16\)"):
        mixer(torch.randn(2, 5, 8), None, None)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mixer(torch.randn(2, 5, D), None, None, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    _, state = mixer.forward_chunk(torch.randn(2, 6, D))  # ends inside a chunk
    with pytest.raises(ValueError, match="inside a chunk"):
        mixer.forward_chunk(torch.randn(2, 4, D), state)
    _, state = mixer.forward_chunk(torch.randn(2, 4, D))
    with pytest.raises(ValueError, match="batch of 3"):
        mixer.forward_chunk(torch.randn(3, 4, D), state)
    with pytest.raises(ValueError, match="chunk_size=None"):
        _mixer(None, 2).forward_chunk(torch.randn(1, 4, D))


# ------------------------------------------------------------------------------------ training
def test_gradients_match_finite_differences():
    mixer = _mixer(2, 2, d=4, hyper=4).double()
    mixer._block_frames = 2  # several checkpointed blocks chained by the state
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = _padding_mask([4], 5)
    assert torch.autograd.gradcheck(lambda v: mixer(v, v, v, key_padding_mask=mask)[0], (x,), atol=1e-6, fast_mode=True)


def test_gradients_reach_every_parameter():
    mixer = _mixer(3, 2)
    mixer._block_frames = 6
    x = torch.randn(2, 20, D, requires_grad=True)
    (mixer(x, x, x)[0] * torch.randn(2, 20, D)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bfloat16_runs_and_stays_close():
    mixer = _mixer(2, 2)
    x = torch.randn(2, 30, D)
    ref = mixer(x, x, x)[0]
    low = mixer.to(torch.bfloat16)
    xb = x.to(torch.bfloat16).requires_grad_()
    out = low(xb, xb, xb)[0]
    assert out.dtype == torch.bfloat16 and _max_diff(out.float(), ref) <= 0.1
    out.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    y, state = low.forward_chunk(xb[:, :10].detach())
    assert y.dtype == torch.bfloat16 and state.sums.dtype == torch.float32


def _training_step(mixer, x, mask, weights, streamed):
    """Output and gradients (input, then every parameter) of ``sum(out * weights)``."""
    mixer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    if streamed:  # the block-checkpointed path, through the streaming call from an empty state
        out = mixer.forward_chunk(x, key_padding_mask=mask)[0]
    else:  # the training kernel
        out = mixer(x, x, x, key_padding_mask=mask)[0]
    (out * weights).sum().backward()
    return out.detach(), [x.grad] + [p.grad for _, p in mixer.named_parameters()]


@pytest.mark.parametrize(
    "chunk,tied,fix,blocks",
    [
        (1, False, False, None),
        (1, True, False, (5, 3)),
        (3, False, True, (7, 2)),
        (4, False, False, None),
        (16, False, False, (20, 64)),
        (2, True, True, (6, 64)),
    ],
)
def test_training_kernel_equals_the_checkpointed_path(chunk, tied, fix, blocks):
    """forward() under autograd (the training kernel, its backward written out) gives the output and every
    gradient of the streaming call, which recomputes blocks under autograd."""
    torch.manual_seed(chunk)
    mixer = _mixer(chunk, 2, tied=tied, fix=fix, max_length=20)  # runs past the precomputed positions
    mixer._kernel_below_chunk = 10**6  # the kernel for every chunk size
    if blocks is not None:
        mixer._block_frames, mixer._block_chunks = blocks
        mixer._native_block_frames = blocks[0]  # the compiled kernels' blocks, where they are built
    lengths = [45, 31, 8]
    x = torch.randn(3, 45, D)
    mask = _padding_mask(lengths, 45)
    weights = torch.randn(3, 45, D)
    out, grads = _training_step(mixer, x, mask, weights, streamed=False)
    ref_out, ref_grads = _training_step(mixer, x, mask, weights, streamed=True)
    assert _max_diff(out, ref_out) <= 1e-5
    names = ["input"] + [n for n, _ in mixer.named_parameters()]
    for name, g, ref in zip(names, grads, ref_grads):
        assert g is not None and ref is not None, name
        assert _max_diff(g, ref) <= 1e-4 * max(1.0, ref.abs().max().item()), name


def test_training_kernel_under_autocast():
    mixer = _mixer(1, 2)
    x = torch.randn(2, 30, D)
    weights = torch.randn(2, 30, D)
    ref_out, ref_grads = _training_step(mixer, x, None, weights, streamed=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _training_step(mixer, x, None, weights, streamed=False)
    assert _max_diff(out.float(), ref_out) <= 0.1
    for g, ref in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and F.cosine_similarity(g.flatten().float(), ref.flatten(), dim=0) > 0.98
