// Softmax attention through cuDNN's fused flash-attention engines (cuDNN 9 backend graph API), the
// fast path behind attention_forward / attention_backward on CUDA (kernels/attention.h for the
// semantics; kernels/attention.cu keeps our own WMMA kernel as the fallback).
//
// Which path runs is chosen per call by LASP_ATTENTION (read on every call, so tests and benchmarks
// can switch it):
//   auto   (default) cuDNN when it is built in and takes the call, else our kernel
//   cudnn  cuDNN or a clear error saying why it cannot take the call
//   own    always our kernel
// cuDNN takes a call when: head dim 64 or 128; B, Tq, Tk >= 1; causal calls have q_offset >= 0
// (every query row then sees at least key 0; rows without keys stay with our kernel); 16-byte
// aligned pointers; and cuDNN builds an execution plan for the graph (plans are cached per shape,
// so the build cost is paid once per shape and process). The first call of each path logs which one
// runs.
#pragma once

#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace lasp {

enum class AttentionPath { Auto, Cudnn, Own };

// LASP_ATTENTION parsed (unset or empty = Auto); an unknown value is an error naming the choices.
AttentionPath attention_path_from_env();

// True when lasp was built with cuDNN (LASP_CUDNN found it).
bool cudnn_attention_built();

// "cuDNN 9.19.0 (built against 9.19.0)", or why there is none.
std::string cudnn_attention_version();

// The fused paths. Each returns true when it ran (outputs written on the current stream) and false
// when the policy above sends the call to our kernel; with LASP_ATTENTION=cudnn a call cuDNN cannot
// take is an error instead. Arguments are those of attention_forward / attention_backward, already
// checked for shape, layout and dtype by the caller (attention.cu). An undefined lse / dq / dk / dv
// is computed into a scratch buffer and dropped.
bool cudnn_attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k,
                             const Tensor& v, float scale, bool causal, int64_t q_offset);
bool cudnn_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& o, const Tensor& lse,
                              const Tensor& d_o, float scale, bool causal, int64_t q_offset);

}  // namespace lasp
