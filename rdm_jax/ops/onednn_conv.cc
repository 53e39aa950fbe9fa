// oneDNN 2-D convolutions as XLA FFI custom calls for the CPU backend (float32, NHWC
// activations, HWIO kernels, no dilation, one group): forward, input gradient, kernel
// gradient. rdm_jax/ops/onednn.py registers them and wraps them in a jax.custom_vjp.
//
// Why: on the 2-core development machine XLA:CPU runs the demo UNet's convolutions and their
// gradients 2-3x slower than oneDNN's brgemm/jit kernels (benchmarks/RESULTS.md).
//
// Threads: oneDNN runs single-threaded on each batch chunk, and the chunks run on XLA's own
// intra-op thread pool (ffi::ThreadPool). Letting oneDNN fork its OpenMP team instead
// oversubscribes the cores whenever XLA runs another op concurrently (XLA:CPU executes
// independent ops in parallel), which cost half of oneDNN's speed in the train step.
// The kernel gradient sums the chunks' partial gradients.
//
// Activations stay in the caller's NHWC layout; kernels are reordered into the blocked
// layout oneDNN picks (cheap: kernels are small next to activations).
//
// Built by `make onednn` (g++ against Debian's libdnnl-dev and jax.ffi.include_dir()).
#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Kind : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// kind, N, H, W, C, OH, OW, O, KH, KW, stride h/w, pad top/bottom/left/right
using Key = std::array<int64_t, 16>;

struct Geometry {
  int64_t n, h, w, c, oh, ow, o, kh, kw, sh, sw, pt, pb, pl, pr;
  memory::desc src() const { return {{n, c, h, w}, memory::data_type::f32, tag::nhwc}; }
  memory::desc dst() const { return {{n, o, oh, ow}, memory::data_type::f32, tag::nhwc}; }
  memory::desc weights(tag t) const { return {{o, c, kh, kw}, memory::data_type::f32, t}; }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
  Key key(Kind kind) const { return {kind, n, h, w, c, oh, ow, o, kh, kw, sh, sw, pt, pb, pl, pr}; }
};

// A primitive for one geometry and kind: immutable once built, so threads share it (each
// execution brings its own scratchpad and kernel buffer).
struct Primitive {
  dnnl::primitive prim;
  memory::desc weights_md;  // the kernel layout the primitive uses
  memory::desc scratch_md;
  bool reorder = false;     // weights_md differs from the caller's HWIO
  dnnl::reorder weights_reorder;
};

struct State {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::mutex mu;  // guards the cache
  std::map<Key, std::unique_ptr<Primitive>> cache;
};

State& state() {
  static State* s = new State();
  return *s;
}

template <typename Desc, typename PD>
PD with_user_scratchpad(const Desc& d, dnnl::engine& eng) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return PD(d, attr, eng);
}

template <typename Desc, typename PD, typename Hint>
PD with_user_scratchpad(const Desc& d, dnnl::engine& eng, const Hint& hint) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return PD(d, attr, eng, hint);
}

std::unique_ptr<Primitive> build(const Geometry& g, Kind kind, dnnl::engine& eng) {
  using Fwd = dnnl::convolution_forward;
  using BwdData = dnnl::convolution_backward_data;
  using BwdWeights = dnnl::convolution_backward_weights;
  auto p = std::make_unique<Primitive>();
  const auto algo = dnnl::algorithm::convolution_direct;
  Fwd::desc fd(dnnl::prop_kind::forward_training, algo, g.src(), g.weights(tag::any), g.dst(),
               g.strides(), g.pad_l(), g.pad_r());
  auto fwd = with_user_scratchpad<Fwd::desc, Fwd::primitive_desc>(fd, eng);
  if (kind == kForward) {
    p->prim = Fwd(fwd);
    p->weights_md = fwd.weights_desc();
    p->scratch_md = fwd.scratchpad_desc();
  } else if (kind == kBackwardData) {
    BwdData::desc d(algo, g.src(), g.weights(tag::any), g.dst(), g.strides(), g.pad_l(), g.pad_r());
    auto pd = with_user_scratchpad<BwdData::desc, BwdData::primitive_desc>(d, eng, fwd);
    p->prim = BwdData(pd);
    p->weights_md = pd.weights_desc();
    p->scratch_md = pd.scratchpad_desc();
  } else {
    BwdWeights::desc d(algo, g.src(), g.weights(tag::any), g.dst(), g.strides(), g.pad_l(),
                       g.pad_r());
    auto pd = with_user_scratchpad<BwdWeights::desc, BwdWeights::primitive_desc>(d, eng, fwd);
    p->prim = BwdWeights(pd);
    p->weights_md = pd.diff_weights_desc();
    p->scratch_md = pd.scratchpad_desc();
  }
  memory::desc user = g.weights(tag::hwio);
  p->reorder = !(p->weights_md == user);
  if (p->reorder) {
    memory blocked(p->weights_md, eng, DNNL_MEMORY_NONE), plain(user, eng, DNNL_MEMORY_NONE);
    p->weights_reorder = kind == kBackwardWeights ? dnnl::reorder(blocked, plain)   // gradient out
                                                  : dnnl::reorder(plain, blocked);  // kernel in
  }
  return p;
}

const Primitive& primitive(const Geometry& g, Kind kind) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto& slot = s.cache[g.key(kind)];
  if (!slot) slot = build(g, kind, s.engine);
  return *slot;
}

// One batch chunk on the calling thread. For the kernel gradient, `weights` receives this
// chunk's partial gradient (HWIO).
void run_chunk(const Geometry& g, Kind kind, float* src, float* weights, float* dst) {
  omp_set_num_threads(1);  // this thread's OpenMP setting: oneDNN runs inline, no team
  State& s = state();
  const Primitive& p = primitive(g, kind);
  dnnl::stream stream(s.engine);
  memory src_mem(g.src(), s.engine, src), dst_mem(g.dst(), s.engine, dst);
  memory user_w(g.weights(tag::hwio), s.engine, weights);
  std::vector<char> scratch(p.scratch_md.get_size());
  memory scratch_mem(p.scratch_md, s.engine, scratch.data());
  std::vector<char> blocked(p.reorder ? p.weights_md.get_size() : 0);
  memory w = p.reorder ? memory(p.weights_md, s.engine, blocked.data()) : user_w;
  if (kind == kForward) {
    if (p.reorder) p.weights_reorder.execute(stream, user_w, w);
    p.prim.execute(stream, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, dst_mem},
                            {DNNL_ARG_SCRATCHPAD, scratch_mem}});
  } else if (kind == kBackwardData) {
    if (p.reorder) p.weights_reorder.execute(stream, user_w, w);
    p.prim.execute(stream, {{DNNL_ARG_DIFF_DST, dst_mem}, {DNNL_ARG_WEIGHTS, w},
                            {DNNL_ARG_DIFF_SRC, src_mem}, {DNNL_ARG_SCRATCHPAD, scratch_mem}});
  } else {
    p.prim.execute(stream, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_DIFF_DST, dst_mem},
                            {DNNL_ARG_DIFF_WEIGHTS, w}, {DNNL_ARG_SCRATCHPAD, scratch_mem}});
    if (p.reorder) p.weights_reorder.execute(stream, w, user_w);
  }
  stream.wait();
}

// Chunks are claimed from a shared counter by the caller and by tasks on XLA's pool; the
// caller waits only for chunks that other threads have claimed (and so are running), never
// for a queued task, so a busy pool cannot deadlock it.
struct Job {
  Geometry g;
  Kind kind;
  float *src, *weights, *dst;
  std::vector<std::vector<float>> partial;  // kernel-gradient partials of chunks 1..
  int64_t chunks;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex error_mu;
  std::string error;

  void work() {
    for (int64_t i; (i = next.fetch_add(1)) < chunks; done.fetch_add(1)) {
      try {
        int64_t lo = g.n * i / chunks, hi = g.n * (i + 1) / chunks;
        Geometry c = g;
        c.n = hi - lo;
        float* w = kind == kBackwardWeights && i > 0 ? partial[i - 1].data() : weights;
        run_chunk(c, kind, src + lo * g.h * g.w * g.c, w, dst + lo * g.oh * g.ow * g.o);
      } catch (const dnnl::error& err) {
        std::lock_guard<std::mutex> lock(error_mu);
        error = std::string("oneDNN convolution failed: ") + err.what();
      }
    }
  }
};

ffi::Error run(ffi::ThreadPool& pool, const Geometry& g, Kind kind, float* src, float* weights,
               float* dst) {
  auto job = std::make_shared<Job>();
  job->g = g;
  job->kind = kind;
  job->src = src;
  job->weights = weights;
  job->dst = dst;
  job->chunks = std::max<int64_t>(1, std::min<int64_t>(g.n, pool.num_threads()));
  if (kind == kBackwardWeights)
    job->partial.assign(job->chunks - 1, std::vector<float>(g.kh * g.kw * g.c * g.o));
  for (int64_t i = 1; i < job->chunks; ++i) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load() < job->chunks) std::this_thread::yield();
  if (!job->error.empty()) return ffi::Error(ffi::ErrorCode::kInternal, job->error);
  if (kind == kBackwardWeights) {
    const int64_t size = g.kh * g.kw * g.c * g.o;
    for (const auto& part : job->partial)
      for (int64_t j = 0; j < size; ++j) weights[j] += part[j];
  }
  return ffi::Error::Success();
}

ffi::Error geometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                    ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                    int64_t pl, int64_t pr, Geometry* g) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4)
    return ffi::Error::InvalidArgument("oneDNN conv: expected NHWC input, HWIO kernel, NHWC output");
  *g = {x[0], x[1], x[2], x[3], y[1], y[2], y[3], w[0], w[1], sh, sw, pt, pb, pl, pr};
  bool ok = x[0] > 0 && y[0] == x[0] && w[2] == x[3] && w[3] == y[3] && sh > 0 && sw > 0 &&
            pt >= 0 && pb >= 0 && pl >= 0 && pr >= 0 &&
            (x[1] + pt + pb - w[0]) / sh + 1 == y[1] && (x[2] + pl + pr - w[1]) / sw + 1 == y[2];
  if (!ok) return ffi::Error::InvalidArgument("oneDNN conv: inconsistent shapes, strides or padding");
  return ffi::Error::Success();
}

#define RDM_CONV_HANDLER(NAME, KIND, A, B, OUT, X_DIMS, W_DIMS, Y_DIMS, SRC, WEIGHTS, DST)      \
  ffi::Error NAME(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> A, ffi::Buffer<ffi::F32> B,      \
                  ffi::ResultBuffer<ffi::F32> OUT, int64_t sh, int64_t sw, int64_t pt,         \
                  int64_t pb, int64_t pl, int64_t pr) {                                         \
    Geometry g;                                                                                 \
    if (auto err = geometry(X_DIMS, W_DIMS, Y_DIMS, sh, sw, pt, pb, pl, pr, &g); err.failure()) \
      return err;                                                                               \
    return run(pool, g, KIND, SRC, WEIGHTS, DST);                                               \
  }

RDM_CONV_HANDLER(Forward, kForward, x, w, y, x.dimensions(), w.dimensions(), y->dimensions(),
                 x.typed_data(), w.typed_data(), y->typed_data())
RDM_CONV_HANDLER(BackwardData, kBackwardData, dy, w, dx, dx->dimensions(), w.dimensions(),
                 dy.dimensions(), dx->typed_data(), w.typed_data(), dy.typed_data())
RDM_CONV_HANDLER(BackwardWeights, kBackwardWeights, x, dy, dw, x.dimensions(), dw->dimensions(),
                 dy.dimensions(), x.typed_data(), dw->typed_data(), dy.typed_data())

}  // namespace

#define RDM_CONV_BINDING                                                                       \
  ffi::Ffi::Bind()                                                                             \
      .Ctx<ffi::ThreadPool>()                                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                                            \
      .Arg<ffi::Buffer<ffi::F32>>()                                                            \
      .Ret<ffi::Buffer<ffi::F32>>()                                                            \
      .Attr<int64_t>("stride_h")                                                               \
      .Attr<int64_t>("stride_w")                                                               \
      .Attr<int64_t>("pad_top")                                                                \
      .Attr<int64_t>("pad_bottom")                                                             \
      .Attr<int64_t>("pad_left")                                                               \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(RdmOnednnConvForward, Forward, RDM_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(RdmOnednnConvBackwardData, BackwardData, RDM_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(RdmOnednnConvBackwardWeights, BackwardWeights, RDM_CONV_BINDING);
