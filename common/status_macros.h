// Early-return helpers for absl::Status / absl::StatusOr, which Debian's Abseil
// 20220623 lacks.
#ifndef MODELSTATE_COMMON_STATUS_MACROS_H_
#define MODELSTATE_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MS_CONCAT_INNER_(a, b) a##b
#define MS_CONCAT_(a, b) MS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function if
// it is not OK.
#define RETURN_IF_ERROR(expr)                \
  do {                                       \
    ::absl::Status ms_status_ = (expr);      \
    if (!ms_status_.ok()) return ms_status_; \
  } while (0)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status,
// otherwise moves the value into `lhs`, which may be a declaration (`auto x`)
// or an existing variable.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  MS_ASSIGN_OR_RETURN_IMPL_(MS_CONCAT_(ms_statusor_, __LINE__), lhs, rexpr)

#define MS_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr)    \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // MODELSTATE_COMMON_STATUS_MACROS_H_
