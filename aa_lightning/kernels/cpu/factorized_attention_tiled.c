/* 2-D relative attention, float32, head dims fixed at compile time.
 *
 *   l_ij  = q_i . k_j + bw[i, jx] + bh[i, jy]          i = (iy, ix), j = (jy, jx) on an H x W grid
 *   bw[i, jx] = q_i . rel_w[jx - ix + W - 1]           bh[i, jy] = q_i . rel_h[jy - iy + H - 1]
 *   out_i = sum_j softmax_j(l_i) v_j,   lse_i = log sum_j exp(l_ij)
 *
 * The function of factorized_attention.c, with the relative tables bw and bh computed here, one
 * tile of rows at a time (O(HW (H + W) dkh) in all, as vector multiply-adds over each row's window
 * of the transposed tables), instead of read from [BH, HW, W + H] tensors that would cost more
 * memory traffic than their arithmetic. Built once per head-dim pair with -DAA_D=<dkh>
 * -DAA_DV=<dvh>: with the dims constant, a key's vectors stay in SIMD registers, and R = 4 query
 * rows are processed together, so each load of a key or value and each update of its gradient
 * serves four rows; from dkh 16 the logits also take two key vectors per step, so that each q
 * broadcast serves two.
 *   forward   per row tile: pass 1 writes the tile's logits to scratch and takes row maxima;
 *             pass 2 exponentiates them and accumulates sum_j p_ij and sum_j p_ij v_j.
 *   backward  per row tile, short passes over the tile's scratch rows, each with few live vectors:
 *             the logits minus lse_i; P, dS, dV and the bias gradients; dK = dS^T q and dQ = dS K
 *             together, DB head dims at a time; then the tables' share of dQ and the tables' gradients.
 * The (HW)^2 logits never reach memory: a tile's scratch holds R rows of them.
 *
 * Layouts (contiguous; Wp = W rounded up to VW; the padding columns are zero in kT and vT and
 * get bias -inf, so probability exactly 0):
 *   q [BH, L, D] (L = H W, q already scaled)   kT [BH, D, Ls]   vT [BH, DV, Ls], each row an
 *   H x Wp grid followed by padding to Ls = aa_tiled_row_stride(H, Wp) floats
 *   rel_w [2W - 1, D]   rel_h [2H - 1, D]   out [BH, L, DV]   lse [BH, L]
 *   gradients: gq like q, gkT like kT, gvT like vT; grel_w [BH, 2W - 1, D] and grel_h
 *   [BH, 2H - 1, D], one slab per (batch, head) slice, summed by the caller (so the result does
 *   not depend on how the slices are split across threads).
 *   scratch: aa_tiled_scratch(H, Wp) floats per range; zeros: at least D + DV zero floats.
 * The exported functions split [bh0, bh1) into `parts` ranges of whole (batch, head) slices, each
 * with its own `stride` floats of scratch, run on OpenMP threads when built with -fopenmp (torch's
 * own libgomp, already loaded): a slice's gkT and gvT are written by one thread, and the result
 * does not depend on the split.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef AA_D
#error "build with -DAA_D=<dkh> -DAA_DV=<dvh>"
#endif
#define D AA_D
#define DV AA_DV
#ifndef AA_R
#define AA_R 4
#endif
#define R AA_R  /* query rows per tile */
#ifndef AA_KEY_PAIRS_FROM
#define AA_KEY_PAIRS_FROM 16 /* head dims from which tile_logits takes two key vectors per step */
#endif
/* Loops over the head dims are unrolled (gcc stops by itself from D ~ 16), so that a key's vectors
 * stay in registers rather than in a stack array; the pragma is ignored by compilers without it. */
#define UNROLL _Pragma("GCC unroll 64")
#ifndef AA_VW
#define AA_VW 8
#endif
#define VW AA_VW /* floats per SIMD vector: 8 (AVX; two SSE halves elsewhere) or 16 (AVX-512) */

typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));

static inline vf load(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float* p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return (vf){0} + x; }
static inline vf vmax(vf a, vf b) { const vi m = a > b; return (vf)(((vi)a & m) | ((vi)b & ~m)); }
/* Horizontal sum by halves (depth log2(VW)); a lane-by-lane loop would be a chain of VW dependent
 * scalar adds, and hsum runs once per (row, key row) in the backward. __builtin_shufflevector (clang,
 * gcc >= 12) narrows the vector at each step; older gcc has __builtin_shuffle, which keeps the full
 * width (one more shuffle + add per step, still depth log2(VW)). */
#if defined(__has_builtin) && !defined(AA_NO_SHUFFLEVECTOR)
#if __has_builtin(__builtin_shufflevector)
#define AA_SHUFFLEVECTOR 1
#endif
#endif
#if VW != 8 && VW != 16
#error "AA_VW must be 8 or 16"
#endif
#if defined(AA_SHUFFLEVECTOR)
typedef float f8 __attribute__((vector_size(8 * sizeof(float))));
typedef float f4 __attribute__((vector_size(4 * sizeof(float))));
static inline float hsum4(f4 v) {
    const f4 a = v + __builtin_shufflevector(v, v, 2, 3, 0, 1);
    return a[0] + a[1];
}
static inline float hsum8(f8 v) {
    return hsum4(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
}
#if VW == 16
static inline float hsum(vf v) {
    return hsum8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}
#else
static inline float hsum(vf v) { return hsum8(v); }
#endif
#elif defined(__GNUC__)
static inline float hsum(vf v) {
#if VW == 16
    v += __builtin_shuffle(v, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
    v += __builtin_shuffle(v, (vi){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
#else
    v += __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3});
    v += __builtin_shuffle(v, (vi){2, 3, 0, 1, 2, 3, 0, 1});
#endif
    return v[0] + v[1];
}
#else
static inline float hsum(vf v) {
    float s = 0;
    for (int i = 0; i < VW; ++i) s += v[i];
    return s;
}
#endif
static inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < VW; ++i) m = v[i] > m ? v[i] : m; return m; }

/* Logits are computed in base 2: q (and so the relative tables) is multiplied by log2(e) once per
 * row, so that softmax needs 2^x, whose range reduction is one rounding (no ln2 multiply-subtracts).
 * The saved log-sum-exp and every gradient stay in natural units. */
#define LOG2E 1.44269504088896341f
#define LN2 0.693147180559945309f

/* 2^x for x <= ~0 (base-2 logits minus their row max or log-sum-exp): x = n + r, |r| <= 1/2,
 * 2^r by a polynomial, 2^n added to the exponent bits: the integer n is read from the low bits of
 * x + 1.5 * 2^23, where adding the magic constant rounded it. Lanes below -125 (-inf included) are
 * set to exactly 0, as softmax underflows in float.
 *   AA_EXP_DEGREE 6 (the default, the float32 path): e^(r ln2) by its degree-6 Taylor polynomial
 *     (Estrin's scheme), within ~2 ulp.
 *   AA_EXP_DEGREE 3 (the bfloat16 path's build): a degree-3 fit of 2^r on [-1/2, 1/2] (Horner;
 *     p(0) = 1 exactly), relative error <= 1.02e-4, 1/38 of bfloat16's rounding (2^-8): the
 *     probabilities it gives round to the same bfloat16 values but for ties. */
#ifndef AA_EXP_DEGREE
#define AA_EXP_DEGREE 6
#endif
#if AA_EXP_DEGREE != 6 && AA_EXP_DEGREE != 3
#error "AA_EXP_DEGREE must be 6 or 3"
#endif
static inline vf vexp2(vf x) {
    const vi under = x < -125.0f;
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vf t = x + magic;
    const vf r = x - (t - magic);
#if AA_EXP_DEGREE == 3
    const vf p = r * (r * (r * 5.500893e-2f + 2.4221098e-1f) + 6.9328293e-1f) + 1.0f;
#else
    const vf r2 = r * r;
    vf u = r * 1.3333558146428443e-3f + 9.6181291076284772e-3f;             /* ln2^5/5!, ln2^4/4! */
    u = r2 * 1.5403530393381609e-4f + u;                                    /* ln2^6/6! */
    u = r2 * u + (r * 5.5504108664821580e-2f + 2.4022650695910071e-1f);     /* ln2^3/3!, ln2^2/2! */
    const vf p = r2 * u + (r * 6.9314718055994531e-1f + 1.0f);              /* ln2, 1 */
#endif
    return (vf)(((vi)p + ((vi)t << 23)) & ~under);
}
#define AA_EXP vexp2

/* The relative tables transposed, so that a bias row is a few vector multiply-adds: relT[d * 2Np + o] =
 * rel[o, d] for the offsets o < 2N - 1, zero up to 2Np (Np = N rounded up to VW). Row i = (iy, ix)
 * reads its W-table window from offset W - 1 - ix on: bw[i, jx] = q_i . relT_w[:, W - 1 - ix + jx],
 * for jx < Wp (up to offset W - 2 + Wp < 2 Wp). Likewise for H, on Hp rows. */
typedef struct {
    long W, Wp, H, Hp;
    const float* wT; /* [D, 2 Wp] */
    const float* hT; /* [D, 2 Hp] */
    const float* pad; /* Wp: 0, then -inf in the padding columns */
} tables_t;

static long rounded(long n) { return (n + VW - 1) / VW * VW; }

static tables_t transpose_tables(const float* rel_w, const float* rel_h, long H, long W, long Wp, float* out) {
    const long Hp = rounded(H);
    float* wT = out;
    float* hT = out + D * 2 * Wp;
    float* pad = out + D * 2 * (Wp + Hp);
    const tables_t t = {W, Wp, H, Hp, wT, hT, pad};
    memset(out, 0, sizeof(float) * D * 2 * (Wp + Hp));
    for (long o = 0; o < 2 * W - 1; ++o)
        for (int d = 0; d < D; ++d) wT[d * 2 * Wp + o] = rel_w[o * D + d];
    for (long o = 0; o < 2 * H - 1; ++o)
        for (int d = 0; d < D; ++d) hT[d * 2 * Hp + o] = rel_h[o * D + d];
    for (long jx = 0; jx < Wp; ++jx) pad[jx] = jx < W ? 0.0f : -INFINITY;
    return t;
}

/* The rows of one tile, with their relative-bias rows computed into scratch (base 2: from
 * log2(e) q). Rows past L read zeros (q and bias 0) and are never written back, so a partial tile
 * runs the same code and contributes nothing to any gradient. */
typedef struct {
    long index[R]; /* s * L + i, or -1 past the end */
    const float* q[R];
    float* bw[R];  /* Wp: log2(e) q_i . rel_w[jx - ix + W - 1], -inf in the padding */
    float* bh[R];  /* Hp: log2(e) q_i . rel_h[jy - iy + H - 1] */
} tile_t;

static tile_t tile_rows(const float* q, const tables_t* tab, long s, long i0, const float* zeros, float* bias) {
    tile_t t;
    const long H = tab->H, W = tab->W, Wp = tab->Wp, Hp = tab->Hp, L = H * W;
    for (int r = 0; r < R; ++r) {
        const long i = i0 + r;
        t.index[r] = i < L ? s * L + i : -1;
        t.q[r] = i < L ? q + t.index[r] * D : zeros;
        t.bw[r] = bias + r * (Wp + Hp);
        t.bh[r] = t.bw[r] + Wp;
        if (i >= L) {
            memset(t.bw[r], 0, sizeof(float) * (Wp + Hp));
            continue;
        }
        vf qd[D];
        for (int d = 0; d < D; ++d) qd[d] = splat(t.q[r][d] * LOG2E);
        const float* wT = tab->wT + (W - 1 - i % W);
        const float* hT = tab->hT + (H - 1 - i / W);
        for (long jx = 0; jx < Wp; jx += VW) {
            vf acc = load(tab->pad + jx);
            UNROLL
            for (int d = 0; d < D; ++d) acc += qd[d] * load(wT + d * 2 * Wp + jx);
            store(t.bw[r] + jx, acc);
        }
        for (long jy = 0; jy < Hp; jy += VW) {
            vf acc = splat(0.0f);
            UNROLL
            for (int d = 0; d < D; ++d) acc += qd[d] * load(hT + d * 2 * Hp + jy);
            store(t.bh[r] + jy, acc);
        }
    }
    return t;
}

/* The stride of the rows of kT, vT, their gradients and the scratch rows: a cache line more than
 * the grid, so that the D + DV rows one key vector is read from fall in different L1 sets (a
 * 32 x 32 grid is exactly 4 KiB: unpadded, its rows would all compete for one set's 8 ways). */
long aa_tiled_row_stride(long H, long Wp) { return H * Wp + 16; }

long aa_tiled_vector_width(void) { return VW; }

/* 2 R bias rows (and their gradients), R logits rows, the transposed tables and their gradients, the pad row */
long aa_tiled_scratch(long H, long Wp) {
    const long Hp = rounded(H);
    return 2 * R * (Wp + Hp) + R * aa_tiled_row_stride(H, Wp) + 4 * D * (Wp + Hp) + Wp;
}

/* Row r's bias for the key vector at grid row jy, columns jx.. (minus shift_r in backward). */
static inline __attribute__((always_inline)) vf bias_vector(const tile_t* t, int r, long jx, long jy, const vf* shift) {
    return load(t->bw[r] + jx) + (shift ? t->bh[r][jy] - shift[r] : splat(t->bh[r][jy]));
}

/* The tile's logits for one key vector j (grid row jy, columns jx..): its D k vectors loaded once
 * for the R rows. */
static inline __attribute__((always_inline)) void logits_vector(const tile_t* t, const vf qs[R][D], const float* kTs,
                                                                long Ls, const vf* shift, float* rows, vf* max, long j,
                                                                long jy, long jx) {
    vf k[D];
    UNROLL
    for (int d = 0; d < D; ++d) k[d] = load(kTs + d * Ls + j);
    for (int r = 0; r < R; ++r) {
        vf l = bias_vector(t, r, jx, jy, shift);
        UNROLL
        for (int d = 0; d < D; ++d) l += qs[r][d] * k[d];
        store(rows + r * Ls + j, l);
        if (max) max[r] = vmax(l, max[r]);
    }
}

/* The tile's base-2 logits l_ij - shift_r (shift: log2(e) lse_i in backward, NULL in forward) for all
 * keys j into its R scratch rows of Ls floats, and with max not NULL their row maxima. Inlined with
 * constant NULLs, so neither caller pays for the other's option. */
static inline __attribute__((always_inline)) void tile_logits(const tile_t* t, const vf qs[R][D], const float* kTs,
                                                              long H, long Wp, long Ls, const vf* shift, float* rows,
                                                              vf* max) {
#if D >= AA_KEY_PAIRS_FROM
    /* Two key vectors per step (j and j + VW, possibly in different grid rows): each q broadcast
     * loaded serves two multiply-adds (at large D the R x D broadcasts do not fit in registers and
     * are read from the stack). Each logit's sum runs in the same order: the same bits. */
    const long Lp = H * Wp;
    long j = 0;
    for (; j + 2 * VW <= Lp; j += 2 * VW) {
        const long jy0 = j / Wp, jx0 = j % Wp, jy1 = (j + VW) / Wp, jx1 = (j + VW) % Wp;
        vf l0[R], l1[R];
        for (int r = 0; r < R; ++r) {
            l0[r] = bias_vector(t, r, jx0, jy0, shift);
            l1[r] = bias_vector(t, r, jx1, jy1, shift);
        }
        UNROLL
        for (int d = 0; d < D; ++d) {
            const vf k0 = load(kTs + d * Ls + j), k1 = load(kTs + d * Ls + j + VW);
            for (int r = 0; r < R; ++r) { l0[r] += qs[r][d] * k0; l1[r] += qs[r][d] * k1; }
        }
        for (int r = 0; r < R; ++r) {
            store(rows + r * Ls + j, l0[r]);
            store(rows + r * Ls + j + VW, l1[r]);
            if (max) max[r] = vmax(vmax(l0[r], max[r]), l1[r]);
        }
    }
    for (; j < Lp; j += VW) logits_vector(t, qs, kTs, Ls, shift, rows, max, j, j / Wp, j % Wp); /* an odd last vector */
#else
    for (long jy = 0; jy < H; ++jy)
        for (long jx = 0; jx < Wp; jx += VW) logits_vector(t, qs, kTs, Ls, shift, rows, max, jy * Wp + jx, jy, jx);
#endif
}

static void forward_rows(const float* q, const float* kT, const float* vT, const float* rel_w, const float* rel_h,
                         float* out, float* lse, long bh0, long bh1, long H, long W, long Wp, float* scratch,
                         const float* zeros) {
    const long L = H * W, Lp = H * Wp, Ls = aa_tiled_row_stride(H, Wp), Hp = rounded(H);
    float* bias = scratch;                    /* R (Wp + Hp): the tile's bias rows */
    float* logits = bias + R * (Wp + Hp);     /* R rows of Ls */
    const tables_t tab = transpose_tables(rel_w, rel_h, H, W, Wp, logits + R * Ls);
    for (long s = bh0; s < bh1; ++s) {
        const float* kTs = kT + s * D * Ls;
        const float* vTs = vT + s * DV * Ls;
        for (long i0 = 0; i0 < L; i0 += R) {
            const tile_t t = tile_rows(q, &tab, s, i0, zeros, bias);
            vf qs[R][D], m[R];
            for (int r = 0; r < R; ++r) {
                for (int d = 0; d < D; ++d) qs[r][d] = splat(t.q[r][d] * LOG2E);
                m[r] = splat(-INFINITY);
            }
            tile_logits(&t, qs, kTs, H, Wp, Ls, NULL, logits, m);
            vf sum[R], acc[R][DV];
            for (int r = 0; r < R; ++r) {
                m[r] = splat(hmax(m[r]));
                sum[r] = splat(0.0f);
                for (int c = 0; c < DV; ++c) acc[r][c] = splat(0.0f);
            }
            for (long j = 0; j < Lp; j += VW) {
                vf v[DV];
                UNROLL
                for (int c = 0; c < DV; ++c) v[c] = load(vTs + c * Ls + j);
                for (int r = 0; r < R; ++r) {
                    const vf p = vexp2(load(logits + r * Ls + j) - m[r]);
                    sum[r] += p;
                    UNROLL
                    for (int c = 0; c < DV; ++c) acc[r][c] += p * v[c];
                }
            }
            for (int r = 0; r < R; ++r) {
                const long i = t.index[r];
                if (i < 0) continue;
                const float total = hsum(sum[r]);
                for (int c = 0; c < DV; ++c) out[i * DV + c] = hsum(acc[r][c]) / total;
                lse[i] = (m[r][0] + log2f(total)) * LN2;
            }
        }
    }
}

/* Head dims d0 .. d0 + nb - 1 (nb <= DB, a constant where inlined) of dK += dS^T (log2(e) q) and
 * dQ = dS K in one pass over the tile's dS rows: a register micro-tile of R rows x nb head dims, so
 * that each dS vector loaded serves 2 nb multiply-adds, each k vector R and each dK vector R (one
 * head dim at a time, dK and dQ in passes of their own, each dS load served one). The sums run in
 * the same order as one head dim at a time: the same bits. */
#ifndef AA_DB
#define AA_DB 2
#endif
#define DB AA_DB
static inline __attribute__((always_inline)) void dk_dq_block(const int d0, const int nb, const vf qs[R][D],
                                                              const float* kTs, float* gkTs, const float* dsrow,
                                                              long Lp, long Ls, float dq[R][D]) {
    vf a[R][DB], qd[R][DB];
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < nb; ++b) { a[r][b] = splat(0.0f); qd[r][b] = qs[r][d0 + b]; }
    for (long j = 0; j < Lp; j += VW) {
        vf ds[R];
        for (int r = 0; r < R; ++r) ds[r] = load(dsrow + r * Ls + j);
        for (int b = 0; b < nb; ++b) {
            const vf kd = load(kTs + (d0 + b) * Ls + j);
            vf g = load(gkTs + (d0 + b) * Ls + j);
            for (int r = 0; r < R; ++r) { g += ds[r] * qd[r][b]; a[r][b] += ds[r] * kd; }
            store(gkTs + (d0 + b) * Ls + j, g);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < nb; ++b) dq[r][d0 + b] = hsum(a[r][b]);
}

/* Backward of one tile in short passes over its scratch rows, each with few live vectors: the logits
 * (as in forward), then P, dS, dV and the bias gradients, then dK = dS^T q and dQ = dS K together (dk_dq_block),
 * then the relative tables' share of dQ and their own gradients (vector loops over
 * each row's window of the transposed tables). */
static void backward_rows(const float* q, const float* kT, const float* vT, const float* rel_w, const float* rel_h,
                          const float* out, const float* lse, const float* gout, float* gq, float* gkT, float* gvT,
                          float* grel_w, float* grel_h, long bh0, long bh1, long H, long W, long Wp, float* scratch,
                          const float* zeros) {
    const long L = H * W, Lp = H * Wp, Ls = aa_tiled_row_stride(H, Wp), Hp = rounded(H);
    float* bias = scratch;                       /* R (Wp + Hp): the tile's bias rows */
    float* gbias = bias + R * (Wp + Hp);         /* R (Wp + Hp): their gradients */
    float* dsrow = gbias + R * (Wp + Hp);        /* R rows of Ls: dS of the tile's rows */
    float* gwT = dsrow + R * Ls;                 /* [D, 2 Wp]: the slice's gradient of the transposed W table */
    float* ghT = gwT + D * 2 * Wp;               /* [D, 2 Hp] */
    const tables_t tab = transpose_tables(rel_w, rel_h, H, W, Wp, ghT + D * 2 * Hp);
    for (long s = bh0; s < bh1; ++s) {
        const float* kTs = kT + s * D * Ls;
        const float* vTs = vT + s * DV * Ls;
        float* gkTs = gkT + s * D * Ls;
        float* gvTs = gvT + s * DV * Ls;
        memset(gkTs, 0, sizeof(float) * D * Ls);
        memset(gvTs, 0, sizeof(float) * DV * Ls);
        memset(gwT, 0, sizeof(float) * D * 2 * (Wp + Hp));
        for (long i0 = 0; i0 < L; i0 += R) {
            const tile_t t = tile_rows(q, &tab, s, i0, zeros, bias);
            vf qs[R][D], gs[R][DV], dot[R], lses[R];
            float* gbwr[R];
            float* gbhr[R];
            for (int r = 0; r < R; ++r) {
                const long i = t.index[r];
                const float* g = i >= 0 ? gout + i * DV : zeros;
                float dd = 0; /* D_i = dO_i . O_i */
                for (int c = 0; c < DV; ++c) {
                    gs[r][c] = splat(g[c]);
                    dd += i >= 0 ? g[c] * out[i * DV + c] : 0.0f;
                }
                dot[r] = splat(dd);
                lses[r] = splat(i >= 0 ? lse[i] * LOG2E : 0.0f);
                for (int d = 0; d < D; ++d) qs[r][d] = splat(t.q[r][d] * LOG2E);
                gbwr[r] = gbias + r * (Wp + Hp);
                gbhr[r] = gbwr[r] + Wp;
                memset(gbwr[r], 0, sizeof(float) * (Wp + Hp));
            }
            tile_logits(&t, qs, kTs, H, Wp, Ls, lses, dsrow, NULL); /* the logits minus lse, as in forward */
            for (long jy = 0; jy < H; ++jy) { /* P, dS = P (dO . v_j - D_i), dV, the bias gradients */
                vf rowsum[R];
                for (int r = 0; r < R; ++r) rowsum[r] = splat(0.0f);
                for (long jx = 0; jx < Wp; jx += VW) {
                    const long j = jy * Wp + jx;
                    vf v[DV], gv[DV];
                    UNROLL
                    for (int c = 0; c < DV; ++c) { v[c] = load(vTs + c * Ls + j); gv[c] = splat(0.0f); }
                    for (int r = 0; r < R; ++r) {
                        const vf p = vexp2(load(dsrow + r * Ls + j)); /* P_ij = exp(l_ij - lse_i), in base 2 */
                        vf dp = -dot[r];
                        UNROLL
                        for (int c = 0; c < DV; ++c) { dp += gs[r][c] * v[c]; gv[c] += p * gs[r][c]; }
                        const vf ds = p * dp;
                        store(dsrow + r * Ls + j, ds);
                        store(gbwr[r] + jx, load(gbwr[r] + jx) + ds);
                        rowsum[r] += ds;
                    }
                    UNROLL
                    for (int c = 0; c < DV; ++c) store(gvTs + c * Ls + j, load(gvTs + c * Ls + j) + gv[c]);
                }
                for (int r = 0; r < R; ++r) gbhr[r][jy] = hsum(rowsum[r]);
            }
            for (int r = 0; r < R; ++r) /* the padding columns' share is 0: keep it exactly so */
                for (long jx = W; jx < Wp; ++jx) gbwr[r][jx] = 0.0f;
            float dq[R][D]; /* dK += dS^T (log2(e) q) and dQ = dS K, DB head dims per pass */
            int d0 = 0;
            for (; d0 + DB <= D; d0 += DB) dk_dq_block(d0, DB, qs, kTs, gkTs, dsrow, Lp, Ls, dq);
            if (d0 < D) dk_dq_block(d0, D - d0, qs, kTs, gkTs, dsrow, Lp, Ls, dq); /* the last D % DB dims */
            for (int r = 0; r < R; ++r) { /* the tables' share: bw, bh = q . rel, over each row's window */
                const long i = t.index[r];
                if (i < 0) continue;
                const long iy = (i0 + r) / W, ix = (i0 + r) % W;
                const float* wT = tab.wT + (W - 1 - ix);
                const float* hT = tab.hT + (H - 1 - iy);
                float* gw = gwT + (W - 1 - ix);
                float* gh = ghT + (H - 1 - iy);
                for (int d = 0; d < D; ++d) {
                    const vf qd = splat(t.q[r][d]);
                    vf a = splat(0.0f);
                    for (long jx = 0; jx < Wp; jx += VW) {
                        const vf g = load(gbwr[r] + jx);
                        a += g * load(wT + d * 2 * Wp + jx);
                        store(gw + d * 2 * Wp + jx, load(gw + d * 2 * Wp + jx) + g * qd);
                    }
                    for (long jy = 0; jy < Hp; jy += VW) {
                        const vf g = load(gbhr[r] + jy);
                        a += g * load(hT + d * 2 * Hp + jy);
                        store(gh + d * 2 * Hp + jy, load(gh + d * 2 * Hp + jy) + g * qd);
                    }
                    gq[i * D + d] = dq[r][d] + hsum(a);
                }
            }
        }
        for (long j = 0; j < D * Ls; ++j) gkTs[j] *= LN2; /* dK was accumulated with log2(e) q */
        float* grw_s = grel_w + s * (2 * W - 1) * D;
        float* grh_s = grel_h + s * (2 * H - 1) * D;
        for (long o = 0; o < 2 * W - 1; ++o)
            for (int d = 0; d < D; ++d) grw_s[o * D + d] = gwT[d * 2 * Wp + o];
        for (long o = 0; o < 2 * H - 1; ++o)
            for (int d = 0; d < D; ++d) grh_s[o * D + d] = ghT[d * 2 * Hp + o];
    }
}

void aa_tiled_forward(const float* q, const float* kT, const float* vT, const float* rel_w, const float* rel_h,
                      float* out, float* lse, long bh0, long bh1, long H, long W, long Wp, const float* zeros,
                      long parts, float* scratch, long stride) {
    _Pragma("omp parallel for schedule(static, 1) num_threads(parts)")
    for (long t = 0; t < parts; ++t)
        forward_rows(q, kT, vT, rel_w, rel_h, out, lse, bh0 + (bh1 - bh0) * t / parts,
                     bh0 + (bh1 - bh0) * (t + 1) / parts, H, W, Wp, scratch + t * stride, zeros);
}

void aa_tiled_backward(const float* q, const float* kT, const float* vT, const float* rel_w, const float* rel_h,
                       const float* out, const float* lse, const float* gout, float* gq, float* gkT, float* gvT,
                       float* grel_w, float* grel_h, long bh0, long bh1, long H, long W, long Wp, const float* zeros,
                       long parts, float* scratch, long stride) {
    _Pragma("omp parallel for schedule(static, 1) num_threads(parts)")
    for (long t = 0; t < parts; ++t)
        backward_rows(q, kT, vT, rel_w, rel_h, out, lse, gout, gq, gkT, gvT, grel_w, grel_h,
                      bh0 + (bh1 - bh0) * t / parts, bh0 + (bh1 - bh0) * (t + 1) / parts, H, W, Wp,
                      scratch + t * stride, zeros);
}

int aa_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
