#include "model/initializers.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "common/status_macros.h"

namespace modelstate {
namespace {

// Fills a float32 tensor of `shape` with `draw()`, applies `edit` if given,
// and casts it to `dtype`.
template <typename Draw>
absl::StatusOr<Tensor> Float32Then(DType dtype, const Shape& shape, Draw draw,
                                   const std::function<void(float*)>& edit) {
  ASSIGN_OR_RETURN(TensorBuilder builder,
                   TensorBuilder::Create(DType::kFloat32, shape));
  float* data = builder.mutable_data_as<float>();
  for (int64_t i = 0; i < builder.num_elements(); ++i) data[i] = draw();
  if (edit) edit(data);
  return std::move(builder).Build().CastTo(dtype);
}

}  // namespace

absl::StatusOr<Tensor> FilledTensor(DType dtype, const Shape& shape,
                                    double value) {
  const float fill = static_cast<float>(value);
  return Float32Then(
      dtype, shape, [fill] { return fill; }, nullptr);
}

template <typename Draw>
absl::StatusOr<Tensor> Initializer::Generate(
    DType dtype, const Shape& shape, Draw draw,
    const std::function<void(float*)>& edit) {
  if (dtype != DType::kFloat32) {
    ASSIGN_OR_RETURN(const int64_t draw_bytes,
                     NumBytes(DType::kFloat32, shape));
    peak_scratch_bytes_ = std::max(peak_scratch_bytes_, draw_bytes);
  }
  if (dry_run_) return PlaceholderTensor(dtype, shape);
  return Float32Then(dtype, shape, draw, edit);
}

absl::StatusOr<Tensor> PlaceholderTensor(DType dtype, const Shape& shape) {
  ASSIGN_OR_RETURN(int64_t bytes, NumBytes(dtype, shape));
  return Tensor::View(dtype, shape,
                      Storage::Borrow(nullptr, static_cast<size_t>(bytes),
                                      /*owner=*/nullptr),
                      0);
}

absl::StatusOr<Tensor> Initializer::Filled(DType dtype, const Shape& shape,
                                           double value) {
  const float fill = static_cast<float>(value);
  return Generate(
      dtype, shape, [fill] { return fill; }, nullptr);
}

absl::StatusOr<Tensor> Initializer::Zeros(DType dtype, const Shape& shape) {
  if (dry_run_) return PlaceholderTensor(dtype, shape);
  return Tensor::Zeros(dtype, shape);
}

absl::StatusOr<Tensor> Initializer::Uniform(DType dtype, const Shape& shape,
                                            double low, double high) {
  std::uniform_real_distribution<float> dist(static_cast<float>(low),
                                             static_cast<float>(high));
  return Generate(
      dtype, shape, [&] { return dist(rng_); }, nullptr);
}

absl::StatusOr<Tensor> Initializer::Normal(DType dtype, const Shape& shape,
                                           double mean, double stddev) {
  return Normal(dtype, shape, mean, stddev, nullptr);
}

absl::StatusOr<Tensor> Initializer::Normal(
    DType dtype, const Shape& shape, double mean, double stddev,
    const std::function<void(float*)>& edit) {
  std::normal_distribution<float> dist(static_cast<float>(mean),
                                       static_cast<float>(stddev));
  return Generate(
      dtype, shape, [&] { return dist(rng_); }, edit);
}

absl::StatusOr<Tensor> Initializer::KaimingUniform(DType dtype,
                                                   const Shape& shape,
                                                   int64_t fan_in) {
  const double bound =
      fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
  return Uniform(dtype, shape, -bound, bound);
}

absl::StatusOr<Tensor> Initializer::XavierUniform(DType dtype,
                                                  const Shape& shape) {
  const double fan_out = static_cast<double>(shape[0]);
  const double fan_in = static_cast<double>(shape[1]);
  double receptive = 1;
  for (size_t i = 2; i < shape.size(); ++i)
    receptive *= static_cast<double>(shape[i]);
  const double bound =
      std::sqrt(6.0 / (fan_in * receptive + fan_out * receptive));
  return Uniform(dtype, shape, -bound, bound);
}

}  // namespace modelstate
