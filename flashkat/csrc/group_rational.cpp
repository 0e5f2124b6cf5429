// Eager CUDA calls of the group-rational op without Python: a C++ autograd function that looks up
// the call's plan (built and compiled once per signature by flashkat/ops/group_rational.py, which
// registers the compiled Triton kernels here) and launches the kernels through the driver API.
// The fused LayerNorm + group-rational op (flashkat/ops/layer_norm_group_rational.py) has its own
// plans and autograd function below, on the same launch code.
//
// Why: an eager step of a small KAT is bound by the host, and a Python autograd.Function with its
// launch code costs several times what an ATen op costs (docs/BENCHMARKS.md, step 22). Here a call
// costs one Python -> C++ crossing, a hash lookup, one allocation and one launch forward, and in
// backward four allocations and two launches, all in C++. The kernels, their arguments and hence
// the results are exactly those of the Python path.
//
// A kernel's parameters are those of Triton's compiled function: every argument that is not a
// constexpr (tensors as device addresses, scalars by type), then Triton's two scratch pointers,
// unused by these kernels (null). Python builds that list from the compiled signature.

#include <torch/extension.h>

#include <ATen/cuda/EmptyTensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>

#include <cstring>
#include <deque>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// Driver entry points, from the libcuda.so.1 that torch already loaded (no link-time dependency).
void* driver_symbol(const char* name) {
  static void* const library = [] {
    void* handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (handle == nullptr) handle = dlopen("libcuda.so.1", RTLD_NOW);
    TORCH_CHECK(handle != nullptr, "flashkat native: cannot open libcuda.so.1");
    return handle;
  }();
  void* found = dlsym(library, name);
  TORCH_CHECK(found != nullptr, "flashkat native: libcuda.so.1 has no ", name);
  return found;
}

using LaunchKernelEx = CUresult (*)(const CUlaunchConfig*, CUfunction, void**, void**);
using CtxGetCurrent = CUresult (*)(CUcontext*);
using CtxSetCurrent = CUresult (*)(CUcontext);

LaunchKernelEx launch_kernel_ex() {
  static const auto function = reinterpret_cast<LaunchKernelEx>(driver_symbol("cuLaunchKernelEx"));
  return function;
}

CUcontext current_context() {
  static const auto get = reinterpret_cast<CtxGetCurrent>(driver_symbol("cuCtxGetCurrent"));
  CUcontext context = nullptr;
  TORCH_CHECK(get(&context) == CUDA_SUCCESS, "flashkat native: cuCtxGetCurrent failed");
  return context;
}

// A thread that has made no CUDA runtime call has no current context: an autograd device thread
// whose first work is this backward is such a thread (a launch there crashed `flashkat bench
// host`, whose first backward pass was native). Make the kernels' context current there.
void ensure_context(CUcontext context) {
  if (context == nullptr || current_context() != nullptr) return;
  static const auto set = reinterpret_cast<CtxSetCurrent>(driver_symbol("cuCtxSetCurrent"));
  TORCH_CHECK(set(context) == CUDA_SUCCESS, "flashkat native: cuCtxSetCurrent failed");
}

constexpr size_t kMaxParams = 30;

// Tests only: a Python function called instead of the driver with (function, grid, tensors, the
// parameter cells), so that CPU tensors and the Triton interpreter can stand in for a GPU.
PyObject* launch_hook = nullptr;

void call_launch_hook(uint64_t function, const unsigned* grid, std::initializer_list<const at::Tensor*> tensors,
                      const uint64_t* cells, size_t n) {
  const py::gil_scoped_acquire gil;
  py::list tensor_list, cell_list;
  for (const at::Tensor* t : tensors) tensor_list.append(py::cast(*t));
  for (size_t i = 0; i < n; ++i) cell_list.append(cells[i]);
  const py::handle hook(launch_hook);
  hook(function, py::make_tuple(grid[0], grid[1], grid[2]), tensor_list, cell_list);
}

// One kernel parameter: kind 't' is the address of tensor number `integer` of the launch, 'i' an
// int32, 'l' an int64, 'f' a float32 and 'd' a float64 scalar, fixed by the plan.
struct Param {
  char kind;
  int64_t integer;
  double real;
};

struct Kernel {
  CUfunction function = nullptr;
  unsigned grid[3] = {1, 1, 1};
  unsigned threads = 0, shared = 0;
  bool pdl = false;
  std::vector<Param> params;

  void launch(std::initializer_list<const at::Tensor*> tensors, CUstream stream) const {
    uint64_t cells[kMaxParams + 2];
    void* pointers[kMaxParams + 2];
    const at::Tensor* const* slot = tensors.begin();
    size_t n = 0;
    for (const Param& p : params) {
      uint64_t& cell = cells[n];
      cell = 0;
      if (p.kind == 't') {
        cell = reinterpret_cast<uint64_t>(slot[p.integer]->data_ptr());
      } else if (p.kind == 'i') {
        const int32_t value = static_cast<int32_t>(p.integer);
        std::memcpy(&cell, &value, sizeof value);
      } else if (p.kind == 'l') {
        std::memcpy(&cell, &p.integer, sizeof p.integer);
      } else if (p.kind == 'f') {
        const float value = static_cast<float>(p.real);
        std::memcpy(&cell, &value, sizeof value);
      } else {
        std::memcpy(&cell, &p.real, sizeof p.real);
      }
      pointers[n] = &cell;
      ++n;
    }
    for (int scratch = 0; scratch < 2; ++scratch, ++n) {  // global and profile scratch: none
      cells[n] = 0;
      pointers[n] = &cells[n];
    }
    if (launch_hook != nullptr) {
      call_launch_hook(reinterpret_cast<uint64_t>(function), grid, tensors, cells, n);
      return;
    }
    CUlaunchAttribute serialization{};
    serialization.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    serialization.value.programmaticStreamSerializationAllowed = 1;
    CUlaunchConfig config{};
    config.gridDimX = grid[0];
    config.gridDimY = grid[1];
    config.gridDimZ = grid[2];
    config.blockDimX = threads;
    config.blockDimY = 1;
    config.blockDimZ = 1;
    config.sharedMemBytes = shared;
    config.hStream = stream;
    config.attrs = pdl ? &serialization : nullptr;
    config.numAttrs = pdl ? 1 : 0;
    const CUresult result = launch_kernel_ex()(&config, function, pointers, nullptr);
    TORCH_CHECK(result == CUDA_SUCCESS, "flashkat native: kernel launch failed (CUresult ", static_cast<int>(result), ")");
  }
};

struct Plan {
  Kernel forward, backward, reduce;
  at::ScalarType out_dtype;
  bool dense;
  int64_t partials;
  CUcontext context;  // where the kernels were loaded (null for CPU tensors, which only reach the launch hook)
};

// Plans by call signature. Replaced plans stay alive (in `all_plans`): a pending backward may hold one.
std::unordered_map<std::string, const Plan*> plans;
std::deque<Plan> all_plans;

// A call's signature: every tensor's shape, strides, dtype and device, then the call's other values.
std::string signature(std::initializer_list<const at::Tensor*> tensors, std::initializer_list<int64_t> values) {
  std::string key;
  key.reserve(320);
  const auto put = [&key](int64_t value) { key.append(reinterpret_cast<const char*>(&value), sizeof value); };
  for (const at::Tensor* t : tensors) {
    put(t->dim());
    for (const int64_t size : t->sizes()) put(size);
    for (const int64_t stride : t->strides()) put(stride);
    put(static_cast<int64_t>(t->scalar_type()));
    put(static_cast<int64_t>(t->device().type()));
    put(t->device().index());
  }
  for (const int64_t value : values) put(value);
  return key;
}

std::string signature(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator, int64_t dim,
                      int64_t out_code) {
  return signature({&x, &numerator, &denominator}, {dim, out_code});
}

// New tensors (new_like: t's sizes and strides, t dense) straight from the CUDA caching
// allocator as inductor's generated code allocates: through the dispatcher, empty_like costs a few
// µs of host time per tensor, and a backward call makes four (docs/BENCHMARKS.md, step 30).
at::Tensor new_tensor(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype, const at::Tensor& on) {
  if (!on.is_cuda()) return at::empty_strided(sizes, strides, on.options().dtype(dtype));  // launch-hook tests
  return at::detail::empty_strided_cuda(sizes, strides, dtype, on.device());
}

at::Tensor new_like(const at::Tensor& t, at::ScalarType dtype) { return new_tensor(t.sizes(), t.strides(), dtype, t); }

bool aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The gradient as a backward kernel was built for: in dtype, with x's strides, 16-byte aligned.
at::Tensor kernel_grad(const at::Tensor& grad_in, const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor grad = grad_in.scalar_type() == dtype ? grad_in : grad_in.to(dtype);
  if (grad.strides() != x.strides() || !aligned(grad)) grad = at::empty_like(x, grad.options()).copy_(grad);
  return grad;
}

CUstream current_stream(const at::Tensor& t) {
  if (!t.is_cuda()) return nullptr;  // CPU tensors only reach the launch hook
  return reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

// What the Python path's _launch_forward and _launch_backward do, for a registered plan.
at::Tensor run_forward(const Plan& plan, const at::Tensor& x_in, const at::Tensor& numerator,
                       const at::Tensor& denominator) {
  const c10::DeviceGuard guard(x_in.device());
  ensure_context(plan.context);
  const at::Tensor x = plan.dense ? x_in : x_in.contiguous();
  at::Tensor y = new_like(x, plan.out_dtype);
  plan.forward.launch({&x, &y, &numerator, &denominator}, current_stream(x));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const Plan& plan, const at::Tensor& grad_in,
                                                            const at::Tensor& x_in, const at::Tensor& numerator,
                                                            const at::Tensor& denominator) {
  const c10::DeviceGuard guard(x_in.device());
  ensure_context(plan.context);
  const at::Tensor x = plan.dense ? x_in : x_in.contiguous();
  const at::Tensor grad = kernel_grad(grad_in, x, plan.out_dtype);
  at::Tensor dx = new_like(x, x.scalar_type());
  at::Tensor d_numerator = new_like(numerator, numerator.scalar_type());
  at::Tensor d_denominator = new_like(denominator, denominator.scalar_type());
  at::Tensor partials = new_tensor({plan.partials}, {1}, at::kDouble, x);
  const CUstream stream = current_stream(x);
  plan.backward.launch({&x, &grad, &dx, &numerator, &denominator, &partials}, stream);
  plan.reduce.launch({&partials, &numerator, &d_numerator, &denominator, &d_denominator}, stream);
  return {dx, d_numerator, d_denominator};
}

// The registered plan of this call, if its tensors are 16-byte aligned (what the kernels were
// specialised on); else null, and the caller takes the Python path.
const Plan* find_plan(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator, int64_t dim,
                      int64_t out_code) {
  const auto found = plans.find(signature(x, numerator, denominator, dim, out_code));
  if (found == plans.end() || !aligned(x) || !aligned(numerator) || !aligned(denominator)) return nullptr;
  return found->second;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct GroupRationalFunction : public torch::autograd::Function<GroupRationalFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& numerator,
                            const at::Tensor& denominator, int64_t plan_address) {
    ctx->save_for_backward({x, numerator, denominator});
    ctx->saved_data["plan"] = plan_address;
    return run_forward(*reinterpret_cast<const Plan*>(plan_address), x, numerator, denominator);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Plan& plan = *reinterpret_cast<const Plan*>(ctx->saved_data["plan"].toInt());
    const variable_list saved = ctx->get_saved_variables();
    auto [dx, d_numerator, d_denominator] = run_backward(plan, grads[0], saved[0], saved[1], saved[2]);
    return {dx, d_numerator, d_denominator, at::Tensor()};
  }
};

// Eager calls: F(x) with autograd (one C++ node), or None without a plan. The lookup holds the
// GIL (which guards `plans`); like torch's own bindings, the work after it runs without.
py::object forward(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator, int64_t dim,
                   int64_t out_code) {
  const Plan* plan = find_plan(x, numerator, denominator, dim, out_code);
  if (plan == nullptr) return py::none();
  at::Tensor y;
  {
    const py::gil_scoped_release no_gil;
    y = GroupRationalFunction::apply(x, numerator, denominator, reinterpret_cast<int64_t>(plan));
  }
  return py::cast(y);
}

// The registered operators' CUDA kernels (what compiled graphs call): launches only, or None.
py::object launch_forward(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator,
                          int64_t dim, int64_t out_code) {
  const Plan* plan = find_plan(x, numerator, denominator, dim, out_code);
  if (plan == nullptr) return py::none();
  at::Tensor y;
  {
    const py::gil_scoped_release no_gil;
    y = run_forward(*plan, x, numerator, denominator);
  }
  return py::cast(y);
}

py::object launch_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& numerator,
                           const at::Tensor& denominator, int64_t dim) {
  const Plan* plan = find_plan(x, numerator, denominator, dim, -1);
  if (plan == nullptr || grad.scalar_type() != plan->out_dtype) return py::none();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  {
    const py::gil_scoped_release no_gil;
    grads = run_backward(*plan, grad, x, numerator, denominator);
  }
  return py::cast(grads);
}

// LayerNorm + group-rational (flashkat/ops/layer_norm_group_rational.py): the same for its three
// kernels. Forward: x (contiguous), weight, bias, numerator, denominator -> y, mean, rstd;
// backward: dx and the four parameters' gradients, from the backward kernel's partial sums.
struct LayerNormPlan {
  Kernel forward, backward, reduce;
  at::ScalarType out_dtype, stats_dtype;
  int64_t partials, programs;
  CUcontext context;
};

std::unordered_map<std::string, const LayerNormPlan*> layer_norm_plans;
std::deque<LayerNormPlan> all_layer_norm_plans;

std::string layer_norm_signature(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& numerator, const at::Tensor& denominator, double eps,
                                 int64_t out_code) {
  int64_t eps_bits;
  std::memcpy(&eps_bits, &eps, sizeof eps);
  return signature({&x, &weight, &bias, &numerator, &denominator}, {eps_bits, out_code});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_layer_norm_forward(const LayerNormPlan& plan, const at::Tensor& x,
                                                                      const at::Tensor& weight, const at::Tensor& bias,
                                                                      const at::Tensor& numerator,
                                                                      const at::Tensor& denominator) {
  const c10::DeviceGuard guard(x.device());
  ensure_context(plan.context);
  const int64_t rows = x.numel() / x.size(-1);
  at::Tensor y = new_like(x, plan.out_dtype);
  at::Tensor mean = new_tensor({rows}, {1}, plan.stats_dtype, x);
  at::Tensor rstd = new_tensor({rows}, {1}, plan.stats_dtype, x);
  plan.forward.launch({&x, &weight, &bias, &numerator, &denominator, &y, &mean, &rstd}, current_stream(x));
  return {y, mean, rstd};
}

variable_list run_layer_norm_backward(const LayerNormPlan& plan, const at::Tensor& grad_in, const at::Tensor& x,
                                      const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& numerator,
                                      const at::Tensor& denominator, const at::Tensor& mean, const at::Tensor& rstd) {
  const c10::DeviceGuard guard(x.device());
  ensure_context(plan.context);
  const at::Tensor grad = kernel_grad(grad_in, x, plan.out_dtype);
  const int64_t channels = x.size(-1);
  at::Tensor dx = new_like(x, x.scalar_type());
  at::Tensor partials = new_tensor({plan.partials}, {1}, at::kDouble, x);
  at::Tensor affine = new_tensor({plan.programs, 2, channels}, {2 * channels, channels, 1}, at::kFloat, x);
  at::Tensor d_weight = new_like(weight, weight.scalar_type());
  at::Tensor d_bias = new_like(bias, bias.scalar_type());
  at::Tensor d_numerator = new_like(numerator, numerator.scalar_type());
  at::Tensor d_denominator = new_like(denominator, denominator.scalar_type());
  const CUstream stream = current_stream(x);
  plan.backward.launch({&x, &grad, &weight, &bias, &numerator, &denominator, &mean, &rstd, &dx, &partials, &affine},
                       stream);
  plan.reduce.launch({&partials, &numerator, &d_numerator, &denominator, &d_denominator, &affine, &d_weight, &d_bias},
                     stream);
  return {dx, d_weight, d_bias, d_numerator, d_denominator};
}

struct LayerNormGroupRationalFunction : public torch::autograd::Function<LayerNormGroupRationalFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& numerator, const at::Tensor& denominator, int64_t plan_address) {
    const auto& plan = *reinterpret_cast<const LayerNormPlan*>(plan_address);
    auto [y, mean, rstd] = run_layer_norm_forward(plan, x, weight, bias, numerator, denominator);
    ctx->save_for_backward({x, weight, bias, numerator, denominator, mean, rstd});
    ctx->saved_data["plan"] = plan_address;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& plan = *reinterpret_cast<const LayerNormPlan*>(ctx->saved_data["plan"].toInt());
    const variable_list s = ctx->get_saved_variables();
    variable_list result = run_layer_norm_backward(plan, grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
    result.push_back(at::Tensor());
    return result;
  }
};

// The registered plan of a call, if x is contiguous and every tensor 16-byte aligned (what the
// kernels were built for); else null, and the caller takes the Python path.
const LayerNormPlan* find_layer_norm_plan(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                          const at::Tensor& numerator, const at::Tensor& denominator, double eps,
                                          int64_t out_code) {
  const auto found = layer_norm_plans.find(layer_norm_signature(x, weight, bias, numerator, denominator, eps, out_code));
  if (found == layer_norm_plans.end() || !x.is_contiguous()) return nullptr;
  for (const at::Tensor* t : {&x, &weight, &bias, &numerator, &denominator}) {
    if (!aligned(*t)) return nullptr;
  }
  return found->second;
}

// Eager calls of F(LayerNorm(x)) with autograd, or None without a plan.
py::object layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& numerator, const at::Tensor& denominator, double eps, int64_t out_code) {
  const LayerNormPlan* plan = find_layer_norm_plan(x, weight, bias, numerator, denominator, eps, out_code);
  if (plan == nullptr) return py::none();
  at::Tensor y;
  {
    const py::gil_scoped_release no_gil;
    y = LayerNormGroupRationalFunction::apply(x, weight, bias, numerator, denominator, reinterpret_cast<int64_t>(plan));
  }
  return py::cast(y);
}

// The fused op's operators' CUDA kernels (what compiled graphs call): launches only, or None.
py::object layer_norm_launch_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& numerator, const at::Tensor& denominator, double eps,
                                     int64_t out_code) {
  const LayerNormPlan* plan = find_layer_norm_plan(x, weight, bias, numerator, denominator, eps, out_code);
  if (plan == nullptr) return py::none();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs;
  {
    const py::gil_scoped_release no_gil;
    outputs = run_layer_norm_forward(*plan, x, weight, bias, numerator, denominator);
  }
  return py::cast(outputs);
}

// The backward operator knows the output dtype only from the gradient (grad_code, its dtype's
// out code): a plan registered for that dtype (out_dtype named), else for x's own (out_dtype None).
py::object layer_norm_launch_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bias, const at::Tensor& numerator,
                                      const at::Tensor& denominator, const at::Tensor& mean, const at::Tensor& rstd,
                                      double eps, int64_t grad_code) {
  const LayerNormPlan* plan = find_layer_norm_plan(x, weight, bias, numerator, denominator, eps, grad_code);
  if (plan == nullptr) plan = find_layer_norm_plan(x, weight, bias, numerator, denominator, eps, -1);
  if (plan == nullptr || grad.scalar_type() != plan->out_dtype || !aligned(mean) || !aligned(rstd)) return py::none();
  variable_list grads;
  {
    const py::gil_scoped_release no_gil;
    grads = run_layer_norm_backward(*plan, grad, x, weight, bias, numerator, denominator, mean, rstd);
  }
  return py::cast(std::make_tuple(grads[0], grads[1], grads[2], grads[3], grads[4]));
}

Kernel to_kernel(const py::tuple& spec) {
  Kernel kernel;
  kernel.function = reinterpret_cast<CUfunction>(spec[0].cast<uint64_t>());
  const auto grid = spec[1].cast<std::vector<unsigned>>();
  TORCH_CHECK(grid.size() == 3, "flashkat native: a grid has 3 dimensions");
  std::copy(grid.begin(), grid.end(), kernel.grid);
  kernel.threads = spec[2].cast<unsigned>();
  kernel.shared = spec[3].cast<unsigned>();
  kernel.pdl = spec[4].cast<bool>();
  for (const auto& item : spec[5].cast<py::list>()) {
    const auto param = item.cast<py::tuple>();
    const auto kind = param[0].cast<std::string>();
    TORCH_CHECK(kind.size() == 1 && std::string("tilfd").find(kind[0]) != std::string::npos,
                "flashkat native: unknown parameter kind ", kind);
    kernel.params.push_back({kind[0], param[1].cast<int64_t>(), param[2].cast<double>()});
  }
  TORCH_CHECK(kernel.params.size() <= kMaxParams, "flashkat native: too many kernel parameters");
  return kernel;
}

// The context a plan's kernels were loaded into: the current one when x is on a GPU (null on the
// CPU, where only the launch hook runs them).
CUcontext registration_context(const at::Tensor& x) {
  const CUcontext context = x.is_cuda() ? current_context() : nullptr;
  TORCH_CHECK(!x.is_cuda() || context != nullptr, "flashkat native: no current CUDA context at registration");
  return context;
}

void register_plan(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator, int64_t dim,
                   int64_t out_code, at::ScalarType out_dtype, bool dense, int64_t partials, const py::tuple& forward_spec,
                   const py::tuple& backward_spec, const py::tuple& reduce_spec) {
  const CUcontext context = registration_context(x);
  all_plans.push_back(Plan{to_kernel(forward_spec), to_kernel(backward_spec), to_kernel(reduce_spec), out_dtype, dense,
                           partials, context});
  plans[signature(x, numerator, denominator, dim, out_code)] = &all_plans.back();
}

void register_layer_norm_plan(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& numerator, const at::Tensor& denominator, double eps, int64_t out_code,
                              at::ScalarType out_dtype, at::ScalarType stats_dtype, int64_t partials, int64_t programs,
                              const py::tuple& forward_spec, const py::tuple& backward_spec,
                              const py::tuple& reduce_spec) {
  const CUcontext context = registration_context(x);
  all_layer_norm_plans.push_back(LayerNormPlan{to_kernel(forward_spec), to_kernel(backward_spec),
                                               to_kernel(reduce_spec), out_dtype, stats_dtype, partials, programs,
                                               context});
  layer_norm_plans[layer_norm_signature(x, weight, bias, numerator, denominator, eps, out_code)] =
      &all_layer_norm_plans.back();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "F(x) with autograd through a registered plan, or None");
  m.def("launch_forward", &launch_forward, "F(x) through a registered plan (no autograd), or None");
  m.def("launch_backward", &launch_backward, "(dx, d numerator, d denominator) through a registered plan, or None");
  m.def("register_plan", &register_plan, "register the compiled kernels of one call signature");
  m.def("layer_norm_forward", &layer_norm_forward, "F(LayerNorm(x)) with autograd through a registered plan, or None");
  m.def("layer_norm_launch_forward", &layer_norm_launch_forward,
        "(y, mean, rstd) through a registered plan (no autograd), or None");
  m.def("layer_norm_launch_backward", &layer_norm_launch_backward,
        "(dx, d weight, d bias, d numerator, d denominator) through a registered plan, or None");
  m.def("register_layer_norm_plan", &register_layer_norm_plan, "register the fused op's kernels of one call signature");
  m.def(
      "clear",
      [] {
        plans.clear();
        layer_norm_plans.clear();
      },
      "forget every plan (kept alive for pending backwards)");
  m.def("plan_count", [] { return plans.size() + layer_norm_plans.size(); });
  m.def(
      "set_launch_hook",
      [](const py::object& hook) {
        Py_XDECREF(launch_hook);
        launch_hook = hook.is_none() ? nullptr : hook.inc_ref().ptr();
      },
      "tests: call hook(function, grid, tensors, parameter cells) instead of launching (None: launch)");
}
