/* Drives the C ABI on the CPU path (built and run by tests/c_program.rs, which checks the
 * printed Gram against its own f64 reference). Prints "gram <rows> <dim>", then the Gram
 * row by row, then one "check <name> ok" line per argument check; exits non-zero on the
 * first check that fails. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "regmean_gpu.h"

#define DIM 5
#define STRIDE 7
#define ROWS_A 6
#define ROWS_B 4

/* The value of row r, column c of batch b: the formula the Rust test repeats. Multiples of
 * 1/8 in [-2, 2): exact in f32 and in bf16. */
static float value(int b, int r, int c) { return (float)(((b * 31 + r * 7 + c * 3) % 32) - 16) / 8.0f; }

static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16); /* exact: the values have at most 8 significant bits */
}

static int fail(const char *what, RegmeanStatus s, const RegmeanGram *g) {
    fprintf(stderr, "%s: status %d: %s\n", what, (int)s, regmean_error_message(g));
    return 1;
}

#define EXPECT(name, call, want, handle)                                              \
    do {                                                                              \
        RegmeanStatus s_ = (call);                                                    \
        if (s_ != (want)) return fail(name, s_, handle);                              \
        if ((want) != REGMEAN_STATUS_OK && regmean_error_message(handle)[0] == '\0') { \
            fprintf(stderr, "%s: no message\n", name);                                \
            return 1;                                                                 \
        }                                                                             \
        printf("check %s ok\n", name);                                                \
    } while (0)

int main(void) {
    RegmeanGram *g = NULL;
    RegmeanStatus s = regmean_gram_create_cpu(DIM, 0, &g);
    if (s != REGMEAN_STATUS_OK) return fail("create", s, NULL);

    /* Batch 0: f32 rows, STRIDE apart, every third row masked out. */
    float a[(ROWS_A - 1) * STRIDE + DIM];
    uint8_t mask[ROWS_A];
    for (int r = 0; r < ROWS_A; r++) {
        mask[r] = (r % 3 != 1);
        for (int c = 0; c < STRIDE && r * STRIDE + c < (int)(sizeof a / sizeof a[0]); c++)
            a[r * STRIDE + c] = c < DIM ? value(0, r, c) : 1000.0f; /* padding columns */
    }
    s = regmean_gram_update_host(g, a, REGMEAN_DTYPE_F32, ROWS_A, STRIDE, mask);
    if (s != REGMEAN_STATUS_OK) return fail("update f32", s, g);

    /* Batch 1: bf16 rows, packed, no mask. */
    uint16_t b[ROWS_B * DIM];
    for (int r = 0; r < ROWS_B; r++)
        for (int c = 0; c < DIM; c++) b[r * DIM + c] = to_bf16(value(1, r, c));
    s = regmean_gram_update_host(g, b, REGMEAN_DTYPE_BF16, ROWS_B, DIM, NULL);
    if (s != REGMEAN_STATUS_OK) return fail("update bf16", s, g);

    /* Argument checks: each is an error with a message, and leaves the handle usable. */
    float out[DIM * DIM];
    uint64_t rows = 0;
    EXPECT("stride_below_dim", regmean_gram_update_host(g, a, REGMEAN_DTYPE_F32, 2, DIM - 1, NULL),
           REGMEAN_STATUS_INVALID_ARGUMENT, g);
    EXPECT("unknown_dtype", regmean_gram_update_host(g, a, 7, 2, DIM, NULL),
           REGMEAN_STATUS_INVALID_ARGUMENT, g);
    EXPECT("null_rows", regmean_gram_update_host(g, NULL, REGMEAN_DTYPE_F32, 2, DIM, NULL),
           REGMEAN_STATUS_INVALID_ARGUMENT, g);
    EXPECT("device_rows_on_cpu", regmean_gram_update_device(g, a, REGMEAN_DTYPE_F32, 2, DIM, NULL),
           REGMEAN_STATUS_INVALID_ARGUMENT, g);
    EXPECT("null_handle", regmean_gram_update_host(NULL, a, REGMEAN_DTYPE_F32, 2, DIM, NULL),
           REGMEAN_STATUS_INVALID_HANDLE, NULL);
    EXPECT("made_up_handle", regmean_gram_rows((RegmeanGram *)(uintptr_t)0x5eed, &rows),
           REGMEAN_STATUS_INVALID_HANDLE, NULL);
    EXPECT("wrong_output_size", regmean_gram_finish(g, out, DIM * DIM - 1, &rows),
           REGMEAN_STATUS_INVALID_ARGUMENT, g);
    EXPECT("null_out", regmean_gram_create_cpu(4, 0, NULL), REGMEAN_STATUS_INVALID_ARGUMENT, NULL);
    EXPECT("zero_dim", regmean_gram_create_cpu(0, 0, &(RegmeanGram *){NULL}),
           REGMEAN_STATUS_INVALID_ARGUMENT, NULL);
    RegmeanGram *compat = NULL;
    if (regmean_gram_create_cpu(DIM, 1, &compat) != REGMEAN_STATUS_OK) return fail("compat", 1, NULL);
    EXPECT("mask_in_compat_mode", regmean_gram_update_host(compat, a, REGMEAN_DTYPE_F32, ROWS_A, STRIDE, mask),
           REGMEAN_STATUS_INVALID_ARGUMENT, compat);
    EXPECT("finish_without_rows", regmean_gram_finish(compat, out, DIM * DIM, &rows),
           REGMEAN_STATUS_INVALID_ARGUMENT, compat);
    regmean_gram_destroy(compat);
    EXPECT("destroyed_handle", regmean_gram_rows(compat, &rows), REGMEAN_STATUS_INVALID_HANDLE, NULL);
    RegmeanGram *cuda = NULL;
    s = regmean_gram_create_cuda(0, NULL, DIM, 0, &cuda);
    if (s != REGMEAN_STATUS_OK && s != REGMEAN_STATUS_UNAVAILABLE) return fail("create_cuda", s, NULL);
    printf("check create_cuda ok\n");
    regmean_gram_destroy(cuda);

    s = regmean_gram_rows(g, &rows);
    if (s != REGMEAN_STATUS_OK) return fail("rows", s, g);
    s = regmean_gram_finish(g, out, DIM * DIM, &rows);
    if (s != REGMEAN_STATUS_OK) return fail("finish", s, g);
    EXPECT("finished_twice", regmean_gram_finish(g, out, DIM * DIM, &rows),
           REGMEAN_STATUS_INVALID_ARGUMENT, g);
    regmean_gram_destroy(g);

    printf("gram %llu %d\n", (unsigned long long)rows, DIM);
    for (int i = 0; i < DIM; i++) {
        for (int j = 0; j < DIM; j++) printf("%.9g ", out[i * DIM + j]);
        printf("\n");
    }

    /* The solve: A = [[4, 1], [1, 3]], X = [[1, 2], [3, 4]], B = A·X. */
    const float sum[4] = {4, 1, 1, 3}, gw[4] = {7, 12, 10, 14}, mean[4] = {0, 0, 0, 0};
    float w[4];
    int how = -1;
    s = regmean_solve(sum, gw, mean, 2, 2, w, &how);
    if (s != REGMEAN_STATUS_OK || how != REGMEAN_SOLVE_CHOLESKY) return fail("solve", s, NULL);
    printf("solve %.9g %.9g %.9g %.9g\n", w[0], w[1], w[2], w[3]);
    const float asym[4] = {4, 1, 2, 3};
    EXPECT("asymmetric_solve", regmean_solve(asym, gw, mean, 2, 2, w, &how),
           REGMEAN_STATUS_INVALID_ARGUMENT, NULL);
    printf("version %s\n", regmean_gpu_version());
    return 0;
}
