/* The native CPU kernels of lejepa_kernels: ECF sums and their gradient for one block of
 * projections on a uniform grid t_k = k * dt, k = 0 .. n_points - 1.
 *
 * Input is a block P [groups, rows, ld] of projections (fp32, row-major); each group's rows have
 * their own sums (forward) or gradient coefficients (backward), and one call loops over the
 * groups. With u = dt P, cos(u) and sin(u) come from one vector sincos, then cos(k u) and
 * sin(k u) from the Chebyshev recurrence f_{k+1} = 2 cos(u) f_k - f_{k-1}, VEC columns at a time
 * in vector registers; nothing of size [rows, cols, n_points] exists. The recurrence's error
 * grows about as k^2, so it restarts from a direct sincos every RESTART_INTERVAL points (not
 * within the default 17-point grid). Each call covers the columns [col_begin, col_end), so that
 * threads given disjoint column ranges never write to the same place.
 *
 * Both functions return 0, or -1 (doing nothing) when n_points is not in [1, MAX_POINTS].
 * Built at first use by lejepa_kernels/cpu_library.py with the system C compiler.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define VEC 16
#define MAX_POINTS 129        /* longest grid the fixed-size accumulators hold */
#define ROWS_PER_PARTIAL 256  /* fp32 partial sums over this many rows, then added in fp64 */
#define SINCOS_LIMIT 8192.0f  /* |u| beyond which a vector takes libm's sinf/cosf */
#define RESTART_INTERVAL 16   /* grid points between restarts of the recurrence */

typedef float vfloat __attribute__((vector_size(VEC * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(VEC * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(VEC * sizeof(uint32_t))));

/* The first `width` (<= VEC) floats at p, zeros after them. */
static inline vfloat load(const float *p, int64_t width) {
    vfloat v = {0};
    if (width == VEC)
        memcpy(&v, p, sizeof v);
    else
        memcpy(&v, p, (size_t)width * sizeof(float));
    return v;
}

static inline void store(float *p, vfloat v, int64_t width) {
    if (width == VEC)
        memcpy(p, &v, sizeof v);
    else
        memcpy(p, &v, (size_t)width * sizeof(float));
}

/* cos(u) and sin(u): u = q pi/2 + r with |r| <= pi/4 (pi/2 split in three parts, exact
 * products for |q| < 2^13), minimax polynomials for cos r and sin r, then the quadrant q mod 4
 * swaps and negates them. A vector holding |u| > SINCOS_LIMIT (or inf, or nan) uses libm. */
static inline void sincos_vec(vfloat u, vfloat *cos_u, vfloat *sin_u) {
    vint magnitude = (vint)u & 0x7fffffff;
    vint beyond = magnitude > (vint)((vfloat){0} + SINCOS_LIMIT);
    int any_beyond = 0;
    for (int l = 0; l < VEC; l++) any_beyond |= beyond[l];
    if (any_beyond) {
        for (int l = 0; l < VEC; l++) {
            (*cos_u)[l] = cosf(u[l]);
            (*sin_u)[l] = sinf(u[l]);
        }
        return;
    }
    const vfloat round_shift = (vfloat){0} + 12582912.0f; /* 1.5 * 2^23 */
    vfloat qf = (u * 0.636619772367581343f + round_shift) - round_shift;
    vint q = __builtin_convertvector(qf, vint);
    vfloat r = u - qf * 1.5703125f;
    r = r - qf * 4.837512969970703125e-4f;
    r = r - qf * 7.54978995489188216e-8f;
    vfloat z = r * r;
    vfloat sin_r = r + r * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
    vfloat cos_r = 1.0f - 0.5f * z
                   + z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f
                                                           + z * 2.443315711809948e-5f));
    vint odd = -(q & 1); /* all ones where q is odd: sin and cos trade places */
    vint s = ((vint)cos_r & odd) | ((vint)sin_r & ~odd);
    vint c = ((vint)sin_r & odd) | ((vint)cos_r & ~odd);
    *sin_u = (vfloat)((vuint)s ^ ((vuint)(q & 2) << 30));       /* negative in quadrants 2, 3 */
    *cos_u = (vfloat)((vuint)c ^ ((vuint)((q + 1) & 2) << 30)); /* negative in quadrants 1, 2 */
}

/* cos(k u) and sin(k u) for one vector of columns, at k (c, s) and k - 1 (c_prev, s_prev). */
typedef struct {
    vfloat c, s, c_prev, s_prev, two_cos;
} harmonics;

/* k = 1, for u = dt * (the `width` projections at p). */
static inline harmonics harmonics_start(const float *p, float dt, int64_t width) {
    harmonics h = {.s_prev = {0}};
    sincos_vec(load(p, width) * dt, &h.c, &h.s);
    h.c_prev = (vfloat){0} + 1.0f;
    h.two_cos = h.c + h.c;
    return h;
}

/* k - 1 -> k (k >= 2): f_k = 2 cos(u) f_{k-1} - f_{k-2}, for cos and sin alike, or a direct
 * sincos of k u and (k - 1) u every RESTART_INTERVAL points (p, dt, width: as at the start). */
static inline void harmonics_next(harmonics *h, int64_t k, const float *p, float dt, int64_t width) {
    if (k % RESTART_INTERVAL == 1) {
        vfloat P = load(p, width);
        sincos_vec(P * (dt * (float)k), &h->c, &h->s);
        sincos_vec(P * (dt * (float)(k - 1)), &h->c_prev, &h->s_prev);
        return;
    }
    vfloat c_next = h->two_cos * h->c - h->c_prev, s_next = h->two_cos * h->s - h->s_prev;
    h->c_prev = h->c;
    h->s_prev = h->s;
    h->c = c_next;
    h->s = s_next;
}

int ecf_max_points(void) { return MAX_POINTS; }

/* One group of ecf_forward_block: P [rows, ld], sums n_points rows of ld_sums. */
static void forward_group(const float *restrict P, int64_t rows, int64_t ld, float dt,
                          int64_t col_begin, int64_t col_end, int64_t n_points,
                          double *restrict cos_sums, double *restrict sin_sums, int64_t ld_sums) {
    vfloat acc_cos[MAX_POINTS], acc_sin[MAX_POINTS];
    for (int64_t j = col_begin; j < col_end; j += VEC) {
        int64_t width = col_end - j < VEC ? col_end - j : VEC;
        for (int64_t row0 = 0; row0 < rows; row0 += ROWS_PER_PARTIAL) {
            int64_t row1 = row0 + ROWS_PER_PARTIAL < rows ? row0 + ROWS_PER_PARTIAL : rows;
            for (int64_t k = 1; k < n_points; k++) acc_cos[k] = acc_sin[k] = (vfloat){0};
            for (int64_t i = row0; i < row1; i++) {
                const float *p = P + i * ld + j;
                harmonics h = harmonics_start(p, dt, width);
                for (int64_t k = 1; k < n_points; k++) {
                    if (k > 1) harmonics_next(&h, k, p, dt, width);
                    acc_cos[k] += h.c;
                    acc_sin[k] += h.s;
                }
            }
            for (int64_t k = 1; k < n_points; k++)
                for (int64_t l = 0; l < width; l++) {
                    cos_sums[k * ld_sums + j + l] += acc_cos[k][l];
                    sin_sums[k * ld_sums + j + l] += acc_sin[k][l];
                }
        }
        for (int64_t l = 0; l < width; l++) cos_sums[j + l] += (double)rows;
    }
}

/* Adds, for each group g, k = 0 .. n_points - 1 and the columns j of [col_begin, col_end),
 *   cos_sums[g * group_stride + k * ld_sums + j] += sum_rows cos(k dt P[g, row, j]),
 *   sin_sums[g * group_stride + k * ld_sums + j] += sum_rows sin(k dt P[g, row, j]).
 * P: [groups, rows, ld] fp32. cos_sums, sin_sums: fp64, per group n_points rows of ld_sums. */
int ecf_forward_block(const float *P, int64_t groups, int64_t rows, int64_t ld, float dt,
                      int64_t col_begin, int64_t col_end, int64_t n_points, double *cos_sums,
                      double *sin_sums, int64_t ld_sums, int64_t group_stride) {
    if (n_points < 1 || n_points > MAX_POINTS) return -1;
    for (int64_t g = 0; g < groups; g++)
        forward_group(P + g * rows * ld, rows, ld, dt, col_begin, col_end, n_points,
                      cos_sums + g * group_stride, sin_sums + g * group_stride, ld_sums);
    return 0;
}

/* One group of ecf_backward_block: P [rows, ld], coefficients n_points rows of ld_coef. */
static void backward_group(float *P, int64_t rows, int64_t ld, float dt, int64_t col_begin,
                           int64_t col_end, int64_t n_points, const float *restrict cos_coef,
                           const float *restrict sin_coef, int64_t ld_coef) {
    vfloat a[MAX_POINTS], b[MAX_POINTS];
    for (int64_t j = col_begin; j < col_end; j += VEC) {
        int64_t width = col_end - j < VEC ? col_end - j : VEC;
        for (int64_t k = 0; k < n_points; k++) {
            a[k] = load(cos_coef + k * ld_coef + j, width);
            b[k] = load(sin_coef + k * ld_coef + j, width);
        }
        for (int64_t i = 0; i < rows; i++) {
            float *p = P + i * ld + j;
            harmonics h = harmonics_start(p, dt, width);
            vfloat g = a[0];
            for (int64_t k = 1; k < n_points; k++) {
                if (k > 1) harmonics_next(&h, k, p, dt, width);
                g += a[k] * h.c + b[k] * h.s;
            }
            store(P + i * ld + j, g, width);
        }
    }
}

/* For each group g, the columns j of [col_begin, col_end) and every row i, overwrites P with
 *   P[g, i, j] = sum_k cos_coef[g * group_stride + k * ld_coef + j] cos(k dt P[g, i, j])
 *                    + sin_coef[g * group_stride + k * ld_coef + j] sin(k dt P[g, i, j]).
 * P: [groups, rows, ld] fp32. cos_coef, sin_coef: fp32, per group n_points rows of ld_coef. */
int ecf_backward_block(float *P, int64_t groups, int64_t rows, int64_t ld, float dt,
                       int64_t col_begin, int64_t col_end, int64_t n_points,
                       const float *cos_coef, const float *sin_coef, int64_t ld_coef,
                       int64_t group_stride) {
    if (n_points < 1 || n_points > MAX_POINTS) return -1;
    for (int64_t g = 0; g < groups; g++)
        backward_group(P + g * rows * ld, rows, ld, dt, col_begin, col_end, n_points,
                       cos_coef + g * group_stride, sin_coef + g * group_stride, ld_coef);
    return 0;
}
