/* 4-bit and 8-bit weight matrix products for CPU inference: y[m, n] = sum_k x[m, k] * w[n, k] + bias[n], with
 * integer dot products: AMX tiles where the CPU has AMX-INT8 and a batch has at least AMX_MIN_ROWS_Q4 / _Q8
 * rows, else AVX-512 VNNI, AVX-VNNI, or AVX2's maddubs where VNNI is missing. The weight formats are llama.cpp's
 * Q4_1 and Q8_0 in spirit, written from their description.
 *
 * Weights come in tiles of 16 output rows. For each tile and each block g of 32 inputs k, the rows' quantized
 * weights q[r][k] sit in AMX's B-matrix order, byte [j * 64 + r * 4 + i] for input k = 4 j + i:
 * - q4_linear, 320 bytes: 256 bytes where byte [j * 64 + r * 4 + i] (j < 4) holds q[r][4 j + i] in its low
 *   nibble and q[r][16 + 4 j + i] in its high nibble; then the 16 rows' fp16 scales d and fp16 offsets o;
 *   w = q * d + o with q in [0, 15].
 * - q8_linear, 544 bytes: 512 bytes of int8 q, byte [j * 64 + r * 4 + i] = q[r][4 j + i] (j < 8); then the 16
 *   rows' fp16 scales d; w = q * d, |q| <= 127.
 * Rows past N are zero padding.
 *
 * Activations: each row of x is quantized here per block of 32 in two int8 levels, x ~ s * (q1 + q2 / 256)
 * with s = max|x| / 127, q1 = round(x / s) and q2 = round((x / s - q1) * 256): the error is at most s / 512,
 * below a bf16 rounding of the block's larger values. Per block the integer dot products are exact:
 * sum(w_q * (256 * q1 + q2)) = (sum(w_q * q1) << 8) + sum(w_q * q2); the float part accumulates
 * d * (s / 256) * dot (+ o * sum of the block's x for q4), block after block, then adds the bias.
 *
 * Contract: every output element gets the same integer sums and then the same float operations in the same
 * order whatever M, the token's place in the batch, the thread count or the instructions (AMX or VNNI) that
 * made the sums, so a row's result is bit-identical alone and batched. Returns 0, -1 when K is not a multiple
 * of 32, or -2 when memory runs out. Built by backends/engine/layers/native.py with -march=native
 * -ffp-contract=off.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32
#define TILE 16
#define Q_BYTES_Q4 (TILE * QK / 2)
#define Q_BYTES_Q8 (TILE * QK)
#define TILE_BYTES_Q4 (Q_BYTES_Q4 + 2 * TILE * 2)
#define TILE_BYTES_Q8 (Q_BYTES_Q8 + TILE * 2)
#define TB 4          /* tokens sharing one load of each weight block (VNNI path) */
#define PREFETCH 2048 /* bytes ahead of the block being read: weights stream from memory once per step */
#define AMX_MIN_ROWS_Q4 16 /* the row counts from which the tiles beat AVX-512 VNNI, measured */
#define AMX_MIN_ROWS_Q8 8

#define INLINE static inline __attribute__((always_inline))

INLINE int32_t hsum_epi32(__m256i v) {
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1)));
}

/* 32 int32 (each in [-127, 127]) → 32 int8 in order */
INLINE __m256i pack_int8(const __m256i *v) {
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* One row of K floats → q1 at q, q2 at q + K; ds[g] = s / 256 (exact), xs[g] = the block's sum of x as
 * quantized, ds * sum(256 * q1 + q2). Rounding is to nearest, ties to even. */
static void quantize_row(const float *x, int64_t K, int8_t *q, float *ds, float *xs) {
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f), scale = _mm256_set1_ps(256.0f);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int64_t g = 0; g < K / QK; g++) {
        const float *xb = x + g * QK;
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < QK; j += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xb + j), abs_mask));
        float lanes[8], amax = 0.0f;
        _mm256_storeu_ps(lanes, m);
        for (int j = 0; j < 8; j++) amax = lanes[j] > amax ? lanes[j] : amax;
        const float s = amax / 127.0f;
        const __m256 inv = _mm256_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
        __m256i q1[4], q2[4], sum = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + 8 * j), inv);
            const __m256 r1 = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(v, nearest), lo), hi);
            const __m256 r2 = _mm256_min_ps(
                _mm256_max_ps(_mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, r1), scale), nearest), lo), hi);
            q1[j] = _mm256_cvtps_epi32(r1);
            q2[j] = _mm256_cvtps_epi32(r2);
            sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_slli_epi32(q1[j], 8), q2[j]));
        }
        _mm256_storeu_si256((__m256i *)(q + g * QK), pack_int8(q1));
        _mm256_storeu_si256((__m256i *)(q + K + g * QK), pack_int8(q2));
        ds[g] = s / 256.0f;
        xs[g] = ds[g] * (float)hsum_epi32(sum);
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

INLINE __m256i bcast4(const int8_t *p) { /* 4 bytes in every int32 lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

INLINE void prefetch(const uint8_t *p, int bytes) {
    for (int i = 0; i < bytes; i += 64) _mm_prefetch((const char *)(p + PREFETCH + i), _MM_HINT_T0);
}

INLINE __m256i sum4(const __m256i *s) {
    return _mm256_add_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_add_epi32(s[2], s[3]));
}

/* The float part of one block for 8 rows of one token: acc += float(sums) * (d * ds) */
INLINE void accumulate(__m256i sums, __m256 d, float ds, __m256 *acc) {
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(d, _mm256_set1_ps(ds)), *acc);
}

/* One tile of 16 q4 rows for nt tokens (token t: activations at xq + 2 K t, scales at ds / xs + G t); out[2 t + h]
 * holds rows 8 h .. 8 h + 7 of token t. Each token's operations do not depend on nt. */
INLINE void tile_q4(const uint8_t *tile, int64_t G, int64_t K, const int8_t *xq, const float *ds,
                    const float *xs, int nt, __m256 *out) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256 acc[2 * TB], off[2 * TB];
    for (int t = 0; t < 2 * nt; t++) acc[t] = off[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *blk = tile + g * TILE_BYTES_Q4;
        prefetch(blk, TILE_BYTES_Q4);
        for (int h = 0; h < 2; h++) {
            __m256i lo[4], hi[4]; /* inputs 4 j .. 4 j + 3 and 16 + 4 j .. of rows 8 h .. 8 h + 7 */
            for (int j = 0; j < 4; j++) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(blk + 64 * j + 32 * h));
                lo[j] = _mm256_and_si256(b, mask);
                hi[j] = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
            }
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + Q_BYTES_Q4 + 16 * h)));
            const __m256 o = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + Q_BYTES_Q4 + 32 + 16 * h)));
            for (int t = 0; t < nt; t++) {
                const int8_t *x1 = xq + 2 * K * t + g * QK, *x2 = x1 + K;
                __m256i s1[4], s2[4]; /* short chains: the sums are exact in any order */
                for (int j = 0; j < 4; j++) {
                    const __m256i z = _mm256_setzero_si256();
                    s1[j] = dot_acc(dot_acc(z, lo[j], bcast4(x1 + 4 * j)), hi[j], bcast4(x1 + 16 + 4 * j));
                    s2[j] = dot_acc(dot_acc(z, lo[j], bcast4(x2 + 4 * j)), hi[j], bcast4(x2 + 16 + 4 * j));
                }
                const __m256i sums = _mm256_add_epi32(_mm256_slli_epi32(sum4(s1), 8), sum4(s2));
                accumulate(sums, d, ds[G * t + g], &acc[2 * t + h]);
                off[2 * t + h] = _mm256_fmadd_ps(o, _mm256_set1_ps(xs[G * t + g]), off[2 * t + h]);
            }
        }
    }
    for (int t = 0; t < 2 * nt; t++) out[t] = _mm256_add_ps(acc[t], off[t]);
}

/* One tile of 16 q8 rows for nt tokens, as tile_q4 */
INLINE void tile_q8(const uint8_t *tile, int64_t G, int64_t K, const int8_t *xq, const float *ds, int nt,
                    __m256 *out) {
    for (int t = 0; t < 2 * nt; t++) out[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *blk = tile + g * TILE_BYTES_Q8;
        prefetch(blk, TILE_BYTES_Q8);
        for (int h = 0; h < 2; h++) {
            __m256i wv[8], aw[8]; /* inputs 4 j .. 4 j + 3 of rows 8 h .. 8 h + 7 */
            for (int j = 0; j < 8; j++) {
                wv[j] = _mm256_loadu_si256((const __m256i *)(blk + 64 * j + 32 * h));
                aw[j] = _mm256_sign_epi8(wv[j], wv[j]); /* |w| as unsigned; x takes w's sign: the same products */
            }
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + Q_BYTES_Q8 + 16 * h)));
            for (int t = 0; t < nt; t++) {
                const int8_t *x1 = xq + 2 * K * t + g * QK, *x2 = x1 + K;
                __m256i s1[4], s2[4];
                for (int j = 0; j < 4; j++) {
                    s1[j] = dot_acc(dot_acc(_mm256_setzero_si256(), aw[j], _mm256_sign_epi8(bcast4(x1 + 4 * j), wv[j])),
                                    aw[4 + j], _mm256_sign_epi8(bcast4(x1 + 16 + 4 * j), wv[4 + j]));
                    s2[j] = dot_acc(dot_acc(_mm256_setzero_si256(), aw[j], _mm256_sign_epi8(bcast4(x2 + 4 * j), wv[j])),
                                    aw[4 + j], _mm256_sign_epi8(bcast4(x2 + 16 + 4 * j), wv[4 + j]));
                }
                const __m256i sums = _mm256_add_epi32(_mm256_slli_epi32(sum4(s1), 8), sum4(s2));
                accumulate(sums, d, ds[G * t + g], &out[2 * t + h]);
            }
        }
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
/* With AVX-512 VNNI, one 512-bit register holds all 16 rows of a tile: the same products and float
 * operations as tile_q4 / tile_q8, lane for lane, in half the instructions. */
#define WIDE 1

INLINE __m512i sum4_wide(const __m512i *s) {
    return _mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(s[2], s[3]));
}

INLINE __m512i bcast4_wide(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

INLINE void split(__m512 v, __m256 *out) { /* rows 0-7, rows 8-15 */
    out[0] = _mm512_castps512_ps256(v);
    out[1] = _mm512_extractf32x8_ps(v, 1);
}

INLINE void tile_q4_wide(const uint8_t *tile, int64_t G, int64_t K, const int8_t *xq, const float *ds,
                         const float *xs, int nt, __m256 *out) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    __m512 acc[TB], off[TB];
    for (int t = 0; t < nt; t++) acc[t] = off[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *blk = tile + g * TILE_BYTES_Q4;
        prefetch(blk, TILE_BYTES_Q4);
        __m512i lo[4], hi[4];
        for (int j = 0; j < 4; j++) {
            const __m512i b = _mm512_loadu_si512(blk + 64 * j);
            lo[j] = _mm512_and_si512(b, mask);
            hi[j] = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask);
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + Q_BYTES_Q4)));
        const __m512 o = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + Q_BYTES_Q4 + 32)));
        for (int t = 0; t < nt; t++) {
            const int8_t *x1 = xq + 2 * K * t + g * QK, *x2 = x1 + K;
            __m512i s1[4], s2[4];
            for (int j = 0; j < 4; j++) {
                s1[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], bcast4_wide(x1 + 4 * j)),
                                            hi[j], bcast4_wide(x1 + 16 + 4 * j));
                s2[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], bcast4_wide(x2 + 4 * j)),
                                            hi[j], bcast4_wide(x2 + 16 + 4 * j));
            }
            const __m512i sums = _mm512_add_epi32(_mm512_slli_epi32(sum4_wide(s1), 8), sum4_wide(s2));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(d, _mm512_set1_ps(ds[G * t + g])), acc[t]);
            off[t] = _mm512_fmadd_ps(o, _mm512_set1_ps(xs[G * t + g]), off[t]);
        }
    }
    for (int t = 0; t < nt; t++) split(_mm512_add_ps(acc[t], off[t]), out + 2 * t);
}

/* q8: |w| as unsigned, and x negated where w < 0 (AVX-512 has no byte sign instruction): the same products */
INLINE void tile_q8_wide(const uint8_t *tile, int64_t G, int64_t K, const int8_t *xq, const float *ds, int nt,
                         __m256 *out) {
    __m512 acc[TB];
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *blk = tile + g * TILE_BYTES_Q8;
        prefetch(blk, TILE_BYTES_Q8);
        __m512i aw[8];
        __mmask64 neg[8];
        for (int j = 0; j < 8; j++) {
            const __m512i v = _mm512_loadu_si512(blk + 64 * j);
            aw[j] = _mm512_abs_epi8(v);
            neg[j] = _mm512_movepi8_mask(v);
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + Q_BYTES_Q8)));
        for (int t = 0; t < nt; t++) {
            const int8_t *x1 = xq + 2 * K * t + g * QK, *x2 = x1 + K;
            __m512i s1[4], s2[4];
            for (int j = 0; j < 4; j++) {
                const __m512i a = bcast4_wide(x1 + 4 * j), b = bcast4_wide(x1 + 16 + 4 * j);
                const __m512i c = bcast4_wide(x2 + 4 * j), e = bcast4_wide(x2 + 16 + 4 * j);
                const __m512i z = _mm512_setzero_si512();
                s1[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, aw[j], _mm512_mask_sub_epi8(a, neg[j], z, a)),
                                            aw[4 + j], _mm512_mask_sub_epi8(b, neg[4 + j], z, b));
                s2[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, aw[j], _mm512_mask_sub_epi8(c, neg[j], z, c)),
                                            aw[4 + j], _mm512_mask_sub_epi8(e, neg[4 + j], z, e));
            }
            const __m512i sums = _mm512_add_epi32(_mm512_slli_epi32(sum4_wide(s1), 8), sum4_wide(s2));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(d, _mm512_set1_ps(ds[G * t + g])), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) split(acc[t], out + 2 * t);
}
#endif

/* y[n0 .. n0 + nr) of one token from a tile's 16 results */
INLINE void store_rows(const float *out, const float *bias, int64_t n0, int nr, float *yrow) {
    for (int r = 0; r < nr; r++) yrow[n0 + r] = bias ? out[r] + bias[n0 + r] : out[r];
}

/* tokens [m, m + nt) of one tile; nt is a literal at every call, so each instance is unrolled */
INLINE void tile_tokens(int bits, const uint8_t *tile, int64_t G, int64_t K, int64_t N, const int8_t *xq,
                        const float *ds, const float *xs, const float *bias, int64_t n0, int nr, int64_t m, int nt,
                        float *y) {
    __m256 v[2 * TB];
#ifdef WIDE
    if (bits == 4)
        tile_q4_wide(tile, G, K, xq + 2 * K * m, ds + G * m, xs + G * m, nt, v);
    else
        tile_q8_wide(tile, G, K, xq + 2 * K * m, ds + G * m, nt, v);
#else
    if (bits == 4)
        tile_q4(tile, G, K, xq + 2 * K * m, ds + G * m, xs + G * m, nt, v);
    else
        tile_q8(tile, G, K, xq + 2 * K * m, ds + G * m, nt, v);
#endif
    for (int t = 0; t < nt; t++) {
        float out[TILE];
        _mm256_storeu_ps(out, v[2 * t]);
        _mm256_storeu_ps(out + 8, v[2 * t + 1]);
        store_rows(out, bias, n0, nr, y + (m + t) * N);
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * AMX: one tile product per block gives the exact integer sums of up to 8 tokens at once: the A tile's rows are
 * each token's q1 and q2 (rows 2 t and 2 t + 1, read in place with a stride of K bytes), so the C tile's rows
 * are the two levels' sums. Three weight tiles go at a time, so that three products are in flight; the float
 * part is the VNNI path's, lane for lane.
 */
#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512F__) && defined(__linux__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TOKENS 8 /* tokens per A tile (2 rows each) */
#define AMX_GROUP 3  /* weight tiles in flight */

static int amx_permitted = -1; /* -1: not asked yet */
static int amx_on = 0;

/* Turn the AMX path on or off (on only where Linux grants the tile state); returns whether it is on now. */
int amx_enable(int on) {
    if (amx_permitted < 0) /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA */
        amx_permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    amx_on = on && amx_permitted;
    return amx_on;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tile 0: one block of the tokens' activations (2 rows a token, 32 bytes); 1-3: one block of three weight
 * tiles (8 rows of 64 bytes); 4-6: their int32 sums (2 rows a token, 16 columns) */
static void amx_configure(int tokens) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = (uint8_t)(2 * tokens);
    c.colsb[0] = QK;
    for (int i = 1; i <= AMX_GROUP; i++) {
        c.rows[i] = QK / 4;
        c.colsb[i] = 64;
        c.rows[AMX_GROUP + i] = (uint8_t)(2 * tokens);
        c.colsb[AMX_GROUP + i] = 64;
    }
    _tile_loadconfig(&c);
}

/* The float part of one block for nt tokens of one weight tile, from its C tile (c: rows 2 t and 2 t + 1) */
INLINE void amx_accumulate(int bits, const int32_t *c, const uint8_t *blk, const float *ds, const float *xs,
                           int64_t G, int64_t g, int nt, float *acc, float *off) {
    const uint8_t *scales = blk + (bits == 4 ? Q_BYTES_Q4 : Q_BYTES_Q8);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales));
    const __m512 o = bits == 4 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + Q_BYTES_Q4 + 32)))
                               : _mm512_setzero_ps();
    for (int t = 0; t < nt; t++) {
        const __m512i sums = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c + 32 * t), 8),
                                              _mm512_load_si512(c + 32 * t + 16));
        _mm512_store_ps(acc + 16 * t, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums),
                                                      _mm512_mul_ps(d, _mm512_set1_ps(ds[G * t + g])),
                                                      _mm512_load_ps(acc + 16 * t)));
        if (bits == 4)
            _mm512_store_ps(off + 16 * t,
                            _mm512_fmadd_ps(o, _mm512_set1_ps(xs[G * t + g]), _mm512_load_ps(off + 16 * t)));
    }
}

/* Weight tiles [t0, t0 + nw) (nw <= 3) for all M tokens, 8 at a time. b: AMX_GROUP * G * 512 bytes of scratch
 * for q4's unpacked weights; *tokens: the token count the thread's tiles are configured for. */
static void amx_group(int bits, const uint8_t *w, int64_t tile_stride, int64_t t0, int nw, int64_t G, int64_t K,
                      int64_t M, const int8_t *xq, const float *ds, const float *xs, const float *bias, int64_t N,
                      float *y, uint8_t *b, int *tokens) {
    const int64_t block_bytes = bits == 4 ? TILE_BYTES_Q4 : TILE_BYTES_Q8;
    const uint8_t *tile[AMX_GROUP], *wb[AMX_GROUP]; /* packed blocks; the B matrices the products read */
    int64_t wstride = bits == 4 ? 512 : block_bytes;
    for (int i = 0; i < AMX_GROUP; i++) {
        tile[i] = w + (t0 + (i < nw ? i : 0)) * tile_stride;
        wb[i] = bits == 4 ? b + i * G * 512 : tile[i];
    }
    if (bits == 4) {
        const __m512i mask = _mm512_set1_epi8(0x0F);
        for (int i = 0; i < nw; i++)
            for (int64_t g = 0; g < G; g++)
                for (int j = 0; j < 4; j++) {
                    const __m512i v = _mm512_loadu_si512(tile[i] + g * block_bytes + 64 * j);
                    uint8_t *dst = b + (i * G + g) * 512;
                    _mm512_store_si512(dst + 64 * j, _mm512_and_si512(v, mask));
                    _mm512_store_si512(dst + 64 * (4 + j), _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
                }
    }
    int32_t c[AMX_GROUP][2 * AMX_TOKENS * 16] __attribute__((aligned(64)));
    float acc[AMX_GROUP][AMX_TOKENS * 16] __attribute__((aligned(64)));
    float off[AMX_GROUP][AMX_TOKENS * 16] __attribute__((aligned(64)));
    for (int64_t m0 = 0; m0 < M; m0 += AMX_TOKENS) {
        const int nt = (int)(M - m0 < AMX_TOKENS ? M - m0 : AMX_TOKENS);
        if (*tokens != nt) {
            amx_configure(nt);
            *tokens = nt;
        }
        memset(acc, 0, sizeof acc);
        memset(off, 0, sizeof off);
        const int8_t *xm = xq + 2 * K * m0;
        const float *dsm = ds + G * m0, *xsm = xs + G * m0;
        for (int64_t g = 0; g < G; g++) {
            if (m0 == 0) /* the next group's weights, while this one computes */
                for (int i = 0; i < AMX_GROUP * block_bytes; i += 64)
                    _mm_prefetch((const char *)(tile[0] + AMX_GROUP * tile_stride + AMX_GROUP * g * block_bytes + i),
                                 _MM_HINT_T0);
            _tile_loadd(0, xm + g * QK, K);
            _tile_loadd(1, wb[0] + g * wstride, 64);
            _tile_loadd(2, wb[1] + g * wstride, 64);
            _tile_loadd(3, wb[2] + g * wstride, 64);
            _tile_zero(4);
            _tile_zero(5);
            _tile_zero(6);
            if (bits == 4) {
                _tile_dpbsud(4, 0, 1);
                _tile_dpbsud(5, 0, 2);
                _tile_dpbsud(6, 0, 3);
            } else {
                _tile_dpbssd(4, 0, 1);
                _tile_dpbssd(5, 0, 2);
                _tile_dpbssd(6, 0, 3);
            }
            _tile_stored(4, c[0], 64);
            _tile_stored(5, c[1], 64);
            _tile_stored(6, c[2], 64);
            for (int i = 0; i < nw; i++)
                amx_accumulate(bits, c[i], tile[i] + g * block_bytes, dsm, xsm, G, g, nt, acc[i], off[i]);
        }
        for (int i = 0; i < nw; i++) {
            const int64_t n0 = (t0 + i) * TILE;
            const int nr = (int)(N - n0 < TILE ? N - n0 : TILE);
            for (int t = 0; t < nt; t++) {
                float out[TILE];
                const __m512 a = _mm512_load_ps(acc[i] + 16 * t);
                _mm512_storeu_ps(out, bits == 4 ? _mm512_add_ps(a, _mm512_load_ps(off[i] + 16 * t)) : a);
                store_rows(out, bias, n0, nr, y + (m0 + t) * N);
            }
        }
    }
}
#else
int amx_enable(int on) {
    (void)on;
    return 0;
}
#endif

static int linear(int bits, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                  float *y, int num_threads) {
    if (K % QK != 0) return -1;
    const int64_t G = K / QK;
    const int64_t tile_stride = G * (bits == 4 ? TILE_BYTES_Q4 : TILE_BYTES_Q8);
    int8_t *xq = (int8_t *)malloc((size_t)(2 * M * K));
    float *ds = (float *)malloc(sizeof(float) * (size_t)(M * G));
    float *xs = (float *)malloc(sizeof(float) * (size_t)(M * G));
    int rc = 0;
    if (!xq || !ds || !xs) {
        rc = -2;
        goto done;
    }
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M > 8)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, xq + 2 * K * m, ds + G * m, xs + G * m);

    const int64_t tiles = (N + TILE - 1) / TILE;
#ifdef HAVE_AMX
    if (amx_on && M >= (bits == 4 ? AMX_MIN_ROWS_Q4 : AMX_MIN_ROWS_Q8)) {
        const int64_t groups = (tiles + AMX_GROUP - 1) / AMX_GROUP;
#pragma omp parallel num_threads(num_threads)
        {
            uint8_t *b = bits == 4 ? (uint8_t *)aligned_alloc(64, (size_t)(AMX_GROUP * G * 512)) : NULL;
            int tokens = 0;
            if (bits == 4 && !b) {
#pragma omp atomic write
                rc = -2;
            }
#pragma omp for schedule(static)
            for (int64_t i = 0; i < groups; i++) {
                if (bits == 4 && !b) continue;
                const int64_t t0 = i * AMX_GROUP;
                amx_group(bits, w, tile_stride, t0, (int)(tiles - t0 < AMX_GROUP ? tiles - t0 : AMX_GROUP), G, K, M,
                          xq, ds, xs, bias, N, y, b, &tokens);
            }
            if (tokens) _tile_release();
            free(b);
        }
        goto done;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * TILE;
        const int nr = (int)(N - n0 < TILE ? N - n0 : TILE);
        const uint8_t *tile = w + t * tile_stride;
        int64_t m = 0;
        for (; m + TB <= M; m += TB) tile_tokens(bits, tile, G, K, N, xq, ds, xs, bias, n0, nr, m, TB, y);
        for (; m < M; m++) tile_tokens(bits, tile, G, K, N, xq, ds, xs, bias, n0, nr, m, 1, y);
    }
done:
    free(xq);
    free(ds);
    free(xs);
    return rc;
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
