/*
 * Chunk-causal token mixing of ChunkCausalHyperMixing (lobes/hypermixing.py), forward and backward, for one
 * block of frames, in the generated weights' space.
 *
 * For every row z (a head of a sequence) and every chunk j of `chunk` frames (the last one may be shorter):
 *     S_j      = start + sum over the frames s up to the end of chunk j of  x_s (outer) w1_s    (dh x hs)
 *     out_t[i] = sum_k w2_t[k] * gelu(S_j[i, k])     for the frames t of chunk j
 * with gelu(v) = v * Phi(v), Phi the standard normal CDF. The running sum S lives in the core's cache: no
 * per-frame hidden layer is ever written to memory. Rows are independent: they are shared between `threads`
 * OpenMP threads (the runtime torch runs on, when the library is linked against the same libgomp). Every
 * function works on `rows` rows whose tensors follow each other in memory (row-major, float32): x (rows, T, dh),
 * w1 / w2 (rows, T, hs), start / state / later (rows, dh, hs), out (rows, T, dh).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define LOBES_CAUSAL_MIXING_ABI 1

/* Subnormal floats (below 1.2e-38, e.g. a gradient times a vanishing GELU slope) cost x86 CPUs a microcode
 * assist of about a hundred cycles per operation; the kernels treat them as zero (flush-to-zero and
 * denormals-are-zero) on their own thread while they run, and put the caller's setting back. */
typedef unsigned int fp_mode_t;
static inline fp_mode_t flush_subnormals(void) {
#if defined(__SSE__)
    const fp_mode_t mode = _mm_getcsr();
    _mm_setcsr(mode | 0x8040u); /* FTZ (bit 15) | DAZ (bit 6) */
    return mode;
#else
    return 0;
#endif
}
static inline void restore_fp_mode(fp_mode_t mode) {
#if defined(__SSE__)
    _mm_setcsr(mode);
#else
    (void)mode;
#endif
}

int lobes_causal_mixing_abi(void) { return LOBES_CAUSAL_MIXING_ABI; }

/* exp(v) for v <= 0: exp(v) = 2^n * exp(f), |f| <= ln(2) / 2; exactly 0 below -80, so that no product with
 * it is a subnormal float (which costs a CPU hundreds of cycles) */
static inline float exp_nonpositive(float v) {
    const int vanishes = v < -80.0f;
    v = vanishes ? -80.0f : v;
    /* n = v / ln 2 rounded to the nearest integer: adding and subtracting 1.5 * 2^23 leaves no fraction bits (two
     * vector additions on any SIMD level, where floorf needs SSE 4.1 to be one instruction) */
    float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float f = v - n * 0.693359375f;
    f = f + n * 2.12194440e-4f; /* ln 2 = 0.693359375 - 2.12194440e-4, the first part exact in float */
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;
    union {
        int32_t bits;
        float value;
    } scale = {.bits = ((int32_t)n + 127) << 23};
    return vanishes ? 0.0f : p * scale.value;
}

/* exp(-v^2 / 2), shared by the normal CDF and density below */
static inline float gauss(float v) { return exp_nonpositive(-0.5f * v * v); }

/* Phi(v), given e = gauss(v); erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the rational form
 * PyTorch's vectorised CPU erf uses */
static inline float normal_cdf(float v, float e) {
    const float u = v * 0.70710678118654752f; /* v / sqrt(2) */
    const float t = 1.0f / (1.0f + 0.3275911f * fabsf(u));
    float q = 1.061405429f;
    q = q * t - 1.453152027f;
    q = q * t + 1.421413741f;
    q = q * t - 0.284496736f;
    q = q * t + 0.254829592f;
    const float tail = 0.5f * q * t * e; /* (1 - |erf(u)|) / 2 */
    return u < 0.0f ? tail : 1.0f - tail;
}

#define NORMAL_PDF_SCALE 0.3989422804014327f /* 1 / sqrt(2 pi): the density is gauss(v) times this */

static inline float gelu(float v) { return v * normal_cdf(v, gauss(v)); }

/* S += x_t (outer) w1_t for the frames t0 .. t1 - 1 of one row */
static void add_frames(float *restrict S, const float *restrict x, const float *restrict w1, long t0, long t1,
                       long dh, long hs) {
    for (long t = t0; t < t1; ++t) {
        const float *xt = x + t * dh, *wt = w1 + t * hs;
        for (long i = 0; i < dh; ++i) {
            const float xi = xt[i];
            float *Si = S + i * hs;
#pragma omp simd
            for (long k = 0; k < hs; ++k) Si[k] += xi * wt[k];
        }
    }
}

/* out[t, i] = sum_k w2[t, k] * gelu(S[i, k]) for the frames t0 .. t1 - 1 of one chunk (chunk 1 has its own
 * fused loop in the forward); act: dh * hs floats of scratch */
static void read_out(const float *restrict S, const float *restrict w2, float *restrict out, float *restrict act,
                     long t0, long t1, long dh, long hs) {
#pragma omp simd
    for (long k = 0; k < dh * hs; ++k) act[k] = gelu(S[k]);
    for (long t = t0; t < t1; ++t) {
        const float *wt = w2 + t * hs;
        for (long i = 0; i < dh; ++i) {
            const float *ai = act + i * hs;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (long k = 0; k < hs; ++k) sum += wt[k] * ai[k];
            out[t * dh + i] = sum;
        }
    }
}

/*
 * Forward of `rows` rows of T frames: out (rows, T, dh); state (rows, dh, hs) holds the start on entry and the
 * running sum after the T frames on return. Returns 0, or -1 when scratch memory cannot be allocated.
 */
int lobes_causal_mixing_forward(long rows, long T, long dh, long hs, long chunk, long threads, const float *x,
                                const float *w1, const float *w2, float *state, float *out) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *act = malloc(sizeof(float) * (size_t)(dh * hs));
        const fp_mode_t mode = flush_subnormals();
#pragma omp for schedule(static)
        for (long z = 0; z < rows; ++z) {
            if (!act) {
                failed = 1;
                continue;
            }
            const float *xz = x + z * T * dh, *w1z = w1 + z * T * hs, *w2z = w2 + z * T * hs;
            float *S = state + z * dh * hs, *oz = out + z * T * dh;
            if (chunk == 1) { /* one pass over the running sum per frame: update, then read out */
                for (long t = 0; t < T; ++t) {
                    const float *xt = xz + t * dh, *w1t = w1z + t * hs, *w2t = w2z + t * hs;
                    for (long i = 0; i < dh; ++i) {
                        const float xi = xt[i];
                        float *Si = S + i * hs;
                        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                        for (long k = 0; k < hs; ++k) {
                            const float v = Si[k] + xi * w1t[k];
                            Si[k] = v;
                            sum += w2t[k] * gelu(v);
                        }
                        oz[t * dh + i] = sum;
                    }
                }
                continue;
            }
            for (long t0 = 0; t0 < T; t0 += chunk) {
                const long t1 = t0 + chunk < T ? t0 + chunk : T;
                add_frames(S, xz, w1z, t0, t1, dh, hs);
                read_out(S, w2z, oz, act, t0, t1, dh, hs);
            }
        }
        restore_fp_mode(mode);
        free(act);
    }
    return failed ? -1 : 0;
}

/*
 * One chunk's backward (frames t0 .. t1 - 1, running sum S = S_j of the chunk). G (dh, hs) holds, on entry, the
 * gradient of the loss with respect to the running sums of every later chunk, summed (each of them holds this
 * chunk's frames); on return it also holds this chunk's. scratch: 2 * dh * hs floats (unused for one frame).
 */
static void chunk_backward(const float *restrict S, float *restrict G, const float *restrict x,
                           const float *restrict w1, const float *restrict w2, const float *restrict gout,
                           float *restrict gx, float *restrict gw1, float *restrict gw2, float *restrict scratch,
                           long t0, long t1, long dh, long hs) {
    if (t1 - t0 == 1) {
        const float *wt = w2 + t0 * hs, *gt = gout + t0 * dh;
        float *gw2t = gw2 + t0 * hs;
        for (long i = 0; i < dh; ++i) {
            const float gi = gt[i];
            const float *Si = S + i * hs;
            float *Gi = G + i * hs;
#pragma omp simd
            for (long k = 0; k < hs; ++k) {
                const float v = Si[k], e = gauss(v), cdf = normal_cdf(v, e);
                gw2t[k] += gi * (v * cdf);
                Gi[k] += gi * wt[k] * (cdf + v * NORMAL_PDF_SCALE * e);
            }
        }
    } else {
        float *act = scratch, *slope = scratch + dh * hs;
#pragma omp simd
        for (long k = 0; k < dh * hs; ++k) {
            const float v = S[k], e = gauss(v), cdf = normal_cdf(v, e);
            act[k] = v * cdf;
            slope[k] = cdf + v * NORMAL_PDF_SCALE * e;
        }
        for (long t = t0; t < t1; ++t) {
            const float *wt = w2 + t * hs, *gt = gout + t * dh;
            float *gw2t = gw2 + t * hs;
            for (long i = 0; i < dh; ++i) {
                const float gi = gt[i];
                const float *ai = act + i * hs, *si = slope + i * hs;
                float *Gi = G + i * hs;
#pragma omp simd
                for (long k = 0; k < hs; ++k) {
                    gw2t[k] += gi * ai[k];
                    Gi[k] += gi * wt[k] * si[k];
                }
            }
        }
    }
    /* every frame of the chunk reaches the running sums of its own chunk and the later ones: G */
    for (long t = t0; t < t1; ++t) {
        const float *xt = x + t * dh, *wt = w1 + t * hs;
        float *gxt = gx + t * dh, *gw1t = gw1 + t * hs;
        for (long i = 0; i < dh; ++i) {
            const float *Gi = G + i * hs;
            const float xi = xt[i];
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (long k = 0; k < hs; ++k) {
                sum += Gi[k] * wt[k];
                gw1t[k] += xi * Gi[k];
            }
            gxt[i] = sum;
        }
    }
}

/*
 * Backward of lobes_causal_mixing_forward for `rows` rows of T frames, given the gradient of the output gout
 * (rows, T, dh) and the start (rows, dh, hs) the forward began from. later (rows, dh, hs): on entry the gradient
 * with respect to the running sums of every chunk after these frames, summed; on return, plus these frames'
 * chunks (what the block before needs). Writes gx (rows, T, dh), gw1 and gw2 (rows, T, hs). The running sums
 * are recomputed: one pass stores them at the start of every group of `group` chunks, then each group, from
 * the last, recomputes its chunks' sums in a small buffer and walks them backwards.
 * Returns 0, or -1 when scratch memory cannot be allocated.
 */
int lobes_causal_mixing_backward(long rows, long T, long dh, long hs, long chunk, long group, long threads,
                                 const float *x, const float *w1, const float *w2, const float *start,
                                 const float *gout, float *later, float *gx, float *gw1, float *gw2) {
    const long n_chunks = (T + chunk - 1) / chunk;
    const long n_groups = (n_chunks + group - 1) / group;
    const long plane = dh * hs;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *marks = malloc(sizeof(float) * (size_t)(n_groups * plane)); /* sums at each group's start */
        float *sums = malloc(sizeof(float) * (size_t)(group * plane));     /* sums of a group's chunks */
        float *scratch = malloc(sizeof(float) * (size_t)(2 * plane));
        const fp_mode_t mode = flush_subnormals();
#pragma omp for schedule(static)
        for (long z = 0; z < rows; ++z) {
            if (!marks || !sums || !scratch) {
                failed = 1;
                continue;
            }
            const float *xz = x + z * T * dh, *w1z = w1 + z * T * hs, *w2z = w2 + z * T * hs;
            const float *gz = gout + z * T * dh;
            float *G = later + z * plane, *gxz = gx + z * T * dh, *gw1z = gw1 + z * T * hs, *gw2z = gw2 + z * T * hs;
            memset(gw1z, 0, sizeof(float) * (size_t)(T * hs));
            memset(gw2z, 0, sizeof(float) * (size_t)(T * hs));
            memcpy(marks, start + z * plane, sizeof(float) * (size_t)plane);
            for (long g = 1; g < n_groups; ++g) {
                memcpy(marks + g * plane, marks + (g - 1) * plane, sizeof(float) * (size_t)plane);
                add_frames(marks + g * plane, xz, w1z, (g - 1) * group * chunk, g * group * chunk, dh, hs);
            }
            for (long g = n_groups - 1; g >= 0; --g) {
                const long c0 = g * group, c1 = c0 + group < n_chunks ? c0 + group : n_chunks;
                const float *previous = marks + g * plane;
                for (long c = c0; c < c1; ++c) {
                    float *S = sums + (c - c0) * plane;
                    memcpy(S, previous, sizeof(float) * (size_t)plane);
                    const long t1 = (c + 1) * chunk < T ? (c + 1) * chunk : T;
                    add_frames(S, xz, w1z, c * chunk, t1, dh, hs);
                    previous = S;
                }
                for (long c = c1 - 1; c >= c0; --c) {
                    const long t1 = (c + 1) * chunk < T ? (c + 1) * chunk : T;
                    chunk_backward(sums + (c - c0) * plane, G, xz, w1z, w2z, gz, gxz, gw1z, gw2z, scratch,
                                   c * chunk, t1, dh, hs);
                }
            }
        }
        restore_fp_mode(mode);
        free(marks);
        free(sums);
        free(scratch);
    }
    return failed ? -1 : 0;
}
