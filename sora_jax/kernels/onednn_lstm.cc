// XLA FFI handlers for the LSTM recurrence: the loop over time steps in one call.
//
// XLA runs a scanned LSTM step as a dozen small operations, each dispatched on its own:
// at the reference shapes (16 clips, 256 units) that overhead cost several times the
// arithmetic (BENCHMARKS.md). Here the whole loop is one call: per step one oneDNN matmul
// (h_{t-1} @ W_h, added onto the precomputed input gates) and one pass of gate arithmetic.
// The mathematics of lstm.py's XLA path (gate order i, f, g, o; zero initial state; gates
// and state in float32, the recurrent product's operands in the compute dtype), on XLA's
// row-major, time-major buffers:
//   forward:  input_gates [T, B, 4H], w_h [H, 4H]   -> h [T, B, H], gate activations
//             [T, B, 4H], c [T, B, H] (float32, the residuals of the backward pass)
//   backward: dh [T, B, H], activations, c, w_h     -> gate gradients [T, B, 4H] (float32)
// The weight gradient (one matmul over all steps) and everything else stay in XLA.
#pragma GCC optimize("O3")  // vectorised gate arithmetic

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "onednn_common.h"

// From libgomp, which the OpenMP build of oneDNN loads.
extern "C" int omp_get_max_threads();
extern "C" void omp_set_num_threads(int);

namespace {

// The per-step matmuls are small (16 x 256 x 1024 at the reference shapes, ~40 us on one
// core): waking OpenMP threads for every one cost more than it saved (2 threads: 27 ms
// forward vs 15 ms on one). The loop runs on the calling thread, leaving the other cores
// to XLA's concurrent work.
class SingleThreaded {
 public:
  SingleThreaded() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SingleThreaded() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

using dnnl::memory;
using sora::Engine;
namespace ffi = xla::ffi;
using tag = memory::format_tag;
using dt = memory::data_type;

uint16_t ToBf16(float value) {  // round to nearest even (values here are finite)
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits += 0x7fff + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

float FromBf16(uint16_t value) {
  uint32_t bits = uint32_t(value) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Rows of float32 -> the matmul's operand dtype (a copy only for bfloat16).
const void* AsOperand(const float* src, size_t count, dt dtype, std::vector<uint16_t>& buffer) {
  if (dtype == dt::f32) return src;
  buffer.resize(count);
  for (size_t k = 0; k < count; ++k) buffer[k] = ToBf16(src[k]);
  return buffer.data();
}

// exp(x) in float32 to within a few ulp, written so that the compiler vectorises the gate
// loops (the C library's expf and tanhf are scalar calls): 2^n * e^r, |r| <= ln2 / 2, with
// a degree-6 Taylor polynomial for e^r, clamped where float32 overflows or underflows.
inline float Exp(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504f + kRound) - kRound;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 split hi + lo
  const float p =
      1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r / 720)))));
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

inline float Sigmoid(float x) { return 1.f / (1.f + Exp(-x)); }
inline float Tanh(float x) { return 1.f - 2.f / (Exp(2.f * x) + 1.f); }

// The gate loops' vector versions, chosen at load time by the CPU. Held to AVX2
// (ONEDNN_MAX_CPU_ISA=AVX2, which build.py passes on as SORA_JAX_MAX_ISA_AVX2) they leave
// out AVX-512 as oneDNN does, so that an AVX-512 host runs what an AVX2 host would.
#ifdef SORA_JAX_MAX_ISA_AVX2
#define GATE_CLONES __attribute__((target_clones("default", "avx2")))
#else
#define GATE_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#endif

// One step's gate arithmetic over the batch: a [B, 4H] pre-activations in, activations out.
GATE_CLONES
void ForwardGates(int64_t batch, int64_t hidden, float* __restrict a,
                  const float* __restrict c_prev, float* __restrict c, float* __restrict h) {
  for (int64_t b = 0; b < batch; ++b) {
    float* row = a + b * 4 * hidden;
    for (int64_t j = 0; j < hidden; ++j) {
      float i = Sigmoid(row[j]), f = Sigmoid(row[hidden + j]);
      float g = Tanh(row[2 * hidden + j]), o = Sigmoid(row[3 * hidden + j]);
      float cell = f * c_prev[b * hidden + j] + i * g;
      row[j] = i, row[hidden + j] = f, row[2 * hidden + j] = g, row[3 * hidden + j] = o;
      c[b * hidden + j] = cell;
      h[b * hidden + j] = o * Tanh(cell);
    }
  }
}

// One step back: dh (this step's output gradient plus the recurrent one) and dc in,
// gate gradients out, dc carried to the previous step.
GATE_CLONES
void BackwardGates(int64_t batch, int64_t hidden, const float* __restrict a,
                   const float* __restrict c, const float* __restrict c_prev,
                   const float* __restrict dh, float* __restrict dc, float* __restrict d_gates) {
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = a + b * 4 * hidden;
    float* d_row = d_gates + b * 4 * hidden;
    for (int64_t j = 0; j < hidden; ++j) {
      int64_t k = b * hidden + j;
      float i = row[j], f = row[hidden + j], g = row[2 * hidden + j], o = row[3 * hidden + j];
      float tanh_c = Tanh(c[k]);
      float d_c = dc[k] + dh[k] * o * (1.f - tanh_c * tanh_c);
      d_row[j] = d_c * g * i * (1.f - i);
      d_row[hidden + j] = d_c * c_prev[k] * f * (1.f - f);
      d_row[2 * hidden + j] = d_c * i * (1.f - g * g);
      d_row[3 * hidden + j] = dh[k] * tanh_c * o * (1.f - o);
      dc[k] = d_c * f;
    }
  }
}

// out [M, N] f32 (+)= lhs [M, K] @ rhs, rhs [K, N] stored as is or, `transposed`, stored
// [N, K]; lhs and rhs in the compute dtype. Built once per shape. The weights are
// reordered into the kernel's own layout once per call and reused by every step.
struct Matmul {
  dnnl::matmul primitive;
  dnnl::reorder pack;
  size_t scratchpad_bytes;
  memory::desc lhs, user_rhs, rhs, out;
};

const Matmul& GetMatmul(int64_t m, int64_t k, int64_t n, dt dtype, bool transposed,
                        bool accumulate) {
  static auto* cache = new sora::PlanCache<Matmul>();
  return cache->Get(sora::Key(m, k, n, int64_t(dtype), transposed, accumulate), [&] {
    auto plan = std::make_unique<Matmul>();
    plan->lhs = memory::desc({m, k}, dtype, tag::ab);
    plan->user_rhs = memory::desc({k, n}, dtype, transposed ? tag::ba : tag::ab);
    plan->out = memory::desc({m, n}, dt::f32, tag::ab);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (accumulate) {
      dnnl::post_ops sum;
      sum.append_sum(1.f);
      attr.set_post_ops(sum);
    }
    dnnl::matmul::primitive_desc pd(Engine(), plan->lhs, memory::desc({k, n}, dtype, tag::any),
                                    plan->out, attr);
    plan->primitive = dnnl::matmul(pd);
    plan->rhs = pd.weights_desc();
    plan->pack = dnnl::reorder(
        dnnl::reorder::primitive_desc(Engine(), plan->user_rhs, Engine(), plan->rhs));
    plan->scratchpad_bytes = pd.scratchpad_desc().get_size();
    return plan;
  });
}

memory PackWeights(const Matmul& mm, dnnl::stream& stream, void* rhs) {
  memory user(mm.user_rhs, Engine(), rhs);
  memory packed = sora::Scratch().Memory(1, mm.rhs);
  mm.pack.execute(stream, user, packed);
  return packed;
}

void RunMatmul(const Matmul& mm, dnnl::stream& stream, const void* lhs, const memory& rhs,
               float* out) {
  mm.primitive.execute(
      stream, {{DNNL_ARG_SRC, memory(mm.lhs, Engine(), const_cast<void*>(lhs))},
               {DNNL_ARG_WEIGHTS, rhs},
               {DNNL_ARG_DST, memory(mm.out, Engine(), out)},
               {DNNL_ARG_SCRATCHPAD,
                sora::Scratch().Memory(0, sora::Bytes(mm.scratchpad_bytes))}});
}

// The loop's sizes and the recurrent product's dtype, from a [T, B, 4H] gate-shaped buffer
// and w_h [H, 4H]; an error naming what is wrong otherwise.
struct Loop {
  int64_t steps, batch, hidden, width;
  dt dtype;
};

ffi::ErrorOr<Loop> LoopOf(const ffi::AnyBuffer& gates, const ffi::AnyBuffer& w_h) {
  auto g = gates.dimensions(), w = w_h.dimensions();
  if (g.size() != 3 || w.size() != 2 || w[1] != 4 * w[0] || g[2] != w[1]) {
    return ffi::Unexpected(
        ffi::Error::InvalidArgument("oneDNN LSTM: expects gates [T, B, 4H], w_h [H, 4H]"));
  }
  auto dtype = sora::DnnlType(w_h.element_type(), "oneDNN LSTM");
  if (dtype.has_error()) return ffi::Unexpected(dtype.error());
  return Loop{g[0], g[1], w[0], w[1], *dtype};
}

ffi::Error Forward(ffi::AnyBuffer input_gates, ffi::AnyBuffer w_h,
                   ffi::Result<ffi::AnyBuffer> h_out, ffi::Result<ffi::AnyBuffer> acts_out,
                   ffi::Result<ffi::AnyBuffer> c_out) {
  auto loop = LoopOf(input_gates, w_h);
  if (loop.has_error()) return loop.error();
  auto gates_type = sora::DnnlType(input_gates.element_type(), "oneDNN LSTM");
  if (gates_type.has_error()) return gates_type.error();
  const auto [steps, batch, hidden, width, dtype] = *loop;
  auto* h = static_cast<float*>(h_out->untyped_data());
  auto* acts = static_cast<float*>(acts_out->untyped_data());
  auto* c = static_cast<float*>(c_out->untyped_data());
  try {
    SingleThreaded single_threaded;
    const Matmul& mm = GetMatmul(batch, hidden, width, dtype, false, true);
    dnnl::stream stream(Engine());
    memory w = PackWeights(mm, stream, w_h.untyped_data());
    std::vector<uint16_t> h_low;
    const std::vector<float> zero_state(batch * hidden, 0.f);
    for (int64_t t = 0; t < steps; ++t) {
      float* a = acts + t * batch * width;
      const size_t n = batch * width;
      if (*gates_type == dt::f32) {
        std::memcpy(a, static_cast<const float*>(input_gates.untyped_data()) + t * n, n * 4);
      } else {
        const auto* src = static_cast<const uint16_t*>(input_gates.untyped_data()) + t * n;
        for (size_t k = 0; k < n; ++k) a[k] = FromBf16(src[k]);
      }
      if (t > 0) {  // a += h_{t-1} @ W_h
        const float* h_prev = h + (t - 1) * batch * hidden;
        RunMatmul(mm, stream, AsOperand(h_prev, batch * hidden, dtype, h_low), w, a);
        stream.wait();
      }
      ForwardGates(batch, hidden, a, t ? c + (t - 1) * batch * hidden : zero_state.data(),
                   c + t * batch * hidden, h + t * batch * hidden);
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN LSTM forward: ") + e.what());
  }
  if (int slot = sora::Scratch().Overrun(); slot >= 0) {
    return ffi::Error::Internal(std::string("oneDNN LSTM forward wrote past its scratch ") +
                                (slot == 0 ? "pad" : "weights"));
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::AnyBuffer dh_out, ffi::AnyBuffer acts_in, ffi::AnyBuffer c_in,
                    ffi::AnyBuffer w_h, ffi::Result<ffi::AnyBuffer> d_gates_out) {
  auto loop = LoopOf(acts_in, w_h);
  if (loop.has_error()) return loop.error();
  const auto [steps, batch, hidden, width, dtype] = *loop;
  const auto* dh_in = static_cast<const float*>(dh_out.untyped_data());
  const auto* acts = static_cast<const float*>(acts_in.untyped_data());
  const auto* c = static_cast<const float*>(c_in.untyped_data());
  auto* d_gates = static_cast<float*>(d_gates_out->untyped_data());
  try {
    SingleThreaded single_threaded;
    const Matmul& mm = GetMatmul(batch, width, hidden, dtype, true, false);
    dnnl::stream stream(Engine());
    memory w = PackWeights(mm, stream, w_h.untyped_data());
    std::vector<float> dh(batch * hidden), dh_next(batch * hidden, 0.f), dc(batch * hidden, 0.f);
    std::vector<uint16_t> d_low;
    const std::vector<float> zero_state(batch * hidden, 0.f);
    for (int64_t t = steps - 1; t >= 0; --t) {
      const float* dh_t = dh_in + t * batch * hidden;
      for (int64_t k = 0; k < batch * hidden; ++k) dh[k] = dh_t[k] + dh_next[k];
      float* d = d_gates + t * batch * width;
      BackwardGates(batch, hidden, acts + t * batch * width, c + t * batch * hidden,
                    t ? c + (t - 1) * batch * hidden : zero_state.data(), dh.data(), dc.data(),
                    d);
      if (t) {  // dh_{t-1} = d_gates @ W_h^T
        RunMatmul(mm, stream, AsOperand(d, batch * width, dtype, d_low), w, dh_next.data());
        stream.wait();
      }
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN LSTM backward: ") + e.what());
  }
  if (int slot = sora::Scratch().Overrun(); slot >= 0) {
    return ffi::Error::Internal(std::string("oneDNN LSTM backward wrote past its scratch ") +
                                (slot == 0 ? "pad" : "weights"));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoraLstmForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // input gates [T, B, 4H]
                                  .Arg<ffi::AnyBuffer>()  // w_h [H, 4H]
                                  .Ret<ffi::AnyBuffer>()  // h [T, B, H]
                                  .Ret<ffi::AnyBuffer>()  // activations [T, B, 4H]
                                  .Ret<ffi::AnyBuffer>());  // c [T, B, H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoraLstmBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // dh [T, B, H]
                                  .Arg<ffi::AnyBuffer>()  // activations [T, B, 4H]
                                  .Arg<ffi::AnyBuffer>()  // c [T, B, H]
                                  .Arg<ffi::AnyBuffer>()  // w_h [H, 4H]
                                  .Ret<ffi::AnyBuffer>());  // gate gradients [T, B, 4H]
