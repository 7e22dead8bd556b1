/* 4-bit and 8-bit weight x 8-bit activation matrix products for CPU decode (the Q4_1 x Q8 and Q8_0 x Q8 schemes
 * of llama.cpp, written from their description): y[m, n] = sum_k x[m, k] * w[n, k] + bias[n].
 *
 * Weights come in tiles of 8 output rows. For each tile and each block g of 32 inputs, 160 bytes: the 8 rows'
 * nibbles (16 bytes a row, rows 0..7; byte j holds weight j in its low and weight j + 16 in its high nibble),
 * then the 8 rows' fp16 scales d, then their fp16 offsets o, both in the row order 0 2 4 6 1 3 5 7 (the order
 * the reduction below produces); w = q * d + o with q in [0, 15]. Rows past N are zero padding.
 * q8_linear's weights: per tile and block, the 8 rows' int8 q (32 bytes a row, rows 0..7), then their fp16
 * scales d in row order; w = q * d, |q| <= 127.
 * Activations: each row of x is quantized here, per block of 32, to int8 with scale dx = max|x| / 127.
 * Per block the integer dot product sum(q * qx) is exact; the float part accumulates
 * d * dx * dot + o * dx * sum(qx).
 *
 * Contract: every output element is computed by the same instruction sequence whatever M, the token's place
 * in the batch or the thread count, so a row's result is bit-identical alone and batched. Returns 0, or -1
 * when K is not a multiple of 32. Built by backends/engine/layers/native.py with -march=native.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32

#define TILE 8
#define TILE_BYTES (TILE * QK / 2 + 2 * TILE * 2)
#define TILE_BYTES_Q8 (TILE * QK + TILE * 2)
#ifndef PREFETCH
#define PREFETCH 2048 /* bytes ahead of the block being read: weights stream from memory once per token */
#endif

/* quantize one row of K floats into int8 blocks; dx[g] = scale, sx[g] = scale * sum of the block's ints */
static void quantize_row(const float *x, int64_t K, int8_t *q, float *dx, float *sx) {
    for (int64_t g = 0; g < K / QK; g++) {
        const float *xb = x + g * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        const float d = amax / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int v = (int)nearbyintf(xb[j] * id);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            q[g * QK + j] = (int8_t)v;
            sum += v;
        }
        dx[g] = d;
        sx[g] = d * (float)sum;
    }
}

/* a += (u8 w) . (s8 x) in groups of 4 adjacent bytes, into int32 lanes */
static inline __m256i dot_acc(__m256i a, __m256i w, __m256i x) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(a, w, x);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(a, w, x);
#else
    /* u8 (<= 15) x s8 (|x| <= 127): pair sums fit int16 without saturation */
    return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

/* rows r and r + 1 of a tile against one activation block: lanes 0-3 sum to row r, lanes 4-7 to row r + 1.
 * xlo = the block's inputs 0-15 twice, xhi = inputs 16-31 twice. */
static inline __m256i pair_dot(const uint8_t *qs, __m256i xlo, __m256i xhi) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i b = _mm256_loadu_si256((const __m256i *)qs);
    const __m256i lo = _mm256_and_si256(b, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
    return dot_acc(dot_acc(_mm256_setzero_si256(), lo, xlo), hi, xhi);
}

/* one tile of 8 output rows for one token: y8 in row order 0..7 */
static inline __m256 tile_dot(const uint8_t *tile, int64_t G, const int8_t *xq, const float *dx, const float *sx) {
    __m256 acc = _mm256_setzero_ps();
    __m256 off = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *blk = tile + g * TILE_BYTES;
        _mm_prefetch((const char *)(blk + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + PREFETCH + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + PREFETCH + 128), _MM_HINT_T0);
        const __m128i x0 = _mm_loadu_si128((const __m128i *)(xq + g * QK));
        const __m128i x1 = _mm_loadu_si128((const __m128i *)(xq + g * QK + 16));
        const __m256i xlo = _mm256_set_m128i(x0, x0), xhi = _mm256_set_m128i(x1, x1);
        const __m256i p01 = pair_dot(blk, xlo, xhi), p23 = pair_dot(blk + 32, xlo, xhi);
        const __m256i p45 = pair_dot(blk + 64, xlo, xhi), p67 = pair_dot(blk + 96, xlo, xhi);
        /* -> [r0 r2 r4 r6 | r1 r3 r5 r7] */
        const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(p01, p23), _mm256_hadd_epi32(p45, p67));
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 128)));
        const __m256 o = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 144)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(d, _mm256_set1_ps(dx[g])), acc);
        off = _mm256_fmadd_ps(o, _mm256_set1_ps(sx[g]), off);
    }
    return _mm256_permutevar8x32_ps(_mm256_add_ps(acc, off), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* one tile of 8 int8 rows for one token: y8 in row order 0..7 */
static inline __m256 tile_dot_q8(const uint8_t *tile, int64_t G, const int8_t *xq, const float *dx) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *blk = tile + g * TILE_BYTES_Q8;
        _mm_prefetch((const char *)(blk + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + PREFETCH + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + PREFETCH + 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + PREFETCH + 192), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + PREFETCH + 256), _MM_HINT_T0);
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + g * QK));
        __m256i v[TILE];
        for (int r = 0; r < TILE; r++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(blk + r * QK));
            /* |w| as unsigned times x carrying w's sign: the same products */
            v[r] = dot_acc(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        }
        const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20),
                                              _mm256_permute2x128_si256(h0, h1, 0x31)); /* r0..r7 */
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + TILE * QK)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(d, _mm256_set1_ps(dx[g])), acc);
    }
    return acc;
}

static int linear(int bits, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                  float *y, int num_threads) {
    if (K % QK != 0) return -1;
    const int64_t G = K / QK;
    const int64_t tile_stride = G * (bits == 4 ? TILE_BYTES : TILE_BYTES_Q8);
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *dx = (float *)malloc(sizeof(float) * (size_t)(M * G));
    float *sx = (float *)malloc(sizeof(float) * (size_t)(M * G));
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M > 8)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, xq + m * K, dx + m * G, sx + m * G);

    const int64_t tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * TILE;
        const int nr = (int)(N - n0 < TILE ? N - n0 : TILE);
        const uint8_t *tile = w + t * tile_stride;
        for (int64_t m = 0; m < M; m++) {
            __m256 v = bits == 4 ? tile_dot(tile, G, xq + m * K, dx + m * G, sx + m * G)
                                 : tile_dot_q8(tile, G, xq + m * K, dx + m * G);
            float out[TILE];
            if (nr == TILE && bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n0));
            _mm256_storeu_ps(out, v);
            for (int r = 0; r < nr; r++) y[m * N + n0 + r] = out[r] + (nr < TILE && bias ? bias[n0 + r] : 0.0f);
        }
    }
    free(xq);
    free(dx);
    free(sx);
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
