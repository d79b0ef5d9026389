/* Row-fused attention with a row/column-factorized additive bias (the 2-D relative logits).
 *
 *   l_ij  = q_i . k_j + bw[i, jx] + bh[i, jy]          j = jy * W + jx,  L = H * W
 *   out_i = sum_j softmax_j(l_i) v_j,   lse_i = log sum_j exp(l_ij)
 *
 * One query row at a time: its L logits live in a scratch row (L1/L2 resident), so the
 * (HW)^2 logits are never written to memory; every loop over j is a unit-stride SIMD loop.
 * Backward recomputes the row's probabilities from lse (one exp per logit) and accumulates
 * every gradient in the same pass. Rows of one (batch, head) slice are handled by one caller
 * thread, so gradients of k and v need no atomics. The exported functions split [bh0, bh1) into
 * `parts` ranges, each with its own `stride` reals of scratch, run on OpenMP threads when built
 * with -fopenmp (torch's own libgomp, already loaded, so no second thread pool competes).
 *
 * Layouts (contiguous): q [BH, L, D]   kT [BH, D, L]   vT [BH, DV, L]   bw [BH, L, W]
 * bh [BH, L, H]   out [BH, L, DV]   lse [BH, L]; gradients in the same layouts
 * (grad_kT [BH, D, L], grad_vT [BH, DV, L]). scratch: 2 * L reals per range.
 *
 * Built for float (with a vectorizable exp, ~2 ulp) and double (libm exp).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp for float: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n by the
 * exponent bits. Inputs here are <= 0 (logits minus their row max or log-sum-exp); below
 * -87.3 the result flushes to 0, as softmax does in float. */
static inline float exp_f32(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    float n = __builtin_roundf(x * 1.44269504088896341f);
    float r = x - n * 0.693145751953125f;      /* ln2 split in two: exact high part */
    r = r - n * 1.428606765330187e-06f;        /* and the low part */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#define DEFINE_KERNELS(real, suffix, EXP)                                                        \
static void logits_row_##suffix(const real* qi, const real* kT, const real* bwi, const real* bhi,\
                                 real* row, long L, long H, long W, long D) {                     \
    for (long jy = 0; jy < H; ++jy) {                                                             \
        const real b = bhi[jy];                                                                   \
        real* r = row + jy * W;                                                                   \
        _Pragma("omp simd")                                                                       \
        for (long jx = 0; jx < W; ++jx) r[jx] = bwi[jx] + b;                                      \
    }                                                                                             \
    for (long d = 0; d < D; ++d) {                                                                \
        const real qd = qi[d];                                                                    \
        const real* kd = kT + d * L;                                                              \
        _Pragma("omp simd")                                                                       \
        for (long j = 0; j < L; ++j) row[j] += qd * kd[j];                                        \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
static void forward_##suffix(const real* q, const real* kT, const real* vT, const real* bw,          \
                         const real* bh, real* out, real* lse, long bh0, long bh1, long L,       \
                         long H, long W, long D, long DV, real* row) {                            \
    for (long s = bh0; s < bh1; ++s) {                                                            \
        const real* kTs = kT + s * D * L;                                                         \
        const real* vTs = vT + s * DV * L;                                                        \
        for (long i = 0; i < L; ++i) {                                                            \
            const long qi = s * L + i;                                                            \
            logits_row_##suffix(q + qi * D, kTs, bw + qi * W, bh + qi * H, row, L, H, W, D);      \
            real m = row[0];                                                                      \
            _Pragma("omp simd reduction(max:m)")                                                  \
            for (long j = 0; j < L; ++j) m = row[j] > m ? row[j] : m;                             \
            real sum = 0;                                                                         \
            _Pragma("omp simd reduction(+:sum)")                                                  \
            for (long j = 0; j < L; ++j) { row[j] = EXP(row[j] - m); sum += row[j]; }             \
            const real inv = (real)1 / sum;                                                       \
            for (long c = 0; c < DV; ++c) {                                                       \
                const real* vc = vTs + c * L;                                                     \
                real acc = 0;                                                                     \
                _Pragma("omp simd reduction(+:acc)")                                              \
                for (long j = 0; j < L; ++j) acc += row[j] * vc[j];                               \
                out[qi * DV + c] = acc * inv;                                                     \
            }                                                                                     \
            lse[qi] = m + log(sum);                                                               \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
static void backward_##suffix(const real* q, const real* kT, const real* vT, const real* bw,         \
                          const real* bh, const real* out, const real* lse, const real* gout,    \
                          real* gq, real* gkT, real* gvT, real* gbw, real* gbh,                  \
                          long bh0, long bh1, long L, long H, long W, long D, long DV,           \
                          real* row) {                                                            \
    real* ds = row + L;                                                                           \
    for (long s = bh0; s < bh1; ++s) {                                                            \
        const real* kTs = kT + s * D * L;                                                         \
        const real* vTs = vT + s * DV * L;                                                        \
        real* gkTs = gkT + s * D * L;                                                             \
        real* gvTs = gvT + s * DV * L;                                                            \
        memset(gkTs, 0, sizeof(real) * D * L);                                                    \
        memset(gvTs, 0, sizeof(real) * DV * L);                                                   \
        for (long i = 0; i < L; ++i) {                                                            \
            const long qi = s * L + i;                                                            \
            const real* go = gout + qi * DV;                                                      \
            logits_row_##suffix(q + qi * D, kTs, bw + qi * W, bh + qi * H, row, L, H, W, D);      \
            const real l = lse[qi];                                                               \
            real dot = 0; /* D_i = dO_i . O_i */                                                  \
            for (long c = 0; c < DV; ++c) dot += go[c] * out[qi * DV + c];                        \
            _Pragma("omp simd")                                                                   \
            for (long j = 0; j < L; ++j) { row[j] = EXP(row[j] - l); ds[j] = -dot; }              \
            for (long c = 0; c < DV; ++c) { /* dP_j = dO_i . v_j; dV_j += P_ij dO_i */            \
                const real g = go[c];                                                             \
                const real* vc = vTs + c * L;                                                     \
                real* gvc = gvTs + c * L;                                                         \
                _Pragma("omp simd")                                                               \
                for (long j = 0; j < L; ++j) { ds[j] += g * vc[j]; gvc[j] += row[j] * g; }        \
            }                                                                                     \
            _Pragma("omp simd")                                                                   \
            for (long j = 0; j < L; ++j) ds[j] *= row[j]; /* dS = P * (dP - D_i) */              \
            for (long d = 0; d < D; ++d) {                                                        \
                const real qd = q[qi * D + d];                                                    \
                const real* kd = kTs + d * L;                                                     \
                real* gkd = gkTs + d * L;                                                         \
                real acc = 0;                                                                     \
                _Pragma("omp simd reduction(+:acc)")                                              \
                for (long j = 0; j < L; ++j) { acc += ds[j] * kd[j]; gkd[j] += ds[j] * qd; }      \
                gq[qi * D + d] = acc;                                                             \
            }                                                                                     \
            real* gbwi = gbw + qi * W;                                                            \
            real* gbhi = gbh + qi * H;                                                            \
            for (long jx = 0; jx < W; ++jx) gbwi[jx] = 0;                                         \
            for (long jy = 0; jy < H; ++jy) {                                                     \
                const real* d_row = ds + jy * W;                                                  \
                real acc = 0;                                                                     \
                _Pragma("omp simd reduction(+:acc)")                                              \
                for (long jx = 0; jx < W; ++jx) { acc += d_row[jx]; gbwi[jx] += d_row[jx]; }      \
                gbhi[jy] = acc;                                                                   \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
void aa_forward_##suffix(const real* q, const real* kT, const real* vT, const real* bw,          \
                         const real* bh, real* out, real* lse, long bh0, long bh1, long L,       \
                         long H, long W, long D, long DV, long parts, real* scratch, long stride) {\
    _Pragma("omp parallel for schedule(static, 1) num_threads(parts)")                           \
    for (long t = 0; t < parts; ++t)                                                              \
        forward_##suffix(q, kT, vT, bw, bh, out, lse, bh0 + (bh1 - bh0) * t / parts,              \
                         bh0 + (bh1 - bh0) * (t + 1) / parts, L, H, W, D, DV, scratch + t * stride);\
}                                                                                                 \
                                                                                                  \
void aa_backward_##suffix(const real* q, const real* kT, const real* vT, const real* bw,         \
                          const real* bh, const real* out, const real* lse, const real* gout,    \
                          real* gq, real* gkT, real* gvT, real* gbw, real* gbh,                  \
                          long bh0, long bh1, long L, long H, long W, long D, long DV,           \
                          long parts, real* scratch, long stride) {                               \
    _Pragma("omp parallel for schedule(static, 1) num_threads(parts)")                           \
    for (long t = 0; t < parts; ++t)                                                              \
        backward_##suffix(q, kT, vT, bw, bh, out, lse, gout, gq, gkT, gvT, gbw, gbh,              \
                          bh0 + (bh1 - bh0) * t / parts, bh0 + (bh1 - bh0) * (t + 1) / parts,    \
                          L, H, W, D, DV, scratch + t * stride);                                  \
}

DEFINE_KERNELS(float, f32, exp_f32)
DEFINE_KERNELS(double, f64, exp)

int aa_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
