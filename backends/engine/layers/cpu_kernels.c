/* 4-bit and 8-bit weight matrix products for CPU decode: y[m, n] = sum_k x[m, k] * w[n, k] + bias[n], with
 * integer dot products (AVX-VNNI, or AVX2's maddubs where VNNI is missing). The weight formats are llama.cpp's
 * Q4_1 and Q8_0 in spirit, written from their description.
 *
 * Weights come in tiles of 8 output rows. q4_linear: for each tile and each block g of 32 inputs, 160 bytes:
 * the 8 rows' nibbles (16 bytes a row, rows 0..7; byte j holds weight j in its low and weight j + 16 in its high
 * nibble), then the 8 rows' fp16 scales d, then their fp16 offsets o, both in the row order 0 2 4 6 1 3 5 7 (the
 * order the reduction below produces); w = q * d + o with q in [0, 15]. q8_linear: per tile and block, the 8
 * rows' int8 q (32 bytes a row, rows 0..7), then their fp16 scales d in row order; w = q * d, |q| <= 127. Rows
 * past N are zero padding.
 *
 * Activations: each row of x is quantized here per block of 32 in two int8 levels, x ~ s * (q1 + q2 / 256)
 * with s = max|x| / 127, q1 = round(x / s) and q2 = round((x / s - q1) * 256): the error is at most s / 512,
 * below a bf16 rounding of the block's larger values. Per block the integer dot products are exact:
 * sum(w_q * (256 * q1 + q2)) = (sum(w_q * q1) << 8) + sum(w_q * q2); the float part accumulates
 * d * (s / 256) * dot (+ o * sum of the block's x for q4).
 *
 * Contract: every output element is computed by the same instruction sequence whatever M, the token's place in
 * the batch or the thread count, so a row's result is bit-identical alone and batched. Returns 0, or -1 when K
 * is not a multiple of 32. Built by backends/engine/layers/native.py with -march=native -ffp-contract=off.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QK 32
#define TILE 8
#define TILE_BYTES_Q4 (TILE * QK / 2 + 2 * TILE * 2)
#define TILE_BYTES_Q8 (TILE * QK + TILE * 2)
#define TB 4          /* tokens sharing one load of each weight block */
#define PREFETCH 2048 /* bytes ahead of the block being read: weights stream from memory once per step */

#define INLINE static inline __attribute__((always_inline))

/* One row of K floats → q1 at q, q2 at q + K; ds[g] = s / 256 (exact), xs[g] = the block's sum of x as
 * quantized, ds * sum(256 * q1 + q2). */
static void quantize_row(const float *x, int64_t K, int8_t *q, float *ds, float *xs) {
    for (int64_t g = 0; g < K / QK; g++) {
        const float *xb = x + g * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float s = amax / 127.0f;
        const float inv = s > 0.0f ? 1.0f / s : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const float v = xb[j] * inv;
            const float q1 = fminf(fmaxf(nearbyintf(v), -127.0f), 127.0f);
            const float q2 = fminf(fmaxf(nearbyintf((v - q1) * 256.0f), -127.0f), 127.0f);
            q[g * QK + j] = (int8_t)q1;
            q[K + g * QK + j] = (int8_t)q2;
            sum += 256 * (int)q1 + (int)q2;
        }
        ds[g] = s / 256.0f;
        xs[g] = ds[g] * (float)sum;
    }
}

/* a += (u8 w) . (s8 x) in groups of 4 adjacent bytes, into int32 lanes */
INLINE __m256i dot_acc(__m256i a, __m256i w, __m256i x) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(a, w, x);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(a, w, x);
#else
    /* u8 (<= 127) x s8 (|x| <= 127): pair sums fit int16 without saturation */
    return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

/* (w . q1) << 8 + (w . q2), lane-wise: the two-level activation's exact integer dot product */
INLINE __m256i dot2(__m256i w_lo, __m256i x1_lo, __m256i x2_lo, __m256i w_hi, __m256i x1_hi, __m256i x2_hi) {
    const __m256i a = _mm256_slli_epi32(dot_acc(dot_acc(_mm256_setzero_si256(), w_lo, x1_lo), w_hi, x1_hi), 8);
    return dot_acc(dot_acc(a, w_lo, x2_lo), w_hi, x2_hi);
}

INLINE void prefetch(const uint8_t *p, int bytes) {
    for (int i = 0; i < bytes; i += 64) _mm_prefetch((const char *)(p + PREFETCH + i), _MM_HINT_T0);
}

INLINE __m256i twice(const int8_t *p) { /* 16 bytes in both halves */
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_set_m128i(v, v);
}

/* One tile of 8 q4 rows for nt tokens (token t: activations at xq + 2 K t, scales at ds / xs + G t); out[t]
 * in row order. Each token's operations do not depend on nt. */
INLINE void tile_q4(const uint8_t *tile, int64_t G, int64_t K, const int8_t *xq, const float *ds,
                    const float *xs, int nt, __m256 *out) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256 acc[TB], off[TB];
    for (int t = 0; t < nt; t++) acc[t] = off[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *blk = tile + g * TILE_BYTES_Q4;
        prefetch(blk, TILE_BYTES_Q4);
        __m256i lo[4], hi[4];
        for (int p = 0; p < 4; p++) { /* rows 2p and 2p + 1: lanes 0-3 and 4-7 */
            const __m256i b = _mm256_loadu_si256((const __m256i *)(blk + 32 * p));
            lo[p] = _mm256_and_si256(b, mask);
            hi[p] = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + TILE * QK / 2)));
        const __m256 o = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + TILE * QK / 2 + 16)));
        for (int t = 0; t < nt; t++) {
            const int8_t *x1 = xq + 2 * K * t + g * QK, *x2 = x1 + K;
            const __m256i x1_lo = twice(x1), x1_hi = twice(x1 + 16), x2_lo = twice(x2), x2_hi = twice(x2 + 16);
            __m256i pr[4];
            for (int p = 0; p < 4; p++) pr[p] = dot2(lo[p], x1_lo, x2_lo, hi[p], x1_hi, x2_hi);
            /* -> [r0 r2 r4 r6 | r1 r3 r5 r7] */
            const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(pr[0], pr[1]), _mm256_hadd_epi32(pr[2], pr[3]));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(d, _mm256_set1_ps(ds[G * t + g])), acc[t]);
            off[t] = _mm256_fmadd_ps(o, _mm256_set1_ps(xs[G * t + g]), off[t]);
        }
    }
    for (int t = 0; t < nt; t++)
        out[t] = _mm256_permutevar8x32_ps(_mm256_add_ps(acc[t], off[t]), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* One tile of 8 q8 rows for nt tokens, as tile_q4 */
INLINE void tile_q8(const uint8_t *tile, int64_t G, int64_t K, const int8_t *xq, const float *ds, int nt,
                    __m256 *out) {
    for (int t = 0; t < nt; t++) out[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *blk = tile + g * TILE_BYTES_Q8;
        prefetch(blk, TILE_BYTES_Q8);
        __m256i wv[TILE], aw[TILE];
        for (int r = 0; r < TILE; r++) {
            wv[r] = _mm256_loadu_si256((const __m256i *)(blk + r * QK));
            aw[r] = _mm256_sign_epi8(wv[r], wv[r]); /* |w| as unsigned; x takes w's sign: the same products */
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + TILE * QK)));
        for (int t = 0; t < nt; t++) {
            const int8_t *x1 = xq + 2 * K * t + g * QK;
            const __m256i xv1 = _mm256_loadu_si256((const __m256i *)x1);
            const __m256i xv2 = _mm256_loadu_si256((const __m256i *)(x1 + K));
            __m256i v[TILE];
            for (int r = 0; r < TILE; r++) {
                const __m256i a = _mm256_slli_epi32(dot_acc(_mm256_setzero_si256(), aw[r], _mm256_sign_epi8(xv1, wv[r])), 8);
                v[r] = dot_acc(a, aw[r], _mm256_sign_epi8(xv2, wv[r]));
            }
            const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
            const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
            const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20),
                                                  _mm256_permute2x128_si256(h0, h1, 0x31)); /* r0..r7 */
            out[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(d, _mm256_set1_ps(ds[G * t + g])), out[t]);
        }
    }
}

/* y[n0 .. n0 + nr) of one token from a tile's 8 results */
INLINE void store_rows(__m256 v, const float *bias, int64_t n0, int nr, float *yrow) {
    float out[TILE];
    if (nr == TILE && bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n0));
    _mm256_storeu_ps(out, v);
    for (int r = 0; r < nr; r++) yrow[n0 + r] = out[r] + (nr < TILE && bias ? bias[n0 + r] : 0.0f);
}

/* tokens [m, m + nt) of one tile; nt is a literal at every call, so each instance is unrolled */
INLINE void tile_tokens(int bits, const uint8_t *tile, int64_t G, int64_t K, int64_t N, const int8_t *xq,
                        const float *ds, const float *xs, const float *bias, int64_t n0, int nr, int64_t m, int nt,
                        float *y) {
    __m256 v[TB];
    if (bits == 4)
        tile_q4(tile, G, K, xq + 2 * K * m, ds + G * m, xs + G * m, nt, v);
    else
        tile_q8(tile, G, K, xq + 2 * K * m, ds + G * m, nt, v);
    for (int t = 0; t < nt; t++) store_rows(v[t], bias, n0, nr, y + (m + t) * N);
}

static int linear(int bits, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                  float *y, int num_threads) {
    if (K % QK != 0) return -1;
    const int64_t G = K / QK;
    const int64_t tile_stride = G * (bits == 4 ? TILE_BYTES_Q4 : TILE_BYTES_Q8);
    int8_t *xq = (int8_t *)malloc((size_t)(2 * M * K));
    float *ds = (float *)malloc(sizeof(float) * (size_t)(M * G));
    float *xs = (float *)malloc(sizeof(float) * (size_t)(M * G));
    if (!xq || !ds || !xs) {
        free(xq);
        free(ds);
        free(xs);
        return -2;
    }
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M > 8)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, xq + 2 * K * m, ds + G * m, xs + G * m);

    const int64_t tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * TILE;
        const int nr = (int)(N - n0 < TILE ? N - n0 : TILE);
        const uint8_t *tile = w + t * tile_stride;
        int64_t m = 0;
        for (; m + TB <= M; m += TB) tile_tokens(bits, tile, G, K, N, xq, ds, xs, bias, n0, nr, m, TB, y);
        for (; m < M; m++) tile_tokens(bits, tile, G, K, N, xq, ds, xs, bias, n0, nr, m, 1, y);
    }
    free(xq);
    free(ds);
    free(xs);
    return 0;
}

int q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias, float *y,
              int num_threads) {
    return linear(4, x, M, K, w, N, bias, y, num_threads);
}

int q8_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias, float *y,
              int num_threads) {
    return linear(8, x, M, K, w, N, bias, y, num_threads);
}

/* ---------------------------------------------------------------------------------------------------------
 * The float32 ops around the matrix products, for the same contract (a row's result does not depend on the
 * batch or the thread count): RMSNorm and causal attention over the paged KV cache. D (the normalized size,
 * the head size) must be a multiple of 8; callers check.
 */

/* sum of a[i] * b[i], i < D, in 8 lanes then a fixed pairwise order */
INLINE float dot8(const float *a, const float *b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

/* y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * (offset + w) for M rows of D floats (row stride x_stride / D);
 * offset 0 (Llama) or 1 (Gemma's (1 + w)). */
void rms_norm(const float *x, int64_t M, int64_t D, int64_t x_stride, const float *w, float eps, float offset,
              float *y) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * x_stride;
        float *yr = y + m * D;
        const float r = 1.0f / sqrtf(dot8(xr, xr, D) / (float)D + eps);
        const __m256 rv = _mm256_set1_ps(r), ov = _mm256_set1_ps(offset);
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 wv = _mm256_add_ps(ov, _mm256_loadu_ps(w + d));
            _mm256_storeu_ps(yr + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + d), rv), wv));
        }
    }
}

/* e^x for x <= 0 (a score minus the row's largest), in 8 lanes: Cephes' expf polynomial, relative error about
 * 2e-7; below -87 it returns e^-87 (about 1.6e-38, nothing next to the largest score's 1) */
INLINE __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* One query row's attention for the G query heads that read kv head g (G a constant at each call, so the
 * head loops unroll): each key and value vector is loaded once for all G heads. Scores 4 keys at a time
 * (the rest one by one), softmax with exp_neg, values summed in key order with 4 output vectors in registers.
 * q: the row's first head of the group; s: the row's n key slots; sc: G * stride floats of scratch. */
INLINE void attend_group(const float *q, int64_t D, const float *kc, const float *vc, int64_t Hkv, int64_t g,
                         const int64_t *s, int64_t n, float scale, float *sc, int64_t stride, float *out,
                         const int G) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k[4];
        for (int r = 0; r < 4; r++) k[r] = kc + (s[j + r] * Hkv + g) * D;
        __m256 acc[4][4];
        for (int h = 0; h < G; h++)
            for (int r = 0; r < 4; r++) acc[h][r] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            __m256 qv[4];
            for (int h = 0; h < G; h++) qv[h] = _mm256_loadu_ps(q + h * D + d);
            for (int r = 0; r < 4; r++) {
                const __m256 kv = _mm256_loadu_ps(k[r] + d);
                for (int h = 0; h < G; h++) acc[h][r] = _mm256_fmadd_ps(qv[h], kv, acc[h][r]);
            }
        }
        for (int h = 0; h < G; h++) {
            const __m256 h4 = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][0], acc[h][1]), _mm256_hadd_ps(acc[h][2], acc[h][3]));
            const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h4), _mm256_extractf128_ps(h4, 1)); /* k0..k3 */
            _mm_storeu_ps(sc + h * stride + j, _mm_mul_ps(sums, _mm_set1_ps(scale)));
        }
    }
    for (; j < n; j++)
        for (int h = 0; h < G; h++) sc[h * stride + j] = dot8(q + h * D, kc + (s[j] * Hkv + g) * D, D) * scale;
    float inv[4];
    for (int h = 0; h < G; h++) {
        float *row = sc + h * stride;
        float top = -INFINITY;
        for (j = 0; j < n; j++) top = fmaxf(top, row[j]);
        const __m256 top8 = _mm256_set1_ps(top);
        for (j = 0; j + 8 <= n; j += 8)
            _mm256_storeu_ps(row + j, exp_neg(_mm256_sub_ps(_mm256_loadu_ps(row + j), top8)));
        if (j < n) { /* the last n % 8 scores, padded with the largest (e^0, unused) */
            float tail[8];
            for (int r = 0; r < 8; r++) tail[r] = j + r < n ? row[j + r] : top;
            _mm256_storeu_ps(tail, exp_neg(_mm256_sub_ps(_mm256_loadu_ps(tail), top8)));
            for (int r = 0; j + r < n; r++) row[j + r] = tail[r];
        }
        float sum = 0.0f;
        for (j = 0; j < n; j++) sum += row[j];
        inv[h] = 1.0f / sum;
    }
    for (int64_t d0 = 0; d0 < D; d0 += 32) { /* 4 vectors of each head's output in registers over all keys */
        const int nv = D - d0 >= 32 ? 4 : (int)((D - d0) / 8);
        __m256 acc[4][4];
        for (int h = 0; h < G; h++)
            for (int u = 0; u < 4; u++) acc[h][u] = _mm256_setzero_ps();
        for (j = 0; j < n; j++) {
            const float *v = vc + (s[j] * Hkv + g) * D + d0;
            for (int u = 0; u < nv; u++) {
                const __m256 vv = _mm256_loadu_ps(v + 8 * u);
                for (int h = 0; h < G; h++)
                    acc[h][u] = _mm256_fmadd_ps(_mm256_set1_ps(sc[h * stride + j]), vv, acc[h][u]);
            }
        }
        for (int h = 0; h < G; h++)
            for (int u = 0; u < nv; u++)
                _mm256_storeu_ps(out + h * D + d0 + 8 * u, _mm256_mul_ps(acc[h][u], _mm256_set1_ps(inv[h])));
    }
}

/* Causal attention of T query rows (q row t at q + t * q_stride: Hq heads of D) over a paged cache (kc / vc:
 * cache row s, kv head g at (s * Hkv + g) * D). Row t attends to the cache rows slots[off[t] .. off[t] + len[t])
 * (positions 0 .. its own, in order), the last `window` of them when window > 0; query head h reads kv head
 * h / (Hq / Hkv). out[t, h] = sum_j softmax_j(scale * q . k_j) * v_j, [T, Hq, D]. One task per row and kv
 * head (attend_group: up to 4 query heads at once, a group of more in slices of 4). Returns 0, or -2 when the
 * score buffer cannot be allocated. */
int paged_attention(const float *q, int64_t T, int64_t q_stride, int64_t Hq, int64_t Hkv, int64_t D,
                    const float *kc, const float *vc, const int64_t *slots, const int64_t *off, const int64_t *len,
                    float scale, int64_t window, float *out, int num_threads) {
    int64_t max_len = 0, total = 0;
    for (int64_t t = 0; t < T; t++) {
        max_len = len[t] > max_len ? len[t] : max_len;
        total += len[t];
    }
    const int64_t G = Hq / Hkv, stride = max_len + 8;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (total * Hq * D > (1 << 20))
    {
        float *sc = (float *)malloc(sizeof(float) * (size_t)(4 * stride));
        if (!sc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < T * Hkv; task++) {
            if (!sc) continue;
            const int64_t t = task / Hkv, g = task % Hkv;
            const int64_t lo = window > 0 && len[t] > window ? len[t] - window : 0, n = len[t] - lo;
            const int64_t *s = slots + off[t] + lo;
            for (int64_t h0 = 0; h0 < G; h0 += 4) {
                const float *qh = q + t * q_stride + (g * G + h0) * D;
                float *o = out + (t * Hq + g * G + h0) * D;
                switch (G - h0 >= 4 ? 4 : G - h0) {
                    case 1: attend_group(qh, D, kc, vc, Hkv, g, s, n, scale, sc, stride, o, 1); break;
                    case 2: attend_group(qh, D, kc, vc, Hkv, g, s, n, scale, sc, stride, o, 2); break;
                    case 3: attend_group(qh, D, kc, vc, Hkv, g, s, n, scale, sc, stride, o, 3); break;
                    default: attend_group(qh, D, kc, vc, Hkv, g, s, n, scale, sc, stride, o, 4); break;
                }
            }
        }
        free(sc);
    }
    return failed ? -2 : 0;
}
