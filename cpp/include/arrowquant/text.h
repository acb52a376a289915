// Text read from files (SafeTensors names, GGUF keys, string values and
// tensor names): one rule for bad bytes. The formats say UTF-8; anything
// else is refused, never replaced or passed on to Python undecoded.
#pragma once

#include <cstddef>
#include <string_view>

namespace arrowquant::text {

// Length of the valid UTF-8 sequence starting at s[i] (RFC 3629: no
// overlongs, no surrogates, nothing above U+10FFFF), or 0.
size_t Utf8SequenceLength(std::string_view s, size_t i);

// Offset of the first byte that does not start a valid UTF-8 sequence, or
// s.size() when the whole string is valid.
size_t FirstInvalidUtf8(std::string_view s);

}  // namespace arrowquant::text
