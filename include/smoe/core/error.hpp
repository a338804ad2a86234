#pragma once
// smoe::error: thrown for bad input at API boundaries. Messages name the argument and give the
// expected and the actual value, so a user can fix the call without reading the library.
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace smoe {

class error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream s;
  (s << ... << std::forward<Parts>(parts));
  return s.str();
}
}  // namespace detail

// Throws smoe::error with the parts streamed together.
template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw error(detail::concat(std::forward<Parts>(parts)...));
}

// `what` must equal `expected`; the message reads "<context>: <what> must be <expected>, got <actual>".
template <class A, class B>
void expect_equal(const char* context, const char* what, const A& expected, const B& actual) {
  if (!(expected == actual)) fail(context, ": ", what, " must be ", expected, ", got ", actual);
}

}  // namespace smoe
