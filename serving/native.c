/* loradex CPU kernels (x86-64 AVX2 + FMA + F16C), built at first use by serving/native.py.
 *
 * y[M, N] = x[M, K] . W[N, K]^T (+ bias) for weights that stay compact in memory:
 *
 *   nf4_gemm  W = code[idx] * absmax[block]: 4-bit indices, one fp32 scale per 64 weights
 *             (the values bitsandbytes' NF4 dequantizes to, bit for bit: the kernel
 *             rebuilds each weight with the same fp32 product, it only reads 8x fewer bytes);
 *   f32_gemm  W in fp32.
 *
 * Every output is one dot product in a fixed order whatever M is (one 8-lane accumulator
 * over the chunks of 8 in order, then a fixed horizontal sum, then the scalar tail), so a
 * row's result does not depend on the rows beside it in the batch. Several rows go through
 * register tiles (up to 4 rows x 3 outputs: each chunk of x and w loaded once per tile).
 * Single-threaded: one call per projection; the caller owns threading.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

/* dot(x, w) over K floats in the order every kernel here uses */
static inline float dot_f32(const float *x, const float *w, int K) {
    __m256 a = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a);
    float s = hsum8(a);
    for (; k < K; k++) s += x[k] * w[k];
    return s;
}

/* R rows of x (stride xs) against O weight rows: y[r * ys + o] = dot_f32(x_r, w_o) + b[o] */
#define TILE(R, O)                                                                                         \
    static inline void tile_##R##x##O(const float *x, size_t xs, const float *const *w, int K,           \
                                      const float *b, float *y, size_t ys) {                            \
        __m256 a[R][O];                                                                                  \
        for (int r = 0; r < R; r++)                                                                      \
            for (int o = 0; o < O; o++) a[r][o] = _mm256_setzero_ps();                                    \
        int k = 0;                                                                                       \
        for (; k + 8 <= K; k += 8) {                                                                     \
            __m256 wc[O];                                                                                \
            for (int o = 0; o < O; o++) wc[o] = _mm256_loadu_ps(w[o] + k);                               \
            for (int r = 0; r < R; r++) {                                                                \
                const __m256 xv = _mm256_loadu_ps(x + r * xs + k);                                       \
                for (int o = 0; o < O; o++) a[r][o] = _mm256_fmadd_ps(xv, wc[o], a[r][o]);               \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int o = 0; o < O; o++) {                                                                \
                float s = hsum8(a[r][o]);                                                                \
                for (int t = k; t < K; t++) s += x[r * xs + t] * w[o][t];                                \
                y[r * ys + o] = s + b[o];                                                                \
            }                                                                                            \
    }
TILE(4, 3)
TILE(3, 3)
TILE(2, 3)
TILE(1, 3)
TILE(4, 1)
TILE(3, 1)
TILE(2, 1)
TILE(1, 1)

/* y[:, n0:n0+O] for every row of x against O weight rows (fp32, contiguous each), O in {1, 3} */
static inline void rows_dot(const float *x, int M, int K, int N, int n0, int O, const float *const *w,
                            const float *b, float *y) {
    int m = 0;
    for (; m + 4 <= M; m += 4) {
        if (O == 3) tile_4x3(x + (size_t)m * K, K, w, K, b, y + (size_t)m * N + n0, N);
        else tile_4x1(x + (size_t)m * K, K, w, K, b, y + (size_t)m * N + n0, N);
    }
    const float *xm = x + (size_t)m * K;
    float *ym = y + (size_t)m * N + n0;
    switch ((M - m) * 4 + O) {
        case 3 * 4 + 3: tile_3x3(xm, K, w, K, b, ym, N); break;
        case 2 * 4 + 3: tile_2x3(xm, K, w, K, b, ym, N); break;
        case 1 * 4 + 3: tile_1x3(xm, K, w, K, b, ym, N); break;
        case 3 * 4 + 1: tile_3x1(xm, K, w, K, b, ym, N); break;
        case 2 * 4 + 1: tile_2x1(xm, K, w, K, b, ym, N); break;
        case 1 * 4 + 1: tile_1x1(xm, K, w, K, b, ym, N); break;
        default: break;
    }
}

/* One NF4 row (K weights, K % 64 == 0) into fp32: weight 8j+i is nibble i of word j;
 * block b (64 weights) has scale absmax[b]; value = code[idx] * absmax[b] in fp32. */
#define NF4_W(word, tlo, thi) ({ __m256i v_ = _mm256_srlv_epi32(_mm256_set1_epi32((int)(word)), shifts);         \
    _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, v_), _mm256_permutevar8x32_ps(thi, v_),                     \
                     _mm256_castsi256_ps(_mm256_slli_epi32(v_, 28))); })

static inline void nf4_row(const uint32_t *q, const float *absmax, const float *code, int K, float *out) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256 clo = _mm256_loadu_ps(code), chi = _mm256_loadu_ps(code + 8);
    for (int b = 0; b < K / 64; b++) {
        const __m256 s = _mm256_set1_ps(absmax[b]);
        const __m256 tlo = _mm256_mul_ps(clo, s), thi = _mm256_mul_ps(chi, s);
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + b * 64 + j * 8, NF4_W(q[b * 8 + j], tlo, thi));
    }
}

/* W [N, K] in NF4 -> fp32 (the whole matrix, for large-M products done by a BLAS) */
void nf4_dequant(const uint32_t *q, const float *absmax, const float *code, int N, int K, float *out) {
    for (int n = 0; n < N; n++)
        nf4_row(q + (size_t)n * (K / 8), absmax + (size_t)n * (K / 64), code, K, out + (size_t)n * K);
}

/* M == 1: two rows' dot products straight from the 4-bit weights (two independent chains), the same
 * products and order as dot_f32 over nf4_row's output, without the round trip through memory */
static inline void nf4_dot2(const float *x, const uint32_t *q0, const uint32_t *q1, const float *m0,
                            const float *m1, const float *code, int K, float *y0, float *y1) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256 clo = _mm256_loadu_ps(code), chi = _mm256_loadu_ps(code + 8);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int b = 0; b < K / 64; b++) {
        const __m256 s0 = _mm256_set1_ps(m0[b]), s1 = _mm256_set1_ps(m1[b]);
        const __m256 l0 = _mm256_mul_ps(clo, s0), h0 = _mm256_mul_ps(chi, s0);
        const __m256 l1 = _mm256_mul_ps(clo, s1), h1 = _mm256_mul_ps(chi, s1);
        for (int j = 0; j < 8; j++) {
            const __m256 xv = _mm256_loadu_ps(x + b * 64 + j * 8);
            a0 = _mm256_fmadd_ps(xv, NF4_W(q0[b * 8 + j], l0, h0), a0);
            a1 = _mm256_fmadd_ps(xv, NF4_W(q1[b * 8 + j], l1, h1), a1);
        }
    }
    *y0 = hsum8(a0);
    *y1 = hsum8(a1);
}

/* Pack fp32 weights W [N, K] that are NF4 values (code[i] * scale, one scale per 64 weights, the scale
 * being the block's largest magnitude) into nf4_row's layout. Returns 0, or -1 if some weight is not
 * exactly such a value (then nothing about q/absmax is meaningful). code: 16 ascending values. */
int nf4_pack(const float *w, int N, int K, const float *code, uint32_t *q, float *absmax) {
    for (size_t b = 0; b < (size_t)N * (K / 64); b++) {
        const float *wb = w + b * 64;
        float s = 0.0f;
        for (int i = 0; i < 64; i++) s = fabsf(wb[i]) > s ? fabsf(wb[i]) : s;
        absmax[b] = s;
        float values[16];
        for (int i = 0; i < 16; i++) values[i] = code[i] * s;
        for (int j = 0; j < 8; j++) {
            uint32_t word = 0;
            for (int i = 0; i < 8; i++) {
                float x = wb[j * 8 + i];
                /* the value's index in the ascending table (branch-free: how many are below it), then exact? */
                const __m256 xv = _mm256_set1_ps(x);
                int lo = __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(values), xv, _CMP_LT_OQ))) +
                         __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(values + 8), xv, _CMP_LT_OQ)));
                if (lo > 15 || values[lo] != x) return -1;
                word |= (uint32_t)lo << (4 * i);
            }
            q[b * 8 + j] = word;
        }
    }
    return 0;
}

void nf4_gemm(const float *x, int M, int K, int N, const uint32_t *q, const float *absmax, const float *code,
              const float *bias, float *y, float *scratch) {
    const size_t qs = K / 8, ms = K / 64;
    if (M == 1) {
        for (int n = 0; n < N; n += 2) {
            int n1 = n + 1 < N ? n + 1 : n;  /* an odd last row is computed twice, written once */
            float y0, y1;
            nf4_dot2(x, q + n * qs, q + n1 * qs, absmax + n * ms, absmax + n1 * ms, code, K, &y0, &y1);
            y[n] = y0 + (bias ? bias[n] : 0.0f);
            if (n1 != n) y[n1] = y1 + (bias ? bias[n1] : 0.0f);
        }
        return;
    }
    /* three weight rows at a time, rebuilt into scratch [3 * K], then register tiles over the rows of x */
    const float *w[3] = {scratch, scratch + K, scratch + 2 * K};
    float b[3];
    int n = 0;
    for (; n + 3 <= N; n += 3) {
        for (int o = 0; o < 3; o++) {
            nf4_row(q + (n + o) * qs, absmax + (n + o) * ms, code, K, scratch + o * K);
            b[o] = bias ? bias[n + o] : 0.0f;
        }
        rows_dot(x, M, K, N, n, 3, w, b, y);
    }
    for (; n < N; n++) {
        nf4_row(q + n * qs, absmax + n * ms, code, K, scratch);
        b[0] = bias ? bias[n] : 0.0f;
        rows_dot(x, M, K, N, n, 1, w, b, y);
    }
}

void f32_gemm(const float *x, int M, int K, int N, const float *w, const float *bias, float *y) {
    /* one weight row at a time (weights stream from memory; several streams at once measured slower) */
    for (int n = 0; n < N; n++) {
        const float *wr[3] = {w + (size_t)n * K, NULL, NULL};
        float b[3] = {bias ? bias[n] : 0.0f, 0.0f, 0.0f};
        if (M == 1) y[n] = dot_f32(x, wr[0], K) + b[0];
        else rows_dot(x, M, K, N, n, 1, wr, b, y);
    }
}


/* ---- one decoder layer's decode step around attention (Llama-style families) ----------------------
 *
 *   layer_in:   xn = rmsnorm(h); q, k, v = proj(xn) (+ bias, + each row's LoRA update)
 *   rope_cache: q/k per-head norm (Qwen3), rotary embedding of q and k, k and v written into the cache
 *   (attention itself stays in torch: masks, sliding windows, soft-capping)
 *   layer_out:  h += o_proj(o); xn = rmsnorm(h); h += down(silu(gate(xn)) * up(xn))
 *
 * Every step is the computation the torch modules do, in the same order of roundings
 * (products, then sums; -ffp-contract=off), except where a reduction's order differs.
 */
typedef struct {
    int n, k;
    const uint32_t *q;
    const float *absmax, *bias;
    const float *A, *B;  /* LoRA stacks [slots, r, k] and [slots, n, r] (scale folded into B), or NULL */
    int r;
} proj_t;

typedef struct {
    int d, nh, nkv, hd, inter;
    float eps;
    const float *in_norm, *post_norm, *q_norm, *k_norm, *code;
    proj_t p[7]; /* q k v o gate up down */
} layer_t;

static void rmsnorm(const float *x, const float *w, int D, float eps, float *out) {
    float ss = dot_f32(x, x, D);
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int i = 0; i < D; i++) {
        float t = x[i] * r;
        out[i] = w[i] * t;
    }
}

static void proj(const proj_t *p, const float *code, const float *x, int M, const int *slots, float *y,
                 float *scratch) {
    nf4_gemm(x, M, p->k, p->n, p->q, p->absmax, code, p->bias, y, scratch);
    if (!p->A || !slots) return;
    float t[256];
    for (int m = 0; m < M; m++) {
        int s = slots[m];
        if (s < 0) continue;
        const float *A = p->A + (size_t)s * p->r * p->k, *B = p->B + (size_t)s * p->n * p->r;
        const float *xm = x + (size_t)m * p->k;
        for (int j = 0; j < p->r; j++) t[j] = dot_f32(xm, A + (size_t)j * p->k, p->k);
        float *ym = y + (size_t)m * p->n;
        for (int n = 0; n < p->n; n++) {
            float dlt = dot_f32(t, B + (size_t)n * p->r, p->r);
            ym[n] = ym[n] + dlt;
        }
    }
}

void layer_in(const layer_t *L, int M, const float *h, const int *slots, float *q, float *k, float *v) {
    float *xn = malloc(sizeof(float) * (size_t)M * L->d);
    float scratch[3 * L->d];
    for (int m = 0; m < M; m++) rmsnorm(h + (size_t)m * L->d, L->in_norm, L->d, L->eps, xn + (size_t)m * L->d);
    proj(&L->p[0], L->code, xn, M, slots, q, scratch);
    proj(&L->p[1], L->code, xn, M, slots, k, scratch);
    proj(&L->p[2], L->code, xn, M, slots, v, scratch);
    free(xn);
}

static void rope_head(float *x, const float *cos, const float *sin, int hd) {
    float tmp[hd];
    int half = hd / 2;
    for (int j = 0; j < hd; j++) {
        float rot = j < half ? -x[j + half] : x[j - half];
        float a = x[j] * cos[j];
        float b = rot * sin[j];
        tmp[j] = a + b;
    }
    memcpy(x, tmp, sizeof(float) * hd);
}

void rope_cache(const layer_t *L, int M, float *q, const float *k, const float *v, const float *cos,
                const float *sin, float *kc, float *vc, int cap, const int64_t *pos) {
    int hd = L->hd;
    float kh[hd];
    for (int m = 0; m < M; m++) {
        const float *cm = cos + (size_t)m * hd, *sm = sin + (size_t)m * hd;
        for (int h = 0; h < L->nh; h++) {
            float *qh = q + ((size_t)m * L->nh + h) * hd;
            if (L->q_norm) rmsnorm(qh, L->q_norm, hd, L->eps, qh);
            rope_head(qh, cm, sm, hd);
        }
        for (int h = 0; h < L->nkv; h++) {
            const float *src = k + ((size_t)m * L->nkv + h) * hd;
            if (L->k_norm) rmsnorm(src, L->k_norm, hd, L->eps, kh);
            else memcpy(kh, src, sizeof(float) * hd);
            rope_head(kh, cm, sm, hd);
            size_t at = (((size_t)m * L->nkv + h) * cap + (size_t)pos[m]) * hd;
            memcpy(kc + at, kh, sizeof(float) * hd);
            memcpy(vc + at, v + ((size_t)m * L->nkv + h) * hd, sizeof(float) * hd);
        }
    }
}

void layer_out(const layer_t *L, int M, const float *o, float *h, const int *slots) {
    size_t d = L->d, I = L->inter;
    float *a = malloc(sizeof(float) * (size_t)M * (d + d + 3 * I));
    float *xn = a + M * d, *g = xn + M * d, *u = g + M * I, *act = u + M * I;
    float scratch[3 * (I > d ? I : d)];
    proj(&L->p[3], L->code, o, M, slots, a, scratch);
    for (size_t i = 0; i < M * d; i++) h[i] = h[i] + a[i];
    for (int m = 0; m < M; m++) rmsnorm(h + m * d, L->post_norm, d, L->eps, xn + m * d);
    proj(&L->p[4], L->code, xn, M, slots, g, scratch);
    proj(&L->p[5], L->code, xn, M, slots, u, scratch);
    for (size_t i = 0; i < M * I; i++) {
        float s = g[i] / (1.0f + expf(-g[i]));
        act[i] = s * u[i];
    }
    proj(&L->p[6], L->code, act, M, slots, a, scratch);
    for (size_t i = 0; i < M * d; i++) h[i] = h[i] + a[i];
    free(a);
}

/* Attention of each row's new query over its own cache rows 0..pos (or the last `window` of them):
 * o[m, h*hd:(h+1)*hd] = softmax(q.k_j * scale) . v_j, heads grouped over the kv heads (GQA). */
void attend(const layer_t *L, int M, const float *q, const float *kc, const float *vc, int cap, const int64_t *pos,
            int window, float scale, float *o) {
    int hd = L->hd, group = L->nh / L->nkv;
    float *sc = malloc(sizeof(float) * (size_t)cap);
    for (int m = 0; m < M; m++) {
        int len = (int)pos[m] + 1, start = window > 0 && len > window ? len - window : 0;
        for (int h = 0; h < L->nh; h++) {
            const float *qh = q + ((size_t)m * L->nh + h) * hd;
            size_t base = (((size_t)m * L->nkv + h / group) * cap) * hd;
            float mx = -INFINITY;
            for (int j = start; j < len; j++) {
                float t = dot_f32(qh, kc + base + (size_t)j * hd, hd) * scale;
                sc[j] = t;
                mx = t > mx ? t : mx;
            }
            float sum = 0.0f;
            for (int j = start; j < len; j++) {
                sc[j] = expf(sc[j] - mx);
                sum += sc[j];
            }
            float *oh = o + ((size_t)m * L->nh + h) * hd;
            for (int d = 0; d < hd; d++) oh[d] = 0.0f;
            for (int j = start; j < len; j++) {
                const float *vj = vc + base + (size_t)j * hd;
                float p = sc[j] / sum;
                int d = 0;
                for (; d + 8 <= hd; d += 8)
                    _mm256_storeu_ps(oh + d, _mm256_add_ps(_mm256_loadu_ps(oh + d),
                                                           _mm256_mul_ps(_mm256_set1_ps(p), _mm256_loadu_ps(vj + d))));
                for (; d < hd; d++) oh[d] += p * vj[d];
            }
        }
    }
    free(sc);
}
