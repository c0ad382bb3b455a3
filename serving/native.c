/* loradex CPU kernels (x86-64 AVX2 + FMA + F16C, or AVX-512F), built at first use by serving/native.py.
 *
 * y[M, N] = x[M, K] . W[N, K]^T (+ bias) for weights that stay compact in memory:
 *
 *   nf4_gemm  W = code[idx] * absmax[block]: 4-bit indices, one fp32 scale per 64 weights (layout below)
 *             (the values bitsandbytes' NF4 dequantizes to, bit for bit: the kernel
 *             rebuilds each weight with the same fp32 product, it only reads 8x fewer bytes);
 *   f32_gemm  W in fp32.
 *
 * Every output is one dot product in a fixed order whatever M is (one VW-lane accumulator
 * over the chunks of VW in order, then a fixed horizontal sum, then the scalar tail), so a
 * row's result does not depend on the rows beside it in the batch. Several rows go through
 * register tiles (up to 4 rows x 3 outputs: each chunk of x and w loaded once per tile).
 * Each product splits its outputs over native_threads() threads (see below); a row's results do not
 * depend on the thread count either.
 *
 * The same source builds twice: for AVX2 (VW = 8 lanes) and, with -mavx512f, for AVX-512 (VW = 16 lanes,
 * and the 16-entry NF4 lookup is one vpermps). native.py loads the one the CPU runs best. The two builds sum
 * in different orders (8 or 16 lanes), so their results may differ in the last bits; within one build every
 * property above holds. Layouts written by the packers below are per build (a build reads only its own).
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- threads ----------------------------------------------------------------------------------------
 *
 * The products split their outputs over `native_threads(n)` threads (the caller plus n - 1 workers); every
 * output is still computed by the same code in the same order, so results do not depend on the thread
 * count. Workers spin briefly between jobs (a decode step is a few hundred products back to back), then
 * sleep on a condition variable, so an idle server does not burn its cores. */
typedef void (*range_fn)(void *arg, int lo, int hi);

#define MAX_THREADS 64
#define SPIN 20000
static struct {
    int n;                      /* threads in use, caller included */
    int started;                /* workers created */
    pthread_t tid[MAX_THREADS];
    atomic_int gen;             /* bumped per job */
    atomic_int pending;         /* workers still on the current job */
    atomic_int sleepers;
    atomic_int ready;           /* workers that have read the current generation */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    range_fn fn;
    void *arg;
    int total, grain, parts;
} pool = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static pthread_mutex_t dispatch = PTHREAD_MUTEX_INITIALIZER;  /* one job at a time */

static void part_range(int id, int parts, int total, int grain, int *lo, int *hi) {
    const int units = (total + grain - 1) / grain;
    const int a = (int)((long)units * id / parts), b = (int)((long)units * (id + 1) / parts);
    *lo = a * grain < total ? a * grain : total;
    *hi = b * grain < total ? b * grain : total;
}

static void *worker(void *p) {
    const int id = (int)(intptr_t)p;
    int seen = atomic_load(&pool.gen);  /* stable: native_threads holds the dispatch lock until we are ready */
    atomic_fetch_add(&pool.ready, 1);
    for (;;) {
        int g, spins = 0;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            if (++spins < SPIN) {
                _mm_pause();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleepers, 1);
            /* seq_cst, like the dispatcher's bump and sleepers check: one of us sees the other */
            while ((g = atomic_load(&pool.gen)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.mu);
            break;
        }
        seen = g;
        if (id < pool.parts) {
            int lo, hi;
            part_range(id, pool.parts, pool.total, pool.grain, &lo, &hi);
            if (lo < hi) pool.fn(pool.arg, lo, hi);
        }
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

/* Use n threads (caller included) from now on; returns the number in use. Workers are created once. */
int native_threads(int n) {
    pthread_mutex_lock(&dispatch);  /* not while a job runs */
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    while (pool.started < n - 1) {
        if (pthread_create(&pool.tid[pool.started], NULL, worker, (void *)(intptr_t)(pool.started + 1)) != 0) break;
        pthread_detach(pool.tid[pool.started]);
        pool.started++;
    }
    while (atomic_load(&pool.ready) < pool.started) _mm_pause();  /* every worker knows the generation */
    pool.n = n <= pool.started + 1 ? n : pool.started + 1;
    pthread_mutex_unlock(&dispatch);
    return pool.n;
}

/* A forked child has none of the workers: start it serial, with fresh locks (it may grow a pool again) */
static void pool_after_fork(void) {
    pool.started = 0;
    pool.n = 1;
    atomic_store(&pool.ready, 0);
    atomic_store(&pool.sleepers, 0);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&dispatch, NULL);
}

__attribute__((constructor)) static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

/* fn over [0, total) in chunks of `grain` outputs, split over the pool (serial when small or single) */
static void parallel_for(range_fn fn, void *arg, int total, int grain) {
    const int parts = pool.n < (total + grain - 1) / grain ? pool.n : (total + grain - 1) / grain;
    if (parts <= 1 || pthread_mutex_trylock(&dispatch) != 0) {  /* small, single, or the pool is busy */
        fn(arg, 0, total);
        return;
    }
    pool.fn = fn;
    pool.arg = arg;
    pool.total = total;
    pool.grain = grain;
    pool.parts = parts;
    atomic_store(&pool.pending, pool.started);
    atomic_fetch_add(&pool.gen, 1);  /* seq_cst: ordered before the sleepers check below (and theirs) */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    int lo, hi;
    part_range(0, parts, total, grain, &lo, &hi);
    if (lo < hi) fn(arg, lo, hi);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) _mm_pause();
    pthread_mutex_unlock(&dispatch);
}

/* ---- vectors of VW floats ------------------------------------------------------------------------- */
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#define vset1(s) _mm512_set1_ps(s)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vdiv(a, b) _mm512_div_ps(a, b)
#else
#define VW 8
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#define vset1(s) _mm256_set1_ps(s)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vdiv(a, b) _mm256_div_ps(a, b)
#endif

/* lanes per vector in this build (the Python side reports it) */
int native_vw(void) { return VW; }

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

/* the fixed horizontal sum of one accumulator */
static inline float vsum(vf v) {
#if VW == 16
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
#else
    return hsum8(v);
#endif
}

/* dot(x, w) over K floats in the order every kernel here uses */
static inline float dot_f32(const float *x, const float *w, int K) {
    vf a = vzero();
    int k = 0;
    for (; k + VW <= K; k += VW) a = vfma(vload(x + k), vload(w + k), a);
    float s = vsum(a);
    for (; k < K; k++) s += x[k] * w[k];
    return s;
}

/* R rows of x (stride xs) against O weight rows: y[r * ys + o] = dot_f32(x_r, w_o) + b[o] */
#define TILE(R, O)                                                                                         \
    static inline void tile_##R##x##O(const float *x, size_t xs, const float *const *w, int K,           \
                                      const float *b, float *y, size_t ys) {                            \
        vf a[R][O];                                                                                       \
        for (int r = 0; r < R; r++)                                                                      \
            for (int o = 0; o < O; o++) a[r][o] = vzero();                                                \
        int k = 0;                                                                                       \
        for (; k + VW <= K; k += VW) {                                                                   \
            vf wc[O];                                                                                    \
            for (int o = 0; o < O; o++) wc[o] = vload(w[o] + k);                                         \
            for (int r = 0; r < R; r++) {                                                                \
                const vf xv = vload(x + r * xs + k);                                                       \
                for (int o = 0; o < O; o++) a[r][o] = vfma(xv, wc[o], a[r][o]);                          \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int o = 0; o < O; o++) {                                                                \
                float s = vsum(a[r][o]);                                                                 \
                for (int t = k; t < K; t++) s += x[r * xs + t] * w[o][t];                                \
                y[r * ys + o] = s + b[o];                                                                \
            }                                                                                            \
    }
TILE(8, 1)
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
    if (O == 1 && M < 16)  /* eight rows: eight FMA chains keep both FMA units busy (measured slower for more) */
        for (; m + 8 <= M; m += 8) tile_8x1(x + (size_t)m * K, K, w, K, b, y + (size_t)m * N + n0, N);
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

/* NF4 layout. A row of K weights (K % 64 == 0) is K/2 bytes: one fp32 scale per block of 64 weights
 * (absmax[b]) and 16 bytes per group of 32 weights (k = 32g + t). Weight value = code[index] * absmax[block]
 * in fp32, the product bitsandbytes dequantizes to. Which nibble holds which weight depends on the build:
 *
 * AVX2: byte 4v + i (v, i in 0..3) holds weight 32g + 8v + i in its low nibble and 32g + 8v + 4 + i in its
 * high nibble. The 16-entry lookup runs on byte shuffles: the code table is kept as four 16-byte planes
 * (byte j of every code value), one vpshufb per plane looks up 32 indices at once, and two rounds of
 * unpacks put the four bytes of each value back together. A group of 32 weights comes out as four vectors
 * of 8 in k order, for 14 single-cycle shuffles (cross-lane vpermps, the obvious 8-entry lookup, takes 2
 * cycles each on Zen 3 and two are needed per 8 weights).
 *
 * AVX-512: byte i (0..15) holds weight 32g + i in its low nibble and 32g + 16 + i in its high nibble. The
 * 16 code values fit one register, and vpermps looks up 16 indices at once (it reads only the low 4 bits
 * of each): a group is one byte-to-dword widening, one shift and two lookups. */
#define NF4_V (32 / VW) /* vectors per group of 32 weights */

#if VW == 16
typedef struct {
    __m512 code;
} nf4_tab;

static inline void nf4_tab_init(nf4_tab *t, const float *code) { t->code = _mm512_loadu_ps(code); }

static inline void nf4_codes32(const uint8_t *qb, const nf4_tab *t, vf w[NF4_V]) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qb));
    w[0] = _mm512_permutexvar_ps(idx, t->code);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), t->code);
}

/* the byte at position j (0..15) of a group, from the group's 32 indices */
static inline uint8_t nf4_byte(const uint8_t *idx, int j) { return (uint8_t)(idx[j] | (idx[j + 16] << 4)); }
#else
typedef struct {
    __m256i p[4], lowmask, shift;
} nf4_tab;

static inline void nf4_tab_init(nf4_tab *t, const float *code) {
    uint8_t planes[4][16];
    for (int c = 0; c < 16; c++) {
        uint32_t bits;
        memcpy(&bits, code + c, 4);
        for (int j = 0; j < 4; j++) planes[j][c] = (uint8_t)(bits >> (8 * j));
    }
    for (int j = 0; j < 4; j++) t->p[j] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)planes[j]));
    t->lowmask = _mm256_set1_epi8(0x0F);
    t->shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
}

/* the code values of one group's 32 weights (16 bytes at qb), in k order: w[v] = weights 8v .. 8v+7 */
static inline void nf4_codes32(const uint8_t *qb, const nf4_tab *t, vf w[NF4_V]) {
    const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qb));
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(raw, t->shift), t->lowmask);  /* lane 1: high nibbles */
    const __m256i b0 = _mm256_shuffle_epi8(t->p[0], idx), b1 = _mm256_shuffle_epi8(t->p[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(t->p[2], idx), b3 = _mm256_shuffle_epi8(t->p[3], idx);
    const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

static inline uint8_t nf4_byte(const uint8_t *idx, int j) {
    const int k = 8 * (j / 4) + j % 4;
    return (uint8_t)(idx[k] | (idx[k + 4] << 4));
}
#endif

/* One NF4 row into fp32 */
static inline void nf4_row(const uint32_t *q, const float *absmax, const nf4_tab *t, int K, float *out) {
    const uint8_t *qb = (const uint8_t *)q;
    for (int b = 0; b < K / 64; b++) {
        const vf s = vset1(absmax[b]);
        for (int g = 0; g < 2; g++) {
            vf w[NF4_V];
            nf4_codes32(qb + b * 32 + g * 16, t, w);
            for (int v = 0; v < NF4_V; v++) vstore(out + b * 64 + g * 32 + v * VW, vmul(w[v], s));
        }
    }
}

/* W [N, K] in NF4 -> fp32 (the whole matrix, for large-M products done by a BLAS) */
void nf4_dequant(const uint32_t *q, const float *absmax, const float *code, int N, int K, float *out) {
    nf4_tab t;
    nf4_tab_init(&t, code);
    for (int n = 0; n < N; n++)
        nf4_row(q + (size_t)n * (K / 8), absmax + (size_t)n * (K / 64), &t, K, out + (size_t)n * K);
}

/* M == 1: two rows' dot products straight from the 4-bit weights (two independent chains), the same
 * products and order as dot_f32 over nf4_row's output, without the round trip through memory */
static inline void nf4_dot2(const float *x, const uint32_t *q0, const uint32_t *q1, const float *m0,
                            const float *m1, const nf4_tab *t, int K, float *y0, float *y1) {
    const uint8_t *qb0 = (const uint8_t *)q0, *qb1 = (const uint8_t *)q1;
    vf a0 = vzero(), a1 = vzero();
    for (int b = 0; b < K / 64; b++) {
        const vf s0 = vset1(m0[b]), s1 = vset1(m1[b]);
        for (int g = 0; g < 2; g++) {
            vf w0[NF4_V], w1[NF4_V];
            nf4_codes32(qb0 + b * 32 + g * 16, t, w0);
            nf4_codes32(qb1 + b * 32 + g * 16, t, w1);
            for (int v = 0; v < NF4_V; v++) {
                const vf xv = vload(x + b * 64 + g * 32 + v * VW);
                a0 = vfma(xv, vmul(w0[v], s0), a0);
                a1 = vfma(xv, vmul(w1[v], s1), a1);
            }
        }
    }
    *y0 = vsum(a0);
    *y1 = vsum(a1);
}

/* Pack fp32 weights W [N, K] that are NF4 values (code[i] * scale, one scale per 64 weights, the scale
 * being the block's largest magnitude) into nf4_row's layout. Returns 0, or -1 if some weight is not
 * exactly such a value (then nothing about q/absmax is meaningful). code: 16 ascending values. */
int nf4_pack(const float *w, int N, int K, const float *code, uint32_t *q, float *absmax) {
    uint8_t *qb = (uint8_t *)q;
    for (size_t b = 0; b < (size_t)N * (K / 64); b++) {
        const float *wb = w + b * 64;
        float s = 0.0f;
        for (int i = 0; i < 64; i++) s = fabsf(wb[i]) > s ? fabsf(wb[i]) : s;
        absmax[b] = s;
        float values[16];
        for (int i = 0; i < 16; i++) values[i] = code[i] * s;
        uint8_t idx[64];
        for (int i = 0; i < 64; i++) {
            /* the value's index in the ascending table (branch-free: how many are below it), then exact? */
            const __m256 xv = _mm256_set1_ps(wb[i]);
            int lo = __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(values), xv, _CMP_LT_OQ))) +
                     __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(values + 8), xv, _CMP_LT_OQ)));
            if (lo > 15 || values[lo] != wb[i]) return -1;
            idx[i] = (uint8_t)lo;
        }
        for (int g = 0; g < 2; g++)
            for (int j = 0; j < 16; j++) qb[b * 32 + g * 16 + j] = nf4_byte(idx + 32 * g, j);
    }
    return 0;
}

#if VW == 16
/* AVX-512, 2..8 rows: R rows of x against two weight rows rebuilt in registers (no scratch round trip), each
 * output one accumulator over the chunks of 16 in k order: the same products and order as nf4_dot2 and
 * dot_f32 over nf4_row's output. 2R accumulators + 4 weight vectors fit the 32 registers. */
#define ROWS2_ZERO(R) \
    vf a[R][2];       \
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = vzero();
/* rows 0..R-1 of x (stride K, at column OFF) times two rebuilt weight vectors, into a[r][0] and a[r][1] */
#define ROWS2_FMA(R, OFF, u0, u1)                                  \
    for (int r = 0; r < R; r++) {                                  \
        const vf xv = vload(x + (size_t)r * K + (OFF));            \
        a[r][0] = vfma(xv, u0, a[r][0]);                           \
        a[r][1] = vfma(xv, u1, a[r][1]);                           \
    }
#define ROWS2_SUM(R)                     \
    for (int r = 0; r < R; r++) {        \
        out[r][0] = vsum(a[r][0]);       \
        out[r][1] = vsum(a[r][1]);       \
    }

#define NF4_TILE(R)                                                                                          \
    static inline void nf4_tile_##R(const float *x, int K, const uint8_t *qb0, const uint8_t *qb1,            \
                                    const float *m0, const float *m1, const nf4_tab *t, float out[R][2]) {   \
        ROWS2_ZERO(R)                                                                                        \
        for (int b = 0; b < K / 64; b++) {                                                                   \
            const vf s0 = vset1(m0[b]), s1 = vset1(m1[b]);                                                   \
            for (int g = 0; g < 2; g++) {                                                                    \
                vf w0[NF4_V], w1[NF4_V];                                                                     \
                nf4_codes32(qb0 + b * 32 + g * 16, t, w0);                                                   \
                nf4_codes32(qb1 + b * 32 + g * 16, t, w1);                                                   \
                for (int v = 0; v < NF4_V; v++) {                                                            \
                    const vf u0 = vmul(w0[v], s0), u1 = vmul(w1[v], s1);                                     \
                    ROWS2_FMA(R, b * 64 + g * 32 + v * VW, u0, u1)                                           \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        ROWS2_SUM(R)                                                                                         \
    }
NF4_TILE(8)
NF4_TILE(4)
NF4_TILE(2)
NF4_TILE(1)

/* 4 rows of x against 4 weight rows rebuilt in registers (8 rows of x: two passes), each output as in NF4_TILE */
static inline void nf4_tile4x4(const float *x, int K, const uint8_t *const qb[4], const float *const m[4],
                               const nf4_tab *t, float out[4][4]) {
    vf a[4][4];
    for (int r = 0; r < 4; r++)
        for (int o = 0; o < 4; o++) a[r][o] = vzero();
    for (int b = 0; b < K / 64; b++) {
        vf s[4];
        for (int o = 0; o < 4; o++) s[o] = vset1(m[o][b]);
        for (int g = 0; g < 2; g++) {
            vf w[4][NF4_V];
            for (int o = 0; o < 4; o++) nf4_codes32(qb[o] + b * 32 + g * 16, t, w[o]);
            for (int v = 0; v < NF4_V; v++) {
                vf u[4];
                for (int o = 0; o < 4; o++) u[o] = vmul(w[o][v], s[o]);
                for (int r = 0; r < 4; r++) {
                    const vf xv = vload(x + (size_t)r * K + b * 64 + g * 32 + v * VW);
                    for (int o = 0; o < 4; o++) a[r][o] = vfma(xv, u[o], a[r][o]);
                }
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int o = 0; o < 4; o++) out[r][o] = vsum(a[r][o]);
}

/* every row of x against weight rows n and n1 (n1 == n for an odd last row: computed twice, written once) */
static inline void nf4_rows2(const float *x, int M, int K, int N, const uint32_t *q, const float *absmax,
                             const nf4_tab *t, const float *bias, int n, int n1, float *y) {
    const size_t qs = K / 8, ms = K / 64;
    const uint8_t *qb0 = (const uint8_t *)(q + n * qs), *qb1 = (const uint8_t *)(q + n1 * qs);
    const float *a0 = absmax + n * ms, *a1 = absmax + n1 * ms;
    const float b0 = bias ? bias[n] : 0.0f, b1 = bias ? bias[n1] : 0.0f;
    float out[8][2];
    for (int m = 0; m < M;) {
        const int R = M - m >= 8 ? 8 : M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
        const float *xm = x + (size_t)m * K;
        switch (R) {
            case 8: nf4_tile_8(xm, K, qb0, qb1, a0, a1, t, out); break;
            case 4: nf4_tile_4(xm, K, qb0, qb1, a0, a1, t, out); break;
            case 2: nf4_tile_2(xm, K, qb0, qb1, a0, a1, t, out); break;
            default: nf4_tile_1(xm, K, qb0, qb1, a0, a1, t, out); break;
        }
        for (int r = 0; r < R; r++) {
            y[(size_t)(m + r) * N + n] = out[r][0] + b0;
            if (n1 != n) y[(size_t)(m + r) * N + n1] = out[r][1] + b1;
        }
        m += R;
    }
}
#endif

typedef struct {
    const float *x;
    int M, K, N;
    const uint32_t *q;
    const float *absmax, *code, *bias;
    float *y;
} nf4_job;

static void nf4_range(void *arg, int lo, int hi) {
    const nf4_job *j = arg;
    const float *x = j->x, *absmax = j->absmax, *bias = j->bias;
    const uint32_t *q = j->q;
    const int M = j->M, K = j->K, N = j->N;
    float *y = j->y;
    const size_t qs = K / 8, ms = K / 64;
    nf4_tab t;
    nf4_tab_init(&t, j->code);
    if (M == 1) {
        for (int n = lo; n < hi; n += 2) {
            int n1 = n + 1 < hi ? n + 1 : n;  /* an odd last row is computed twice, written once */
            float y0, y1;
            nf4_dot2(x, q + n * qs, q + n1 * qs, absmax + n * ms, absmax + n1 * ms, &t, K, &y0, &y1);
            y[n] = y0 + (bias ? bias[n] : 0.0f);
            if (n1 != n) y[n1] = y1 + (bias ? bias[n1] : 0.0f);
        }
        return;
    }
#if VW == 16
    if (M <= 8) {
        int n = lo;
        if (M >= 4)  /* four weight rows against four rows of x at a time: measured faster than 8 x 2 */
            for (; n + 4 <= hi; n += 4) {
                const uint8_t *qb[4];
                const float *mm[4];
                for (int o = 0; o < 4; o++) {
                    qb[o] = (const uint8_t *)(q + (n + o) * qs);
                    mm[o] = absmax + (n + o) * ms;
                }
                float out[4][4];
                int m0 = 0;
                for (; m0 + 4 <= M; m0 += 4) {
                    nf4_tile4x4(x + (size_t)m0 * K, K, qb, mm, &t, out);
                    for (int r = 0; r < 4; r++)
                        for (int o = 0; o < 4; o++)
                            y[(size_t)(m0 + r) * N + n + o] = out[r][o] + (bias ? bias[n + o] : 0.0f);
                }
                if (m0 < M) {  /* the 1-3 rows left */
                    const float *xm = x + (size_t)m0 * K;
                    float *ym = y + (size_t)m0 * N;
                    nf4_rows2(xm, M - m0, K, N, q, absmax, &t, bias, n, n + 1, ym);
                    nf4_rows2(xm, M - m0, K, N, q, absmax, &t, bias, n + 2, n + 3, ym);
                }
            }
        for (; n < hi; n += 2) nf4_rows2(x, M, K, N, q, absmax, &t, bias, n, n + 1 < hi ? n + 1 : n, y);
        return;
    }
#endif
    if (M > 8) {  /* many rows: a chunk of weight rows rebuilt once, then blocks of 8 rows of x against it */
        const int CH = 96;
        float *wc = malloc(sizeof(float) * (size_t)CH * K);
        for (int c0 = lo; c0 < hi; c0 += CH) {
            const int cn = hi - c0 < CH ? hi - c0 : CH;
            for (int i = 0; i < cn; i++) nf4_row(q + (c0 + i) * qs, absmax + (c0 + i) * ms, &t, K, wc + (size_t)i * K);
            for (int m0 = 0; m0 < M; m0 += 8) {
                const int mb = M - m0 < 8 ? M - m0 : 8;
                const float *xm = x + (size_t)m0 * K;
                float *ym = y + (size_t)m0 * N;
                int i = 0;
                for (; i + 3 <= cn; i += 3) {
                    const float *w[3] = {wc + (size_t)i * K, wc + (size_t)(i + 1) * K, wc + (size_t)(i + 2) * K};
                    const float b[3] = {bias ? bias[c0 + i] : 0.0f, bias ? bias[c0 + i + 1] : 0.0f,
                                        bias ? bias[c0 + i + 2] : 0.0f};
                    rows_dot(xm, mb, K, N, c0 + i, 3, w, b, ym);
                }
                for (; i < cn; i++) {
                    const float *w[3] = {wc + (size_t)i * K, NULL, NULL};
                    const float b[3] = {bias ? bias[c0 + i] : 0.0f, 0.0f, 0.0f};
                    rows_dot(xm, mb, K, N, c0 + i, 1, w, b, ym);
                }
            }
        }
        free(wc);
        return;
    }
    /* three weight rows at a time, rebuilt into scratch [3 * K] (on the stack: no allocation per product on the
     * decode path), then register tiles over the rows of x */
    float scratch[3 * K];
    const float *w[3] = {scratch, scratch + K, scratch + 2 * K};
    float b[3];
    int n = lo;
    for (; n + 3 <= hi; n += 3) {
        for (int o = 0; o < 3; o++) {
            nf4_row(q + (n + o) * qs, absmax + (n + o) * ms, &t, K, scratch + o * K);
            b[o] = bias ? bias[n + o] : 0.0f;
        }
        rows_dot(x, M, K, N, n, 3, w, b, y);
    }
    for (; n < hi; n++) {
        nf4_row(q + n * qs, absmax + n * ms, &t, K, scratch);
        b[0] = bias ? bias[n] : 0.0f;
        rows_dot(x, M, K, N, n, 1, w, b, y);
    }
}

/* y [M, N] = x . W^T (+ bias), W in NF4; outputs split over the threads in groups of 6 */
void nf4_gemm(const float *x, int M, int K, int N, const uint32_t *q, const float *absmax, const float *code,
              const float *bias, float *y) {
    nf4_job j = {x, M, K, N, q, absmax, code, bias, y};
    parallel_for(nf4_range, &j, N, 6);
}

/* ---- fp32 weights kept in a compact form that rebuilds them exactly -----------------------------------
 *
 * A weight matrix whose fp32 values are all d * q (q an int8, d one fp32 scale per 32 weights: what a GGUF
 * Q8_0 tensor dequantizes to) or all bf16 values (a model shipped in bf16) is read as 9 or 16 bits per
 * weight instead of 32 and rebuilt in registers to the same fp32 values, so a product over it equals
 * f32_gemm over the fp32 matrix bit for bit (same products, same order), from a quarter or half the bytes.
 *
 * kind 1, Q8: rows in groups of four (N padded to a multiple of 4 with zero rows), interleaved per block of
 * 32: q [N4/4][K/32][4][32] int8, d [N4/4][K/32][4] fp32. kind 2, bf16: the same grouping per chunk of VW:
 * [N4/4][K/VW][4][VW] uint16 (K % VW == 0). One sequential stream instead of four rows read side by side: on the Zen 3
 * machine of this project the LM head's batch-1 product went from 5.6 to 2.6 ms (49152 x 576, Q8). */

/* Pack W [N, K] (K % 32 == 0) as Q8: returns 0, or -1 if some block is not exactly d * int8 */
int q8_pack(const float *w, int N, int K, int8_t *q, float *d) {
    const __m256 lim = _mm256_set1_ps(127.0f), sign = _mm256_set1_ps(-0.0f);
    const int nb = K / 32, N4 = (N + 3) / 4 * 4;
    memset(q, 0, (size_t)N4 * K);
    memset(d, 0, sizeof(float) * (size_t)N4 * nb);
    for (int n = 0; n < N; n++)
        for (int kb = 0; kb < nb; kb++) {
            const float *wb = w + (size_t)n * K + kb * 32;
            const size_t at = ((size_t)(n / 4) * nb + kb) * 4 + n % 4;
            int8_t *qb = q + at * 32;
            __m256 mx = _mm256_setzero_ps();
            for (int i = 0; i < 32; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(wb + i)));
            float amax = 0.0f;
            for (int i = 0; i < 8; i++) amax = mx[i] > amax ? mx[i] : amax;
            const float s = amax / 127.0f;  /* exact when the block's largest weight is 127 * d */
            d[at] = s;
            if (s == 0.0f) {  /* all zeros; +0.0 only (a -0.0 would not come back) */
                for (int i = 0; i < 32; i++)
                    if (signbit(wb[i]) || wb[i] != 0.0f) return -1;
                continue;
            }
            const __m256 sv = _mm256_set1_ps(s);
            for (int i = 0; i < 32; i += 8) {
                const __m256 x = _mm256_loadu_ps(wb + i);
                const __m256 t = _mm256_round_ps(_mm256_div_ps(x, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                const __m256 back = _mm256_mul_ps(t, sv);
                const __m256i same = _mm256_cmpeq_epi32(_mm256_castps_si256(back), _mm256_castps_si256(x));  /* bits */
                const __m256 big = _mm256_cmp_ps(_mm256_andnot_ps(sign, t), lim, _CMP_GT_OQ);
                if (_mm256_movemask_epi8(same) != -1 || _mm256_movemask_ps(big)) return -1;
                int32_t ti[8];
                _mm256_storeu_si256((__m256i *)ti, _mm256_cvtps_epi32(t));
                for (int j = 0; j < 8; j++) qb[i + j] = (int8_t)ti[j];
            }
        }
    return 0;
}

/* Pack W [N, K] (K % 8 == 0) as bf16: returns 0, or -1 if some weight has bits below bf16's */
int bf16_pack(const float *w, int N, int K, uint16_t *out) {
    if (K % VW) return -1;
    const int nc = K / VW, N4 = (N + 3) / 4 * 4;
    memset(out, 0, sizeof(uint16_t) * (size_t)N4 * K);
    for (int n = 0; n < N; n++)
        for (int c = 0; c < nc; c++) {
            uint16_t *o = out + (((size_t)(n / 4) * nc + c) * 4 + n % 4) * VW;
            for (int i = 0; i < VW; i++) {
                uint32_t bits;
                memcpy(&bits, w + (size_t)n * K + c * VW + i, 4);
                if (bits & 0xFFFF) return -1;
                o[i] = (uint16_t)(bits >> 16);
            }
        }
    return 0;
}

/* VW weights rebuilt: Q8 (int8 times the block's scale) or bf16 (the high half of an fp32) */
#if VW == 16
static inline vf q8_w(const int8_t *q, vf s) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), s);
}

static inline vf bf16_w(const uint16_t *h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)h)), 16));
}
#else
static inline vf q8_w(const int8_t *q, vf s) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))), s);
}

static inline vf bf16_w(const uint16_t *h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)h)), 16));
}
#endif

/* row n of the compact matrix back to fp32 */
static inline void compact_row(int kind, const void *w, const float *d, int K, int n, float *out) {
    const size_t G = n / 4, o = n % 4;
    if (kind == 1) {
        const int nb = K / 32;
        for (int kb = 0; kb < nb; kb++) {
            const size_t at = (G * nb + kb) * 4 + o;
            const int8_t *q = (const int8_t *)w + at * 32;
            const vf s = vset1(d[at]);
            for (int i = 0; i < 32; i += VW) vstore(out + kb * 32 + i, q8_w(q + i, s));
        }
    } else {
        const int nc = K / VW;
        const uint16_t *h = (const uint16_t *)w;
        for (int c = 0; c < nc; c++) vstore(out + c * VW, bf16_w(h + ((G * nc + c) * 4 + o) * VW));
    }
}

void compact_dequant(int kind, const void *w, const float *d, int N, int K, float *out) {
    for (int n = 0; n < N; n++) compact_row(kind, w, d, K, n, out + (size_t)n * K);
}

typedef struct {
    int kind;
    const float *x;
    int M, K, N;
    const void *w;
    const float *d, *bias;
    float *y;
} compact_job;

#if VW == 16
/* AVX-512, Q8, 2..8 rows: R rows of x against rows o and o + 1 of a group of four, rebuilt in registers; each
 * output one accumulator over the chunks of 16 in k order (the one-row path's products and order) */
#define Q8_TILE(R)                                                                                           \
    static inline void q8_tile_##R(const float *x, int K, const int8_t *qg, const float *dg, int o,           \
                                   float out[R][2]) {                                                        \
        ROWS2_ZERO(R)                                                                                        \
        for (int kb = 0; kb < K / 32; kb++) {                                                                \
            const int8_t *q0 = qg + ((size_t)kb * 4 + o) * 32;                                               \
            const vf s0 = vset1(dg[kb * 4 + o]), s1 = vset1(dg[kb * 4 + o + 1]);                             \
            for (int i = 0; i < 32; i += VW) {                                                               \
                const vf u0 = q8_w(q0 + i, s0), u1 = q8_w(q0 + 32 + i, s1);                                  \
                ROWS2_FMA(R, kb * 32 + i, u0, u1)                                                            \
            }                                                                                                \
        }                                                                                                    \
        ROWS2_SUM(R)                                                                                         \
    }
Q8_TILE(8)
Q8_TILE(4)
Q8_TILE(2)
Q8_TILE(1)

/* 4 rows of x against a whole group of four weight rows */
static inline void q8_tile4x4(const float *x, int K, const int8_t *qg, const float *dg, float out[4][4]) {
    vf a[4][4];
    for (int r = 0; r < 4; r++)
        for (int o = 0; o < 4; o++) a[r][o] = vzero();
    for (int kb = 0; kb < K / 32; kb++) {
        const int8_t *q0 = qg + (size_t)kb * 128;
        vf s[4];
        for (int o = 0; o < 4; o++) s[o] = vset1(dg[kb * 4 + o]);
        for (int i = 0; i < 32; i += VW) {
            vf u[4];
            for (int o = 0; o < 4; o++) u[o] = q8_w(q0 + 32 * o + i, s[o]);
            for (int r = 0; r < 4; r++) {
                const vf xv = vload(x + (size_t)r * K + kb * 32 + i);
                for (int o = 0; o < 4; o++) a[r][o] = vfma(xv, u[o], a[r][o]);
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int o = 0; o < 4; o++) out[r][o] = vsum(a[r][o]);
}

static void q8_rows(const float *x, int M, int K, int N, const int8_t *q, const float *d, const float *bias,
                    int lo, int hi, float *y) {
    const int nb = K / 32;
    float out[8][2];
    for (int n = lo; n < hi; n += 4) {
        const int8_t *qg = q + (size_t)n * K;
        const float *dg = d + (size_t)n * nb;
        int m4 = 0;
        if (M >= 4 && n + 4 <= hi) {  /* a full group against four rows of x at a time (measured faster than 8 x 2) */
            float o4[4][4];
            for (; m4 + 4 <= M; m4 += 4) {
                q8_tile4x4(x + (size_t)m4 * K, K, qg, dg, o4);
                for (int r = 0; r < 4; r++)
                    for (int o = 0; o < 4; o++)
                        y[(size_t)(m4 + r) * N + n + o] = o4[r][o] + (bias ? bias[n + o] : 0.0f);
            }
            if (m4 == M) continue;
        }
        for (int o = 0; o < 4 && n + o < hi; o += 2) {  /* the rows of x left, two weight rows at a time */
            const float b0 = bias ? bias[n + o] : 0.0f, b1 = bias && n + o + 1 < hi ? bias[n + o + 1] : 0.0f;
            for (int m = m4; m < M;) {
                const int R = M - m >= 8 ? 8 : M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
                const float *xm = x + (size_t)m * K;
                switch (R) {
                    case 8: q8_tile_8(xm, K, qg, dg, o, out); break;
                    case 4: q8_tile_4(xm, K, qg, dg, o, out); break;
                    case 2: q8_tile_2(xm, K, qg, dg, o, out); break;
                    default: q8_tile_1(xm, K, qg, dg, o, out); break;
                }
                for (int r = 0; r < R; r++) {  /* a padded row (beyond N) is computed, not written */
                    y[(size_t)(m + r) * N + n + o] = out[r][0] + b0;
                    if (n + o + 1 < hi) y[(size_t)(m + r) * N + n + o + 1] = out[r][1] + b1;
                }
                m += R;
            }
        }
    }
}
#endif

static void compact_range(void *arg, int lo, int hi) {
    const compact_job *j = arg;
    const int kind = j->kind, M = j->M, K = j->K, N = j->N;
    const float *x = j->x, *d = j->d, *bias = j->bias;
    const void *w = j->w;
    float *y = j->y;
#if VW == 16
    if (kind == 1 && M > 1 && M <= 8) {
        q8_rows(x, M, K, N, (const int8_t *)w, d, bias, lo, hi, y);
        return;
    }
#endif
    if (M > 1) {  /* a group of four rows rebuilt into scratch, then register tiles (3 + 1 outputs) */
        float *scratch = malloc(sizeof(float) * 4 * (size_t)K);
        for (int n = lo; n < hi; n += 4) {
            const int o = hi - n < 4 ? hi - n : 4;
            for (int i = 0; i < o; i++) compact_row(kind, w, d, K, n + i, scratch + (size_t)i * K);
            const float *wr[3] = {scratch, scratch + K, scratch + 2 * (size_t)K};
            float b[4];
            for (int i = 0; i < 4; i++) b[i] = bias && i < o ? bias[n + i] : 0.0f;
            int i = 0;
            if (o >= 3) {
                rows_dot(x, M, K, N, n, 3, wr, b, y);
                i = 3;
            }
            for (; i < o; i++) {
                const float *w1[3] = {scratch + (size_t)i * K, NULL, NULL};
                const float b1[3] = {b[i], 0.0f, 0.0f};
                rows_dot(x, M, K, N, n + i, 1, w1, b1, y);
            }
        }
        free(scratch);
        return;
    }
    /* one row of x: a group of four weight rows at a time, four independent chains, each dot_f32's order */
    for (int n = lo; n < hi; n += 4) {
        vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
        if (kind == 1) {
            const int nb = K / 32;
            const int8_t *q = (const int8_t *)w + (size_t)n * K;
            const float *dg = d + (size_t)n * nb;
            for (int kb = 0; kb < nb; kb++, q += 128) {
                const vf s0 = vset1(dg[kb * 4]), s1 = vset1(dg[kb * 4 + 1]);
                const vf s2 = vset1(dg[kb * 4 + 2]), s3 = vset1(dg[kb * 4 + 3]);
                for (int i = 0; i < 32; i += VW) {
                    const vf xv = vload(x + kb * 32 + i);
                    a0 = vfma(xv, q8_w(q + i, s0), a0);
                    a1 = vfma(xv, q8_w(q + 32 + i, s1), a1);
                    a2 = vfma(xv, q8_w(q + 64 + i, s2), a2);
                    a3 = vfma(xv, q8_w(q + 96 + i, s3), a3);
                }
            }
        } else {
            const uint16_t *h = (const uint16_t *)w + (size_t)n * K;
            for (int k = 0; k < K; k += VW, h += 4 * VW) {
                const vf xv = vload(x + k);
                a0 = vfma(xv, bf16_w(h), a0);
                a1 = vfma(xv, bf16_w(h + VW), a1);
                a2 = vfma(xv, bf16_w(h + 2 * VW), a2);
                a3 = vfma(xv, bf16_w(h + 3 * VW), a3);
            }
        }
        const float r[4] = {vsum(a0), vsum(a1), vsum(a2), vsum(a3)};
        for (int o = 0; o < 4 && n + o < hi; o++) y[n + o] = r[o] + (bias ? bias[n + o] : 0.0f);
    }
}

/* y [M, N] = x . W^T (+ bias) over a compact W; the same result as f32_gemm over the rebuilt fp32 W.
 * Outputs split over the threads in groups of four (one weight group). */
void compact_gemm(int kind, const float *x, int M, int K, int N, const void *w, const float *d, const float *bias,
                  float *y) {
    compact_job j = {kind, x, M, K, N, w, d, bias, y};
    parallel_for(compact_range, &j, N, 4);
}

typedef struct {
    const float *x;
    int M, K, N;
    const float *w, *bias;
    float *y;
} f32_job;

static void f32_range(void *arg, int lo, int hi) {
    /* one weight row at a time (weights stream from memory; several streams at once measured slower) */
    const f32_job *j = arg;
    for (int n = lo; n < hi; n++) {
        const float *wr[3] = {j->w + (size_t)n * j->K, NULL, NULL};
        float b[3] = {j->bias ? j->bias[n] : 0.0f, 0.0f, 0.0f};
        if (j->M == 1) j->y[n] = dot_f32(j->x, wr[0], j->K) + b[0];
        else rows_dot(j->x, j->M, j->K, j->N, n, 1, wr, b, j->y);
    }
}

void f32_gemm(const float *x, int M, int K, int N, const float *w, const float *bias, float *y) {
    f32_job j = {x, M, K, N, w, bias, y};
    parallel_for(f32_range, &j, N, 16);
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

/* exp of VW floats (Cephes' single-precision method: x = n ln2 + r, a degree-7 polynomial in r, times 2^n;
 * within 2 ulp of the correctly rounded value over the range used, like the vectorized exp torch's silu uses).
 * Inputs are clamped to [-87.3, 88.3], so the result is finite and normal; a NaN input gives NaN. */
static inline vf vexp(vf x) {
#if VW == 16
#define VI __m512i
#define vmax(a, b) _mm512_max_ps(a, b)
#define vmin(a, b) _mm512_min_ps(a, b)
#define vround(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vtoi(a) _mm512_cvtps_epi32(a)
#define vpow2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23))
#else
#define VI __m256i
#define vmax(a, b) _mm256_max_ps(a, b)
#define vmin(a, b) _mm256_min_ps(a, b)
#define vround(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vtoi(a) _mm256_cvtps_epi32(a)
#define vpow2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23))
#endif
    /* max/min return their second operand when the first is NaN: clamp with x second, so NaN stays NaN */
    x = vmin(vset1(88.3f), vmax(vset1(-87.3f), x));
    const vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfma(n, vset1(-0.693359375f), x);
    r = vfma(n, vset1(2.12194440e-4f), r);
    vf p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
    const VI e = vtoi(n);
    return vmul(p, vpow2(e));
#undef VI
#undef vmax
#undef vmin
#undef vround
#undef vtoi
#undef vpow2
}

#if VW == 16
/* lane i = vsum(a[i]), for 16 accumulators at once: the same additions in the same order as vsum (halves,
 * then quarters, then pairs (0+1) and (2+3), then their sum), interleaved so that four shuffles and one add
 * serve several accumulators; 46 instructions instead of 16 x 9 */
static inline vf vsum16(const vf a[16]) {
    vf b[8], c[4], d[2];
    for (int k = 0; k < 8; k++)
        b[k] = vadd(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44), _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++)  /* quarter j of c[k]: a[4k + j] folded to 4 */
        c[k] = vadd(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88), _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; k++)  /* quarter j of d[k]: (0+1), (2+3) of a[8k + j], then of a[8k + 4 + j] */
        d[k] = vadd(_mm512_shuffle_ps(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                    _mm512_shuffle_ps(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    const vf e = vadd(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));  /* lane 4j + l: a[4l + j] */
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), e);
}
#endif

static void rmsnorm(const float *x, const float *w, int D, float eps, float *out) {
    float ss = dot_f32(x, x, D);
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int i = 0; i < D; i++) {
        float t = x[i] * r;
        out[i] = w[i] * t;
    }
}

static void proj(const proj_t *p, const float *code, const float *x, int M, const int *slots, float *y) {
    nf4_gemm(x, M, p->k, p->n, p->q, p->absmax, code, p->bias, y);
    if (!p->A || !slots) return;
    float t[256];
    for (int m = 0; m < M; m++) {
        int s = slots[m];
        if (s < 0) continue;
        const float *A = p->A + (size_t)s * p->r * p->k, *B = p->B + (size_t)s * p->n * p->r;
        const float *xm = x + (size_t)m * p->k;
        int j = 0;
#if VW == 16
        if (p->k % VW == 0)
            for (; j + 16 <= p->r; j += 16) {  /* 16 rows of A at once: x read once, 16 chains, dot_f32's bits */
                vf acc[16];
                for (int i = 0; i < 16; i++) acc[i] = vzero();
                for (int c = 0; c < p->k; c += VW) {
                    const vf xv = vload(xm + c);
                    for (int i = 0; i < 16; i++) acc[i] = vfma(xv, vload(A + (size_t)(j + i) * p->k + c), acc[i]);
                }
                vstore(t + j, vsum16(acc));
            }
#endif
        for (; j < p->r; j++) t[j] = dot_f32(xm, A + (size_t)j * p->k, p->k);
        float *ym = y + (size_t)m * p->n;
        int n = 0;
#if VW == 16
        if (p->r % VW == 0)
            for (; n + 16 <= p->n; n += 16) {  /* 16 outputs at once, each dot_f32's bits (see vsum16) */
                vf acc[16];
                for (int i = 0; i < 16; i++) acc[i] = vzero();
                for (int c = 0; c < p->r; c += VW) {
                    const vf tv = vload(t + c);
                    for (int i = 0; i < 16; i++) acc[i] = vfma(tv, vload(B + (size_t)(n + i) * p->r + c), acc[i]);
                }
                vstore(ym + n, vadd(vload(ym + n), vsum16(acc)));
            }
#endif
        for (; n < p->n; n++) {
            float dlt = dot_f32(t, B + (size_t)n * p->r, p->r);
            ym[n] = ym[n] + dlt;
        }
    }
}

void layer_in(const layer_t *L, int M, const float *h, const int *slots, float *q, float *k, float *v) {
    float *xn = malloc(sizeof(float) * (size_t)M * L->d);
    for (int m = 0; m < M; m++) rmsnorm(h + (size_t)m * L->d, L->in_norm, L->d, L->eps, xn + (size_t)m * L->d);
    proj(&L->p[0], L->code, xn, M, slots, q);
    proj(&L->p[1], L->code, xn, M, slots, k);
    proj(&L->p[2], L->code, xn, M, slots, v);
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
    proj(&L->p[3], L->code, o, M, slots, a);
    for (size_t i = 0; i < M * d; i++) h[i] = h[i] + a[i];
    for (int m = 0; m < M; m++) rmsnorm(h + m * d, L->post_norm, d, L->eps, xn + m * d);
    proj(&L->p[4], L->code, xn, M, slots, g);
    proj(&L->p[5], L->code, xn, M, slots, u);
    /* silu(g) * u, per row (so a row's values do not depend on the others): VW at a time, the tail in scalar */
    for (int m = 0; m < M; m++) {
        const float *gm = g + m * I, *um = u + m * I;
        float *am = act + m * I;
        size_t i = 0;
        for (; i + VW <= I; i += VW) {
            const vf gv = vload(gm + i);
            const vf sv = vdiv(gv, vadd(vset1(1.0f), vexp(vsub(vzero(), gv))));
            vstore(am + i, vmul(sv, vload(um + i)));
        }
        for (; i < I; i++) {
            float s = gm[i] / (1.0f + expf(-gm[i]));
            am[i] = s * um[i];
        }
    }
    proj(&L->p[6], L->code, act, M, slots, a);
    for (size_t i = 0; i < M * d; i++) h[i] = h[i] + a[i];
    free(a);
}

/* q . k_j for four consecutive cache rows (stride ks), each in dot_f32's order (four independent chains) */
static inline void dot4_f32(const float *x, const float *k0, size_t ks, int K, float *out) {
    vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
    int k = 0;
    for (; k + VW <= K; k += VW) {
        const vf xv = vload(x + k);
        a0 = vfma(xv, vload(k0 + k), a0);
        a1 = vfma(xv, vload(k0 + ks + k), a1);
        a2 = vfma(xv, vload(k0 + 2 * ks + k), a2);
        a3 = vfma(xv, vload(k0 + 3 * ks + k), a3);
    }
    out[0] = vsum(a0);
    out[1] = vsum(a1);
    out[2] = vsum(a2);
    out[3] = vsum(a3);
    for (int i = 0; i < 4; i++)
        for (int t = k; t < K; t++) out[i] += x[t] * k0[i * ks + t];
}

/* Attention of each row's new query over its own cache rows 0..pos (or the last `window` of them):
 * o[m, h*hd:(h+1)*hd] = softmax(q.k_j * scale) . v_j, heads grouped over the kv heads (GQA).
 * Per output element the sum over j runs in key order (o = o + p_j * v_j), in registers 64 dims at a time. */
typedef struct {
    const layer_t *L;
    const float *q, *kc, *vc;
    int cap;
    const int64_t *pos;
    int window;
    float scale;
    float *o;
} attend_job;

static void attend_range(void *arg, int lo, int hi) {
    const attend_job *a = arg;
    const layer_t *L = a->L;
    const float *q = a->q, *kc = a->kc, *vc = a->vc;
    const int cap = a->cap, window = a->window;
    const int64_t *pos = a->pos;
    const float scale = a->scale;
    float *o = a->o;
    int hd = L->hd, group = L->nh / L->nkv;
    float *sc = malloc(sizeof(float) * (size_t)cap);
    for (int m = lo; m < hi; m++) {
        int len = (int)pos[m] + 1, start = window > 0 && len > window ? len - window : 0;
        for (int h = 0; h < L->nh; h++) {
            const float *qh = q + ((size_t)m * L->nh + h) * hd;
            size_t base = (((size_t)m * L->nkv + h / group) * cap) * hd;
            int j = start;
            for (; j + 4 <= len; j += 4) dot4_f32(qh, kc + base + (size_t)j * hd, hd, hd, sc + j);
            for (; j < len; j++) sc[j] = dot_f32(qh, kc + base + (size_t)j * hd, hd);
            float mx = -INFINITY;
            for (j = start; j < len; j++) {
                float t = sc[j] * scale;
                sc[j] = t;
                mx = t > mx ? t : mx;
            }
            float sum = 0.0f;
            const vf mxv = vset1(mx);
            for (j = start; j + VW <= len; j += VW) vstore(sc + j, vexp(vsub(vload(sc + j), mxv)));
            for (; j < len; j++) sc[j] = expf(sc[j] - mx);
            for (j = start; j < len; j++) sum += sc[j];
            for (j = start; j < len; j++) sc[j] = sc[j] / sum;
            float *oh = o + ((size_t)m * L->nh + h) * hd;
            const float *vh = vc + base;
            if (hd % 64 == 0) {
                for (int d0 = 0; d0 < hd; d0 += 64) {
                    vf acc[64 / VW];
                    for (int i = 0; i < 64 / VW; i++) acc[i] = vzero();
                    for (j = start; j < len; j++) {
                        const vf p = vset1(sc[j]);
                        const float *vj = vh + (size_t)j * hd + d0;
                        for (int i = 0; i < 64 / VW; i++) acc[i] = vadd(acc[i], vmul(p, vload(vj + VW * i)));
                    }
                    for (int i = 0; i < 64 / VW; i++) vstore(oh + d0 + VW * i, acc[i]);
                }
                continue;
            }
            for (int d = 0; d < hd; d++) oh[d] = 0.0f;
            for (j = start; j < len; j++) {
                const float *vj = vh + (size_t)j * hd;
                float p = sc[j];
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

/* rows split over the threads */
void attend(const layer_t *L, int M, const float *q, const float *kc, const float *vc, int cap, const int64_t *pos,
            int window, float scale, float *o) {
    attend_job a = {L, q, kc, vc, cap, pos, window, scale, o};
    parallel_for(attend_range, &a, M, 1);
}
