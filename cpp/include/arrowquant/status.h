// Status / Result: errors as values, in the Apache Arrow habit.
// The core never throws; the Python binding turns a non-OK Status into one
// exception of the matching class (arrowquant.errors).
#pragma once

#include <cassert>
#include <string>
#include <utility>
#include <variant>

namespace arrowquant {

enum class StatusCode : int {
  kOk = 0,
  kInvalid = 1,        // bad input values or arguments (ValidationError)
  kFormatError = 2,    // malformed file contents (FormatError)
  kConfigError = 3,    // bad configuration (ConfigurationError)
  kIOError = 4,        // the operating system refused a read or write
  kNotFound = 5,       // a file or tensor that should exist does not
  kOutOfMemory = 6,    // an allocation or a memory budget failed
  kShapeMismatch = 7,  // shapes or byte counts disagree
  kCancelled = 8,      // stopped on request
  kInternal = 9,       // a bug: should never reach a user
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status OK() { return Status(); }
  static Status Invalid(std::string m) { return {StatusCode::kInvalid, std::move(m)}; }
  static Status FormatError(std::string m) { return {StatusCode::kFormatError, std::move(m)}; }
  static Status ConfigError(std::string m) { return {StatusCode::kConfigError, std::move(m)}; }
  static Status IOError(std::string m) { return {StatusCode::kIOError, std::move(m)}; }
  static Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
  static Status OutOfMemory(std::string m) { return {StatusCode::kOutOfMemory, std::move(m)}; }
  static Status ShapeMismatch(std::string m) { return {StatusCode::kShapeMismatch, std::move(m)}; }
  static Status Cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // Prefix the message with context ("tensor 'w': ..."), keeping the code.
  Status WithContext(const std::string& context) const {
    if (ok()) return *this;
    return Status(code_, context + ": " + message_);
  }

  std::string ToString() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : storage_(std::move(value)) {}        // NOLINT: implicit by design
  Result(Status status) : storage_(std::move(status)) {  // NOLINT
    assert(!std::get<Status>(storage_).ok() && "Result built from an OK status");
  }

  bool ok() const { return std::holds_alternative<T>(storage_); }
  Status status() const { return ok() ? Status::OK() : std::get<Status>(storage_); }

  const T& value() const& {
    assert(ok());
    return std::get<T>(storage_);
  }
  T& value() & {
    assert(ok());
    return std::get<T>(storage_);
  }
  T&& value() && {
    assert(ok());
    return std::get<T>(std::move(storage_));
  }
  const T& operator*() const& { return value(); }
  T& operator*() & { return value(); }
  const T* operator->() const { return &value(); }
  T* operator->() { return &value(); }

 private:
  std::variant<Status, T> storage_;
};

#define AQ_CONCAT_INNER(a, b) a##b
#define AQ_CONCAT(a, b) AQ_CONCAT_INNER(a, b)

#define AQ_RETURN_NOT_OK(expr)            \
  do {                                    \
    ::arrowquant::Status _aq_st = (expr); \
    if (!_aq_st.ok()) return _aq_st;      \
  } while (false)

#define AQ_ASSIGN_OR_RETURN_IMPL(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                             \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()

#define AQ_ASSIGN_OR_RETURN(lhs, rexpr) \
  AQ_ASSIGN_OR_RETURN_IMPL(AQ_CONCAT(_aq_result_, __LINE__), lhs, rexpr)

}  // namespace arrowquant
