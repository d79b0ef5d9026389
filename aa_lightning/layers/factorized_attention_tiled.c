/* Attention with a factorized 2-D relative bias, float32, head dims fixed at compile time.
 *
 *   l_ij  = q_i . k_j + bw[i, jx] + bh[i, jy]          j = (jy, jx) on an H x W grid
 *   out_i = sum_j softmax_j(l_i) v_j,   lse_i = log sum_j exp(l_ij)
 *
 * The same function as factorized_attention.c, built once per head-dim pair with
 * -DAA_D=<dkh> -DAA_DV=<dvh>: with the dims constant, each key's k_j, v_j and the gradient
 * contributions to them stay in SIMD registers, and AA_ROWS query rows are processed together,
 * so each load of a key or value and each update of its gradient serves AA_ROWS rows.
 *   forward   per row tile: pass 1 writes the tile's logits to scratch and takes row maxima;
 *             pass 2 exponentiates them and accumulates sum_j p_ij and sum_j p_ij v_j.
 *   backward  per row tile, one pass over the keys recomputes p_ij from lse_i and accumulates
 *             dV, dK, the bias gradients and dS (kept in scratch); a short pass gives dQ = dS K.
 * The (HW)^2 logits never reach memory: a tile's scratch holds AA_ROWS rows of them.
 *
 * Layouts (contiguous; Wp = W rounded up to AA_VW, the padding columns are zero in kT and vT
 * and -inf in bw, so they get probability exactly 0):
 *   q [BH, L, D] (L = H W)   kT [BH, D, H, Wp]   vT [BH, DV, H, Wp]   bw [BH, L, Wp]   bh [BH, L, H]
 *   out [BH, L, DV]   lse [BH, L]   gradients: gq like q, gkT like kT, gvT like vT, gbw like bw, gbh like bh
 *   scratch: aa_tiled_scratch(H, Wp) floats per range; zeros: Wp + H + D + DV zero floats.
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
#define R 4     /* query rows per tile */
#define VW 8    /* floats per SIMD vector (AVX; two SSE halves elsewhere) */

typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));

static inline vf load(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float* p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return (vf){0} + x; }
static inline vf vmax(vf a, vf b) { const vi m = a > b; return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline float hsum(vf v) { float s = 0; for (int i = 0; i < VW; ++i) s += v[i]; return s; }
static inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < VW; ++i) m = v[i] > m ? v[i] : m; return m; }

/* e^x for x <= ~0 (logits minus their row max or log-sum-exp): x = n ln2 + r, |r| <= ln2/2,
 * e^r by a degree-6 polynomial (Estrin's scheme), 2^n through the exponent bits. Lanes below
 * -87.3 (-inf included) are set to exactly 0, as softmax underflows in float. */
static inline vf vexp(vf x) {
    const vi under = x < -87.3f;
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vf n = (x * 1.44269504088896341f + magic) - magic;
    vf r = x - n * 0.693145751953125f; /* ln2 in two parts: the high part is exact in n * it */
    r = r - n * 1.428606765330187e-06f;
    const vf r2 = r * r;
    vf t = r * (1.0f / 120.0f) + 1.0f / 24.0f;
    t = r2 * (1.0f / 720.0f) + t;
    t = r2 * t + (r * (1.0f / 6.0f) + 0.5f);
    const vf p = r2 * t + (r + 1.0f);
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(p * (vf)bits) & ~under);
}

/* The rows of one tile. Rows past L read zeros and are never written back, so a partial tile
 * runs the same code and contributes nothing to the key and value gradients. */
typedef struct {
    long index[R]; /* s * L + i, or -1 past the end */
    const float* q[R];
    const float* bw[R];
    const float* bh[R];
} tile_t;

static tile_t tile_rows(const float* q, const float* bw, const float* bh, long s, long i0, long L, long H,
                        long Wp, const float* zeros) {
    tile_t t;
    for (int r = 0; r < R; ++r) {
        const int valid = i0 + r < L;
        const long i = s * L + i0 + r;
        t.index[r] = valid ? i : -1;
        t.q[r] = valid ? q + i * D : zeros;
        t.bw[r] = valid ? bw + i * Wp : zeros;
        t.bh[r] = valid ? bh + i * H : zeros;
    }
    return t;
}

long aa_tiled_scratch(long H, long Wp) { return Wp + H + R * H * Wp; }

static void forward_rows(const float* q, const float* kT, const float* vT, const float* bw, const float* bh,
                      float* out, float* lse, long bh0, long bh1, long H, long W, long Wp, float* scratch,
                      const float* zeros) {
    const long L = H * W, Lp = H * Wp;
    float* logits = scratch + Wp + H;
    for (long s = bh0; s < bh1; ++s) {
        const float* kTs = kT + s * D * Lp;
        const float* vTs = vT + s * DV * Lp;
        for (long i0 = 0; i0 < L; i0 += R) {
            const tile_t t = tile_rows(q, bw, bh, s, i0, L, H, Wp, zeros);
            vf qs[R][D], m[R];
            for (int r = 0; r < R; ++r) {
                for (int d = 0; d < D; ++d) qs[r][d] = splat(t.q[r][d]);
                m[r] = splat(-INFINITY);
            }
            for (long jy = 0; jy < H; ++jy) {
                for (long jx = 0; jx < Wp; jx += VW) {
                    const long j = jy * Wp + jx;
                    vf k[D];
                    for (int d = 0; d < D; ++d) k[d] = load(kTs + d * Lp + j);
                    for (int r = 0; r < R; ++r) {
                        vf l = load(t.bw[r] + jx) + t.bh[r][jy];
                        for (int d = 0; d < D; ++d) l += qs[r][d] * k[d];
                        store(logits + r * Lp + j, l);
                        m[r] = vmax(l, m[r]);
                    }
                }
            }
            vf sum[R], acc[R][DV];
            for (int r = 0; r < R; ++r) {
                m[r] = splat(hmax(m[r]));
                sum[r] = splat(0.0f);
                for (int c = 0; c < DV; ++c) acc[r][c] = splat(0.0f);
            }
            for (long j = 0; j < Lp; j += VW) {
                vf v[DV];
                for (int c = 0; c < DV; ++c) v[c] = load(vTs + c * Lp + j);
                for (int r = 0; r < R; ++r) {
                    const vf p = vexp(load(logits + r * Lp + j) - m[r]);
                    sum[r] += p;
                    for (int c = 0; c < DV; ++c) acc[r][c] += p * v[c];
                }
            }
            for (int r = 0; r < R; ++r) {
                const long i = t.index[r];
                if (i < 0) continue;
                const float total = hsum(sum[r]);
                for (int c = 0; c < DV; ++c) out[i * DV + c] = hsum(acc[r][c]) / total;
                lse[i] = m[r][0] + logf(total);
            }
        }
    }
}

static void backward_rows(const float* q, const float* kT, const float* vT, const float* bw, const float* bh,
                       const float* out, const float* lse, const float* gout, float* gq, float* gkT, float* gvT,
                       float* gbw, float* gbh, long bh0, long bh1, long H, long W, long Wp, float* scratch,
                       const float* zeros) {
    const long L = H * W, Lp = H * Wp;
    float* sink = scratch;            /* bias-gradient rows of the rows past L: Wp + H floats */
    float* dsrow = scratch + Wp + H;  /* dS of the tile's rows: R * Lp floats */
    for (long s = bh0; s < bh1; ++s) {
        const float* kTs = kT + s * D * Lp;
        const float* vTs = vT + s * DV * Lp;
        float* gkTs = gkT + s * D * Lp;
        float* gvTs = gvT + s * DV * Lp;
        memset(gkTs, 0, sizeof(float) * D * Lp);
        memset(gvTs, 0, sizeof(float) * DV * Lp);
        for (long i0 = 0; i0 < L; i0 += R) {
            const tile_t t = tile_rows(q, bw, bh, s, i0, L, H, Wp, zeros);
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
                lses[r] = splat(i >= 0 ? lse[i] : 0.0f);
                for (int d = 0; d < D; ++d) qs[r][d] = splat(t.q[r][d]);
                gbwr[r] = i >= 0 ? gbw + i * Wp : sink;
                gbhr[r] = i >= 0 ? gbh + i * H : sink + Wp;
                memset(gbwr[r], 0, sizeof(float) * Wp);
            }
            for (long jy = 0; jy < H; ++jy) {
                vf b[R], rowsum[R];
                for (int r = 0; r < R; ++r) {
                    b[r] = t.bh[r][jy] - lses[r];
                    rowsum[r] = splat(0.0f);
                }
                for (long jx = 0; jx < Wp; jx += VW) {
                    const long j = jy * Wp + jx;
                    vf k[D], v[DV], gk[D], gv[DV];
                    for (int d = 0; d < D; ++d) { k[d] = load(kTs + d * Lp + j); gk[d] = splat(0.0f); }
                    for (int c = 0; c < DV; ++c) { v[c] = load(vTs + c * Lp + j); gv[c] = splat(0.0f); }
                    for (int r = 0; r < R; ++r) {
                        vf l = load(t.bw[r] + jx) + b[r];
                        for (int d = 0; d < D; ++d) l += qs[r][d] * k[d];
                        const vf p = vexp(l); /* P_ij = exp(l_ij - lse_i) */
                        vf dp = -dot[r];
                        for (int c = 0; c < DV; ++c) { dp += gs[r][c] * v[c]; gv[c] += p * gs[r][c]; }
                        const vf ds = p * dp; /* dS = P (dO . v_j - D_i) */
                        store(dsrow + r * Lp + j, ds);
                        for (int d = 0; d < D; ++d) gk[d] += ds * qs[r][d];
                        store(gbwr[r] + jx, load(gbwr[r] + jx) + ds);
                        rowsum[r] += ds;
                    }
                    for (int d = 0; d < D; ++d) store(gkTs + d * Lp + j, load(gkTs + d * Lp + j) + gk[d]);
                    for (int c = 0; c < DV; ++c) store(gvTs + c * Lp + j, load(gvTs + c * Lp + j) + gv[c]);
                }
                for (int r = 0; r < R; ++r) gbhr[r][jy] = hsum(rowsum[r]);
            }
            for (int d = 0; d < D; ++d) { /* dQ = dS K */
                vf a[R];
                for (int r = 0; r < R; ++r) a[r] = splat(0.0f);
                for (long j = 0; j < Lp; j += VW) {
                    const vf kd = load(kTs + d * Lp + j);
                    for (int r = 0; r < R; ++r) a[r] += load(dsrow + r * Lp + j) * kd;
                }
                for (int r = 0; r < R; ++r)
                    if (t.index[r] >= 0) gq[t.index[r] * D + d] = hsum(a[r]);
            }
        }
    }
}

void aa_tiled_forward(const float* q, const float* kT, const float* vT, const float* bw, const float* bh,
                      float* out, float* lse, long bh0, long bh1, long H, long W, long Wp, const float* zeros,
                      long parts, float* scratch, long stride) {
    _Pragma("omp parallel for schedule(static, 1) num_threads(parts)")
    for (long t = 0; t < parts; ++t)
        forward_rows(q, kT, vT, bw, bh, out, lse, bh0 + (bh1 - bh0) * t / parts, bh0 + (bh1 - bh0) * (t + 1) / parts,
                     H, W, Wp, scratch + t * stride, zeros);
}

void aa_tiled_backward(const float* q, const float* kT, const float* vT, const float* bw, const float* bh,
                       const float* out, const float* lse, const float* gout, float* gq, float* gkT, float* gvT,
                       float* gbw, float* gbh, long bh0, long bh1, long H, long W, long Wp, const float* zeros,
                       long parts, float* scratch, long stride) {
    _Pragma("omp parallel for schedule(static, 1) num_threads(parts)")
    for (long t = 0; t < parts; ++t)
        backward_rows(q, kT, vT, bw, bh, out, lse, gout, gq, gkT, gvT, gbw, gbh, bh0 + (bh1 - bh0) * t / parts,
                      bh0 + (bh1 - bh0) * (t + 1) / parts, H, W, Wp, scratch + t * stride, zeros);
}

int aa_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
