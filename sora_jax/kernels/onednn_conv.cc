// XLA FFI handlers running the visual tower's 2-D convolution in oneDNN.
//
// XLA:CPU lowers a convolution's weight gradient as a convolution whose "kernel" is the
// whole output map, after transposing the activations so the frame axis is minor; that
// ran 2-4x slower than oneDNN's JIT kernels (BENCHMARKS.md). These three handlers are the
// forward pass (optionally with the ReLU that follows it fused in), the input gradient and
// the weight+bias gradient of one explicitly padded convolution in oneDNN, on XLA's own
// row-major buffers:
//   x [N, H, W, I] (nhwc), w [KH, KW, I, O] (hwio), b [O], y [N, Ho, Wo, O] (nhwc).
// Activations stay in XLA's layout; only the small kernel is reordered to and from
// oneDNN's blocked layout. Primitives are built once per shape and kept.
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <unordered_map>

#include "onednn_common.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

using sora::Engine;

enum class Kind { kForward, kBackwardData, kBackwardWeights };

struct Geometry {
  int64_t n, h, w, i, o, kh, kw, ho, wo;
  int64_t stride_h, stride_w, pad_t, pad_b, pad_l, pad_r;
  memory::data_type dtype;
  bool relu = false;  // forward only: y = max(conv(x) + b, 0)

  std::string Key(Kind kind) const {
    return sora::Key(int64_t(kind), n, h, w, i, o, kh, kw, ho, wo, stride_h, stride_w, pad_t,
                     pad_b, pad_l, pad_r, int64_t(dtype), int64_t(relu));
  }
  memory::desc Src() const { return {{n, i, h, w}, dtype, tag::nhwc}; }
  memory::desc Dst() const { return {{n, o, ho, wo}, dtype, tag::nhwc}; }
  memory::desc UserWeights() const { return {{o, i, kh, kw}, dtype, tag::hwio}; }
  memory::desc AnyWeights() const { return {{o, i, kh, kw}, dtype, tag::any}; }
  memory::desc Bias() const { return {{o}, dtype, tag::x}; }
  memory::dims Strides() const { return {stride_h, stride_w}; }
  memory::dims PadLo() const { return {pad_t, pad_l}; }
  memory::dims PadHi() const { return {pad_b, pad_r}; }
};

// One convolution's primitive, its kernel layout and, when oneDNN prefers a blocked
// kernel, the reorder between that layout and XLA's hwio.
struct Plan {
  dnnl::primitive conv;
  memory::desc weights;  // oneDNN's layout of w (forward, backward data) or dw
  dnnl::reorder weights_reorder;
  bool needs_reorder = false;
  size_t scratchpad_bytes = 0;
};

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g,
                                                      const dnnl::primitive_attr& attr) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(),
      g.AnyWeights(), g.Bias(), g.Dst(), g.Strides(), g.PadLo(), g.PadHi(), attr);
}

std::unique_ptr<Plan> MakePlan(const Geometry& g, Kind kind) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto plan = std::make_unique<Plan>();
  dnnl::primitive_attr forward_attr = attr;
  if (g.relu) {  // applied to the accumulator in registers: no extra pass over y
    dnnl::post_ops relu;
    relu.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    forward_attr.set_post_ops(relu);
  }
  auto forward = ForwardDesc(g, kind == Kind::kForward ? forward_attr : attr);
  memory::desc scratchpad;
  if (kind == Kind::kForward) {
    plan->conv = dnnl::convolution_forward(forward);
    plan->weights = forward.weights_desc();
    scratchpad = forward.scratchpad_desc();
  } else if (kind == Kind::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(),
        g.Strides(), g.PadLo(), g.PadHi(), forward, attr);
    plan->conv = dnnl::convolution_backward_data(pd);
    plan->weights = pd.weights_desc();
    scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Bias(),
        g.Dst(), g.Strides(), g.PadLo(), g.PadHi(), forward, attr);
    plan->conv = dnnl::convolution_backward_weights(pd);
    plan->weights = pd.diff_weights_desc();
    scratchpad = pd.scratchpad_desc();
  }
  plan->scratchpad_bytes = scratchpad.get_size();
  plan->needs_reorder = plan->weights != g.UserWeights();
  if (plan->needs_reorder) {
    plan->weights_reorder = kind == Kind::kBackwardWeights
                                ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                      Engine(), plan->weights, Engine(), g.UserWeights()))
                                : dnnl::reorder(dnnl::reorder::primitive_desc(
                                      Engine(), g.UserWeights(), Engine(), plan->weights));
  }
  return plan;
}

const Plan& GetPlan(const Geometry& g, Kind kind) {
  static auto* plans = new sora::PlanCache<Plan>();
  return plans->Get(g.Key(kind), [&] { return MakePlan(g, kind); });
}

ffi::Error Run(Kind kind, Geometry g, void* x, void* w, void* b, void* y) {
  try {
    const Plan& plan = GetPlan(g, kind);
    dnnl::engine& engine = Engine();
    dnnl::stream stream(engine);
    memory user_weights(g.UserWeights(), engine, w);
    memory weights = user_weights;
    if (plan.needs_reorder) {
      weights = sora::Scratch().Memory(1, plan.weights);
      if (kind != Kind::kBackwardWeights) {
        plan.weights_reorder.execute(stream, user_weights, weights);
      }
    }
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SCRATCHPAD, sora::Scratch().Memory(0, sora::Bytes(plan.scratchpad_bytes))}};
    if (kind == Kind::kForward) {
      args.insert({{DNNL_ARG_SRC, memory(g.Src(), engine, x)},
                   {DNNL_ARG_WEIGHTS, weights},
                   {DNNL_ARG_BIAS, memory(g.Bias(), engine, b)},
                   {DNNL_ARG_DST, memory(g.Dst(), engine, y)}});
    } else if (kind == Kind::kBackwardData) {
      args.insert({{DNNL_ARG_DIFF_SRC, memory(g.Src(), engine, x)},
                   {DNNL_ARG_WEIGHTS, weights},
                   {DNNL_ARG_DIFF_DST, memory(g.Dst(), engine, y)}});
    } else {
      args.insert({{DNNL_ARG_SRC, memory(g.Src(), engine, x)},
                   {DNNL_ARG_DIFF_WEIGHTS, weights},
                   {DNNL_ARG_DIFF_BIAS, memory(g.Bias(), engine, b)},
                   {DNNL_ARG_DIFF_DST, memory(g.Dst(), engine, y)}});
    }
    plan.conv.execute(stream, args);
    if (plan.needs_reorder && kind == Kind::kBackwardWeights) {
      plan.weights_reorder.execute(stream, weights, user_weights);
    }
    stream.wait();
    if (int slot = sora::Scratch().Overrun(); slot >= 0) {
      return ffi::Error::Internal("oneDNN convolution (kind " + std::to_string(int(kind)) +
                                  ", shape " + g.Key(kind) + ") wrote past its scratch " +
                                  (slot == 0 ? "pad" : "weights"));
    }
  } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc: back to XLA as an error
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::ErrorOr<Geometry> MakeGeometry(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions w,
                                    ffi::AnyBuffer::Dimensions y, ffi::DataType type,
                                    int64_t stride_h, int64_t stride_w, int64_t pad_t,
                                    int64_t pad_b, int64_t pad_l, int64_t pad_r) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4) {
    return ffi::Unexpected(
        ffi::Error::InvalidArgument("oneDNN convolution: expects rank-4 NHWC/HWIO arrays"));
  }
  auto dtype = sora::DnnlType(type, "oneDNN convolution");
  if (dtype.has_error()) return ffi::Unexpected(dtype.error());
  return Geometry{x[0], x[1], x[2], x[3], w[3], w[0], w[1], y[1], y[2],
                  stride_h, stride_w, pad_t, pad_b, pad_l, pad_r, *dtype};
}

#define SORA_CONV_ATTRS                                                                  \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_t")           \
      .Attr<int64_t>("pad_b").Attr<int64_t>("pad_l").Attr<int64_t>("pad_r")

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer b,
                   ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr, bool relu) {
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), x.element_type(), sh,
                        sw, pt, pb, pl, pr);
  if (g.has_error()) return g.error();
  g->relu = relu;
  return Run(Kind::kForward, *g, x.untyped_data(), w.untyped_data(), b.untyped_data(),
             y->untyped_data());
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), dy.element_type(), sh,
                        sw, pt, pb, pl, pr);
  if (g.has_error()) return g.error();
  return Run(Kind::kBackwardData, *g, dx->untyped_data(), w.untyped_data(), nullptr,
             dy.untyped_data());
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           ffi::Result<ffi::AnyBuffer> db, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr) {
  auto g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), x.element_type(), sh,
                        sw, pt, pb, pl, pr);
  if (g.has_error()) return g.error();
  return Run(Kind::kBackwardWeights, *g, x.untyped_data(), dw->untyped_data(),
             db->untyped_data(), dy.untyped_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoraConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() SORA_CONV_ATTRS.Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoraConvBackwardData, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() SORA_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoraConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() SORA_CONV_ATTRS);
