#include "core/module_factory.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace modelstate {
namespace {

using Json = nlohmann::ordered_json;

absl::Status SpecError(const std::string& path, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(
      "architecture spec", path.empty() ? "" : " at ", path, ": ", message));
}

// The arguments of one module: keyword values, positional "args", and torch's
// parameter names.
class Args {
 public:
  Args(const Json& spec, std::string path, std::vector<std::string> names)
      : spec_(spec), path_(std::move(path)), names_(std::move(names)) {}

  // Checks that every keyword is known and positional args are not too many or
  // repeated.
  absl::Status Check(const std::vector<std::string>& extra_keys = {}) const {
    static const absl::flat_hash_set<std::string> kCommon = {
        "type", "args", "dtype", "device", "class_name"};
    for (auto it = spec_.begin(); it != spec_.end(); ++it) {
      const std::string& key = it.key();
      if (kCommon.contains(key)) continue;
      if (std::find(names_.begin(), names_.end(), key) != names_.end())
        continue;
      if (std::find(extra_keys.begin(), extra_keys.end(), key) !=
          extra_keys.end())
        continue;
      return SpecError(path_, absl::StrCat("unknown argument \"", key, "\""));
    }
    if (spec_.contains("args")) {
      const Json& args = spec_["args"];
      if (!args.is_array())
        return SpecError(path_, "\"args\" must be an array");
      if (args.size() > names_.size()) {
        return SpecError(
            path_, absl::StrCat("takes at most ", names_.size(),
                                " positional arguments, got ", args.size()));
      }
      for (size_t i = 0; i < args.size(); ++i) {
        if (spec_.contains(names_[i])) {
          return SpecError(path_,
                           absl::StrCat("got multiple values for argument \"",
                                        names_[i], "\""));
        }
      }
    }
    return absl::OkStatus();
  }

  // Returns the value of `name`, or null when absent (or given as JSON null).
  const Json* Find(const std::string& name) const {
    auto it = spec_.find(name);
    if (it != spec_.end()) return it->is_null() ? nullptr : &*it;
    if (spec_.contains("args")) {
      const Json& args = spec_["args"];
      for (size_t i = 0; i < args.size() && i < names_.size(); ++i) {
        if (names_[i] == name) return args[i].is_null() ? nullptr : &args[i];
      }
    }
    return nullptr;
  }

  absl::StatusOr<int64_t> Int(const std::string& name) const {
    const Json* value = Find(name);
    if (value == nullptr)
      return SpecError(path_, absl::StrCat("missing argument \"", name, "\""));
    return AsInt(*value, name);
  }
  absl::StatusOr<int64_t> Int(const std::string& name, int64_t fallback) const {
    const Json* value = Find(name);
    return value == nullptr ? fallback : AsInt(*value, name);
  }
  absl::StatusOr<absl::optional<int64_t>> OptionalInt(
      const std::string& name) const {
    const Json* value = Find(name);
    if (value == nullptr) return absl::optional<int64_t>();
    ASSIGN_OR_RETURN(int64_t v, AsInt(*value, name));
    return absl::optional<int64_t>(v);
  }
  absl::StatusOr<bool> Bool(const std::string& name, bool fallback) const {
    const Json* value = Find(name);
    if (value == nullptr) return fallback;
    if (!value->is_boolean())
      return SpecError(path_, absl::StrCat("\"", name, "\" must be a boolean"));
    return value->get<bool>();
  }
  absl::StatusOr<double> Number(const std::string& name,
                                double fallback) const {
    const Json* value = Find(name);
    if (value == nullptr) return fallback;
    if (!value->is_number())
      return SpecError(path_, absl::StrCat("\"", name, "\" must be a number"));
    return value->get<double>();
  }
  // An int or a list of `rank` ints (torch's _pair/_single), e.g. kernel_size.
  absl::StatusOr<Shape> IntTuple(
      const std::string& name, size_t rank,
      absl::optional<int64_t> fallback = absl::nullopt) const {
    const Json* value = Find(name);
    if (value == nullptr) {
      if (!fallback)
        return SpecError(path_,
                         absl::StrCat("missing argument \"", name, "\""));
      return Shape(rank, *fallback);
    }
    if (value->is_array()) {
      if (value->size() != rank) {
        return SpecError(
            path_, absl::StrCat("\"", name, "\" must have ", rank, " values"));
      }
      Shape out;
      for (const Json& v : *value) {
        ASSIGN_OR_RETURN(int64_t i, AsInt(v, name));
        out.push_back(i);
      }
      return out;
    }
    ASSIGN_OR_RETURN(int64_t i, AsInt(*value, name));
    return Shape(rank, i);
  }
  // A shape: an int or a list of ints (LayerNorm's normalized_shape).
  absl::StatusOr<Shape> IntList(const std::string& name) const {
    const Json* value = Find(name);
    if (value == nullptr)
      return SpecError(path_, absl::StrCat("missing argument \"", name, "\""));
    if (!value->is_array()) {
      ASSIGN_OR_RETURN(int64_t i, AsInt(*value, name));
      return Shape{i};
    }
    Shape out;
    for (const Json& v : *value) {
      ASSIGN_OR_RETURN(int64_t i, AsInt(v, name));
      out.push_back(i);
    }
    return out;
  }

  const std::string& path() const { return path_; }
  const Json& spec() const { return spec_; }

 private:
  absl::StatusOr<int64_t> AsInt(const Json& value,
                                const std::string& name) const {
    if (!value.is_number_integer()) {
      return SpecError(path_,
                       absl::StrCat("\"", name, "\" must be an integer"));
    }
    return value.get<int64_t>();
  }

  const Json& spec_;
  std::string path_;
  std::vector<std::string> names_;
};

class Builder {
 public:
  explicit Builder(const BuildOptions& options)
      : options_(options), rng_(options.seed) {}

  absl::StatusOr<ModulePtr> Build(const Json& spec, const std::string& path,
                                  DType inherited);

  using Factory = std::function<absl::StatusOr<std::shared_ptr<Module>>(
      Builder&, const Json&, const std::string&, DType)>;
  static const std::map<std::string, Factory>& Factories();

 private:
  // Tensor initialisers (torch.nn.init), generated in float32 and stored in
  // `dtype`.
  absl::StatusOr<Tensor> Filled(DType dtype, const Shape& shape, double value) {
    ASSIGN_OR_RETURN(TensorBuilder builder,
                     TensorBuilder::Create(DType::kFloat32, shape));
    float* data = builder.mutable_data_as<float>();
    for (int64_t i = 0; i < builder.num_elements(); ++i)
      data[i] = static_cast<float>(value);
    return std::move(builder).Build().CastTo(dtype);
  }
  absl::StatusOr<Tensor> Uniform(DType dtype, const Shape& shape, double low,
                                 double high) {
    ASSIGN_OR_RETURN(TensorBuilder builder,
                     TensorBuilder::Create(DType::kFloat32, shape));
    std::uniform_real_distribution<float> dist(static_cast<float>(low),
                                               static_cast<float>(high));
    float* data = builder.mutable_data_as<float>();
    for (int64_t i = 0; i < builder.num_elements(); ++i) data[i] = dist(rng_);
    return std::move(builder).Build().CastTo(dtype);
  }
  absl::StatusOr<Tensor> Normal(DType dtype, const Shape& shape, double mean,
                                double stddev) {
    ASSIGN_OR_RETURN(TensorBuilder builder,
                     TensorBuilder::Create(DType::kFloat32, shape));
    std::normal_distribution<float> dist(static_cast<float>(mean),
                                         static_cast<float>(stddev));
    float* data = builder.mutable_data_as<float>();
    for (int64_t i = 0; i < builder.num_elements(); ++i) data[i] = dist(rng_);
    return std::move(builder).Build().CastTo(dtype);
  }
  // nn.Linear / _ConvNd reset_parameters: kaiming_uniform_(a=sqrt(5)) for the
  // weight gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the bias uses the same
  // bound.
  absl::StatusOr<Tensor> KaimingUniform(DType dtype, const Shape& shape,
                                        int64_t fan_in) {
    const double bound =
        fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
    return Uniform(dtype, shape, -bound, bound);
  }
  absl::StatusOr<Tensor> XavierUniform(DType dtype, const Shape& shape) {
    const double fan_out = static_cast<double>(shape[0]);
    double fan_in = static_cast<double>(shape[1]);
    double receptive = 1;
    for (size_t i = 2; i < shape.size(); ++i)
      receptive *= static_cast<double>(shape[i]);
    const double bound =
        std::sqrt(6.0 / (fan_in * receptive + fan_out * receptive));
    return Uniform(dtype, shape, -bound, bound);
  }

  absl::Status AddLinear(Module* module, DType dtype, int64_t in, int64_t out,
                         bool bias) {
    ASSIGN_OR_RETURN(Tensor weight, KaimingUniform(dtype, {out, in}, in));
    RETURN_IF_ERROR(module->AddParameter("weight", std::move(weight)));
    if (!bias) return module->AddParameter("bias", absl::nullopt);
    ASSIGN_OR_RETURN(Tensor b, KaimingUniform(dtype, {out}, in));
    return module->AddParameter("bias", std::move(b));
  }

  // The affine parameters of normalisation layers: weight of ones and bias of
  // zeros, each registered as None when switched off (torch's `affine`,
  // `elementwise_affine`, `bias`).
  absl::Status AddAffine(Module* module, DType dtype, const Shape& shape,
                         bool weight, bool bias) {
    absl::optional<Tensor> w, b;
    if (weight) {
      ASSIGN_OR_RETURN(w, Filled(dtype, shape, 1));
    }
    if (bias) {
      ASSIGN_OR_RETURN(b, Filled(dtype, shape, 0));
    }
    RETURN_IF_ERROR(module->AddParameter("weight", std::move(w)));
    return module->AddParameter("bias", std::move(b));
  }

  static absl::StatusOr<DType> ModuleDType(const Json& spec,
                                           const std::string& path,
                                           DType inherited) {
    auto it = spec.find("dtype");
    if (it == spec.end() || it->is_null()) return inherited;
    if (!it->is_string()) return SpecError(path, "\"dtype\" must be a string");
    absl::StatusOr<DType> dtype = ParseTorchDType(it->get<std::string>());
    if (!dtype.ok()) return SpecError(path, dtype.status().message());
    return *dtype;
  }

  // Factories, one per torch.nn class.
  absl::StatusOr<std::shared_ptr<Module>> Linear(const Json& spec,
                                                 const std::string& path,
                                                 DType dtype,
                                                 const std::string& type_name);
  absl::StatusOr<std::shared_ptr<Module>> Conv(const Json& spec,
                                               const std::string& path,
                                               DType dtype,
                                               const std::string& type,
                                               size_t rank, bool transposed);
  absl::StatusOr<std::shared_ptr<Module>> BatchNorm(const Json& spec,
                                                    const std::string& path,
                                                    DType dtype,
                                                    const std::string& type);
  absl::StatusOr<std::shared_ptr<Module>> LayerNorm(const Json& spec,
                                                    const std::string& path,
                                                    DType dtype);
  absl::StatusOr<std::shared_ptr<Module>> GroupNorm(const Json& spec,
                                                    const std::string& path,
                                                    DType dtype);
  absl::StatusOr<std::shared_ptr<Module>> Embedding(const Json& spec,
                                                    const std::string& path,
                                                    DType dtype);
  absl::StatusOr<std::shared_ptr<Module>> MultiheadAttention(
      const Json& spec, const std::string& path, DType dtype);
  absl::StatusOr<std::shared_ptr<Module>> TransformerEncoderLayer(
      const Json& spec, const std::string& path, DType dtype);
  absl::StatusOr<std::shared_ptr<Module>> Container(const Json& spec,
                                                    const std::string& path,
                                                    DType dtype,
                                                    const std::string& type);
  absl::StatusOr<std::shared_ptr<Module>> Generic(const Json& spec,
                                                  const std::string& path,
                                                  DType dtype);
  absl::StatusOr<std::shared_ptr<Module>> Parameterless(
      const Json& spec, const std::string& path, const std::string& type,
      std::vector<std::string> arg_names);
  absl::StatusOr<Tensor> GenericTensor(const Json& spec,
                                       const std::string& path, DType dtype);

  BuildOptions options_;
  std::mt19937_64 rng_;
};

std::string ChildPath(const std::string& path, absl::string_view name) {
  return path.empty() ? std::string(name) : absl::StrCat(path, ".", name);
}

absl::StatusOr<std::shared_ptr<Module>> Builder::Linear(
    const Json& spec, const std::string& path, DType dtype,
    const std::string& type_name) {
  Args args(spec, path, {"in_features", "out_features", "bias"});
  RETURN_IF_ERROR(args.Check());
  ASSIGN_OR_RETURN(int64_t in, args.Int("in_features"));
  ASSIGN_OR_RETURN(int64_t out, args.Int("out_features"));
  ASSIGN_OR_RETURN(bool bias, args.Bool("bias", true));
  if (in < 0 || out < 0)
    return SpecError(path, "features must be non-negative");
  auto module = std::make_shared<Module>(type_name);
  RETURN_IF_ERROR(AddLinear(module.get(), dtype, in, out, bias));
  return module;
}

absl::StatusOr<std::shared_ptr<Module>> Builder::Conv(
    const Json& spec, const std::string& path, DType dtype,
    const std::string& type, size_t rank, bool transposed) {
  std::vector<std::string> names = {"in_channels", "out_channels",
                                    "kernel_size", "stride", "padding"};
  if (transposed) {
    names.insert(names.end(), {"output_padding", "groups", "bias", "dilation",
                               "padding_mode"});
  } else {
    names.insert(names.end(), {"dilation", "groups", "bias", "padding_mode"});
  }
  Args args(spec, path, names);
  RETURN_IF_ERROR(args.Check());
  ASSIGN_OR_RETURN(int64_t in, args.Int("in_channels"));
  ASSIGN_OR_RETURN(int64_t out, args.Int("out_channels"));
  ASSIGN_OR_RETURN(Shape kernel, args.IntTuple("kernel_size", rank));
  ASSIGN_OR_RETURN(int64_t groups, args.Int("groups", 1));
  ASSIGN_OR_RETURN(bool bias, args.Bool("bias", true));
  // Geometry arguments do not change any tensor, but are validated for what
  // they are.
  for (const char* name : {"stride", "dilation", "output_padding"}) {
    if (args.Find(name) != nullptr)
      RETURN_IF_ERROR(args.IntTuple(name, rank).status());
  }
  if (const Json* padding = args.Find("padding");
      padding != nullptr && !padding->is_string()) {
    RETURN_IF_ERROR(args.IntTuple("padding", rank).status());
  }
  if (groups <= 0) return SpecError(path, "groups must be a positive integer");
  if (in % groups != 0)
    return SpecError(path, "in_channels must be divisible by groups");
  if (out % groups != 0)
    return SpecError(path, "out_channels must be divisible by groups");
  Shape weight_shape =
      transposed ? Shape{in, out / groups} : Shape{out, in / groups};
  weight_shape.insert(weight_shape.end(), kernel.begin(), kernel.end());
  int64_t fan_in = weight_shape[1];
  for (int64_t k : kernel) fan_in *= k;
  auto module = std::make_shared<Module>(type);
  ASSIGN_OR_RETURN(Tensor weight, KaimingUniform(dtype, weight_shape, fan_in));
  RETURN_IF_ERROR(module->AddParameter("weight", std::move(weight)));
  if (bias) {
    ASSIGN_OR_RETURN(Tensor b, KaimingUniform(dtype, {out}, fan_in));
    RETURN_IF_ERROR(module->AddParameter("bias", std::move(b)));
  } else {
    RETURN_IF_ERROR(module->AddParameter("bias", absl::nullopt));
  }
  return module;
}

absl::StatusOr<std::shared_ptr<Module>> Builder::BatchNorm(
    const Json& spec, const std::string& path, DType dtype,
    const std::string& type) {
  Args args(
      spec, path,
      {"num_features", "eps", "momentum", "affine", "track_running_stats"});
  RETURN_IF_ERROR(args.Check());
  ASSIGN_OR_RETURN(int64_t c, args.Int("num_features"));
  ASSIGN_OR_RETURN(bool affine, args.Bool("affine", true));
  ASSIGN_OR_RETURN(bool track, args.Bool("track_running_stats", true));
  RETURN_IF_ERROR(args.Number("eps", 1e-5).status());
  if (const Json* momentum = args.Find("momentum");
      momentum != nullptr && !momentum->is_number()) {
    return SpecError(path, "\"momentum\" must be a number or null");
  }
  auto module = std::make_shared<Module>(type, /*version=*/2);
  RETURN_IF_ERROR(AddAffine(module.get(), dtype, {c}, affine, affine));
  if (track) {
    ASSIGN_OR_RETURN(Tensor mean, Filled(dtype, {c}, 0));
    ASSIGN_OR_RETURN(Tensor var, Filled(dtype, {c}, 1));
    ASSIGN_OR_RETURN(Tensor count, Tensor::Zeros(DType::kInt64, {}));
    RETURN_IF_ERROR(module->AddBuffer("running_mean", std::move(mean)));
    RETURN_IF_ERROR(module->AddBuffer("running_var", std::move(var)));
    RETURN_IF_ERROR(module->AddBuffer("num_batches_tracked", std::move(count)));
  } else {
    RETURN_IF_ERROR(module->AddBuffer("running_mean", absl::nullopt));
    RETURN_IF_ERROR(module->AddBuffer("running_var", absl::nullopt));
    RETURN_IF_ERROR(module->AddBuffer("num_batches_tracked", absl::nullopt));
  }
  return module;
}

absl::StatusOr<std::shared_ptr<Module>> Builder::LayerNorm(
    const Json& spec, const std::string& path, DType dtype) {
  Args args(spec, path,
            {"normalized_shape", "eps", "elementwise_affine", "bias"});
  RETURN_IF_ERROR(args.Check());
  ASSIGN_OR_RETURN(Shape shape, args.IntList("normalized_shape"));
  ASSIGN_OR_RETURN(bool affine, args.Bool("elementwise_affine", true));
  ASSIGN_OR_RETURN(bool bias, args.Bool("bias", true));
  RETURN_IF_ERROR(args.Number("eps", 1e-5).status());
  auto module = std::make_shared<Module>("LayerNorm");
  RETURN_IF_ERROR(
      AddAffine(module.get(), dtype, shape, affine, affine && bias));
  return module;
}

absl::StatusOr<std::shared_ptr<Module>> Builder::GroupNorm(
    const Json& spec, const std::string& path, DType dtype) {
  Args args(spec, path, {"num_groups", "num_channels", "eps", "affine"});
  RETURN_IF_ERROR(args.Check());
  ASSIGN_OR_RETURN(int64_t groups, args.Int("num_groups"));
  ASSIGN_OR_RETURN(int64_t channels, args.Int("num_channels"));
  ASSIGN_OR_RETURN(bool affine, args.Bool("affine", true));
  RETURN_IF_ERROR(args.Number("eps", 1e-5).status());
  if (groups <= 0 || channels % groups != 0) {
    return SpecError(path, "num_channels must be divisible by num_groups");
  }
  auto module = std::make_shared<Module>("GroupNorm");
  RETURN_IF_ERROR(AddAffine(module.get(), dtype, {channels}, affine, affine));
  return module;
}

absl::StatusOr<std::shared_ptr<Module>> Builder::Embedding(
    const Json& spec, const std::string& path, DType dtype) {
  Args args(spec, path,
            {"num_embeddings", "embedding_dim", "padding_idx", "max_norm",
             "norm_type", "scale_grad_by_freq", "sparse"});
  RETURN_IF_ERROR(args.Check());
  ASSIGN_OR_RETURN(int64_t num, args.Int("num_embeddings"));
  ASSIGN_OR_RETURN(int64_t dim, args.Int("embedding_dim"));
  ASSIGN_OR_RETURN(absl::optional<int64_t> padding_idx,
                   args.OptionalInt("padding_idx"));
  if (padding_idx) {
    if (*padding_idx >= num || *padding_idx < -num) {
      return SpecError(path, "padding_idx must be within num_embeddings");
    }
    if (*padding_idx < 0) *padding_idx += num;
  }
  ASSIGN_OR_RETURN(Tensor weight, Normal(DType::kFloat32, {num, dim}, 0, 1));
  if (padding_idx) {
    // torch zeroes the padding row after the normal draw.
    ASSIGN_OR_RETURN(TensorBuilder copy,
                     TensorBuilder::Create(DType::kFloat32, {num, dim}));
    std::memcpy(copy.mutable_data(), weight.data(), weight.num_bytes());
    float* row = copy.mutable_data_as<float>() + *padding_idx * dim;
    std::fill(row, row + dim, 0.0f);
    weight = std::move(copy).Build();
  }
  ASSIGN_OR_RETURN(weight, weight.CastTo(dtype));
  auto module = std::make_shared<Module>("Embedding");
  RETURN_IF_ERROR(module->AddParameter("weight", std::move(weight)));
  return module;
}

absl::StatusOr<std::shared_ptr<Module>> Builder::MultiheadAttention(
    const Json& spec, const std::string& path, DType dtype) {
  Args args(spec, path,
            {"embed_dim", "num_heads", "dropout", "bias", "add_bias_kv",
             "add_zero_attn", "kdim", "vdim", "batch_first"});
  RETURN_IF_ERROR(args.Check());
  ASSIGN_OR_RETURN(int64_t e, args.Int("embed_dim"));
  ASSIGN_OR_RETURN(int64_t heads, args.Int("num_heads"));
  ASSIGN_OR_RETURN(bool bias, args.Bool("bias", true));
  ASSIGN_OR_RETURN(bool add_bias_kv, args.Bool("add_bias_kv", false));
  ASSIGN_OR_RETURN(int64_t kdim, args.Int("kdim", e));
  ASSIGN_OR_RETURN(int64_t vdim, args.Int("vdim", e));
  if (heads <= 0 || e % heads != 0)
    return SpecError(path, "embed_dim must be divisible by num_heads");
  auto module = std::make_shared<Module>("MultiheadAttention");
  if (kdim == e && vdim == e) {
    ASSIGN_OR_RETURN(Tensor in_proj, XavierUniform(dtype, {3 * e, e}));
    RETURN_IF_ERROR(module->AddParameter("in_proj_weight", std::move(in_proj)));
    for (const char* name :
         {"q_proj_weight", "k_proj_weight", "v_proj_weight"}) {
      RETURN_IF_ERROR(module->AddParameter(name, absl::nullopt));
    }
  } else {
    ASSIGN_OR_RETURN(Tensor q, XavierUniform(dtype, {e, e}));
    ASSIGN_OR_RETURN(Tensor k, XavierUniform(dtype, {e, kdim}));
    ASSIGN_OR_RETURN(Tensor v, XavierUniform(dtype, {e, vdim}));
    RETURN_IF_ERROR(module->AddParameter("q_proj_weight", std::move(q)));
    RETURN_IF_ERROR(module->AddParameter("k_proj_weight", std::move(k)));
    RETURN_IF_ERROR(module->AddParameter("v_proj_weight", std::move(v)));
    RETURN_IF_ERROR(module->AddParameter("in_proj_weight", absl::nullopt));
  }
  if (bias) {
    ASSIGN_OR_RETURN(Tensor in_bias, Filled(dtype, {3 * e}, 0));
    RETURN_IF_ERROR(module->AddParameter("in_proj_bias", std::move(in_bias)));
  } else {
    RETURN_IF_ERROR(module->AddParameter("in_proj_bias", absl::nullopt));
  }
  auto out_proj = std::make_shared<Module>("NonDynamicallyQuantizableLinear");
  RETURN_IF_ERROR(AddLinear(out_proj.get(), dtype, e, e, bias));
  if (bias)
    out_proj->SetTensor(TensorKind::kParameter, 1,
                        Filled(dtype, {e}, 0).value());
  RETURN_IF_ERROR(module->AddChild("out_proj", std::move(out_proj)));
  if (add_bias_kv) {
    // xavier_normal_ on [1, 1, E]: std = sqrt(2 / (E + E)).
    const double stddev = std::sqrt(1.0 / static_cast<double>(e));
    ASSIGN_OR_RETURN(Tensor bias_k, Normal(dtype, {1, 1, e}, 0, stddev));
    ASSIGN_OR_RETURN(Tensor bias_v, Normal(dtype, {1, 1, e}, 0, stddev));
    RETURN_IF_ERROR(module->AddParameter("bias_k", std::move(bias_k)));
    RETURN_IF_ERROR(module->AddParameter("bias_v", std::move(bias_v)));
  }
  return module;
}

absl::StatusOr<std::shared_ptr<Module>> Builder::TransformerEncoderLayer(
    const Json& spec, const std::string& path, DType dtype) {
  Args args(spec, path,
            {"d_model", "nhead", "dim_feedforward", "dropout", "activation",
             "layer_norm_eps", "batch_first", "norm_first", "bias"});
  RETURN_IF_ERROR(args.Check());
  ASSIGN_OR_RETURN(int64_t d_model, args.Int("d_model"));
  ASSIGN_OR_RETURN(int64_t nhead, args.Int("nhead"));
  ASSIGN_OR_RETURN(int64_t ff, args.Int("dim_feedforward", 2048));
  ASSIGN_OR_RETURN(bool bias, args.Bool("bias", true));
  auto module = std::make_shared<Module>("TransformerEncoderLayer");
  Json attention = {
      {"embed_dim", d_model}, {"num_heads", nhead}, {"bias", bias}};
  ASSIGN_OR_RETURN(
      auto self_attn,
      MultiheadAttention(attention, ChildPath(path, "self_attn"), dtype));
  RETURN_IF_ERROR(module->AddChild("self_attn", std::move(self_attn)));
  auto linear1 = std::make_shared<Module>("Linear");
  RETURN_IF_ERROR(AddLinear(linear1.get(), dtype, d_model, ff, bias));
  RETURN_IF_ERROR(module->AddChild("linear1", std::move(linear1)));
  RETURN_IF_ERROR(
      module->AddChild("dropout", std::make_shared<Module>("Dropout")));
  auto linear2 = std::make_shared<Module>("Linear");
  RETURN_IF_ERROR(AddLinear(linear2.get(), dtype, ff, d_model, bias));
  RETURN_IF_ERROR(module->AddChild("linear2", std::move(linear2)));
  Json norm = {{"normalized_shape", d_model}, {"bias", bias}};
  for (const char* name : {"norm1", "norm2"}) {
    ASSIGN_OR_RETURN(auto layer_norm,
                     LayerNorm(norm, ChildPath(path, name), dtype));
    RETURN_IF_ERROR(module->AddChild(name, std::move(layer_norm)));
  }
  RETURN_IF_ERROR(
      module->AddChild("dropout1", std::make_shared<Module>("Dropout")));
  RETURN_IF_ERROR(
      module->AddChild("dropout2", std::make_shared<Module>("Dropout")));
  return module;
}

absl::StatusOr<std::shared_ptr<Module>> Builder::Container(
    const Json& spec, const std::string& path, DType dtype,
    const std::string& type) {
  Args args(spec, path, {"modules"});
  RETURN_IF_ERROR(args.Check());
  auto module = std::make_shared<Module>(type);
  const Json* modules = args.Find("modules");
  if (modules == nullptr) return module;
  if (modules->is_array()) {
    if (type == "ModuleDict")
      return SpecError(path, "ModuleDict \"modules\" must be an object");
    for (size_t i = 0; i < modules->size(); ++i) {
      const std::string name = std::to_string(i);
      ASSIGN_OR_RETURN(ModulePtr child,
                       Build((*modules)[i], ChildPath(path, name), dtype));
      RETURN_IF_ERROR(module->AddChild(name, std::move(child)));
    }
  } else if (modules->is_object()) {
    if (type == "ModuleList")
      return SpecError(path, "ModuleList \"modules\" must be an array");
    for (auto it = modules->begin(); it != modules->end(); ++it) {
      absl::Status name_ok = ValidateMemberName(it.key());
      if (!name_ok.ok()) return SpecError(path, name_ok.message());
      ASSIGN_OR_RETURN(ModulePtr child,
                       Build(it.value(), ChildPath(path, it.key()), dtype));
      RETURN_IF_ERROR(module->AddChild(it.key(), std::move(child)));
    }
  } else {
    return SpecError(path, "\"modules\" must be an array or an object");
  }
  return module;
}

absl::StatusOr<Tensor> Builder::GenericTensor(const Json& spec,
                                              const std::string& path,
                                              DType module_dtype) {
  if (!spec.is_object())
    return SpecError(path, "a tensor spec must be an object");
  Args args(
      spec, path,
      {"shape", "init", "value", "low", "high", "mean", "std", "persistent"});
  RETURN_IF_ERROR(args.Check());
  ASSIGN_OR_RETURN(DType dtype, ModuleDType(spec, path, module_dtype));
  ASSIGN_OR_RETURN(Shape shape, args.IntList("shape"));
  if (const Json* s = args.Find("shape");
      s != nullptr && s->is_array() && s->empty())
    shape = {};
  for (int64_t d : shape) {
    if (d < 0) return SpecError(path, "shape dimensions must be non-negative");
  }
  std::string init = "zeros";
  if (const Json* v = args.Find("init"); v != nullptr) {
    if (!v->is_string()) return SpecError(path, "\"init\" must be a string");
    init = v->get<std::string>();
  }
  absl::StatusOr<Tensor> tensor;
  if (init == "zeros") {
    tensor = Tensor::Zeros(dtype, shape);
  } else if (init == "ones") {
    tensor = Filled(dtype, shape, 1);
  } else if (init == "constant") {
    ASSIGN_OR_RETURN(double value, args.Number("value", 0));
    tensor = Filled(dtype, shape, value);
  } else if (init == "uniform") {
    ASSIGN_OR_RETURN(double low, args.Number("low", 0));
    ASSIGN_OR_RETURN(double high, args.Number("high", 1));
    tensor = Uniform(dtype, shape, low, high);
  } else if (init == "normal") {
    ASSIGN_OR_RETURN(double mean, args.Number("mean", 0));
    ASSIGN_OR_RETURN(double stddev, args.Number("std", 1));
    tensor = Normal(dtype, shape, mean, stddev);
  } else {
    return SpecError(
        path, absl::StrCat("unknown init \"", init,
                           "\" (zeros, ones, constant, uniform, normal)"));
  }
  if (!tensor.ok()) return SpecError(path, tensor.status().message());
  return tensor;
}

absl::StatusOr<std::shared_ptr<Module>> Builder::Generic(
    const Json& spec, const std::string& path, DType dtype) {
  Args args(spec, path, {"parameters", "buffers", "children", "version"});
  RETURN_IF_ERROR(args.Check());
  std::string class_name = "Module";
  if (auto it = spec.find("class_name"); it != spec.end()) {
    if (!it->is_string() || it->get<std::string>().empty()) {
      return SpecError(path, "\"class_name\" must be a non-empty string");
    }
    class_name = it->get<std::string>();
  }
  ASSIGN_OR_RETURN(int64_t version, args.Int("version", 1));
  auto module = std::make_shared<Module>(class_name, static_cast<int>(version));
  auto each = [&](const char* field, auto&& add) -> absl::Status {
    const Json* group = args.Find(field);
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
  };
  RETURN_IF_ERROR(each("parameters",
                       [&](const std::string& name, const Json& value,
                           const std::string& tensor_path) -> absl::Status {
                         if (value.is_null())
                           return module->AddParameter(name, absl::nullopt);
                         ASSIGN_OR_RETURN(
                             Tensor tensor,
                             GenericTensor(value, tensor_path, dtype));
                         return module->AddParameter(name, std::move(tensor));
                       }));
  RETURN_IF_ERROR(each(
      "buffers",
      [&](const std::string& name, const Json& value,
          const std::string& tensor_path) -> absl::Status {
        if (value.is_null()) return module->AddBuffer(name, absl::nullopt);
        bool persistent = true;
        if (auto p = value.find("persistent"); p != value.end()) {
          if (!p->is_boolean())
            return SpecError(tensor_path, "\"persistent\" must be a boolean");
          persistent = p->get<bool>();
        }
        ASSIGN_OR_RETURN(Tensor tensor,
                         GenericTensor(value, tensor_path, dtype));
        return module->AddBuffer(name, std::move(tensor), persistent);
      }));
  RETURN_IF_ERROR(each("children",
                       [&](const std::string& name, const Json& value,
                           const std::string& child_path) -> absl::Status {
                         if (value.is_null())
                           return module->AddChild(name, nullptr);
                         ASSIGN_OR_RETURN(ModulePtr child,
                                          Build(value, child_path, dtype));
                         return module->AddChild(name, std::move(child));
                       }));
  return module;
}

absl::StatusOr<std::shared_ptr<Module>> Builder::Parameterless(
    const Json& spec, const std::string& path, const std::string& type,
    std::vector<std::string> arg_names) {
  Args args(spec, path, std::move(arg_names));
  RETURN_IF_ERROR(args.Check());
  return std::make_shared<Module>(type);
}

const std::map<std::string, Builder::Factory>& Builder::Factories() {
  static const auto* factories = [] {
    auto* map = new std::map<std::string, Factory>;
    auto& m = *map;
    m["Linear"] = [](Builder& b, const Json& s, const std::string& p, DType d) {
      return b.Linear(s, p, d, "Linear");
    };
    m["Conv1d"] = [](Builder& b, const Json& s, const std::string& p, DType d) {
      return b.Conv(s, p, d, "Conv1d", 1, false);
    };
    m["Conv2d"] = [](Builder& b, const Json& s, const std::string& p, DType d) {
      return b.Conv(s, p, d, "Conv2d", 2, false);
    };
    m["Conv3d"] = [](Builder& b, const Json& s, const std::string& p, DType d) {
      return b.Conv(s, p, d, "Conv3d", 3, false);
    };
    m["ConvTranspose1d"] = [](Builder& b, const Json& s, const std::string& p,
                              DType d) {
      return b.Conv(s, p, d, "ConvTranspose1d", 1, true);
    };
    m["ConvTranspose2d"] = [](Builder& b, const Json& s, const std::string& p,
                              DType d) {
      return b.Conv(s, p, d, "ConvTranspose2d", 2, true);
    };
    for (const char* type : {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d"}) {
      m[type] = [type](Builder& b, const Json& s, const std::string& p,
                       DType d) { return b.BatchNorm(s, p, d, type); };
    }
    m["LayerNorm"] = [](Builder& b, const Json& s, const std::string& p,
                        DType d) { return b.LayerNorm(s, p, d); };
    m["GroupNorm"] = [](Builder& b, const Json& s, const std::string& p,
                        DType d) { return b.GroupNorm(s, p, d); };
    m["Embedding"] = [](Builder& b, const Json& s, const std::string& p,
                        DType d) { return b.Embedding(s, p, d); };
    m["MultiheadAttention"] = [](Builder& b, const Json& s,
                                 const std::string& p, DType d) {
      return b.MultiheadAttention(s, p, d);
    };
    m["TransformerEncoderLayer"] = [](Builder& b, const Json& s,
                                      const std::string& p, DType d) {
      return b.TransformerEncoderLayer(s, p, d);
    };
    for (const char* type : {"Sequential", "ModuleList", "ModuleDict"}) {
      m[type] = [type](Builder& b, const Json& s, const std::string& p,
                       DType d) { return b.Container(s, p, d, type); };
    }
    m["Module"] = [](Builder& b, const Json& s, const std::string& p, DType d) {
      return b.Generic(s, p, d);
    };
    const std::vector<std::pair<const char*, std::vector<std::string>>>
        parameterless = {
            {"ReLU", {"inplace"}},
            {"GELU", {"approximate"}},
            {"SiLU", {"inplace"}},
            {"Tanh", {}},
            {"Sigmoid", {}},
            {"Softmax", {"dim"}},
            {"Dropout", {"p", "inplace"}},
            {"Identity", {}},
            {"Flatten", {"start_dim", "end_dim"}},
            {"MaxPool2d",
             {"kernel_size", "stride", "padding", "dilation", "return_indices",
              "ceil_mode"}},
            {"AdaptiveAvgPool2d", {"output_size"}},
        };
    for (const auto& [type, names] : parameterless) {
      std::string type_name = type;
      std::vector<std::string> arg_names = names;
      m[type] = [type_name, arg_names](Builder& b, const Json& s,
                                       const std::string& p, DType) {
        return b.Parameterless(s, p, type_name, arg_names);
      };
    }
    return map;
  }();
  return *factories;
}

absl::StatusOr<ModulePtr> Builder::Build(const Json& spec,
                                         const std::string& path,
                                         DType inherited) {
  if (!spec.is_object())
    return SpecError(path, "a module spec must be a JSON object");
  auto type_it = spec.find("type");
  if (type_it == spec.end() || !type_it->is_string()) {
    return SpecError(path, "a module spec needs a string \"type\"");
  }
  const std::string type = type_it->get<std::string>();
  const auto& factories = Factories();
  auto factory = factories.find(type);
  if (factory == factories.end()) {
    return SpecError(
        path, absl::StrCat("unknown module type \"", type, "\"; supported: ",
                           absl::StrJoin(SupportedModuleTypes(), ", ")));
  }
  if (type != "Module" && spec.contains("class_name")) {
    return SpecError(path,
                     "\"class_name\" is only for the generic \"Module\" type");
  }
  ASSIGN_OR_RETURN(DType dtype, ModuleDType(spec, path, inherited));
  absl::StatusOr<std::shared_ptr<Module>> module =
      factory->second(*this, spec, path, dtype);
  if (!module.ok()) {
    if (module.status().code() == absl::StatusCode::kInvalidArgument)
      return module.status();
    return SpecError(path, module.status().message());
  }
  return ModulePtr(*std::move(module));
}

}  // namespace

std::vector<std::string> SupportedModuleTypes() {
  std::vector<std::string> types;
  for (const auto& [type, factory] : Builder::Factories())
    types.push_back(type);
  return types;
}

absl::StatusOr<ModulePtr> BuildModuleFromSpec(absl::string_view spec_json,
                                              const BuildOptions& options) {
  Json spec = Json::parse(spec_json.begin(), spec_json.end(), nullptr,
                          /*allow_exceptions=*/false);
  if (spec.is_discarded()) return SpecError("", "not valid JSON");
  Builder builder(options);
  return builder.Build(spec, "", options.default_dtype);
}

}  // namespace modelstate
