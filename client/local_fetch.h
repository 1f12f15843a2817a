// The client's end of the same-host shared-memory fetch (docs/protocol.md,
// "Same-host shared-memory fetch"): ask the daemon's local socket for a state
// dict and map the sealed export it answers with (zero copy; the tensors are
// views of a private mapping of it), or, when the daemon has none to give,
// create a memfd of the size its manifest asks for, pass it over, and map
// what the daemon wrote read-only, verifying every tensor's XXH3-64 before it
// is handed out, as on the gRPC path.
//
// Thread-safety: the functions may be called from any thread at once.
#ifndef MODELSTATE_CLIENT_LOCAL_FETCH_H_
#define MODELSTATE_CLIENT_LOCAL_FETCH_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "model/tensor.h"
#include "modelstate/v1/model_state.pb.h"
#include "transfer/transfer.h"

namespace modelstate {

// The local socket a client uses: `configured` when set, otherwise, for a
// "unix:PATH" (or "unix://PATH") target, "PATH.local"; empty for none.
std::string LocalSocketFor(const std::string& target,
                           const std::string& configured);

struct LocalFetchSettings {
  std::string socket_path;
  // Sent as LocalFetchRequest.token for the daemon's per-model check.
  std::string token;
  // Bounds each wait for the daemon; infinite for none.
  absl::Duration timeout = absl::InfiniteDuration();
  // Ask for the daemon's sealed export of the tensors (zero copy); false
  // always has the daemon fill a memfd of this process's.
  bool accept_exports = true;
  // Check every tensor's XXH3-64 of an export too (about 0.1 s per GiB on two
  // threads). The daemon checked them when it made the export, which nobody
  // can change since, so this only guards against a daemon's bug. A region
  // the daemon filled is always checked.
  bool verify_exports = false;
};

// A state dict fetched through shared memory: the tensors are views of one
// mapping, which lives as long as any of them (and keeps the pages of the
// daemon's export alive until then, even once the daemon dropped it).
struct LocalFetched {
  v1::Manifest manifest;
  std::vector<TransferEntry> entries;
  std::vector<Tensor> tensors;  // Verified, in manifest order.
};

// Called with the manifest before any byte is transferred; an error ends the
// fetch with it.
using LocalManifestCallback = std::function<absl::Status(
    const v1::Manifest&, const std::vector<TransferEntry>&)>;

// Fetches `request` through the local socket. Returns nullopt, having done
// nothing, when the socket is absent or nobody listens on it, when the
// request (with its token) is larger than the daemon reads on that socket
// (kMaxLocalRequestBytes: a long key list), or when the daemon refuses it
// with ResourceExhausted (no connection slot free for this process's uid, or
// memory): the caller falls back to gRPC. Otherwise the fetched state dict or
// an error: the daemon's (NotFound, PermissionDenied, ...), the callback's,
// DataLoss for a failed checksum, a malformed answer or an export that is not
// sealed, Unavailable when the daemon goes away, DeadlineExceeded after
// `settings.timeout`, ResourceExhausted when the region cannot be allocated.
absl::StatusOr<absl::optional<LocalFetched>> FetchLocally(
    const LocalFetchSettings& settings, const v1::StateDictRequest& request,
    const LocalManifestCallback& on_manifest = nullptr);

}  // namespace modelstate

#endif  // MODELSTATE_CLIENT_LOCAL_FETCH_H_
