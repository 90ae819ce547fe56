/* MEmeL's fused CPU step for float32 activations (see memel_native.py, which compiles and loads it).

   One pass over the activation z (rows x cols, contiguous) computes, per element, the centred value
   s = z - mean and, in the same loop, the batch sums of s and s^2 (float partial sums over ROW_BLOCK
   rows, added into double totals), the score s^2 / den (the Monosemantic Scale times count - 1, so the
   same order within a row) and, with `out`, the copy of z that the forward returns and the first
   maximum of the score in each row. The eager torch code needs about ten passes and thirty kernel
   launches for the same; on CPU those passes and launches are MEmeL's cost.

   Invariants the Python side relies on:
   - den[j] = max(m2[j] + 0.01 * mean(m2), eps_f32 * max(count - 1, 1)), the eager code's denominator;
   - index[i] is the FIRST column of the row maximum (strict > across column blocks, which run in order);
     a row whose scores are all NaN keeps index 0;
   - out[i, index[i]] = mean[index[i]] (the running mean before this batch is merged), every other
     element of out equals z;
   - floating-point contraction is off (the build passes -ffp-contract=off), so s, s^2 and the score
     are rounded as the eager code rounds them. */

#include <float.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define COLUMN_BLOCK 1024 /* columns per block: its accumulators and scores stay in L1 */
#define ROW_BLOCK 32      /* rows summed in float before the partial sums go into the double totals */
#define VARIANCE_FLOOR_SHARE 0.01
#define MAX_THREADS 64

static double denominator_shift(const float *restrict m2, int64_t cols)
{
    double total = 0.0;
    for (int64_t j = 0; j < cols; ++j) total += m2[j];
    return VARIANCE_FLOOR_SHARE * total / (double)(cols > 0 ? cols : 1);
}

/* GCC/clang vector extensions: sixteen lanes, lowered to AVX-512, AVX, SSE or scalar code by the compiler. */
typedef float f16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
#define LANES 16
#define CHAINS 2 /* independent compare-and-select chains in top1_segment */

static inline f16 load16(const float *p)
{
    f16 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, f16 v) { __builtin_memcpy(p, &v, sizeof v); }

/* The running first maximum of the scores in one set of lanes: each lane keeps the largest score it
   has seen and the column where it first saw it (strict >). */
struct lane_top {
    f16 top;
    i16 where;
};

/* One vector of LANES columns from j: the partial sums, the output copy, and the lanes' maxima. */
static inline void top1_vector(const float *restrict zr, const float *restrict mu, const float *restrict inverse,
                               int64_t j, float *restrict sum1, float *restrict sum2, float *restrict o,
                               struct lane_top *acc, i16 column)
{
    const f16 v = load16(zr + j);
    const f16 s = v - load16(mu + j);
    const f16 q = s * s;
    store16(sum1 + j, load16(sum1 + j) + s);
    store16(sum2 + j, load16(sum2 + j) + q);
    store16(o + j, v);
    const f16 score = q * load16(inverse + j);
    const i16 better = score > acc->top;
    acc->top = (f16)(((i16)score & better) | ((i16)acc->top & ~better));
    acc->where = (column & better) | (acc->where & ~better);
}

/* One row segment of the top-1 mode: the batch partial sums, the output copy, and the segment's first
   maximum score, which replaces the row's best only when strictly greater (earlier segments hold the
   lower columns). CHAINS independent sets of lanes take the vectors in turn, so that one
   compare-and-select chain does not wait on another's (with one chain the pass was latency-bound,
   about 3.5x the time of the sums alone). The lanes of all sets are reduced to the lowest column
   among those holding the largest value, so the result is the first maximum of the row. Scores are
   >= 0 and NaN never compares greater, so a row of NaN keeps index 0. */
static void top1_segment(const float *restrict zr, const float *restrict mu, const float *restrict inverse,
                         int64_t width, int64_t offset, float *restrict sum1, float *restrict sum2,
                         float *restrict o, float *best, int64_t *at)
{
    struct lane_top acc[CHAINS];
    i16 column;
    for (int lane = 0; lane < LANES; ++lane) column[lane] = lane;
    const i16 step = column * 0 + LANES;
    for (int k = 0; k < CHAINS; ++k) {
        acc[k].top = (f16)(column * 0) - 1.0f;
        acc[k].where = column;
    }
    int64_t j = 0;
    for (; j + CHAINS * LANES <= width; j += CHAINS * LANES) {
        for (int k = 0; k < CHAINS; ++k) {
            top1_vector(zr, mu, inverse, j + k * LANES, sum1, sum2, o, &acc[k], column);
            column += step;
        }
    }
    for (int k = 0; j + LANES <= width; ++k, j += LANES) {
        top1_vector(zr, mu, inverse, j, sum1, sum2, o, &acc[k], column);
        column += step;
    }
    float lane_top = -1.0f;
    int64_t lane_at = 0;
    for (int k = 0; k < CHAINS; ++k) {
        for (int lane = 0; lane < LANES; ++lane) {
            const float top = acc[k].top[lane];
            const int64_t where = acc[k].where[lane];
            if (top > lane_top || (top == lane_top && where < lane_at)) {
                lane_top = top;
                lane_at = where;
            }
        }
    }
    for (; j < width; ++j) { /* the tail: columns above every lane's, so strict > keeps the first */
        const float s = zr[j] - mu[j];
        const float q = s * s;
        sum1[j] += s;
        sum2[j] += q;
        o[j] = zr[j];
        const float score = q * inverse[j];
        if (score > lane_top) {
            lane_top = score;
            lane_at = j;
        }
    }
    if (lane_top > *best) {
        *best = lane_top;
        *at = offset + lane_at;
    }
}

/* What one thread of memel_step_f32 works on: the columns [begin, end) of every row. */
struct step_task {
    const float *z;
    int64_t rows, cols, begin, end;
    const float *mean, *m2;
    double shift, floor;
    double *sums;
    float *out, *phi, *best;
    int64_t *index;
};

/* The columns [begin, end): their sums (disjoint from other tasks'), their part of out or phi, and
   each row's first maximum among them in best/index (this task's own arrays). */
static void step_columns(const struct step_task *t)
{
    float sum1[COLUMN_BLOCK], sum2[COLUMN_BLOCK], inverse[COLUMN_BLOCK];
    const int64_t cols = t->cols;
    if (t->out != NULL) {
        for (int64_t i = 0; i < t->rows; ++i) {
            t->best[i] = -1.0f;
            t->index[i] = 0;
        }
    }
    for (int64_t c0 = t->begin; c0 < t->end; c0 += COLUMN_BLOCK) {
        const int64_t width = t->end - c0 < COLUMN_BLOCK ? t->end - c0 : COLUMN_BLOCK;
        const float *restrict mu = t->mean + c0;
        for (int64_t j = 0; j < width; ++j) {
            /* The eager code divides by the float32 denominator; the reciprocal is rounded once here. */
            const double den = t->m2[c0 + j] + t->shift;
            inverse[j] = 1.0f / (float)(den > t->floor ? den : t->floor);
        }
        for (int64_t j = 0; j < width; ++j) t->sums[c0 + j] = t->sums[cols + c0 + j] = 0.0;
        for (int64_t r0 = 0; r0 < t->rows; r0 += ROW_BLOCK) {
            const int64_t r1 = t->rows - r0 < ROW_BLOCK ? t->rows : r0 + ROW_BLOCK;
            memset(sum1, 0, (size_t)width * sizeof(float));
            memset(sum2, 0, (size_t)width * sizeof(float));
            for (int64_t i = r0; i < r1; ++i) {
                const float *restrict zr = t->z + i * cols + c0;
                if (t->out != NULL) {
                    top1_segment(zr, mu, inverse, width, c0, sum1, sum2, t->out + i * cols + c0, t->best + i,
                                 t->index + i);
                } else if (t->phi != NULL) {
                    float *restrict p = t->phi + i * cols + c0;
                    #pragma omp simd
                    for (int64_t j = 0; j < width; ++j) {
                        const float s = zr[j] - mu[j];
                        const float q = s * s;
                        sum1[j] += s;
                        sum2[j] += q;
                        p[j] = q * inverse[j];
                    }
                } else {
                    #pragma omp simd
                    for (int64_t j = 0; j < width; ++j) {
                        const float s = zr[j] - mu[j];
                        sum1[j] += s;
                        sum2[j] += s * s;
                    }
                }
            }
            for (int64_t j = 0; j < width; ++j) {
                t->sums[c0 + j] += sum1[j];
                t->sums[cols + c0 + j] += sum2[j];
            }
        }
    }
}

static void *run_step_task(void *task)
{
    step_columns((const struct step_task *)task);
    return NULL;
}

/* The batch sums (into sums[0:cols] and sums[cols:2*cols]) and, with `out` (rows x cols, may be NULL),
   the top-1 selection and the forward's output; with `phi` (rows x cols, may be NULL) the scores of
   every element, for a top-t selection done by the caller. `best` is a rows-long workspace.
   `threads` > 1 splits the columns into that many ranges, one per thread (the caller's thread takes
   the first); the row maxima of the ranges are merged in column order, so the result does not depend
   on the number of threads. Returns 0, or -1 when memory or a thread could not be had (then the
   outputs are not valid and the caller must fall back). */
int memel_step_f32(const float *restrict z, int64_t rows, int64_t cols, const float *restrict mean,
                   const float *restrict m2, double count, double *restrict sums, float *restrict out,
                   int64_t *restrict index, float *restrict phi, float *restrict best, int64_t threads)
{
    const double shift = denominator_shift(m2, cols);
    const double floor = (double)FLT_EPSILON * (count - 1.0 > 1.0 ? count - 1.0 : 1.0);
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > cols / LANES) threads = cols / LANES;
    if (threads < 1) threads = 1;
    struct step_task tasks[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    float *bests = NULL;
    int64_t *indices = NULL;
    if (threads > 1 && out != NULL) {
        bests = malloc((size_t)(rows * (threads - 1)) * sizeof(float));
        indices = malloc((size_t)(rows * (threads - 1)) * sizeof(int64_t));
        if (bests == NULL || indices == NULL) {
            free(bests);
            free(indices);
            return -1;
        }
    }
    int64_t started = 0, failed = 0;
    for (int64_t k = 0; k < threads; ++k) {
        /* Range boundaries on multiples of the lane count keep every range's vectors whole. */
        const int64_t begin = (cols * k / threads) / LANES * LANES;
        const int64_t end = k + 1 == threads ? cols : (cols * (k + 1) / threads) / LANES * LANES;
        tasks[k] = (struct step_task){z, rows, cols, begin, end, mean, m2, shift, floor, sums, out, phi,
                                      k == 0 ? best : bests + rows * (k - 1), k == 0 ? index : indices + rows * (k - 1)};
        if (k > 0) {
            if (pthread_create(&handles[k], NULL, run_step_task, &tasks[k]) != 0) {
                failed = 1;
                break;
            }
            started = k;
        }
    }
    if (!failed) step_columns(&tasks[0]);
    for (int64_t k = 1; k <= started; ++k) pthread_join(handles[k], NULL);
    if (failed) {
        free(bests);
        free(indices);
        return -1;
    }
    if (out != NULL) {
        for (int64_t k = 1; k < threads; ++k) { /* later ranges hold higher columns: strict > keeps the first */
            for (int64_t i = 0; i < rows; ++i) {
                if (bests[rows * (k - 1) + i] > best[i]) {
                    best[i] = bests[rows * (k - 1) + i];
                    index[i] = indices[rows * (k - 1) + i];
                }
            }
        }
        for (int64_t i = 0; i < rows; ++i) out[i * cols + index[i]] = mean[index[i]];
    }
    free(bests);
    free(indices);
    return 0;
}

/* The capped Chan merge of memel_stats.merge_capped_ (with batch_moments folded in), in double:
   sums holds the batch's per-element sums of (z - mean) and (z - mean)^2 around the running mean.
   Returns the new sample count. */
double memel_merge(double count, double batch_count, int64_t n_forget, const double *restrict sums,
                   float *restrict mean, float *restrict m2, int64_t cols)
{
    if (batch_count <= 0.0) return count;
    const double cap = (double)(n_forget - 1) * batch_count;
    const double capped = count < cap ? count : cap;
    const double keep = count > 0.0 ? capped / count : 0.0;
    const double total = capped + batch_count;
    const double weight = batch_count / total;
    const double cross = capped * batch_count / total;
    for (int64_t j = 0; j < cols; ++j) {
        const double offset = sums[j] / batch_count;
        double batch_m2 = sums[cols + j] - sums[j] * offset;
        batch_m2 = batch_m2 > 0.0 ? batch_m2 : 0.0;
        mean[j] = (float)(mean[j] + offset * weight);
        m2[j] = (float)(m2[j] * keep + batch_m2 + offset * offset * cross);
    }
    return total;
}

/* Backward of the top-1 Reversed Deactivation: the upstream gradient, with the selected element of
   each row multiplied by scale (= -delta). */
void memel_backward_f32(const float *restrict grad, int64_t rows, int64_t cols, const int64_t *restrict index,
                        float scale, float *restrict out)
{
    memcpy(out, grad, (size_t)(rows * cols) * sizeof(float));
    for (int64_t i = 0; i < rows; ++i) out[i * cols + index[i]] = grad[i * cols + index[i]] * scale;
}
