// Byte counts for people, as modelstatectl prints them. Thread-safe: pure
// functions.
#ifndef MODELSTATE_CLIENT_FORMAT_H_
#define MODELSTATE_CLIENT_FORMAT_H_

#include <cstdint>
#include <string>

namespace modelstate {

// Returns `bytes` in binary units with one decimal ("22.5 KiB", "1.0 GiB"), or
// exactly below 1 KiB ("512 B"). The unit is the largest that keeps the
// rounded value below 1024, so 1048575 bytes read "1.0 MiB", not
// "1024.0 KiB".
std::string HumanBytes(uint64_t bytes);

}  // namespace modelstate

#endif  // MODELSTATE_CLIENT_FORMAT_H_
