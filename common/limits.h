// Protocol and input limits, in one place: the server, the client, the
// validators of model/ and store/, and docs/protocol.md all use these numbers.
#ifndef MODELSTATE_COMMON_LIMITS_H_
#define MODELSTATE_COMMON_LIMITS_H_

#include <cstddef>
#include <cstdint>

namespace modelstate {

// Data chunks of StateDict and LoadStateDict streams. A request's chunk size
// of 0 means the default; a larger one than the maximum is INVALID_ARGUMENT
// on both streams.
inline constexpr uint32_t kDefaultChunkBytes = 1u << 20;
inline constexpr uint32_t kMaxChunkBytes = 3u << 20;
// Default of modelstated's --min_chunk_bytes: every load chunk but the one
// that ends the stream must carry at least this many bytes, and a fetch's
// chunk_bytes below it is raised to it, so a client cannot make the server
// handle a message per byte.
inline constexpr uint32_t kDefaultMinChunkBytes = 64u << 10;

// Largest gRPC message either side sends or accepts. Chunks are far smaller;
// the bound is for manifests (about 100 bytes a tensor: 64 MiB holds
// manifests of several hundred thousand tensors).
inline constexpr int kMaxMessageBytes = 64 << 20;

// Request frames on the same-host socket (modelstated --local_socket), the
// first of a connection included: the daemon reads that one before it knows
// whether the peer may read anything, so the bound keeps what unauthorized
// peers can pin small (all 64 connection slots: 1 MiB). It holds a model name,
// a module path, a token and a few hundred keys of typical length; a client
// whose request is larger fetches through gRPC instead.
inline constexpr uint32_t kMaxLocalRequestBytes = 16u << 10;

// The largest frame either end of the same-host socket accepts: requests are
// small, but a manifest of many tensors is not, so the gRPC message limit
// applies to both.
inline constexpr uint32_t kMaxLocalFrameBytes = 64u << 20;

// Status messages sent to a peer are cut to this many bytes, so that a
// message quoting hostile input stays small.
inline constexpr size_t kMaxStatusMessageBytes = 3072;

// What an access policy may hold: names are logged, globs are matched per
// call.
inline constexpr size_t kMaxPrincipalNameLength = 128;
inline constexpr size_t kMaxGlobLength = 256;
inline constexpr size_t kMaxCertificateNameLength = 1024;

// Model names: 1 to this many characters from [A-Za-z0-9._-], not starting
// with '.'.
inline constexpr int kMaxModelNameLength = 128;

// State-dict keys and module paths.
inline constexpr int kMaxKeyLength = 4096;
inline constexpr int kMaxKeyComponents = 256;

// torch class names of modules in a tree description.
inline constexpr size_t kMaxClassNameLength = 128;

// Nesting of an architecture spec (modules inside containers).
inline constexpr int kMaxSpecDepth = 128;
// Size of an architecture spec's JSON text: parsed JSON takes several times
// its text, before any estimate of the model can be made.
inline constexpr size_t kMaxSpecBytes = 1u << 20;

// Modules in one model (the root included), however it is made: bounds the
// work of every walk over a tree.
inline constexpr int64_t kMaxModules = 1 << 20;

// Events queued for one watcher that reads slower than models change (see
// store/watch_queue.h): updates collapse, and past this many the oldest go.
inline constexpr size_t kMaxQueuedWatchEvents = 64;

}  // namespace modelstate

#endif  // MODELSTATE_COMMON_LIMITS_H_
