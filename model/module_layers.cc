#include "model/module_layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/module_version.h"

namespace modelstate {
namespace {

using ModuleOr = absl::StatusOr<std::shared_ptr<Module>>;

// ---- Shared pieces of several layers ----

// nn.Linear's weight [out, in] and bias [out] (None when switched off), both
// kaiming-uniform with fan_in = in.
absl::Status AddLinear(Module* module, Initializer& init, DType dtype,
                       int64_t in, int64_t out, bool bias) {
  ASSIGN_OR_RETURN(Tensor weight, init.KaimingUniform(dtype, {out, in}, in));
  RETURN_IF_ERROR(module->AddParameter("weight", std::move(weight)));
  if (!bias) return module->AddParameter("bias", absl::nullopt);
  ASSIGN_OR_RETURN(Tensor b, init.KaimingUniform(dtype, {out}, in));
  return module->AddParameter("bias", std::move(b));
}

// The affine parameters of normalisation layers: weight of ones and bias of
// zeros, each registered as None when switched off (torch's `affine`,
// `elementwise_affine`, `bias`).
absl::Status AddAffine(Module* module, Initializer& init, DType dtype,
                       const Shape& shape, bool weight, bool bias) {
  absl::optional<Tensor> w, b;
  if (weight) {
    ASSIGN_OR_RETURN(w, init.Filled(dtype, shape, 1));
  }
  if (bias) {
    ASSIGN_OR_RETURN(b, init.Filled(dtype, shape, 0));
  }
  RETURN_IF_ERROR(module->AddParameter("weight", std::move(w)));
  return module->AddParameter("bias", std::move(b));
}

// Builds the layer of torch class `type` from a spec the caller made (a
// composite layer's parts), at `path` and with `parent`'s dtype and generator.
ModuleOr BuildPart(const char* type, const SpecJson& spec,
                   const std::string& path, const LayerContext& parent) {
  return BuildLayer(*FindLayerRow(type), spec, path, parent.dtype, parent.init,
                    parent.nested);
}

// ---- One factory per torch.nn class (or family) ----

ModuleOr BuildLinear(const LayerContext& layer) {
  ASSIGN_OR_RETURN(int64_t in, layer.args.Int("in_features"));
  ASSIGN_OR_RETURN(int64_t out, layer.args.Int("out_features"));
  ASSIGN_OR_RETURN(bool bias, layer.args.Bool("bias", true));
  if (in < 0 || out < 0)
    return SpecError(layer.path(), "features must be non-negative");
  auto module = std::make_shared<Module>(layer.type);
  RETURN_IF_ERROR(
      AddLinear(module.get(), layer.init, layer.dtype, in, out, bias));
  return module;
}

// Convolution geometry (stride, padding, dilation, output_padding) changes no
// tensor, but is validated for what it is.
absl::Status CheckConvGeometry(const SpecArgs& args, size_t rank) {
  for (const char* name : {"stride", "dilation", "output_padding"}) {
    if (args.Find(name) != nullptr)
      RETURN_IF_ERROR(args.IntTuple(name, rank).status());
  }
  if (const SpecJson* padding = args.Find("padding");
      padding != nullptr && !padding->is_string()) {
    RETURN_IF_ERROR(args.IntTuple("padding", rank).status());
  }
  return absl::OkStatus();
}

// _ConvNd's fan_in: weight.shape[1] times the kernel's elements.
absl::StatusOr<int64_t> ConvFanIn(const std::string& path,
                                  const Shape& weight_shape,
                                  const Shape& kernel) {
  int64_t fan_in = weight_shape[1];
  for (int64_t k : kernel) {
    if (__builtin_mul_overflow(fan_in, k, &fan_in)) {
      return SpecError(path,
                       "fan-in (channels per group times kernel_size) "
                       "overflows int64");
    }
  }
  return fan_in;
}

ModuleOr BuildConvNd(const LayerContext& layer, size_t rank, bool transposed) {
  const SpecArgs& args = layer.args;
  ASSIGN_OR_RETURN(int64_t in, args.Int("in_channels"));
  ASSIGN_OR_RETURN(int64_t out, args.Int("out_channels"));
  ASSIGN_OR_RETURN(Shape kernel, args.IntTuple("kernel_size", rank));
  ASSIGN_OR_RETURN(int64_t groups, args.Int("groups", 1));
  ASSIGN_OR_RETURN(bool bias, args.Bool("bias", true));
  RETURN_IF_ERROR(CheckConvGeometry(args, rank));
  if (groups <= 0)
    return SpecError(layer.path(), "groups must be a positive integer");
  if (in % groups != 0)
    return SpecError(layer.path(), "in_channels must be divisible by groups");
  if (out % groups != 0)
    return SpecError(layer.path(), "out_channels must be divisible by groups");
  Shape weight_shape =
      transposed ? Shape{in, out / groups} : Shape{out, in / groups};
  weight_shape.insert(weight_shape.end(), kernel.begin(), kernel.end());
  ASSIGN_OR_RETURN(int64_t fan_in,
                   ConvFanIn(layer.path(), weight_shape, kernel));
  auto module = std::make_shared<Module>(layer.type);
  ASSIGN_OR_RETURN(Tensor weight, layer.init.KaimingUniform(
                                      layer.dtype, weight_shape, fan_in));
  RETURN_IF_ERROR(module->AddParameter("weight", std::move(weight)));
  absl::optional<Tensor> b;
  if (bias) {
    ASSIGN_OR_RETURN(b, layer.init.KaimingUniform(layer.dtype, {out}, fan_in));
  }
  RETURN_IF_ERROR(module->AddParameter("bias", std::move(b)));
  return module;
}

template <size_t kRank, bool kTransposed>
ModuleOr BuildConv(const LayerContext& layer) {
  return BuildConvNd(layer, kRank, kTransposed);
}

ModuleOr BuildBatchNorm(const LayerContext& layer) {
  const SpecArgs& args = layer.args;
  ASSIGN_OR_RETURN(int64_t c, args.Int("num_features"));
  ASSIGN_OR_RETURN(bool affine, args.Bool("affine", true));
  ASSIGN_OR_RETURN(bool track, args.Bool("track_running_stats", true));
  RETURN_IF_ERROR(args.Number("eps", 1e-5).status());
  if (const SpecJson* momentum = args.Find("momentum");
      momentum != nullptr && !momentum->is_number()) {
    return SpecError(layer.path(), "\"momentum\" must be a number or null");
  }
  auto module =
      std::make_shared<Module>(layer.type, TorchModuleVersion(layer.type));
  RETURN_IF_ERROR(
      AddAffine(module.get(), layer.init, layer.dtype, {c}, affine, affine));
  // Without track_running_stats torch registers the three buffers as None.
  absl::optional<Tensor> mean, var, count;
  if (track) {
    ASSIGN_OR_RETURN(mean, layer.init.Filled(layer.dtype, {c}, 0));
    ASSIGN_OR_RETURN(var, layer.init.Filled(layer.dtype, {c}, 1));
    ASSIGN_OR_RETURN(count, layer.init.Zeros(DType::kInt64, {}));
  }
  RETURN_IF_ERROR(module->AddBuffer("running_mean", std::move(mean)));
  RETURN_IF_ERROR(module->AddBuffer("running_var", std::move(var)));
  RETURN_IF_ERROR(module->AddBuffer("num_batches_tracked", std::move(count)));
  return module;
}

ModuleOr BuildLayerNorm(const LayerContext& layer) {
  ASSIGN_OR_RETURN(Shape shape, layer.args.IntList("normalized_shape"));
  ASSIGN_OR_RETURN(bool affine, layer.args.Bool("elementwise_affine", true));
  ASSIGN_OR_RETURN(bool bias, layer.args.Bool("bias", true));
  RETURN_IF_ERROR(layer.args.Number("eps", 1e-5).status());
  auto module = std::make_shared<Module>(layer.type);
  RETURN_IF_ERROR(AddAffine(module.get(), layer.init, layer.dtype, shape,
                            affine, affine && bias));
  return module;
}

ModuleOr BuildGroupNorm(const LayerContext& layer) {
  ASSIGN_OR_RETURN(int64_t groups, layer.args.Int("num_groups"));
  ASSIGN_OR_RETURN(int64_t channels, layer.args.Int("num_channels"));
  ASSIGN_OR_RETURN(bool affine, layer.args.Bool("affine", true));
  RETURN_IF_ERROR(layer.args.Number("eps", 1e-5).status());
  if (groups <= 0 || channels % groups != 0) {
    return SpecError(layer.path(),
                     "num_channels must be divisible by num_groups");
  }
  auto module = std::make_shared<Module>(layer.type);
  RETURN_IF_ERROR(AddAffine(module.get(), layer.init, layer.dtype, {channels},
                            affine, affine));
  return module;
}

ModuleOr BuildEmbedding(const LayerContext& layer) {
  ASSIGN_OR_RETURN(int64_t num, layer.args.Int("num_embeddings"));
  ASSIGN_OR_RETURN(int64_t dim, layer.args.Int("embedding_dim"));
  ASSIGN_OR_RETURN(absl::optional<int64_t> padding_idx,
                   layer.args.OptionalInt("padding_idx"));
  if (padding_idx) {
    // `num` may be negative (the tensor allocation rejects it later); the
    // first test keeps -num from being evaluated for INT64_MIN.
    if (*padding_idx >= num || *padding_idx < -num) {
      return SpecError(layer.path(),
                       "padding_idx must be within num_embeddings");
    }
    if (*padding_idx < 0) *padding_idx += num;
  }
  // torch draws the whole weight from N(0, 1), then zeroes the padding row.
  std::function<void(float*)> zero_padding;
  if (padding_idx) {
    zero_padding = [&](float* data) {
      std::fill_n(data + *padding_idx * dim, dim, 0.0f);
    };
  }
  ASSIGN_OR_RETURN(Tensor weight, layer.init.Normal(layer.dtype, {num, dim}, 0,
                                                    1, zero_padding));
  auto module = std::make_shared<Module>(layer.type);
  RETURN_IF_ERROR(module->AddParameter("weight", std::move(weight)));
  return module;
}

// MultiheadAttention's input projections: one packed in_proj_weight [3E, E]
// when keys and values have the query's size, else separate q/k/v weights;
// the other form is registered as None.
absl::Status AddAttentionProjections(Module* module, Initializer& init,
                                     DType dtype, int64_t e, int64_t three_e,
                                     int64_t kdim, int64_t vdim) {
  if (kdim == e && vdim == e) {
    ASSIGN_OR_RETURN(Tensor in_proj, init.XavierUniform(dtype, {three_e, e}));
    RETURN_IF_ERROR(module->AddParameter("in_proj_weight", std::move(in_proj)));
    for (const char* name :
         {"q_proj_weight", "k_proj_weight", "v_proj_weight"}) {
      RETURN_IF_ERROR(module->AddParameter(name, absl::nullopt));
    }
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(Tensor q, init.XavierUniform(dtype, {e, e}));
  ASSIGN_OR_RETURN(Tensor k, init.XavierUniform(dtype, {e, kdim}));
  ASSIGN_OR_RETURN(Tensor v, init.XavierUniform(dtype, {e, vdim}));
  RETURN_IF_ERROR(module->AddParameter("q_proj_weight", std::move(q)));
  RETURN_IF_ERROR(module->AddParameter("k_proj_weight", std::move(k)));
  RETURN_IF_ERROR(module->AddParameter("v_proj_weight", std::move(v)));
  return module->AddParameter("in_proj_weight", absl::nullopt);
}

// out_proj is a Linear whose bias torch resets to zeros.
absl::Status AddAttentionOutput(Module* module, Initializer& init, DType dtype,
                                int64_t e, bool bias) {
  auto out_proj = std::make_shared<Module>("NonDynamicallyQuantizableLinear");
  RETURN_IF_ERROR(AddLinear(out_proj.get(), init, dtype, e, e, bias));
  if (bias) {
    ASSIGN_OR_RETURN(Tensor zeros, init.Filled(dtype, {e}, 0));
    out_proj->SetTensor(TensorKind::kParameter, 1, std::move(zeros));
  }
  return module->AddChild("out_proj", std::move(out_proj));
}

ModuleOr BuildMultiheadAttention(const LayerContext& layer) {
  const SpecArgs& args = layer.args;
  ASSIGN_OR_RETURN(int64_t e, args.Int("embed_dim"));
  ASSIGN_OR_RETURN(int64_t heads, args.Int("num_heads"));
  ASSIGN_OR_RETURN(bool bias, args.Bool("bias", true));
  ASSIGN_OR_RETURN(bool add_bias_kv, args.Bool("add_bias_kv", false));
  ASSIGN_OR_RETURN(int64_t kdim, args.Int("kdim", e));
  ASSIGN_OR_RETURN(int64_t vdim, args.Int("vdim", e));
  if (heads <= 0 || e % heads != 0)
    return SpecError(layer.path(), "embed_dim must be divisible by num_heads");
  int64_t three_e;
  if (__builtin_mul_overflow(int64_t{3}, e, &three_e))
    return SpecError(layer.path(), "3 * embed_dim overflows int64");
  auto module = std::make_shared<Module>(layer.type);
  RETURN_IF_ERROR(AddAttentionProjections(module.get(), layer.init, layer.dtype,
                                          e, three_e, kdim, vdim));
  absl::optional<Tensor> in_bias;
  if (bias) {
    ASSIGN_OR_RETURN(in_bias, layer.init.Filled(layer.dtype, {three_e}, 0));
  }
  RETURN_IF_ERROR(module->AddParameter("in_proj_bias", std::move(in_bias)));
  RETURN_IF_ERROR(
      AddAttentionOutput(module.get(), layer.init, layer.dtype, e, bias));
  if (add_bias_kv) {
    // xavier_normal_ on [1, 1, E]: std = sqrt(2 / (E + E)).
    const double stddev = std::sqrt(1.0 / static_cast<double>(e));
    ASSIGN_OR_RETURN(Tensor bias_k,
                     layer.init.Normal(layer.dtype, {1, 1, e}, 0, stddev));
    ASSIGN_OR_RETURN(Tensor bias_v,
                     layer.init.Normal(layer.dtype, {1, 1, e}, 0, stddev));
    RETURN_IF_ERROR(module->AddParameter("bias_k", std::move(bias_k)));
    RETURN_IF_ERROR(module->AddParameter("bias_v", std::move(bias_v)));
  }
  return module;
}

// A Linear child built without a spec (a composite layer's part).
absl::Status AddLinearChild(Module* module, const char* name,
                            const LayerContext& layer, int64_t in, int64_t out,
                            bool bias) {
  auto linear = std::make_shared<Module>("Linear");
  RETURN_IF_ERROR(
      AddLinear(linear.get(), layer.init, layer.dtype, in, out, bias));
  return module->AddChild(name, std::move(linear));
}

ModuleOr BuildTransformerEncoderLayer(const LayerContext& layer) {
  const std::string& path = layer.path();
  ASSIGN_OR_RETURN(int64_t d_model, layer.args.Int("d_model"));
  ASSIGN_OR_RETURN(int64_t nhead, layer.args.Int("nhead"));
  ASSIGN_OR_RETURN(int64_t ff, layer.args.Int("dim_feedforward", 2048));
  ASSIGN_OR_RETURN(bool bias, layer.args.Bool("bias", true));
  auto module = std::make_shared<Module>(layer.type);
  const SpecJson attention = {
      {"embed_dim", d_model}, {"num_heads", nhead}, {"bias", bias}};
  ASSIGN_OR_RETURN(auto self_attn,
                   BuildPart("MultiheadAttention", attention,
                             ChildPath(path, "self_attn"), layer));
  RETURN_IF_ERROR(module->AddChild("self_attn", std::move(self_attn)));
  RETURN_IF_ERROR(
      AddLinearChild(module.get(), "linear1", layer, d_model, ff, bias));
  RETURN_IF_ERROR(
      module->AddChild("dropout", std::make_shared<Module>("Dropout")));
  RETURN_IF_ERROR(
      AddLinearChild(module.get(), "linear2", layer, ff, d_model, bias));
  const SpecJson norm = {{"normalized_shape", d_model}, {"bias", bias}};
  for (const char* name : {"norm1", "norm2"}) {
    ASSIGN_OR_RETURN(auto layer_norm, BuildPart("LayerNorm", norm,
                                                ChildPath(path, name), layer));
    RETURN_IF_ERROR(module->AddChild(name, std::move(layer_norm)));
  }
  for (const char* name : {"dropout1", "dropout2"}) {
    RETURN_IF_ERROR(
        module->AddChild(name, std::make_shared<Module>("Dropout")));
  }
  return module;
}

// Sequential (array or object), ModuleList (array), ModuleDict (object).
ModuleOr BuildContainer(const LayerContext& layer) {
  const std::string& path = layer.path();
  auto module = std::make_shared<Module>(layer.type);
  const SpecJson* modules = layer.args.Find("modules");
  if (modules == nullptr) return module;
  if (modules->is_array()) {
    if (layer.type == "ModuleDict")
      return SpecError(path, "ModuleDict \"modules\" must be an object");
    for (size_t i = 0; i < modules->size(); ++i) {
      const std::string name = std::to_string(i);
      ASSIGN_OR_RETURN(ModulePtr child,
                       layer.nested.BuildNested(
                           (*modules)[i], ChildPath(path, name), layer.dtype));
      RETURN_IF_ERROR(module->AddChild(name, std::move(child)));
    }
  } else if (modules->is_object()) {
    if (layer.type == "ModuleList")
      return SpecError(path, "ModuleList \"modules\" must be an array");
    for (auto it = modules->begin(); it != modules->end(); ++it) {
      absl::Status name_ok = ValidateMemberName(it.key());
      if (!name_ok.ok()) return SpecError(path, name_ok.message());
      ASSIGN_OR_RETURN(ModulePtr child,
                       layer.nested.BuildNested(
                           it.value(), ChildPath(path, it.key()), layer.dtype));
      RETURN_IF_ERROR(module->AddChild(it.key(), std::move(child)));
    }
  } else {
    return SpecError(path, "\"modules\" must be an array or an object");
  }
  return module;
}

// Activations, dropout, pooling, ...: arguments are checked, no tensors.
ModuleOr BuildParameterless(const LayerContext& layer) {
  return std::make_shared<Module>(layer.type);
}

// ---- The generic "Module": parameters, buffers and children spelled out ----

// Reports a tensor allocation error at the tensor spec's path.
absl::StatusOr<Tensor> AtPath(const std::string& path,
                              absl::StatusOr<Tensor> tensor) {
  if (!tensor.ok()) return SpecError(path, tensor.status().message());
  return tensor;
}

// Draws the values of a generic tensor spec's `init` (default "zeros").
absl::StatusOr<Tensor> InitGenericTensor(const SpecArgs& args, DType dtype,
                                         const Shape& shape,
                                         Initializer& init) {
  const std::string& path = args.path();
  std::string kind = "zeros";
  if (const SpecJson* v = args.Find("init"); v != nullptr) {
    if (!v->is_string()) return SpecError(path, "\"init\" must be a string");
    kind = v->get<std::string>();
  }
  if (kind == "zeros") return AtPath(path, init.Zeros(dtype, shape));
  if (kind == "ones") return AtPath(path, init.Filled(dtype, shape, 1));
  if (kind == "constant") {
    ASSIGN_OR_RETURN(double value, args.Number("value", 0));
    return AtPath(path, init.Filled(dtype, shape, value));
  }
  if (kind == "uniform") {
    ASSIGN_OR_RETURN(double low, args.Number("low", 0));
    ASSIGN_OR_RETURN(double high, args.Number("high", 1));
    return AtPath(path, init.Uniform(dtype, shape, low, high));
  }
  if (kind == "normal") {
    ASSIGN_OR_RETURN(double mean, args.Number("mean", 0));
    ASSIGN_OR_RETURN(double stddev, args.Number("std", 1));
    return AtPath(path, init.Normal(dtype, shape, mean, stddev));
  }
  return SpecError(path,
                   absl::StrCat("unknown init \"", kind,
                                "\" (zeros, ones, constant, uniform, normal)"));
}

// A tensor spec {"shape", "dtype", "init", ...} at `path`, in a module of
// dtype `module_dtype`.
absl::StatusOr<Tensor> GenericTensor(const SpecJson& spec,
                                     const std::string& path,
                                     DType module_dtype, Initializer& init) {
  if (!spec.is_object())
    return SpecError(path, "a tensor spec must be an object");
  SpecArgs args(
      spec, path,
      {"shape", "init", "value", "low", "high", "mean", "std", "persistent"});
  RETURN_IF_ERROR(args.Check());
  ASSIGN_OR_RETURN(DType dtype, SpecDType(spec, path, module_dtype));
  ASSIGN_OR_RETURN(Shape shape, args.IntList("shape"));
  // "shape": [] is a scalar.
  if (const SpecJson* s = args.Find("shape");
      s != nullptr && s->is_array() && s->empty())
    shape = {};
  for (int64_t d : shape) {
    if (d < 0) return SpecError(path, "shape dimensions must be non-negative");
  }
  return InitGenericTensor(args, dtype, shape, init);
}

// Calls `add(name, value, member_path)` for each member of the object
// `field` ("parameters", "buffers", "children") of the generic module at
// `args.path()`. A name registered twice is InvalidArgument at that path.
template <typename Add>
absl::Status ForEachMember(const SpecArgs& args, const char* field, Add add) {
  const std::string& path = args.path();
  const SpecJson* group = args.Find(field);
  if (group == nullptr) return absl::OkStatus();
  if (!group->is_object())
    return SpecError(path, absl::StrCat("\"", field, "\" must be an object"));
  for (auto it = group->begin(); it != group->end(); ++it) {
    absl::Status name_ok = ValidateMemberName(it.key());
    if (!name_ok.ok()) return SpecError(path, name_ok.message());
    absl::Status added = add(it.key(), it.value(), ChildPath(path, it.key()));
    if (!added.ok()) {
      return added.code() == absl::StatusCode::kAlreadyExists
                 ? SpecError(path, added.message())
                 : added;
    }
  }
  return absl::OkStatus();
}

absl::Status AddGenericParameters(const LayerContext& layer, Module* module) {
  return ForEachMember(
      layer.args, "parameters",
      [&](const std::string& name, const SpecJson& value,
          const std::string& tensor_path) -> absl::Status {
        if (value.is_null()) return module->AddParameter(name, absl::nullopt);
        ASSIGN_OR_RETURN(Tensor tensor, GenericTensor(value, tensor_path,
                                                      layer.dtype, layer.init));
        return module->AddParameter(name, std::move(tensor));
      });
}

absl::Status AddGenericBuffers(const LayerContext& layer, Module* module) {
  return ForEachMember(
      layer.args, "buffers",
      [&](const std::string& name, const SpecJson& value,
          const std::string& tensor_path) -> absl::Status {
        if (value.is_null()) return module->AddBuffer(name, absl::nullopt);
        bool persistent = true;
        if (auto p = value.find("persistent"); p != value.end()) {
          if (!p->is_boolean())
            return SpecError(tensor_path, "\"persistent\" must be a boolean");
          persistent = p->get<bool>();
        }
        ASSIGN_OR_RETURN(Tensor tensor, GenericTensor(value, tensor_path,
                                                      layer.dtype, layer.init));
        return module->AddBuffer(name, std::move(tensor), persistent);
      });
}

absl::Status AddGenericChildren(const LayerContext& layer, Module* module) {
  return ForEachMember(layer.args, "children",
                       [&](const std::string& name, const SpecJson& value,
                           const std::string& child_path) -> absl::Status {
                         if (value.is_null())
                           return module->AddChild(name, nullptr);
                         ASSIGN_OR_RETURN(ModulePtr child,
                                          layer.nested.BuildNested(
                                              value, child_path, layer.dtype));
                         return module->AddChild(name, std::move(child));
                       });
}

// Members register as torch registers them: parameters, then buffers, then
// children, whatever the spec's field order.
ModuleOr BuildGeneric(const LayerContext& layer) {
  std::string class_name = "Module";
  const SpecJson& spec = layer.args.spec();
  if (auto it = spec.find("class_name"); it != spec.end()) {
    if (!it->is_string() || it->get<std::string>().empty()) {
      return SpecError(layer.path(),
                       "\"class_name\" must be a non-empty string");
    }
    class_name = it->get<std::string>();
  }
  ASSIGN_OR_RETURN(int64_t version, layer.args.Int("version", 1));
  auto module = std::make_shared<Module>(class_name, static_cast<int>(version));
  RETURN_IF_ERROR(AddGenericParameters(layer, module.get()));
  RETURN_IF_ERROR(AddGenericBuffers(layer, module.get()));
  RETURN_IF_ERROR(AddGenericChildren(layer, module.get()));
  return module;
}

// ---- The table ----

std::vector<LayerRow> MakeRows() {
  const std::vector<std::string> conv_args = {
      "in_channels", "out_channels", "kernel_size", "stride",      "padding",
      "dilation",    "groups",       "bias",        "padding_mode"};
  const std::vector<std::string> conv_transpose_args = {
      "in_channels", "out_channels",   "kernel_size", "stride",
      "padding",     "output_padding", "groups",      "bias",
      "dilation",    "padding_mode"};
  const std::vector<std::string> batch_norm_args = {
      "num_features", "eps", "momentum", "affine", "track_running_stats"};
  const std::vector<std::string> container_args = {"modules"};
  std::vector<LayerRow> rows = {
      {"Linear", BuildLinear, {"in_features", "out_features", "bias"}},
      {"Conv1d", BuildConv<1, false>, conv_args},
      {"Conv2d", BuildConv<2, false>, conv_args},
      {"Conv3d", BuildConv<3, false>, conv_args},
      {"ConvTranspose1d", BuildConv<1, true>, conv_transpose_args},
      {"ConvTranspose2d", BuildConv<2, true>, conv_transpose_args},
      {"BatchNorm1d", BuildBatchNorm, batch_norm_args},
      {"BatchNorm2d", BuildBatchNorm, batch_norm_args},
      {"BatchNorm3d", BuildBatchNorm, batch_norm_args},
      {"LayerNorm",
       BuildLayerNorm,
       {"normalized_shape", "eps", "elementwise_affine", "bias"}},
      {"GroupNorm",
       BuildGroupNorm,
       {"num_groups", "num_channels", "eps", "affine"}},
      {"Embedding",
       BuildEmbedding,
       {"num_embeddings", "embedding_dim", "padding_idx", "max_norm",
        "norm_type", "scale_grad_by_freq", "sparse"}},
      {"MultiheadAttention",
       BuildMultiheadAttention,
       {"embed_dim", "num_heads", "dropout", "bias", "add_bias_kv",
        "add_zero_attn", "kdim", "vdim", "batch_first"}},
      {"TransformerEncoderLayer",
       BuildTransformerEncoderLayer,
       {"d_model", "nhead", "dim_feedforward", "dropout", "activation",
        "layer_norm_eps", "batch_first", "norm_first", "bias"}},
      {"Sequential", BuildContainer, container_args},
      {"ModuleList", BuildContainer, container_args},
      {"ModuleDict", BuildContainer, container_args},
      {"Module",
       BuildGeneric,
       {"parameters", "buffers", "children", "version"}},
      {"ReLU", BuildParameterless, {"inplace"}},
      {"GELU", BuildParameterless, {"approximate"}},
      {"SiLU", BuildParameterless, {"inplace"}},
      {"Tanh", BuildParameterless, {}},
      {"Sigmoid", BuildParameterless, {}},
      {"Softmax", BuildParameterless, {"dim"}},
      {"Dropout", BuildParameterless, {"p", "inplace"}},
      {"Identity", BuildParameterless, {}},
      {"Flatten", BuildParameterless, {"start_dim", "end_dim"}},
      {"MaxPool2d",
       BuildParameterless,
       {"kernel_size", "stride", "padding", "dilation", "return_indices",
        "ceil_mode"}},
      {"AdaptiveAvgPool2d", BuildParameterless, {"output_size"}},
  };
  std::sort(rows.begin(), rows.end(), [](const LayerRow& a, const LayerRow& b) {
    return a.type < b.type;
  });
  return rows;
}

}  // namespace

const std::vector<LayerRow>& LayerRows() {
  static const auto* rows = new std::vector<LayerRow>(MakeRows());
  return *rows;
}

const LayerRow* FindLayerRow(absl::string_view type) {
  const std::vector<LayerRow>& rows = LayerRows();
  auto it = std::lower_bound(rows.begin(), rows.end(), type,
                             [](const LayerRow& row, absl::string_view t) {
                               return absl::string_view(row.type) < t;
                             });
  return it != rows.end() && it->type == type ? &*it : nullptr;
}

absl::StatusOr<std::shared_ptr<Module>> BuildLayer(
    const LayerRow& row, const SpecJson& spec, const std::string& path,
    DType dtype, Initializer& init, NestedSpecBuilder& nested) {
  SpecArgs args(spec, path, row.arg_names);
  RETURN_IF_ERROR(args.Check());
  return row.build(LayerContext{row.type, args, dtype, init, nested});
}

}  // namespace modelstate
