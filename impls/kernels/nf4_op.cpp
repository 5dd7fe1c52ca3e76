// The few-rows NF4 + LoRA linear as one compiled autograd op: twinbench_nf4::lora_linear (issue 18 item 1).
//
// Forward out = x W^T + scaling (x A^T) B^T (+ bias) for x [M <= 4, K], one call of nf4_lora_gemv; backward one
// call of nf4_lora_gemv_t (nf4_gemv_t without LoRA). The kernels are nf4_native.c's, in the build the Python side
// loaded (one per vector layer): this file holds none, finds them by dlopen of that build's path, and needs no
// vector flags. What it replaces is Python around each call: an autograd.Function's apply, ctypes' argument
// conversion and per-call checks; against that Function it saves 10-30 us per forward and 40-80 us per backward
// right after a streamed weight has evicted the interpreter (docs/quant_linear.md, "The compiled few-rows op").
//
// The numbers are those of the ctypes wrappers (nf4_native.lora_gemv / lora_gemv_t) bit for bit: the same kernels
// on the same fp32 (or bf16 LoRA factor) inputs, rounded once to the callers' dtypes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <mutex>
#include <string>
#include <unordered_map>

namespace {

using at::Tensor;
using i64 = int64_t;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr i64 kMaxRows = 4;    // nf4_native.c: MAX_ROWS
constexpr i64 kMaxRank = 256;  // nf4_native.c: MAX_RANK

// nf4_native.c's entry points (nf4_native.py sets the same argument types for ctypes).
using LoraGemvFn = int (*)(const uint8_t *packed, const float *scales, const float *code16, const float *x, float *y,
                           i64 M, i64 N, i64 K, i64 bs, int threads, const uint8_t *q, const float *absmax2,
                           const float *code2, float offset, i64 rank, const void *a, const void *b, int ab_bf16,
                           const float *bias, float scaling, float *xa);
using LoraGemvTFn = int (*)(const uint8_t *packed, const float *scales, const float *code16, const float *g, float *dx,
                            i64 M, i64 N, i64 K, i64 bs, int threads, const uint8_t *q, const float *absmax2,
                            const float *code2, float offset, i64 rank, const void *a, const void *b, int ab_bf16,
                            const float *xa, float scaling, const float *x, void *da, void *db);
using GemvTFn = int (*)(const uint8_t *packed, const float *scales, const float *code16, const float *g, float *dx,
                        i64 M, i64 N, i64 K, i64 bs, int threads, const uint8_t *q, const float *absmax2,
                        const float *code2, float offset);

struct Kernels {
  LoraGemvFn lora_gemv;
  LoraGemvTFn lora_gemv_t;
  GemvTFn gemv_t;
};

// The kernels of the build at `path`, opened once per path (the handle is never closed: ctypes holds the same
// library open for the life of the process anyway).
const Kernels &kernels_of(const std::string &path) {
  static std::mutex lock;
  static std::unordered_map<std::string, Kernels> opened;
  std::lock_guard<std::mutex> guard(lock);
  auto found = opened.find(path);
  if (found != opened.end()) return found->second;
  void *handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK_VALUE(handle != nullptr, "twinbench_nf4: cannot open the NF4 kernels at ", path, ": ", dlerror());
  Kernels k{reinterpret_cast<LoraGemvFn>(dlsym(handle, "nf4_lora_gemv")),
            reinterpret_cast<LoraGemvTFn>(dlsym(handle, "nf4_lora_gemv_t")),
            reinterpret_cast<GemvTFn>(dlsym(handle, "nf4_gemv_t"))};
  TORCH_CHECK_VALUE(k.lora_gemv && k.lora_gemv_t && k.gemv_t, "twinbench_nf4: ", path, " lacks the NF4 GEMV kernels");
  return opened.emplace(path, k).first->second;
}

// The weight as C takes it. `weight` is nf4_native.CheckedWeight's: [code16, packed [N, K/2] uint8, scales fp32]
// or [code16, packed, q uint8, absmax2 fp32, code2 fp32] (double-quantised scales, decoded per block in C). The
// Python side checked it once; what a pointer's safety needs is checked again here (cheap).
struct WeightArgs {
  const float *code16;
  const uint8_t *packed;
  const float *scales = nullptr;
  const uint8_t *q = nullptr;
  const float *absmax2 = nullptr;
  const float *code2 = nullptr;
  i64 n, k, blocks;
};

bool plain(const Tensor &t, at::ScalarType dtype) {
  return t.defined() && t.scalar_type() == dtype && t.is_cpu() && t.is_contiguous();
}

WeightArgs weight_args(const std::vector<Tensor> &w) {
  TORCH_CHECK_VALUE(w.size() == 3 || w.size() == 5, "twinbench_nf4: the weight is [code16, packed, scales] or "
                    "[code16, packed, q, absmax2, code2], got ", w.size(), " tensors");
  TORCH_CHECK_VALUE(plain(w[0], at::kFloat) && w[0].numel() == 16, "twinbench_nf4: code16 must be 16 fp32 values");
  TORCH_CHECK_VALUE(plain(w[1], at::kByte) && w[1].dim() == 2, "twinbench_nf4: packed must be a contiguous CPU uint8 "
                    "[N, K/2]");
  WeightArgs a{w[0].data_ptr<float>(), w[1].data_ptr<uint8_t>()};
  a.n = w[1].size(0);
  a.k = 2 * w[1].size(1);
  if (w.size() == 3) {
    TORCH_CHECK_VALUE(plain(w[2], at::kFloat), "twinbench_nf4: scales must be contiguous CPU fp32");
    a.scales = w[2].data_ptr<float>();
    a.blocks = w[2].numel();
  } else {
    TORCH_CHECK_VALUE(plain(w[2], at::kByte) && plain(w[3], at::kFloat) && plain(w[4], at::kFloat) &&
                      w[3].numel() * 256 >= w[2].numel() && w[4].numel() == 256,
                      "twinbench_nf4: nested scales must be uint8 q, fp32 absmax2 covering every 256 blocks and 256 "
                      "fp32 code2 values, all contiguous on the CPU");
    a.q = w[2].data_ptr<uint8_t>();
    a.absmax2 = w[3].data_ptr<float>();
    a.code2 = w[4].data_ptr<float>();
    a.blocks = w[2].numel();
  }
  return a;
}

// t as the kernels read it: contiguous fp32 (t itself when it already is).
Tensor fp32(const Tensor &t) { return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous(); }

Tensor as_dtype(const Tensor &t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// The gradients of a backward run with create_graph=True. They come from the kernels, not from differentiable
// ops, so they have no graph: a second derivative through them would silently lose the weight's part (a gradient
// penalty would train on a wrong value). As reference/autograd_once.py does for the Python Functions, they are
// passed through autograd's DelayedError node, which raises its message if a second backward reaches it. Its
// inputs are also `sources`, what the gradients depend on (the incoming gradient, x, A, B), so that a second
// backward towards those reaches the node and raises rather than reporting them unused (Python's
// @once_differentiable hangs it on fresh leaves, which a second torch.autograd.grad prunes); a caller that only
// wanted first gradients (create_graph for another part of the model) is unaffected.
variable_list differentiable_once(variable_list grads, const variable_list &sources) {
  variable_list inputs;
  for (const Tensor &g : grads)
    if (g.defined()) inputs.push_back(g.detach());
  const size_t n = inputs.size();
  for (const Tensor &t : sources)
    if (t.defined() && t.requires_grad()) inputs.push_back(t);
  if (n == inputs.size()) return grads;  // nothing to differentiate by: the gradients are constants, rightly
  torch::autograd::DelayedError refuse(
      // reference/autograd_once.py's message(), word for word: one message for every differentiable-once op
      "twinbench_nf4.lora_linear is differentiable once: its backward computes gradients autograd cannot "
      "differentiate, so a second derivative through it (create_graph=True, then differentiating the gradients) is "
      "not supported", static_cast<i64>(inputs.size()));
  const variable_list wrapped = refuse.apply(std::move(inputs));
  size_t next = 0;
  for (Tensor &g : grads)
    if (g.defined()) g = wrapped[next++];
  return grads;
}

class LoRALinear : public torch::autograd::Function<LoRALinear> {
 public:
  // weight and watched are one argument each (vectors are not autograd inputs); watched: the tensors the weight
  // was derived from (nf4_native.CheckedWeight.watched), saved so that the backward refuses a weight changed in
  // place after this forward (autograd's version check on saved tensors).
  static Tensor forward(AutogradContext *ctx, const Tensor &x, const std::optional<Tensor> &lora_a,
                        const std::optional<Tensor> &lora_b, const std::optional<Tensor> &bias,
                        const std::vector<Tensor> &weight, const std::vector<Tensor> &watched, double offset,
                        i64 blocksize, double scaling, i64 threads, const std::string &kernels_path) {
    const Kernels &kern = kernels_of(kernels_path);
    const WeightArgs w = weight_args(weight);
    TORCH_CHECK_VALUE(w.blocks > 0 && blocksize > 0 && w.n * w.k == w.blocks * blocksize,
                      "twinbench_nf4: ", w.blocks, " scales of block size ", blocksize, " do not cover a ", w.n, "x",
                      w.k, " weight");
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == w.k && x.size(0) >= 1 && x.size(0) <= kMaxRows && x.is_cpu(),
                      "twinbench_nf4: x must be a CPU [M <= ", kMaxRows, ", ", w.k, "], got ", x.sizes(), " on ",
                      x.device());
    const bool lora = lora_a.has_value() && lora_a->defined();
    TORCH_CHECK_VALUE(lora == (lora_b.has_value() && lora_b->defined()), "twinbench_nf4: pass both LoRA factors or "
                      "neither");
    const Tensor xc = fp32(x);
    const i64 m = xc.size(0);
    Tensor a_c, b_c, xa;
    bool ab_bf16 = false;
    i64 rank = 0;
    if (lora) {
      const Tensor &a = *lora_a, &b = *lora_b;
      rank = a.dim() == 2 ? a.size(0) : 0;
      TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == w.k && b.size(0) == w.n && b.size(1) == rank &&
                        rank >= 1 && rank <= kMaxRank && a.is_cpu() && b.is_cpu(),
                        "twinbench_nf4: LoRA factors must be CPU [r <= ", kMaxRank, ", ", w.k, "] and [", w.n,
                        ", r], got ", a.sizes(), " and ", b.sizes());
      // bf16 factors are read as they are (the kernels widen them as they read), any other dtype as fp32
      ab_bf16 = a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16;
      a_c = ab_bf16 ? a.contiguous() : fp32(a);
      b_c = ab_bf16 ? b.contiguous() : fp32(b);
      xa = at::empty({m, rank}, xc.options());
    }
    Tensor bias_c;
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.n && bias->is_cpu(), "twinbench_nf4: bias must be a "
                        "CPU [", w.n, "], got ", bias->sizes());
      bias_c = fp32(*bias);
    }
    Tensor y = at::empty({m, w.n}, xc.options());
    const int rc = kern.lora_gemv(w.packed, w.scales, w.code16, xc.data_ptr<float>(), y.data_ptr<float>(), m, w.n,
                                  w.k, blocksize, static_cast<int>(threads), w.q, w.absmax2, w.code2,
                                  static_cast<float>(offset), rank, lora ? a_c.data_ptr() : nullptr,
                                  lora ? b_c.data_ptr() : nullptr, ab_bf16,
                                  bias_c.defined() ? bias_c.data_ptr<float>() : nullptr, static_cast<float>(scaling),
                                  lora ? xa.data_ptr<float>() : nullptr);
    TORCH_CHECK(rc != -2, "nf4_lora_gemv: no memory for its scratch buffer");
    TORCH_CHECK_VALUE(rc == 0, "nf4_lora_gemv refused its arguments (M ", m, ", N ", w.n, ", K ", w.k, ", block size ",
                      blocksize, ", rank ", rank, ")");
    // saved: x, A, B as the kernel read them (the backward's own inputs, as the forward converted them) and x A^T
    // (undefined without LoRA: x is then not needed), the weight, and what it was derived from
    // and x, A, B as given (the same tensors where no conversion was needed), only for a backward under
    // create_graph to refuse a second derivative (differentiable_once)
    std::vector<Tensor> saved{lora ? xc : Tensor(), a_c, b_c, xa, lora ? x : Tensor(), lora ? *lora_a : Tensor(),
                              lora ? *lora_b : Tensor()};
    saved.insert(saved.end(), weight.begin(), weight.end());
    saved.insert(saved.end(), watched.begin(), watched.end());
    ctx->save_for_backward(saved);
    // the scalars in three entries (each saved_data entry is a hashed string key): integers (the weight list's
    // length, block size, threads, the inputs' dtypes, for each gradient goes back in its input's dtype, and the
    // autograd edges of A, B and bias: x is edge 0, then those given), the two floats, the kernels' path
    const bool has_bias = bias_c.defined();
    ctx->saved_data["ints"] = std::vector<i64>{
        static_cast<i64>(weight.size()), blocksize, threads, static_cast<i64>(x.scalar_type()),
        lora ? static_cast<i64>(lora_a->scalar_type()) : 0, lora ? static_cast<i64>(lora_b->scalar_type()) : 0,
        has_bias ? static_cast<i64>(bias->scalar_type()) : 0, lora ? 1 : -1, lora ? 2 : -1,
        has_bias ? (lora ? 3 : 1) : -1};
    ctx->saved_data["floats"] = std::vector<double>{offset, scaling};
    ctx->saved_data["kernels"] = kernels_path;
    return as_dtype(y, x.scalar_type());
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    // unpacking checks every saved tensor's version: a weight changed in place since the forward raises here
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<i64> ints = ctx->saved_data["ints"].toIntVector();
    const std::vector<double> floats = ctx->saved_data["floats"].toDoubleVector();
    const i64 nweight = ints[0], bs = ints[1];
    const int threads = static_cast<int>(ints[2]);
    const float offset = static_cast<float>(floats[0]), scaling = static_cast<float>(floats[1]);
    const std::vector<Tensor> weight(saved.begin() + 7, saved.begin() + 7 + nweight);
    const WeightArgs w = weight_args(weight);
    const Tensor &xc = saved[0], &a_c = saved[1], &b_c = saved[2], &xa = saved[3];
    auto needs = [&](i64 edge) { return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge)); };
    const bool need_x = ctx->needs_input_grad(0), need_a = needs(ints[7]), need_b = needs(ints[8]),
               need_bias = needs(ints[9]);
    const Tensor &g = grads[0];
    const Tensor gc = fp32(g);
    const i64 m = gc.size(0);
    const Kernels &kern = kernels_of(ctx->saved_data["kernels"].toStringRef());
    Tensor dx, da, db, dbias;
    if (need_x) dx = at::empty({m, w.k}, gc.options());
    int rc = 0;
    if (xa.defined()) {  // with LoRA: dx, dA, dB in one call, each only where needed
      const i64 rank = a_c.size(0);
      if (need_a) da = at::empty({rank, w.k}, a_c.options());
      if (need_b) db = at::empty({w.n, rank}, b_c.options());
      if (need_x || need_a || need_b)
        rc = kern.lora_gemv_t(w.packed, w.scales, w.code16, gc.data_ptr<float>(), need_x ? dx.data_ptr<float>() : nullptr,
                              m, w.n, w.k, bs, threads, w.q, w.absmax2, w.code2, offset, rank, a_c.data_ptr(),
                              b_c.data_ptr(), a_c.scalar_type() == at::kBFloat16, xa.data_ptr<float>(), scaling,
                              xc.data_ptr<float>(), need_a ? da.data_ptr() : nullptr, need_b ? db.data_ptr() : nullptr);
      if (need_a) da = as_dtype(da, static_cast<at::ScalarType>(ints[4]));
      if (need_b) db = as_dtype(db, static_cast<at::ScalarType>(ints[5]));
    } else if (need_x) {
      rc = kern.gemv_t(w.packed, w.scales, w.code16, gc.data_ptr<float>(), dx.data_ptr<float>(), m, w.n, w.k, bs,
                       threads, w.q, w.absmax2, w.code2, offset);
    }
    TORCH_CHECK(rc != -2, "nf4_lora_gemv_t: no memory for its scratch buffer");
    TORCH_CHECK_VALUE(rc == 0, "nf4_lora_gemv_t refused its arguments (M ", m, ", N ", w.n, ", K ", w.k, ")");
    if (need_bias) dbias = as_dtype(gc.sum(0), static_cast<at::ScalarType>(ints[6]));
    if (need_x) dx = as_dtype(dx, static_cast<at::ScalarType>(ints[3]));
    // one gradient per forward argument (undefined for the non-tensor ones)
    variable_list out{dx, da, db, dbias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    return at::GradMode::is_enabled() ? differentiable_once(std::move(out), {g, saved[4], saved[5], saved[6]}) : out;
  }
};

Tensor lora_linear(const Tensor &x, const std::optional<Tensor> &lora_a, const std::optional<Tensor> &lora_b,
                   const std::optional<Tensor> &bias, at::TensorList weight, at::TensorList watched, double offset,
                   i64 blocksize, double scaling, i64 threads, std::string kernels_path) {
  return LoRALinear::apply(x, lora_a, lora_b, bias, weight.vec(), watched.vec(), offset, blocksize, scaling, threads,
                           kernels_path);
}

}  // namespace

TORCH_LIBRARY(twinbench_nf4, m) {
  m.def("lora_linear(Tensor x, Tensor? lora_A, Tensor? lora_B, Tensor? bias, Tensor[] weight, Tensor[] watched, "
        "float offset, int blocksize, float scaling, int threads, str kernels) -> Tensor");
}

// CompositeImplicitAutograd: the op is its own autograd (the Function above), called as is on every backend key
// it is given; the checks above refuse anything but CPU tensors.
TORCH_LIBRARY_IMPL(twinbench_nf4, CompositeImplicitAutograd, m) { m.impl("lora_linear", lora_linear); }
