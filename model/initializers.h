// torch.nn.init for the module factory: fills and the seeded random
// initialisers (uniform, normal, kaiming/xavier uniform). Values are generated
// in float32, as torch's default dtype, and then stored in the requested
// dtype.
//
// An Initializer owns its generator, so tensors drawn from one seed in one
// order are the same on every run. Not thread-safe: use one per build.
#ifndef MODELSTATE_MODEL_INITIALIZERS_H_
#define MODELSTATE_MODEL_INITIALIZERS_H_

#include <cstdint>
#include <functional>
#include <random>

#include "absl/status/statusor.h"
#include "model/dtype.h"
#include "model/tensor.h"

namespace modelstate {

// Returns a tensor of `shape` whose every element is `value` (nn.init.ones_,
// zeros_, constant_). Errors as TensorBuilder::Create or Tensor::CastTo.
absl::StatusOr<Tensor> FilledTensor(DType dtype, const Shape& shape,
                                    double value);

// Returns a tensor of `dtype` and `shape` over a storage that reports the
// tensor's size but has no bytes behind it: it must never be read or written.
// For dry runs that measure a model before allocating it. Errors as NumBytes.
absl::StatusOr<Tensor> PlaceholderTensor(DType dtype, const Shape& shape);

class Initializer {
 public:
  explicit Initializer(uint64_t seed) : rng_(seed) {}

  // An initializer whose every tensor is a PlaceholderTensor: a build with it
  // gives the real tree's modules, names, dtypes and shapes without allocating
  // or drawing any tensor data.
  static Initializer DryRun() {
    Initializer init(0);
    init.dry_run_ = true;
    return init;
  }
  bool dry_run() const { return dry_run_; }

  // FilledTensor, and Tensor::Zeros, honouring the dry run.
  absl::StatusOr<Tensor> Filled(DType dtype, const Shape& shape, double value);
  absl::StatusOr<Tensor> Zeros(DType dtype, const Shape& shape);

  // nn.init.uniform_: U(low, high). Errors as FilledTensor.
  absl::StatusOr<Tensor> Uniform(DType dtype, const Shape& shape, double low,
                                 double high);

  // nn.init.normal_: N(mean, stddev^2). Errors as FilledTensor.
  absl::StatusOr<Tensor> Normal(DType dtype, const Shape& shape, double mean,
                                double stddev);
  // Normal, with `edit` applied to the float32 draw before it is cast (e.g.
  // zeroing Embedding's padding row without a copy of the weight).
  absl::StatusOr<Tensor> Normal(DType dtype, const Shape& shape, double mean,
                                double stddev,
                                const std::function<void(float*)>& edit);

  // nn.Linear / _ConvNd reset_parameters: kaiming_uniform_(a=sqrt(5)) for the
  // weight gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the bias uses the same
  // bound. A fan_in of 0 gives zeros.
  absl::StatusOr<Tensor> KaimingUniform(DType dtype, const Shape& shape,
                                        int64_t fan_in);

  // nn.init.xavier_uniform_ (gain 1) on a shape of rank 2 or more.
  absl::StatusOr<Tensor> XavierUniform(DType dtype, const Shape& shape);

  // The largest transient buffer one tensor's initialisation needed (or, in a
  // dry run, would need): values are drawn in float32 and then cast, so a
  // tensor of another dtype briefly exists twice. A build's peak memory is
  // the tree's bytes plus this.
  int64_t peak_scratch_bytes() const { return peak_scratch_bytes_; }

 private:
  template <typename Draw>
  absl::StatusOr<Tensor> Generate(DType dtype, const Shape& shape, Draw draw,
                                  const std::function<void(float*)>& edit);

  std::mt19937_64 rng_;
  bool dry_run_ = false;
  int64_t peak_scratch_bytes_ = 0;
};

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_INITIALIZERS_H_
