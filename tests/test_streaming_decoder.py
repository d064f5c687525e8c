"""Attention decoder with causal HyperMixing self-attention: incremental decoding (carried state) equals the full
decoder, constant state size, beam search equal to speechbrain's full-prefix beam search, errors."""

from functools import partial

import pytest
import torch
from speechbrain.decoders.seq2seq import S2STransformerBeamSearcher

from lobes.asr import AttentionDecoder
from lobes.attention import PositionalEncoding
from lobes.hypermixing import ChunkCausalHyperMixing, HyperMixing
from lobes.incremental import IncrementalBeamSearcher, IncrementalDecoder

V, D = 11, 16


def _decoder(hyper: bool, layers: int = 2) -> AttentionDecoder:
    torch.manual_seed(0)
    mixer = partial(ChunkCausalHyperMixing, D, 32, num_heads=2, chunk_size=1) if hyper else None
    return AttentionDecoder(
        V, D, layers, 2, 32, PositionalEncoding(D, max_len=8), dropout=0.0, self_attention=mixer
    ).eval()


def _full_log_probs(dec, tokens, memory, lengths):
    with torch.no_grad():
        hidden, _ = dec(tokens, memory, lengths)
        return torch.log_softmax(dec.seq_lin(hidden), dim=-1)


@pytest.mark.parametrize("hyper", [True, False])
def test_incremental_equals_full_forward(hyper):
    dec = _decoder(hyper)
    memory, lengths = torch.randn(3, 9, D), torch.tensor([9, 4, 6])
    tokens = torch.randint(0, V, (3, 13))  # longer than the positional table: positions computed on demand
    full = _full_log_probs(dec, tokens, memory, lengths)
    steps = IncrementalDecoder(dec)
    state = steps.start(memory, lengths)
    outs = []
    for t in range(tokens.shape[1]):
        log_probs, state = steps.step(tokens[:, t], state)
        outs.append(log_probs)
    assert (torch.stack(outs, 1) - full).abs().max() <= 1e-5


def test_hypermixing_decoder_state_does_not_grow_and_attention_cache_does():
    memory = torch.randn(1, 5, D)
    sizes = {}
    for hyper in (True, False):
        steps = IncrementalDecoder(_decoder(hyper))
        state = steps.start(memory)
        shapes = []
        for t in range(30):
            _, state = steps.step(torch.tensor([t % V]), state)
            first = state.self_states[0]
            shapes.append(tuple(first.sums.shape) if hyper else tuple(first[0].shape))
        sizes[hyper] = shapes
    assert len(set(sizes[True])) == 1
    assert sizes[False][0][2] == 1 and sizes[False][-1][2] == 30


def test_future_tokens_do_not_change_earlier_outputs():
    dec = _decoder(True)
    memory, lengths = torch.randn(1, 6, D), torch.tensor([6])
    a = torch.randint(0, V, (1, 8))
    b = a.clone()
    b[:, 5:] = (a[:, 5:] + 1) % V
    assert torch.equal(_full_log_probs(dec, a, memory, lengths)[:, :5], _full_log_probs(dec, b, memory, lengths)[:, :5])


@pytest.mark.parametrize("hyper", [True, False])
def test_beam_search_equals_speechbrains_full_prefix_search(hyper):
    dec = _decoder(hyper)
    memory, lengths = torch.randn(3, 9, D), torch.tensor([9, 4, 6])

    class Model(torch.nn.Module):  # ASRModel.decode's signature, for speechbrain's searcher
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def decode(self, tokens, enc, enc_lens):
            return self.decoder(tokens, enc, enc_lens.round().long())

    opts = dict(bos_index=1, eos_index=2, min_decode_ratio=0.0, max_decode_ratio=1.5, beam_size=3)
    ours = IncrementalBeamSearcher(dec, **opts)
    reference = S2STransformerBeamSearcher([Model(dec), dec.seq_lin], **opts)
    with torch.no_grad():
        hyps, _, scores, _ = ours(memory, lengths.float() / 9)
        ref_hyps, _, ref_scores, _ = reference(memory, lengths.float() / 9)
    assert hyps == ref_hyps
    assert (scores - ref_scores).abs().max() <= 1e-4


def test_non_causal_self_attention_is_refused():
    with pytest.raises(ValueError, match="causal"):
        AttentionDecoder(V, D, 1, 2, 32, PositionalEncoding(D), self_attention=partial(HyperMixing, D, 32))
    with pytest.raises(ValueError, match="causal"):
        AttentionDecoder(V, D, 1, 2, 32, PositionalEncoding(D),
                         self_attention=partial(ChunkCausalHyperMixing, D, 32, chunk_size=4))  # fmt: skip


def test_default_decoder_keeps_its_state_dict_keys():
    keys = set(_decoder(False).state_dict())
    assert any(k.endswith("self_attn.att.in_proj_weight") for k in keys)
    hyper = set(_decoder(True).state_dict())
    assert any("self_attn.hyper.w1_gen" in k for k in hyper)
