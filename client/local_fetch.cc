#include "client/local_fetch.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <utility>

#include "absl/strings/strip.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "proto/convert.h"
#include "proto/local_frame.h"
#include "xxhash.h"

namespace modelstate {
namespace {

// Connects to the daemon's local socket; an invalid UniqueFd when there is
// none to connect to.
absl::StatusOr<UniqueFd> Connect(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.size() >= sizeof(address.sun_path))
    return absl::InvalidArgumentError("local socket path too long");
  std::memcpy(address.sun_path, path.data(), path.size());
  UniqueFd socket_fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!socket_fd.valid())
    return absl::UnavailableError(absl::StrCat("socket: ", strerror(errno)));
  int result;
  do {
    result = connect(socket_fd.get(), reinterpret_cast<sockaddr*>(&address),
                     sizeof(address));
  } while (result != 0 && errno == EINTR);
  if (result == 0) return socket_fd;
  if (errno == ENOENT || errno == ECONNREFUSED || errno == ENOTSOCK ||
      errno == ENOTDIR)
    return UniqueFd();
  return absl::UnavailableError(absl::StrCat("cannot connect to local socket ",
                                             path, ": ", strerror(errno)));
}

// Reads the daemon's answer; its error message becomes our status.
absl::StatusOr<v1::LocalResponse> ReadResponse(int socket_fd) {
  v1::LocalResponse response;
  absl::Status read =
      ReadLocalFrame(socket_fd, kMaxLocalFrameBytes, &response, nullptr);
  if (read.code() == absl::StatusCode::kInvalidArgument ||
      read.code() == absl::StatusCode::kOutOfRange)
    return absl::UnavailableError(
        absl::StrCat("local socket: ", read.message()));
  RETURN_IF_ERROR(read);
  if (response.has_error()) return FromLocalStatus(response.error());
  return response;
}

// Checks that the daemon's layout is the one both ends compute.
absl::Status CheckLayout(const v1::LocalManifest& manifest,
                         const std::vector<TransferEntry>& entries) {
  ASSIGN_OR_RETURN(const std::vector<uint64_t> sizes, TransferSizes(entries));
  ASSIGN_OR_RETURN(const LocalRegionLayout layout, LayOutLocalRegion(sizes));
  if (layout.region_bytes != manifest.region_bytes() ||
      !std::equal(layout.offsets.begin(), layout.offsets.end(),
                  manifest.offsets().begin(), manifest.offsets().end()))
    return absl::DataLossError("the daemon's region layout is malformed");
  return absl::OkStatus();
}

// A memfd of `size` bytes whose pages exist already (so the daemon's writes
// allocate nothing, and the memory counts against this process), sealed so
// that it cannot change size.
absl::StatusOr<UniqueFd> CreateRegion(uint64_t size) {
  UniqueFd region(
      memfd_create("modelstate-fetch", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!region.valid())
    return absl::ResourceExhaustedError(
        absl::StrCat("memfd_create: ", strerror(errno)));
  if (ftruncate(region.get(), static_cast<off_t>(size)) != 0 ||
      (size > 0 &&
       fallocate(region.get(), 0, 0, static_cast<off_t>(size)) != 0) ||
      fcntl(region.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot allocate a ", size, "-byte region: ", strerror(errno)));
  }
  return region;
}

// Seals the filled region against writes, maps it read-only and verifies
// every tensor, returning them as views of the mapping.
absl::StatusOr<std::vector<Tensor>> MapAndVerify(
    int region, uint64_t size, const std::vector<TransferEntry>& entries,
    const v1::LocalManifest& manifest) {
  if (fcntl(region, F_ADD_SEALS, F_SEAL_WRITE) != 0)
    return absl::InternalError(
        absl::StrCat("cannot seal the region: ", strerror(errno)));
  std::shared_ptr<const void> mapping;
  const uint8_t* base = nullptr;
  if (size > 0) {
    void* mapped =
        mmap(nullptr, size, PROT_READ, MAP_SHARED | MAP_POPULATE, region, 0);
    if (mapped == MAP_FAILED)
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot map the region: ", strerror(errno)));
    mapping = std::shared_ptr<const void>(
        mapped, [size](const void* p) { munmap(const_cast<void*>(p), size); });
    base = static_cast<const uint8_t*>(mapped);
  }
  std::shared_ptr<const Storage> storage =
      Storage::Borrow(base, size, std::move(mapping));
  std::vector<Tensor> tensors;
  tensors.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    ASSIGN_OR_RETURN(Tensor tensor,
                     Tensor::View(entries[i].dtype, entries[i].shape, storage,
                                  manifest.offsets(static_cast<int>(i))));
    if (XXH3_64bits(tensor.data(), tensor.num_bytes()) != entries[i].checksum)
      return absl::DataLossError(
          absl::StrCat("checksum mismatch for \"", entries[i].key, "\""));
    tensors.push_back(std::move(tensor));
  }
  return tensors;
}

}  // namespace

std::string LocalSocketFor(const std::string& target,
                           const std::string& configured) {
  if (!configured.empty()) return configured;
  absl::string_view path = target;
  if (absl::ConsumePrefix(&path, "unix://") ||
      absl::ConsumePrefix(&path, "unix:"))
    return path.empty() ? "" : absl::StrCat(path, ".local");
  return "";
}

absl::StatusOr<absl::optional<LocalFetched>> FetchLocally(
    const LocalFetchSettings& settings, const v1::StateDictRequest& request,
    const LocalManifestCallback& on_manifest) {
  ASSIGN_OR_RETURN(const UniqueFd socket_fd, Connect(settings.socket_path));
  if (!socket_fd.valid()) return absl::nullopt;
  RETURN_IF_ERROR(SetSocketTimeouts(socket_fd.get(), settings.timeout));
  v1::LocalRequest message;
  *message.mutable_fetch()->mutable_request() = request;
  message.mutable_fetch()->set_token(settings.token);
  RETURN_IF_ERROR(WriteLocalFrame(socket_fd.get(), message));
  ASSIGN_OR_RETURN(v1::LocalResponse response, ReadResponse(socket_fd.get()));
  if (!response.has_manifest())
    return absl::DataLossError("the daemon did not answer with a manifest");
  LocalFetched fetched;
  v1::LocalManifest& manifest = *response.mutable_manifest();
  absl::StatusOr<std::vector<TransferEntry>> entries =
      ToTransferEntries(manifest.manifest().tensors());
  if (!entries.ok()) return absl::DataLossError(entries.status().message());
  fetched.entries = std::move(*entries);
  RETURN_IF_ERROR(CheckLayout(manifest, fetched.entries));
  if (on_manifest)
    RETURN_IF_ERROR(on_manifest(manifest.manifest(), fetched.entries));
  ASSIGN_OR_RETURN(const UniqueFd region,
                   CreateRegion(manifest.region_bytes()));
  message.Clear();
  message.mutable_region()->set_size(manifest.region_bytes());
  RETURN_IF_ERROR(WriteLocalFrame(socket_fd.get(), message, region.get()));
  ASSIGN_OR_RETURN(const v1::LocalResponse filled,
                   ReadResponse(socket_fd.get()));
  if (!filled.has_filled() ||
      filled.filled().total_bytes() != manifest.manifest().total_bytes())
    return absl::DataLossError("the daemon did not fill the region");
  ASSIGN_OR_RETURN(fetched.tensors,
                   MapAndVerify(region.get(), manifest.region_bytes(),
                                fetched.entries, manifest));
  fetched.manifest = std::move(*manifest.mutable_manifest());
  return fetched;
}

}  // namespace modelstate
