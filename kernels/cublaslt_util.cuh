// What the cuBLASLt GEMMs (gemm.cu, gemm_fp8.cu, gemm_fp4.cu) share: one handle and one workspace
// per (user, device), the descriptor set of one matmul, and the zero-padded output copy for
// problems whose C cuBLASLt cannot take as is.
//
// Each user (the bf16/fp32 GEMM, the FP8 GEMM, the FP4 GEMM) has its own workspace, so GEMMs of
// different kinds issued on different streams never share one. Callers serialise their own use
// of a context (each file holds a mutex around descriptor set-up, algorithm cache and launch).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "core/tensor.h"
#include "kernels/cuda_utils.cuh"
#include "kernels/gemm.h"

namespace lasp {

constexpr size_t kLtWorkspaceBytes = 32u << 20;

enum class LtUser { Gemm, Fp8, Fp4, Count };

struct LtContext {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;  // kLtWorkspaceBytes of device memory
};

// The context of `user` on CUDA device `dev`, created on first use (defined in gemm.cu; not
// thread-safe by itself: call it under the caller's mutex).
LtContext& lt_context(LtUser user, int dev);

struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  LtDescriptors() = default;
  LtDescriptors(const LtDescriptors&) = delete;
  LtDescriptors& operator=(const LtDescriptors&) = delete;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// How many of cuBLASLt's heuristic candidates lt_pick_algo times when tuning is on.
constexpr int kLtTuneCandidates = 8;

// The algorithm for the matmul `d` describes (its preference included), found once per shape by
// the caller and cached there:
// - tuning off (gemm_tuning(), LASP_GEMM_TUNE=0), or the stream is being captured: the
//   heuristic's first candidate;
// - tuning on: the fastest of the heuristic's first kLtTuneCandidates, timed on these operands
//   in place on a scratch copy of C (`d_bytes`), so nothing the caller owns changes. Each
//   candidate runs once (a refusal drops it), the first one 5 more times (clocks up), then
//   4 rounds time every candidate over 2 runs, all queued without a host sync so the GPU stays
//   busy, and each candidate keeps its best round. Another candidate must beat the first by
//   3% to replace it: a first, one-shot version (3 runs per candidate, one after the other)
//   picked slower algorithms than the heuristic's on an H200.
// Returns false when the heuristic has no candidate (its status in *status).
inline bool lt_pick_algo(LtContext& ctx, const LtDescriptors& d, const void* alpha, const void* a_ptr,
                         const void* b_ptr, const void* beta, const void* c_ptr, size_t d_bytes,
                         Device dev, cublasLtMatmulAlgo_t* algo, cublasStatus_t* status) {
  cudaStream_t stream = cuda_stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool tune = gemm_tuning() && capture == cudaStreamCaptureStatusNone;
  cublasLtMatmulHeuristicResult_t results[kLtTuneCandidates] = {};
  int found = 0;
  *status = cublasLtMatmulAlgoGetHeuristic(ctx.handle, d.op, d.a, d.b, d.c, d.c, d.pref,
                                           tune ? kLtTuneCandidates : 1, results, &found);
  if (*status != CUBLAS_STATUS_SUCCESS || found == 0) return false;
  *algo = results[0].algo;
  if (!tune || found == 1) return true;

  Tensor scratch = Tensor::empty({static_cast<int64_t>(d_bytes)}, DType::U8, dev);
  CUDA_CHECK(cudaMemcpyAsync(scratch.raw(), c_ptr, d_bytes, cudaMemcpyDeviceToDevice, stream));
  auto run = [&](int i) {
    return cublasLtMatmul(ctx.handle, d.op, alpha, a_ptr, d.a, b_ptr, d.b, beta, scratch.raw(), d.c,
                          scratch.raw(), d.c, &results[i].algo, ctx.workspace, kLtWorkspaceBytes, stream);
  };
  bool valid[kLtTuneCandidates] = {};
  for (int i = 0; i < found; ++i)
    valid[i] = results[i].state == CUBLAS_STATUS_SUCCESS && run(i) == CUBLAS_STATUS_SUCCESS;
  if (!valid[0]) {  // keep the heuristic's choice; the caller's own call reports the error
    CUDA_CHECK(cudaGetLastError());
    return true;
  }
  for (int r = 0; r < 5; ++r) (void)run(0);
  constexpr int kRounds = 4, kRuns = 2;
  cudaEvent_t ev[kRounds][kLtTuneCandidates][2];
  for (auto& round : ev)
    for (auto& pair : round)
      for (cudaEvent_t& e : pair) CUDA_CHECK(cudaEventCreate(&e));
  for (int round = 0; round < kRounds; ++round)
    for (int i = 0; i < found; ++i) {
      if (!valid[i]) continue;
      CUDA_CHECK(cudaEventRecord(ev[round][i][0], stream));
      for (int r = 0; r < kRuns; ++r) valid[i] = valid[i] && run(i) == CUBLAS_STATUS_SUCCESS;
      CUDA_CHECK(cudaEventRecord(ev[round][i][1], stream));
    }
  CUDA_CHECK(cudaStreamSynchronize(stream));
  float best_ms[kLtTuneCandidates];
  for (int i = 0; i < found; ++i) {
    best_ms[i] = std::numeric_limits<float>::infinity();
    for (int round = 0; round < kRounds && valid[i]; ++round) {
      float ms = 0.0f;
      CUDA_CHECK(cudaEventElapsedTime(&ms, ev[round][i][0], ev[round][i][1]));
      best_ms[i] = std::min(best_ms[i], ms / kRuns);
    }
  }
  for (auto& round : ev)
    for (auto& pair : round)
      for (cudaEvent_t& e : pair) CUDA_CHECK(cudaEventDestroy(e));
  CUDA_CHECK(cudaGetLastError());
  int chosen = 0;
  for (int i = 1; i < found; ++i)
    if (best_ms[i] < 0.97f * best_ms[0] && best_ms[i] < best_ms[chosen]) chosen = i;
  *algo = results[chosen].algo;
  gemm_tuning_note(best_ms[0], best_ms[chosen]);
  return true;
}

// C as cuBLASLt gets it: `c` itself when it is [mp, np] and 16-byte aligned, else a zeroed
// [mp, np] copy that holds c's values when keep_values (beta != 0). finish() copies the [m, n]
// part of the copy back into c.
struct PaddedOutput {
  Tensor& c;
  Tensor run;
  bool padded = false;

  PaddedOutput(Tensor& out, int64_t mp, int64_t np, bool keep_values) : c(out), run(out) {
    const int64_t m = c.dim(0), n = c.dim(1);
    padded = mp != m || np != n || reinterpret_cast<uintptr_t>(c.raw()) % 16 != 0;
    if (!padded) return;
    const size_t es = dtype_size(c.dtype());
    run = Tensor::empty({mp, np}, c.dtype(), c.device());
    CUDA_CHECK(cudaMemsetAsync(run.raw(), 0, run.nbytes(), cuda_stream()));
    if (keep_values)
      CUDA_CHECK(cudaMemcpy2DAsync(run.raw(), np * es, c.raw(), n * es, n * es,
                                   static_cast<size_t>(m), cudaMemcpyDeviceToDevice,
                                   cuda_stream()));
  }
  void finish() {
    if (!padded) return;
    const int64_t m = c.dim(0), n = c.dim(1), np = run.dim(1);
    const size_t es = dtype_size(c.dtype());
    CUDA_CHECK(cudaMemcpy2DAsync(c.raw(), n * es, run.raw(), np * es, n * es,
                                 static_cast<size_t>(m), cudaMemcpyDeviceToDevice, cuda_stream()));
  }
};

}  // namespace lasp
