#pragma once
// The opt-in validation mode: scans inputs for NaN/Inf and names the first bad element. On by
// default in debug builds (NDEBUG unset); routing stays in bounds for NaN/Inf either way.
#include <cmath>

#include "smoe/core/view.hpp"

namespace smoe {

#ifdef NDEBUG
inline constexpr bool validate_by_default = false;
#else
inline constexpr bool validate_by_default = true;
#endif

template <class T>
void check_finite(const char* context, const char* name, ConstMatrixView<T> m) {
  for (index_t r = 0; r < m.rows; ++r)
    for (index_t c = 0; c < m.cols; ++c)
      if (!std::isfinite(m(r, c)))
        fail(context, ": ", name, " row ", r, " is not finite (column ", c, " holds ", m(r, c), ")");
}

}  // namespace smoe
