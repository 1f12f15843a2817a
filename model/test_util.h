// Helpers shared by the core tests.
#ifndef MODELSTATE_MODEL_TEST_UTIL_H_
#define MODELSTATE_MODEL_TEST_UTIL_H_

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/module_factory.h"
#include "model/state_dict.h"
#include "model/tensor.h"

namespace modelstate {

// Builds `spec` or fails the test.
inline ModulePtr MustBuild(const std::string& spec, uint64_t seed = 0) {
  absl::StatusOr<ModulePtr> module =
      BuildModuleFromSpec(spec, BuildOptions{seed});
  EXPECT_TRUE(module.ok()) << module.status();
  return module.ok() ? *module : nullptr;
}

// A float32 tensor holding `values` with `shape`.
inline Tensor FloatTensor(const Shape& shape,
                          const std::vector<float>& values) {
  return Tensor::FromBytes(DType::kFloat32, shape,
                           {reinterpret_cast<const uint8_t*>(values.data()),
                            values.size() * sizeof(float)})
      .value();
}

// A float32 tensor of `shape` filled with `value`.
inline Tensor FullTensor(DType dtype, const Shape& shape, float value) {
  const int64_t n = NumElements(shape).value();
  return FloatTensor(shape, std::vector<float>(n, value)).CastTo(dtype).value();
}

inline std::vector<std::string> KeysOf(const ModulePtr& module) {
  return GetStateDict(module).value().Keys();
}

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_TEST_UTIL_H_
