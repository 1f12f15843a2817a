#include "model/spec_args.h"

#include <algorithm>
#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace modelstate {

absl::Status SpecError(const std::string& path, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(
      "architecture spec", path.empty() ? "" : " at ", path, ": ", message));
}

std::string ChildPath(const std::string& path, absl::string_view name) {
  return path.empty() ? std::string(name) : absl::StrCat(path, ".", name);
}

absl::StatusOr<DType> SpecDType(const SpecJson& spec, const std::string& path,
                                DType inherited) {
  auto it = spec.find("dtype");
  if (it == spec.end() || it->is_null()) return inherited;
  if (!it->is_string()) return SpecError(path, "\"dtype\" must be a string");
  absl::StatusOr<DType> dtype = ParseTorchDType(it->get<std::string>());
  if (!dtype.ok()) return SpecError(path, dtype.status().message());
  return *dtype;
}

SpecArgs::SpecArgs(const SpecJson& spec, std::string path,
                   std::vector<std::string> names)
    : spec_(spec), path_(std::move(path)), names_(std::move(names)) {}

absl::Status SpecArgs::Check() const {
  static const char* const kCommon[] = {"type", "args", "dtype", "device",
                                        "class_name"};
  for (auto it = spec_.begin(); it != spec_.end(); ++it) {
    const std::string& key = it.key();
    if (std::find(std::begin(kCommon), std::end(kCommon), key) !=
        std::end(kCommon))
      continue;
    if (std::find(names_.begin(), names_.end(), key) != names_.end()) continue;
    return SpecError(path_, absl::StrCat("unknown argument \"", key, "\""));
  }
  if (!spec_.contains("args")) return absl::OkStatus();
  const SpecJson& args = spec_["args"];
  if (!args.is_array()) return SpecError(path_, "\"args\" must be an array");
  if (args.size() > names_.size()) {
    return SpecError(path_,
                     absl::StrCat("takes at most ", names_.size(),
                                  " positional arguments, got ", args.size()));
  }
  for (size_t i = 0; i < args.size(); ++i) {
    if (spec_.contains(names_[i])) {
      return SpecError(
          path_,
          absl::StrCat("got multiple values for argument \"", names_[i], "\""));
    }
  }
  return absl::OkStatus();
}

const SpecJson* SpecArgs::Find(const std::string& name) const {
  auto it = spec_.find(name);
  if (it != spec_.end()) return it->is_null() ? nullptr : &*it;
  if (spec_.contains("args")) {
    const SpecJson& args = spec_["args"];
    for (size_t i = 0; i < args.size() && i < names_.size(); ++i) {
      if (names_[i] == name) return args[i].is_null() ? nullptr : &args[i];
    }
  }
  return nullptr;
}

absl::Status SpecArgs::Missing(const std::string& name) const {
  return SpecError(path_, absl::StrCat("missing argument \"", name, "\""));
}

absl::StatusOr<int64_t> SpecArgs::AsInt(const SpecJson& value,
                                        const std::string& name) const {
  if (!value.is_number_integer()) {
    return SpecError(path_, absl::StrCat("\"", name, "\" must be an integer"));
  }
  // JSON integers above INT64_MAX parse as unsigned; converting them would wrap
  // (18446744073709551615 would pass as padding_idx -1).
  if (value.is_number_unsigned() &&
      value.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
    return SpecError(path_,
                     absl::StrCat("\"", name, "\" does not fit in int64"));
  }
  return value.get<int64_t>();
}

absl::StatusOr<int64_t> SpecArgs::Int(const std::string& name) const {
  const SpecJson* value = Find(name);
  if (value == nullptr) return Missing(name);
  return AsInt(*value, name);
}

absl::StatusOr<int64_t> SpecArgs::Int(const std::string& name,
                                      int64_t fallback) const {
  const SpecJson* value = Find(name);
  return value == nullptr ? fallback : AsInt(*value, name);
}

absl::StatusOr<absl::optional<int64_t>> SpecArgs::OptionalInt(
    const std::string& name) const {
  const SpecJson* value = Find(name);
  if (value == nullptr) return absl::optional<int64_t>();
  ASSIGN_OR_RETURN(int64_t v, AsInt(*value, name));
  return absl::optional<int64_t>(v);
}

absl::StatusOr<bool> SpecArgs::Bool(const std::string& name,
                                    bool fallback) const {
  const SpecJson* value = Find(name);
  if (value == nullptr) return fallback;
  if (!value->is_boolean())
    return SpecError(path_, absl::StrCat("\"", name, "\" must be a boolean"));
  return value->get<bool>();
}

absl::StatusOr<double> SpecArgs::Number(const std::string& name,
                                        double fallback) const {
  const SpecJson* value = Find(name);
  if (value == nullptr) return fallback;
  if (!value->is_number())
    return SpecError(path_, absl::StrCat("\"", name, "\" must be a number"));
  return value->get<double>();
}

absl::StatusOr<Shape> SpecArgs::IntTuple(
    const std::string& name, size_t rank,
    absl::optional<int64_t> fallback) const {
  const SpecJson* value = Find(name);
  if (value == nullptr) {
    if (!fallback) return Missing(name);
    return Shape(rank, *fallback);
  }
  if (!value->is_array()) {
    ASSIGN_OR_RETURN(int64_t i, AsInt(*value, name));
    return Shape(rank, i);
  }
  if (value->size() != rank) {
    return SpecError(
        path_, absl::StrCat("\"", name, "\" must have ", rank, " values"));
  }
  Shape out;
  for (const SpecJson& v : *value) {
    ASSIGN_OR_RETURN(int64_t i, AsInt(v, name));
    out.push_back(i);
  }
  return out;
}

absl::StatusOr<Shape> SpecArgs::IntList(const std::string& name) const {
  const SpecJson* value = Find(name);
  if (value == nullptr) return Missing(name);
  if (!value->is_array()) {
    ASSIGN_OR_RETURN(int64_t i, AsInt(*value, name));
    return Shape{i};
  }
  Shape out;
  for (const SpecJson& v : *value) {
    ASSIGN_OR_RETURN(int64_t i, AsInt(v, name));
    out.push_back(i);
  }
  return out;
}

}  // namespace modelstate
