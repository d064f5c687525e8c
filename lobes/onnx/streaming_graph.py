"""The chunk-step graph of a streaming HyperConformer: one chunk of audio and the carried state in, the CTC
log-probabilities of one chunk of encoder frames and the new state out.

:class:`StreamingASRGraph` is what :func:`lobes.onnx.export.export_streaming_asr` traces. It computes what
:class:`lobes.streaming.StreamingASR` computes (fbank, frame-wise normalisation, the strided front-end with its
cached input frames, the Conformer layers with their HyperMixing running sums and convolution caches), with
every piece of state a fixed-size tensor and no decision taken on the data, so one graph serves every batch
size and stream length:

* every call takes exactly ``chunk_samples`` samples and returns one chunk of ``chunk_frames`` encoder frames;
* the audio grid is shifted by the front-end's look-ahead ``lookahead`` (40 ms frames at 16 kHz need 40
  samples past the chunk's end): call ``n`` (from 0) takes samples ``[(n - 1) S + lookahead, n S + lookahead)``
  (``S`` = ``chunk_samples``; positions before 0 are ignored, so the first call holds the stream's first
  ``lookahead`` samples at its end) and returns encoder frames ``[(n - 1) C, n C)`` (none for the first call).
  A chunk is thus returned as soon as its audio and look-ahead have arrived, as ``StreamingASR`` does;
* ``lengths`` says how many of the chunk's samples belong to the stream; a call with fewer than expected ends
  it (the state remembers where), and further calls with ``lengths`` 0 return its last frames (the frames of
  the front-end's right padding), ``frames`` telling how many of each chunk are valid;
* positions (the absolute encoding added before the encoder and HyperMixing's own) are computed from the
  frame counter in the state: no table, no length ceiling;
* every row carries its own counters, so the rows of a batch may be streams at different points.

The state (:meth:`StreamingASRGraph.state_spec`) starts as zeros and keeps its size whatever the stream's
length: the last samples of the fbank window, the input frames of each front-end block that its next output
still needs, and per Conformer layer HyperMixing's running sums and count of valid frames and the depthwise
convolution's last inputs (``kernel_size - 1`` for a causal convolution; ``(kernel_size - 1) / 2`` for a chunk
convolution, ``causal="chunk"``, whose chunk input is [cache, chunk, zeros]); then the samples received and
the encoder frames passed.

Example
-------
>>> from functools import partial
>>> from lobes.asr import ASRModel
>>> from lobes.conformer import ConformerEncoder
>>> from lobes.hypermixing import ChunkCausalHyperMixing
>>> from lobes.streaming import GlobalNormalization
>>> enc = ConformerEncoder(1, 16, 32, partial(ChunkCausalHyperMixing, 16, 32, chunk_size=None), 3, causal=True)
>>> model = ASRModel(enc, 5, 16, frontend_channels=(4, 4), fbank_top_db=None, feature_norm=GlobalNormalization(80))
>>> graph = StreamingASRGraph(model.eval(), chunk_frames=2)
>>> graph.chunk_samples, graph.lookahead, [name for name, _, _ in graph.state_spec()]
(1280, 40, ['wav_cache', 'frontend0_cache', 'frontend1_cache', 'layer0_mixer_sums', 'layer0_mixer_count', \
'layer0_conv_cache', 'samples', 'frame'])
>>> state = graph.initial_state(batch=1)
>>> log_probs, frames, *state = graph(torch.zeros(1, 1280), torch.tensor([40]), *state)
>>> log_probs.shape, frames.tolist(), state[-1].tolist()
(torch.Size([1, 2, 5]), [0], [2])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lobes.onnx.graphs import DFTSpeechBrainFbank, ExportError

__all__ = ["StreamingASRGraph", "streaming_export_problems"]

_NO_END = 2**62  # "the stream has not ended": a length beyond any stream


def streaming_export_problems(model: nn.Module) -> list[str]:
    """What keeps an :class:`lobes.asr.ASRModel` from the chunk-step export (empty: nothing)."""
    from lobes.hypermixing import ChunkCausalHyperMixing
    from lobes.streaming import check_streamable

    try:
        check_streamable(model)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    for i, layer in enumerate(getattr(model.encoder, "layers", [])):
        if not isinstance(layer.mha_layer, ChunkCausalHyperMixing):
            problems.append(
                f"layer {i} mixes with {type(layer.mha_layer).__name__}; the chunk-step graph carries the "
                "constant-size state of ChunkCausalHyperMixing only"
            )
        if layer.convolution_module.padding < 1:
            problems.append(f"layer {i}: a depthwise convolution of kernel 1 has no cache to carry")
    if getattr(model.encoder, "pos_encoding", None) is not None:
        problems.append("the encoder adds relative positional embeddings (attention); HyperMixing has its own")
    for conv in model.frontend.convs:
        if conv.kernel_size[0] % 2 != 1 or conv.padding[0] != conv.kernel_size[0] // 2:
            problems.append("a front-end block whose time padding is not kernel_size // 2")
    return problems


def _sinusoids(positions: Tensor, frequencies: Tensor) -> Tensor:
    """``(B, T)`` int64 positions -> ``(B, T, d)`` float32 rows of :func:`lobes.attention.sinusoidal_table`."""
    angles = positions.float().unsqueeze(-1) * frequencies  # (B, T, d / 2)
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(2)  # (B, T, d): sin, cos, ...


class _ChunkFbank(nn.Module):
    """The fbank of :class:`DFTSpeechBrainFbank` over a call's samples: ``(B, K + S)`` -> ``(B, S / hop, n_mels)``,
    the frames starting every hop from the first sample (no centring, no dB clipping: a streaming model has
    none). A module of its own so that the int8 variant keeps it in float32 (it is found by its name)."""

    def __init__(self, fbank: DFTSpeechBrainFbank, frames: int) -> None:
        super().__init__()
        self.tables = fbank
        self.frames = frames

    def forward(self, x: Tensor) -> Tensor:
        fb = self.tables
        index = torch.arange(self.frames, device=x.device).unsqueeze(1) * fb.hop  # (M, 1)
        index = index + torch.arange(fb.n_fft, device=x.device)  # (M, n_fft)
        spec = torch.matmul(x[:, index].to(fb.dft_dtype), fb.dft)  # (B, M, 2 * bins)
        re, im = spec.chunk(2, dim=-1)
        feats = torch.matmul((re * re + im * im).float(), fb.mel)  # (B, M, n_mels)
        if not fb.log_mel:
            return feats
        return fb.multiplier * torch.log10(feats.clamp_min(fb.amin)) - fb.multiplier * fb.db_multiplier


def _frequencies(size: int) -> Tensor:
    return torch.exp(torch.arange(0, size, 2).float() * -(math.log(10000.0) / size))  # (d / 2,)


class StreamingASRGraph(nn.Module):
    """One chunk step of a streaming :class:`lobes.asr.ASRModel` (see the module docstring).

    Inputs: ``chunk`` (B, chunk_samples) float32, ``lengths`` (B,) int64 (samples of the chunk that belong to
    the stream), then the state tensors in the order of :meth:`state_spec`. Outputs: ``log_probs``
    (B, chunk_frames, V) (frames outside the stream are the blank), ``frames`` (B,) int64 (valid frames of the
    chunk), then the new state in the same order.

    Arguments
    ---------
    model : lobes.asr.ASRModel
        A streaming model (:func:`lobes.streaming.check_streamable`) with chunk-causal HyperMixing layers; it is
        not changed.
    chunk_frames : int
        Encoder frames per chunk.
    blank_index : int
        The CTC blank.
    pad_log_prob : float
        Log-probability of the other tokens on frames outside the stream.
    dft_dtype : torch.dtype
        Precision of the fbank's DFT.
    """

    def __init__(
        self,
        model: nn.Module,
        chunk_frames: int,
        blank_index: int = 0,
        pad_log_prob: float = -1e4,
        dft_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        problems = streaming_export_problems(model)
        if problems:
            raise ExportError("no chunk-step graph: " + "; ".join(problems))
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ExportError(f"chunk_frames must be an integer >= 1, got {chunk_frames!r}")
        self.model = model.eval()
        tables = DFTSpeechBrainFbank(model.compute_fbank, dft_dtype)
        self.chunk_frames = C = chunk_frames
        self.hop, self.n_fft = int(model.hop_length), tables.n_fft
        self.frame_samples = int(model.frame_samples)
        self.chunk_samples = S = C * self.frame_samples
        self.strides = [int(conv.stride[0]) for conv in model.frontend.convs]
        self.reaches = [int(conv.kernel_size[0]) // 2 for conv in model.frontend.convs]

        # the last fbank frame the last encoder frame of a chunk needs, and the samples that frame needs
        last = C - 1
        for s, r in zip(reversed(self.strides), reversed(self.reaches)):
            last = s * last + r
        self.lookahead = self.hop * last + self.n_fft // 2 - S
        if not 0 <= self.lookahead < S:
            raise ExportError(
                f"the front-end looks {self.lookahead} samples past a chunk of {S}; the chunk-step graph needs "
                f"between 0 and one chunk (use a longer chunk)"
            )
        # first frame of every stage returned by a call, relative to the call's first whole-chunk index
        self.firsts = [(self.lookahead - self.n_fft // 2) // self.hop + 1]
        self.caches = []  # input frames each front-end block keeps
        for s, r in zip(self.strides, self.reaches):
            first = (self.firsts[-1] - 1 - r) // s + 1
            self.caches.append(self.firsts[-1] - (s * first - r))
            self.firsts.append(first)
        if self.firsts[-1] != 0:  # the look-ahead is chosen so that whole chunks come out
            raise ExportError(f"internal: the front-end's output starts {self.firsts[-1]} frames off a chunk")
        self.per_chunk = [S // self.hop]  # frames of each stage per call: fbank, after each block
        for s in self.strides:
            self.per_chunk.append(self.per_chunk[-1] // s)
        self.wav_cache = self.lookahead - self.hop * self.firsts[0] + self.n_fft // 2
        self.fbank = _ChunkFbank(tables, self.per_chunk[0])
        blank = torch.full((int(model.ctc_lin.out_features),), pad_log_prob)
        blank[blank_index] = 0.0
        self.register_buffer("blank_row", blank, persistent=False)
        d_model = int(model.ctc_lin.in_features)
        self.register_buffer("frequencies", _frequencies(d_model), persistent=False)

    # ------------------------------------------------------------------------------------------ state
    def state_spec(self) -> list[tuple[str, tuple, torch.dtype]]:
        """``(name, shape without the batch axis, dtype)`` of every state tensor, in input order."""
        model = self.model
        spec: list[tuple[str, tuple, torch.dtype]] = [("wav_cache", (self.wav_cache,), torch.float32)]
        channels, freq = 1, int(model.frontend.n_mels)
        for j, conv in enumerate(model.frontend.convs):
            spec.append((f"frontend{j}_cache", (channels, self.caches[j], freq), torch.float32))
            channels = int(conv.out_channels)
            k, s, p = conv.kernel_size[1], conv.stride[1], conv.padding[1]
            freq = (freq + 2 * p - k) // s + 1
        for i, layer in enumerate(model.encoder.layers):
            mixer = layer.mha_layer
            H = mixer.num_heads
            k = mixer.hyper.w1_gen.hidden_size
            dh = mixer.input_output_dim // H
            spec.append((f"layer{i}_mixer_sums", (H, dh, k + 1), torch.float32))
            spec.append((f"layer{i}_mixer_count", (), torch.float32))
            conv = layer.convolution_module
            spec.append((f"layer{i}_conv_cache", (int(conv.conv.in_channels), conv.padding), torch.float32))
        spec.append(("samples", (), torch.int64))
        spec.append(("frame", (), torch.int64))
        return spec

    def initial_state(self, batch: int) -> list[Tensor]:
        """The state of ``batch`` new streams: zeros."""
        return [torch.zeros((batch, *shape), dtype=dtype) for _, shape, dtype in self.state_spec()]

    # ------------------------------------------------------------------------------------------ steps
    def _valid(self, first: Tensor, count: int, limit: Tensor) -> Tensor:
        """(B, count) bool: frames ``first + j`` with ``0 <= index < limit`` (first, limit: (B,) int64)."""
        index = first.unsqueeze(1) + torch.arange(count, device=first.device)  # (B, count)
        return (index >= 0) & (index < limit.unsqueeze(1))

    def _mix(self, mixer: nn.Module, x: Tensor, keep: Tensor, pe: Tensor, sums: Tensor, count: Tensor) -> tuple:
        """One chunk of :meth:`lobes.hypermixing.ChunkCausalHyperMixing.forward_chunk` with per-row positions.

        x (B, T, d), keep (B, T) float, pe (B, T, d), sums (B, H, dh, k + 1), count (B,) -> output (B, T, d),
        sums and count after the chunk.
        """
        B, T, d = x.shape
        H = mixer.num_heads
        dh = d // H
        w1_gen, w2_gen = mixer.hyper.w1_gen, mixer.hyper.w2_gen
        x = x * keep.unsqueeze(-1)  # frames outside the stream take no part
        xm = x.view(B, T, H, dh).permute(2, 0, 1, 3)  # (H, B, T, dh)
        hyp_in = (xm + pe.view(B, T, H, dh).permute(2, 0, 1, 3)).reshape(H, B * T, dh)
        g1 = w1_gen.hidden(hyp_in)  # (H, B*T, k)
        g2 = g1 if mixer.hyper.tied else w2_gen.hidden(hyp_in)
        k = g1.shape[-1]
        g1e = torch.cat([g1.view(H, B, T, k), torch.ones_like(xm[..., :1])], dim=-1)  # (H, B, T, k + 1)
        running = torch.matmul(xm.transpose(-1, -2), g1e) + sums.transpose(0, 1)  # (H, B, dh, k + 1)
        seen = count + keep.sum(1)  # (B,)
        new_sums = running.transpose(0, 1)
        if mixer.normalize:
            running = running / seen.clamp(min=1).view(1, B, 1, 1)
        w1_map = mixer._w1_map(running.dtype)  # (H, hs, k + 1)
        hidden = torch.matmul(running.reshape(H, B * dh, k + 1), w1_map.transpose(1, 2))  # (H, B*dh, hs)
        hs = hidden.shape[-1]
        act = mixer.activation(hidden).view(H, B, dh, hs)
        w2 = w2_gen.output(g2)  # (H, B*T, hs)
        out = torch.matmul(w2.view(H, B, T, hs), act.transpose(-1, -2))  # (H, B, T, dh)
        out = out.permute(1, 2, 0, 3).reshape(B, T, d) * keep.unsqueeze(-1)
        return mixer.layer_norm(out), new_sums, seen

    @staticmethod
    def _convolve(module: nn.Module, x: Tensor, keep: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`lobes.conformer.ConvolutionModule.forward_chunk` with frames outside the stream zeroed
        before the depthwise convolution (so the first chunk's cache is the zero left padding); a chunk
        convolution sees zeros past the chunk's end."""
        out = module.bottleneck(module.layer_norm(x).transpose(1, 2)) * keep.unsqueeze(1)  # (B, D, T)
        full = torch.cat([cache, out], dim=-1)  # (B, D, padding + T)
        new_cache = full[..., full.shape[-1] - module.padding :]
        if module.chunk_conv:  # [cache, chunk, zeros]
            full = F.pad(full, (0, module.padding))
        out = F.conv1d(full, module.conv.weight, module.conv.bias, groups=module.conv.groups)  # (B, D, T)
        return module.after_conv(out.transpose(1, 2)), new_cache

    def forward(self, chunk: Tensor, lengths: Tensor, *state: Tensor) -> tuple:
        model, C, S = self.model, self.chunk_frames, self.chunk_samples
        n_blocks = len(self.strides)
        wav_cache, block_caches = state[0], state[1 : 1 + n_blocks]
        layer_states = state[1 + n_blocks : -2]
        samples, frame = state[-2], state[-1]
        B = chunk.shape[0]

        # where this call is: its first sample, and where the stream ends (if it has)
        start = frame * self.frame_samples - S + self.lookahead  # (B,) global index of chunk[:, 0]
        received = samples + lengths
        ended = received < start + S
        end = torch.where(ended, received, torch.full_like(received, _NO_END))  # (B,) samples of the stream
        sample_ok = self._valid(start, S, end)  # (B, S)
        x = torch.cat([wav_cache, chunk.float() * sample_ok.float()], dim=1)  # (B, K + S)

        # fbank frames of the chunk, normalised; frames outside the stream are the zero padding of the front-end
        per_chunk = self.per_chunk
        lengths_at = [torch.where(ended, torch.div(end, self.hop, rounding_mode="floor") + 1, end)]
        for s in self.strides:
            previous = lengths_at[-1]
            lengths_at.append(torch.where(ended, torch.div(previous - 1, s, rounding_mode="floor") + 1, previous))
        firsts = [(frame // C - 1) * per_chunk[j] + self.firsts[j] for j in range(n_blocks + 1)]  # (B,) each

        feats = self.fbank(x)  # (B, M, n_mels)
        full = torch.full_like(lengths, feats.shape[1])
        feats, _ = model.feature_norm(feats, full)
        h = (feats * self._valid(firsts[0], per_chunk[0], lengths_at[0]).unsqueeze(-1).float()).unsqueeze(1)
        new_block_caches = []
        fe = model.frontend
        for j, (conv, norm) in enumerate(zip(fe.convs, fe.norms)):
            span = torch.cat([block_caches[j], h], dim=2)  # (B, Ch, K + M, F)
            new_block_caches.append(span[:, :, span.shape[2] - self.caches[j] :])
            y = F.conv2d(span, conv.weight, conv.bias, stride=conv.stride, padding=(0, conv.padding[1]))
            y = y[:, :, : per_chunk[j + 1]]  # (B, Ch', M', F')
            y = fe.dropout(fe.activation(norm(y.permute(0, 2, 3, 1))))  # (B, M', F', Ch')
            ok = self._valid(firsts[j + 1], per_chunk[j + 1], lengths_at[j + 1]).float()
            h = (y * ok.view(B, -1, 1, 1)).permute(0, 3, 1, 2)  # (B, Ch', M', F')
        h = h.permute(0, 2, 3, 1)  # (B, C, F', Ch')
        h = model.proj(h.reshape(B, C, -1))  # (B, C, D)
        positions = firsts[-1].unsqueeze(1) + torch.arange(C, device=chunk.device)  # (B, C)
        pe = _sinusoids(positions, self.frequencies)  # (B, C, D)
        if model.pos_encoding is not None:
            h = h + pe

        # the Conformer layers, HyperMixing continuing its running sums
        keep = self._valid(firsts[-1], C, lengths_at[-1]).float()  # (B, C)
        new_layer_states = []
        for i, layer in enumerate(model.encoder.layers):
            sums, count, conv_cache = layer_states[3 * i : 3 * i + 3]
            h = h + 0.5 * layer.ffn_module1(h)
            mixed, sums, count = self._mix(layer.mha_layer, layer.norm1(h), keep, pe, sums, count)
            h = h + mixed
            conv, conv_cache = self._convolve(layer.convolution_module, h, keep, conv_cache)
            h = h + conv
            h = layer.norm2(h + 0.5 * layer.ffn_module2(h))
            new_layer_states += [sums, count, conv_cache]
        log_probs = model.ctc_log_probs(model.encoder.norm(h))  # (B, C, V)
        log_probs = torch.where(keep.unsqueeze(-1) > 0.5, log_probs, self.blank_row)
        frames = keep.sum(1).long()
        new_wav_cache = x[:, x.shape[1] - self.wav_cache :]
        return (
            log_probs,
            frames,
            new_wav_cache,
            *new_block_caches,
            *new_layer_states,
            received,
            frame + C,
        )
