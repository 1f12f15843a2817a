// Parsing of architecture-spec arguments (see docs/architecture-spec.md): a
// module's keyword and positional ("args") values under torch's parameter
// names, with type checks whose errors name the JSON path.
//
// Internal to the module factory (module_factory.cc, module_layers.cc).
// SpecArgs holds a reference to its JSON; it is used on one thread.
#ifndef MODELSTATE_MODEL_SPEC_ARGS_H_
#define MODELSTATE_MODEL_SPEC_ARGS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/optional.h"
#include "model/dtype.h"
#include "model/tensor.h"
#include "nlohmann/json.hpp"

namespace modelstate {

// Specs keep their field order, so ModuleDict children and generic tensors
// register in the order written.
using SpecJson = nlohmann::ordered_json;

// Returns InvalidArgument "architecture spec at <path>: <message>" (without
// " at <path>" for the root, whose path is "").
absl::Status SpecError(const std::string& path, absl::string_view message);

// Returns the JSON path of member `name` of the spec at `path` ("a.b").
std::string ChildPath(const std::string& path, absl::string_view name);

// Returns the dtype a spec names in "dtype", or `inherited` when it names none
// (absent or null). InvalidArgument for a non-string or unknown dtype.
absl::StatusOr<DType> SpecDType(const SpecJson& spec, const std::string& path,
                                DType inherited);

// The arguments of one module or tensor spec: keyword values, positional
// "args", and torch's parameter names (in positional order). Every error is
// InvalidArgument naming the spec's path.
class SpecArgs {
 public:
  // `spec` must outlive this object.
  SpecArgs(const SpecJson& spec, std::string path,
           std::vector<std::string> names);

  // Checks that every keyword is known (a parameter name or one of "type",
  // "args", "dtype", "device", "class_name") and that positional args are an
  // array, not too many, and not also given by keyword.
  absl::Status Check() const;

  // Returns the value of `name`, or null when absent (or given as JSON null).
  const SpecJson* Find(const std::string& name) const;

  // An integer argument; the first overload requires it.
  absl::StatusOr<int64_t> Int(const std::string& name) const;
  absl::StatusOr<int64_t> Int(const std::string& name, int64_t fallback) const;
  absl::StatusOr<absl::optional<int64_t>> OptionalInt(
      const std::string& name) const;
  absl::StatusOr<bool> Bool(const std::string& name, bool fallback) const;
  absl::StatusOr<double> Number(const std::string& name, double fallback) const;

  // An int or a list of `rank` ints (torch's _single/_pair/_triple), e.g.
  // kernel_size. Required unless `fallback` is given.
  absl::StatusOr<Shape> IntTuple(
      const std::string& name, size_t rank,
      absl::optional<int64_t> fallback = absl::nullopt) const;

  // A shape: an int or a list of ints (LayerNorm's normalized_shape).
  // Required.
  absl::StatusOr<Shape> IntList(const std::string& name) const;

  const std::string& path() const { return path_; }
  const SpecJson& spec() const { return spec_; }

 private:
  absl::StatusOr<int64_t> AsInt(const SpecJson& value,
                                const std::string& name) const;
  absl::Status Missing(const std::string& name) const;

  const SpecJson& spec_;
  std::string path_;
  std::vector<std::string> names_;
};

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_SPEC_ARGS_H_
