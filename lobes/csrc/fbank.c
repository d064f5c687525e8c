/*
 * CPU kernels of lobes.features.kaldi_fbank (built and loaded through ctypes by lobes/_native.py).
 *
 * Frames are numbered r = b * n + i (frame i of row b, n frames per row); each function handles a range of
 * them, so callers may split the work between threads.
 *
 * frames_rows / lobes_fbank_frames: DC removal, pre-emphasis and window with torchaudio's float32 rounding.
 *     This part must be compiled with -ffp-contract=off: a fused multiply-add in `z - c * zp` rounds
 *     differently, and with loud input (BEATs feeds wav * 2**15) that moves the log energies of the lowest
 *     mel bins by ~1e-3.
 * mel_rows / lobes_fbank_mel: power (or magnitude) spectrum, triangular mel filters, floor and log, LANES frames
 *     at a time (16 with AVX-512, else 8): their powers are transposed so that each filter is a short loop
 *     of LANES-wide multiply-adds over the few FFT bins it covers.
 * lobes_fbank_part: both, around MKL's real FFT called directly, a small batch of frames at a time so that
 *     every intermediate stays in the core's cache.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <float.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* frames per tile = vector lanes: 16 with AVX-512, else 8 (AVX2 and others), so that the vectors below map
 * onto single machine registers */
#ifdef __AVX512F__
#define LANES 16
#define EVENS 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define ODDS 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#else
#define LANES 8
#define EVENS 0, 2, 4, 6, 8, 10, 12, 14
#define ODDS 1, 3, 5, 7, 9, 11, 13, 15
#endif
typedef float vfw __attribute__((vector_size(4 * LANES)));
typedef int viw __attribute__((vector_size(4 * LANES)));

#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)

int lobes_fbank_abi(void) { return 1; }

/* frames r0 <= r < r1; dst points at frame r0's row, rows ld floats apart. noinline: the fused-multiply-add
 * setting of the spectral code below must never reach this code through inlining. */
__attribute__((noinline)) static void frames_rows(const float *src, long row_stride, long frame_stride, long n,
                                                  long r0, long r1, long win, const float *means,
                                                  long means_row_stride, float coef, const float *window,
                                                  float *dst, long ld) {
    for (long r = r0; r < r1; ++r) {
        const long b = r / n, i = r % n;
        const float *s = src + b * row_stride + i * frame_stride;
        float *o = dst + (r - r0) * ld;
        const float m = means ? means[b * means_row_stride + i] : 0.0f;
        /* z[k] = s[k] - m; y[k] = z[k] - coef * z[k - 1], with z[-1] := z[0]; out = y * window */
        if (means) {
            const float z0 = s[0] - m;
            const float t0 = coef * z0;
            o[0] = (z0 - t0) * window[0];
            for (long k = 1; k < win; ++k) {
                const float z = s[k] - m;
                const float zp = s[k - 1] - m;
                const float t = coef * zp;
                const float y = z - t;
                o[k] = y * window[k];
            }
        } else {
            const float t0 = coef * s[0];
            o[0] = (s[0] - t0) * window[0];
            for (long k = 1; k < win; ++k) {
                const float t = coef * s[k - 1];
                const float y = s[k] - t;
                o[k] = y * window[k];
            }
        }
    }
}

void lobes_fbank_frames(const float *src, long row_stride, long frame_stride, long n, long r0, long r1,
                        long win, const float *means, long means_row_stride, float coef, const float *window,
                        float *dst, long padded) {
    frames_rows(src, row_stride, frame_stride, n, r0, r1, win, means, means_row_stride, coef, window,
                dst + r0 * padded, padded);
}

/* Everything below works on spectra, where the order of roundings does not matter: fused multiply-adds allowed. */
#pragma GCC optimize("fp-contract=fast")

/* transpose LANES rows of LANES floats in place (rounds of block swaps, halving the block each time) */
static inline void transpose(vfw *r) {
    vfw t[LANES];
#if LANES == 16
    for (int i = 0; i < 8; ++i) {
        const vfw a = r[i], b = r[i + 8];
        t[i] = SHUF(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
        t[i + 8] = SHUF(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
    for (int g = 0; g < 16; g += 8)
        for (int i = g; i < g + 4; ++i) {
            const vfw a = t[i], b = t[i + 4];
            r[i] = SHUF(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
            r[i + 4] = SHUF(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
        }
    for (int g = 0; g < 16; g += 4)
        for (int i = g; i < g + 2; ++i) {
            const vfw a = r[i], b = r[i + 2];
            t[i] = SHUF(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
            t[i + 2] = SHUF(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
        }
    for (int i = 0; i < 16; i += 2) {
        const vfw a = t[i], b = t[i + 1];
        r[i] = SHUF(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
        r[i + 1] = SHUF(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    }
#else
    for (int i = 0; i < 4; ++i) {
        const vfw a = r[i], b = r[i + 4];
        t[i] = SHUF(a, b, 0, 1, 2, 3, 8, 9, 10, 11);
        t[i + 4] = SHUF(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
    }
    for (int g = 0; g < 8; g += 4)
        for (int i = g; i < g + 2; ++i) {
            const vfw a = t[i], b = t[i + 2];
            r[i] = SHUF(a, b, 0, 1, 8, 9, 4, 5, 12, 13);
            r[i + 2] = SHUF(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int i = 0; i < 8; i += 2) {
        const vfw a = r[i], b = r[i + 1];
        t[i] = SHUF(a, b, 0, 8, 2, 10, 4, 12, 6, 14);
        t[i + 1] = SHUF(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
    }
    for (int i = 0; i < 8; ++i) r[i] = t[i];
#endif
}

/*
 * Natural log of LANES floats >= FLT_EPSILON (NaN and +inf pass through), within ~2 ulp: x = 2^e * m with m in
 * [sqrt(1/2), sqrt(2)), log(m) = f - f^2/2 + f^3 * p(f) for f = m - 1, p a degree-6 least-squares fit of
 * (log1p(f) - f + f^2/2) / f^3 on that interval (absolute error 1.2e-8), and e * ln 2 split into a part
 * exact in float32 (0.693359375 = 355 / 512) and the rest.
 */
static inline vfw log_lanes(vfw x) {
    const viw bits = (viw)x;
    const viw special = (bits & 0x7f800000) == 0x7f800000; /* NaN or inf: returned unchanged */
    viw e = ((bits >> 23) & 0xff) - 126;
    vfw m = (vfw)((bits & 0x007fffff) | 0x3f000000); /* [0.5, 1) */
    const viw low = m < 0.70710678f;                   /* -1 where m < sqrt(1/2): use 2m, e - 1 */
    e += low;
    m += (vfw)((viw)m & low);
    const vfw f = m - 1.0f;
    const vfw z = f * f;
    vfw p = 8.5069533777e-02f - (vfw){0};
    p = p * f - 1.4197471796e-01f;
    p = p * f + 1.4950979494e-01f;
    p = p * f - 1.6587949064e-01f;
    p = p * f + 1.9960596534e-01f;
    p = p * f - 2.5000969371e-01f;
    p = p * f + 3.3333972565e-01f;
    const vfw ef = __builtin_convertvector(e, vfw);
    vfw y = f * z * p + ef * -2.1219444005469057e-04f - 0.5f * z;
    y = (f + y) + ef * 0.693359375f;
    return (vfw)(((viw)y & ~special) | ((viw)x & special));
}

/* floats of workspace lobes_fbank_mel needs */
long lobes_fbank_mel_workspace(long nbins, long nfilt) {
    const long nbw = (nbins + LANES - 1) / LANES * LANES, nfw = (nfilt + LANES - 1) / LANES * LANES;
    return (nbw + nfw) * LANES + 16;
}

/*
 * spec: rows of complex64 spectra (interleaved re, im), frame r0's row first, rows ldspec floats apart;
 * bins [0, nbins) used. Filter j covers bins [lo[j], lo[j] + len[j]) with weights wts[off[j] ...].
 * out: frame r = (b, i) goes to out + b * out_row_stride + i * out_frame_stride.
 * magnitude: use sqrt(re^2 + im^2) instead of the power; use_log: log(max(energy, FLT_EPSILON)), the floor
 * Kaldi puts under the energies.
 */
static void mel_rows(const float *spec, long ldspec, long nbins, long nfilt, const int *lo, const int *len,
                     const int *off, const float *wts, int magnitude, int use_log, float *out, long out_row_stride,
                     long out_frame_stride, long n, long r0, long r1, float *workspace) {
    const long nbw = (nbins + LANES - 1) / LANES * LANES, nfw = (nfilt + LANES - 1) / LANES * LANES;
    vfw *P = (vfw *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63); /* nbw vectors: bin-major powers */
    vfw *OT = P + nbw;                                               /* nfw vectors: filter-major output */
    const vfw floor_vec = FLT_EPSILON - (vfw){0};
    for (long t0 = r0; t0 < r1; t0 += LANES) {
        const long nt = r1 - t0 < LANES ? r1 - t0 : LANES;
        float *dst[LANES];
        for (long f = 0; f < nt; ++f) {
            const long r = t0 + f;
            dst[f] = out + (r / n) * out_row_stride + (r % n) * out_frame_stride;
        }
        for (long k0 = 0; k0 < nbw; k0 += LANES) { /* P[k0 + k]: power of bin k0 + k in each frame of the tile */
            vfw *block = P + k0;
            for (long f = 0; f < LANES; ++f) {
                vfw row = {0};
                if (f < nt) {
                    const float *s = spec + (t0 - r0 + f) * ldspec + 2 * k0;
                    if (k0 + LANES <= nbins) {
                        vfw a, b;
                        memcpy(&a, s, sizeof a);
                        memcpy(&b, s + LANES, sizeof b);
                        a = a * a;
                        b = b * b;
                        row = SHUF(a, b, EVENS) + SHUF(a, b, ODDS);
                    } else {
                        for (long k = 0; k0 + k < nbins; ++k) row[k] = s[2 * k] * s[2 * k] + s[2 * k + 1] * s[2 * k + 1];
                    }
                    if (magnitude)
                        for (int k = 0; k < LANES; ++k) row[k] = sqrtf(row[k]);
                }
                block[f] = row;
            }
            transpose(block);
        }
        for (long j = 0; j < nfilt; ++j) {
            vfw acc = {0};
            const float *w = wts + off[j];
            const vfw *pj = P + lo[j];
            for (int q = 0; q < len[j]; ++q) acc += w[q] * pj[q];
            if (use_log) { /* max(acc, floor); NaN stays NaN, as in torch's clamp_min */
                const viw low = acc < floor_vec;
                acc = log_lanes((vfw)(((viw)acc & ~low) | ((viw)floor_vec & low)));
            }
            OT[j] = acc;
        }
        for (long j = nfilt; j < nfw; ++j) OT[j] = (vfw){0};
        for (long j0 = 0; j0 < nfw; j0 += LANES) {
            transpose(OT + j0);
            const long width = nfilt - j0 < LANES ? nfilt - j0 : LANES;
            for (long f = 0; f < nt; ++f) {
                float *d = dst[f] + j0;
#ifdef __AVX512F__
                if (width == 16 && ((uintptr_t)d & 63) == 0) { /* a whole line: stored without reading it first */
                    _mm512_stream_ps(d, (__m512)OT[j0 + f]);
                    continue;
                }
#endif
                memcpy(d, &OT[j0 + f], width * sizeof(float));
            }
        }
    }
#ifdef __AVX512F__
    _mm_sfence();
#endif
}

void lobes_fbank_mel(const float *spec, long ldspec, long nbins, long nfilt, const int *lo, const int *len,
                     const int *off, const float *wts, int magnitude, int use_log, float *out, long out_row_stride,
                     long out_frame_stride, long n, long r0, long r1, float *workspace) {
    mel_rows(spec + r0 * ldspec, ldspec, nbins, nfilt, lo, len, off, wts, magnitude, use_log, out, out_row_stride,
             out_frame_stride, n, r0, r1, workspace);
}

/* MKL's DFTI entry points, set once by the caller (lobes/_native.py) from torch's CPU library */
typedef long (*dfti_create_fn)(void **, int, long);
typedef long (*dfti_set_fn)(void *, int, ...);
typedef long (*dfti_commit_fn)(void *);
typedef long (*dfti_forward_fn)(void *, void *, ...);
typedef long (*dfti_free_fn)(void **);
static dfti_create_fn dfti_create;
static dfti_set_fn dfti_set;
static dfti_commit_fn dfti_commit;
static dfti_forward_fn dfti_forward;
static dfti_free_fn dfti_free;

void lobes_fbank_set_dfti(void *create_s_1d, void *set, void *commit, void *forward, void *release) {
    dfti_create = (dfti_create_fn)create_s_1d;
    dfti_set = (dfti_set_fn)set;
    dfti_commit = (dfti_commit_fn)commit;
    dfti_forward = (dfti_forward_fn)forward;
    dfti_free = (dfti_free_fn)release;
}

enum { /* values from MKL's mkl_dfti.h */
    DFTI_NUMBER_OF_TRANSFORMS = 7, DFTI_CONJUGATE_EVEN_STORAGE = 10, DFTI_PLACEMENT = 11,
    DFTI_INPUT_DISTANCE = 14, DFTI_OUTPUT_DISTANCE = 15, DFTI_THREAD_LIMIT = 27, DFTI_REAL = 33,
    DFTI_COMPLEX_COMPLEX = 39, DFTI_NOT_INPLACE = 44
};

/* an out-of-place real-to-complex plan for `count` transforms of length `padded`, on the calling thread */
static void *rfft_plan(long padded, long count, long *status) {
    void *plan = NULL;
    long st = dfti_create(&plan, DFTI_REAL, padded);
    if (!st) st = dfti_set(plan, DFTI_PLACEMENT, DFTI_NOT_INPLACE);
    if (!st) st = dfti_set(plan, DFTI_CONJUGATE_EVEN_STORAGE, DFTI_COMPLEX_COMPLEX);
    if (!st) st = dfti_set(plan, DFTI_NUMBER_OF_TRANSFORMS, count);
    if (!st) st = dfti_set(plan, DFTI_INPUT_DISTANCE, padded);
    if (!st) st = dfti_set(plan, DFTI_OUTPUT_DISTANCE, padded / 2 + 1);
    if (!st) st = dfti_set(plan, DFTI_THREAD_LIMIT, 1L);
    if (!st) st = dfti_commit(plan);
    if (st && plan) dfti_free(&plan);
    *status = st;
    return st ? NULL : plan;
}

/* rfft of `count` rows of `padded` floats into rows of padded/2 + 1 complex values (for the check) */
long lobes_rfft(const float *in, float *out, long padded, long count) {
    long st;
    void *plan = rfft_plan(padded, count, &st);
    if (!plan) return st;
    st = dfti_forward(plan, (void *)in, (void *)out);
    dfti_free(&plan);
    return st;
}

long lobes_fbank_part_workspace(long padded, long nfilt, long batch) {
    const long fft = batch * padded + batch * (padded + 2) + 16;
    return fft + lobes_fbank_mel_workspace(padded / 2, nfilt);
}

/*
 * The whole pipeline for `rows` rows of `n` frames each (frame r = (r / n, r % n)), `batch` frames at a time
 * through a buffer that stays in cache: frames -> real FFT (MKL's DFTI, the library torch.fft.rfft calls on
 * CPU; the caller passes its entry points and checks once that the results are bit-identical to
 * torch.fft.rfft) -> mel filters. work: lobes_fbank_part_workspace floats. Returns 0, or the DFTI status.
 */
long lobes_fbank_part(const float *src, long row_stride, long frame_stride, long rows, long n, long win,
                      const float *means, float coef, const float *window, long padded, long nfilt, const int *lo,
                      const int *len, const int *off, const float *wts, int magnitude, int use_log, float *out,
                      long out_row_stride, long out_frame_stride, long batch, float *work) {
    if (!dfti_create) return -1;
    const long total = rows * n, ldspec = padded + 2;
    float *buf = (float *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    float *spec = buf + batch * padded;
    float *mel_work = spec + batch * ldspec;
    for (long r = 0; r < batch; ++r) memset(buf + r * padded + win, 0, (padded - win) * sizeof(float));
    long st = 0;
    void *plan = NULL, *tail_plan = NULL;
    plan = rfft_plan(padded, batch, &st);
    for (long r0 = 0; !st && r0 < total; r0 += batch) {
        const long r1 = r0 + batch < total ? r0 + batch : total;
        void *p = plan;
        if (r1 - r0 < batch) { /* the last, shorter batch */
            p = tail_plan = rfft_plan(padded, r1 - r0, &st);
            if (st) break;
        }
        frames_rows(src, row_stride, frame_stride, n, r0, r1, win, means, n, coef, window, buf, padded);
        st = dfti_forward(p, buf, spec);
        if (st) break;
        mel_rows(spec, ldspec, padded / 2, nfilt, lo, len, off, wts, magnitude, use_log, out, out_row_stride,
                 out_frame_stride, n, r0, r1, mel_work);
    }
    if (plan) dfti_free(&plan);
    if (tail_plan) dfti_free(&tail_plan);
    return st;
}
