// Whether this build runs under AddressSanitizer (gcc defines
// __SANITIZE_ADDRESS__, clang answers __has_feature): its allocator and shadow
// memory change what malloc's counters and RSS mean, and code that maps memory
// itself must poison it by hand.
#ifndef MODELSTATE_COMMON_SANITIZERS_H_
#define MODELSTATE_COMMON_SANITIZERS_H_

#if defined(__SANITIZE_ADDRESS__)
#define MODELSTATE_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MODELSTATE_ASAN 1
#endif
#endif

namespace modelstate {

#ifdef MODELSTATE_ASAN
inline constexpr bool kUnderAsan = true;
#else
inline constexpr bool kUnderAsan = false;
#endif

}  // namespace modelstate

#endif  // MODELSTATE_COMMON_SANITIZERS_H_
