// The client's end of the same-host shared-memory fetch (docs/protocol.md,
// "Same-host shared-memory fetch"): ask the daemon's local socket for a state
// dict, create a memfd of the size its manifest asks for, pass it over, and
// map what the daemon wrote read-only. Every tensor's XXH3-64 is verified
// before it is handed out, as on the gRPC path.
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
#include "core/tensor.h"
#include "core/transfer.h"
#include "modelstate/v1/model_state.pb.h"

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
};

// A state dict fetched through shared memory: the tensors are read-only
// views of one mapping, which lives as long as any of them.
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
// nothing, when the socket is absent or nobody listens on it (the caller
// falls back to gRPC); otherwise the fetched state dict or an error: the
// daemon's (NotFound, PermissionDenied, ...), the callback's, DataLoss for a
// failed checksum or a malformed answer, Unavailable when the daemon goes
// away, DeadlineExceeded after `settings.timeout`, ResourceExhausted when the
// region cannot be allocated.
absl::StatusOr<absl::optional<LocalFetched>> FetchLocally(
    const LocalFetchSettings& settings, const v1::StateDictRequest& request,
    const LocalManifestCallback& on_manifest = nullptr);

}  // namespace modelstate

#endif  // MODELSTATE_CLIENT_LOCAL_FETCH_H_
