#include "client/local_fetch.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/limits.h"
#include "common/status_macros.h"
#include "proto/convert.h"
#include "proto/local_frame.h"
#include "transfer/export_seals.h"

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

// Reads the daemon's answer; its error message becomes our status. A
// descriptor that comes with it goes to `received_fd`, when not null.
absl::StatusOr<v1::LocalResponse> ReadResponse(
    int socket_fd, UniqueFd* received_fd = nullptr) {
  v1::LocalResponse response;
  absl::Status read =
      ReadLocalFrame(socket_fd, kMaxLocalFrameBytes, &response, received_fd);
  if (read.code() == absl::StatusCode::kInvalidArgument ||
      read.code() == absl::StatusCode::kOutOfRange)
    return absl::UnavailableError(
        absl::StrCat("local socket: ", read.message()));
  RETURN_IF_ERROR(read);
  if (response.has_error()) return FromLocalStatus(response.error());
  return response;
}

// Sends `fetch` and reads the daemon's first answer (a descriptor with it goes
// to `exported`). nullopt when the daemon refused for want of room
// (ResourceExhausted: no connection slot free, or not the memory): gRPC, with
// its own admission, serves the fetch instead.
absl::StatusOr<absl::optional<v1::LocalResponse>> SendFetch(
    int socket_fd, const v1::LocalRequest& fetch, UniqueFd* exported) {
  const absl::Status sent = WriteLocalFrame(socket_fd, fetch);
  // A daemon refusing a connection answers without reading the request and
  // closes, which can break the write; its answer is still there to read.
  if (!sent.ok() && sent.code() != absl::StatusCode::kUnavailable) return sent;
  absl::StatusOr<v1::LocalResponse> response =
      ReadResponse(socket_fd, exported);
  if (response.status().code() == absl::StatusCode::kResourceExhausted)
    return absl::nullopt;
  RETURN_IF_ERROR(sent);
  RETURN_IF_ERROR(response.status());
  return *std::move(response);
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

// MADV_POPULATE_READ, which older C libraries do not name.
constexpr int kPopulateRead = 22;

// Threads that verify the checksums of tensors that landed together.
constexpr int kVerifyThreads = 2;

// Maps `size` bytes of `fd` (none if 0) with `protection` and `flags`; the
// mapping is undone when the returned pointer's last copy goes.
absl::StatusOr<std::shared_ptr<const void>> Map(int fd, uint64_t size,
                                                int protection, int flags,
                                                const char* what) {
  if (size == 0) return std::shared_ptr<const void>();
  void* mapped = mmap(nullptr, size, protection, flags, fd, 0);
  if (mapped == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot map ", what, ": ", strerror(errno)));
  }
  return std::shared_ptr<const void>(
      mapped, [size](const void* p) { munmap(const_cast<void*>(p), size); });
}

// The tensors of `entries` as views of `mapping` (of `size` bytes) at the
// manifest's offsets; the mapping lives as long as any of them.
absl::StatusOr<std::vector<Tensor>> ViewsOf(
    std::shared_ptr<const void> mapping, uint64_t size,
    const std::vector<TransferEntry>& entries,
    const v1::LocalManifest& manifest) {
  const auto* base = static_cast<const uint8_t*>(mapping.get());
  std::shared_ptr<const Storage> storage =
      Storage::Borrow(base, size, std::move(mapping));
  std::vector<Tensor> tensors;
  tensors.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    ASSIGN_OR_RETURN(Tensor tensor,
                     Tensor::View(entries[i].dtype, entries[i].shape, storage,
                                  manifest.offsets(static_cast<int>(i))));
    tensors.push_back(std::move(tensor));
  }
  return tensors;
}

// Maps the region copy-on-write (its pages exist already, so this only fills
// page tables) and returns the tensors as views of the mapping: the caller
// may write them, and gets private copies of the pages it writes.
absl::StatusOr<std::vector<Tensor>> MapRegion(
    int region, uint64_t size, const std::vector<TransferEntry>& entries,
    const v1::LocalManifest& manifest) {
  // Mapped through a read-only descriptor, which F_SEAL_WRITE tolerates; a
  // private mapping never writes the memfd, and its untouched pages show
  // what the daemon writes there.
  UniqueFd read_only;
  if (size > 0) {
    read_only = UniqueFd(open(absl::StrCat("/proc/self/fd/", region).c_str(),
                              O_RDONLY | O_CLOEXEC));
    if (!read_only.valid()) {
      return absl::InternalError(
          absl::StrCat("cannot reopen the region: ", strerror(errno)));
    }
  }
  // Not populated yet: the fallocated pages are zeroed on first touch, which
  // the daemon's writes do anyway (see Populate).
  ASSIGN_OR_RETURN(std::shared_ptr<const void> mapping,
                   Map(read_only.get(), size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE, "the region"));
  return ViewsOf(std::move(mapping), size, entries, manifest);
}

// Maps in the pages of tensors [from, to), written by now, in one call
// rather than one fault per page (MADV_POPULATE_READ, Linux 5.14; on older
// kernels the hash faults them in).
void Populate(const std::vector<Tensor>& tensors, size_t from, size_t to) {
  if (from >= to) return;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin =
      reinterpret_cast<uintptr_t>(tensors[from].data()) / page * page;
  const uintptr_t end = reinterpret_cast<uintptr_t>(tensors[to - 1].data()) +
                        tensors[to - 1].num_bytes();
  if (end > begin)
    madvise(reinterpret_cast<void*>(begin), end - begin, kPopulateRead);
}

// Checks the XXH3-64 of tensors [from, to). They are split between
// kVerifyThreads threads by bytes, each tensor whole (a hash runs over one
// tensor in order): hashing is the client's only pass over the bytes.
absl::Status Verify(const std::vector<Tensor>& tensors,
                    const std::vector<TransferEntry>& entries, size_t from,
                    size_t to) {
  Populate(tensors, from, to);
  uint64_t total = 0;
  for (size_t i = from; i < to; ++i) total += tensors[i].num_bytes();
  std::vector<char> matches(to - from, 0);
  const auto hash = [&](int worker) {
    uint64_t before = 0;
    for (size_t i = from; i < to; ++i) {
      const int owner = static_cast<int>(before * kVerifyThreads / (total + 1));
      before += tensors[i].num_bytes();
      if (owner != worker) continue;
      matches[i - from] =
          ChecksumOf(tensors[i].data(), tensors[i].num_bytes()) ==
          entries[i].checksum;
    }
  };
  std::vector<std::thread> helpers;
  for (int worker = 1; worker < kVerifyThreads; ++worker)
    helpers.emplace_back(hash, worker);
  hash(0);
  for (std::thread& helper : helpers) helper.join();
  for (size_t i = from; i < to; ++i) {
    if (!matches[i - from])
      return absl::DataLossError(
          absl::StrCat("checksum mismatch for \"", entries[i].key, "\""));
  }
  return absl::OkStatus();
}

// Follows the daemon's fill of `region`: verifies tensors as progress
// reports say they are in place (while the daemon writes the next ones), then
// the rest once it says all are, and seals the region against writes so that
// the tensors can never change.
absl::Status VerifyAsFilled(int socket_fd, int region,
                            const std::vector<Tensor>& tensors,
                            const std::vector<TransferEntry>& entries,
                            uint64_t total_bytes) {
  size_t verified = 0;
  while (true) {
    ASSIGN_OR_RETURN(const v1::LocalResponse response, ReadResponse(socket_fd));
    if (response.has_filled() && response.filled().total_bytes() == total_bytes)
      break;
    const uint32_t written = response.progress().tensors_written();
    if (!response.has_progress() || written < verified ||
        written > tensors.size())
      return absl::DataLossError("malformed progress of the region's fill");
    RETURN_IF_ERROR(Verify(tensors, entries, verified, written));
    verified = written;
  }
  // Only the daemon could write besides us, and it closed its descriptor
  // before reporting the end.
  if (fcntl(region, F_ADD_SEALS, F_SEAL_WRITE) != 0)
    return absl::InternalError(
        absl::StrCat("cannot seal the region: ", strerror(errno)));
  return Verify(tensors, entries, verified, tensors.size());
}

// Checks that `fd` is what the daemon promises of an export: a memfd of
// exactly the manifest's region_bytes that nobody can write, resize or unseal,
// holding each tensor whole at a 64-aligned offset.
absl::Status CheckExport(int fd, const v1::LocalManifest& manifest,
                         const std::vector<TransferEntry>& entries) {
  struct stat info {};
  const int seals = fcntl(fd, F_GET_SEALS);
  if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode) || seals < 0 ||
      (seals & kExportSeals) != kExportSeals ||
      static_cast<uint64_t>(info.st_size) != manifest.region_bytes())
    return absl::DataLossError(
        "the daemon's export is not a sealed memfd of the manifest's size");
  ASSIGN_OR_RETURN(const std::vector<uint64_t> sizes, TransferSizes(entries));
  if (manifest.offsets_size() != static_cast<int>(sizes.size()))
    return absl::DataLossError("the daemon's export layout is malformed");
  for (size_t i = 0; i < sizes.size(); ++i) {
    const uint64_t offset = manifest.offsets(static_cast<int>(i));
    if (offset % kLocalRegionAlignment != 0 ||
        offset > manifest.region_bytes() ||
        sizes[i] > manifest.region_bytes() - offset)
      return absl::DataLossError("the daemon's export layout is malformed");
  }
  return absl::OkStatus();
}

// Maps the export privately (a worker writing to its tensors' pages gets its
// own copies of those pages; the export never changes) and maps in the pages
// of the fetched tensors, which already exist: no byte is copied. With
// `verify`, checks every tensor's XXH3-64 as well (the daemon did when it
// made the export).
absl::StatusOr<std::vector<Tensor>> MapExport(
    int fd, const v1::LocalManifest& manifest,
    const std::vector<TransferEntry>& entries, bool verify) {
  const uint64_t size = manifest.region_bytes();
  ASSIGN_OR_RETURN(std::shared_ptr<const void> mapping,
                   Map(fd, size, PROT_READ | PROT_WRITE, MAP_PRIVATE,
                       "the daemon's export"));
  ASSIGN_OR_RETURN(std::vector<Tensor> tensors,
                   ViewsOf(std::move(mapping), size, entries, manifest));
  // Read faults only: a write fault on a private mapping would copy.
  Populate(tensors, 0, tensors.size());
  if (verify) RETURN_IF_ERROR(Verify(tensors, entries, 0, tensors.size()));
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
  v1::LocalRequest message;
  *message.mutable_fetch()->mutable_request() = request;
  message.mutable_fetch()->set_token(settings.token);
  message.mutable_fetch()->set_accept_export(settings.accept_exports);
  // The daemon reads no larger request before it knows who sends it.
  if (message.ByteSizeLong() > kMaxLocalRequestBytes) return absl::nullopt;
  ASSIGN_OR_RETURN(const UniqueFd socket_fd, Connect(settings.socket_path));
  if (!socket_fd.valid()) return absl::nullopt;
  RETURN_IF_ERROR(SetSocketTimeouts(socket_fd.get(), settings.timeout));
  UniqueFd exported;
  ASSIGN_OR_RETURN(absl::optional<v1::LocalResponse> answer,
                   SendFetch(socket_fd.get(), message, &exported));
  if (!answer.has_value()) return absl::nullopt;
  v1::LocalResponse& response = *answer;
  if (!response.has_manifest() ||
      response.manifest().shared_export() != exported.valid())
    return absl::DataLossError("the daemon did not answer with a manifest");
  LocalFetched fetched;
  v1::LocalManifest& manifest = *response.mutable_manifest();
  absl::StatusOr<std::vector<TransferEntry>> entries =
      ToTransferEntries(manifest.manifest().tensors());
  if (!entries.ok()) return absl::DataLossError(entries.status().message());
  fetched.entries = std::move(*entries);
  RETURN_IF_ERROR(exported.valid()
                      ? CheckExport(exported.get(), manifest, fetched.entries)
                      : CheckLayout(manifest, fetched.entries));
  if (on_manifest)
    RETURN_IF_ERROR(on_manifest(manifest.manifest(), fetched.entries));
  if (exported.valid()) {
    ASSIGN_OR_RETURN(fetched.tensors,
                     MapExport(exported.get(), manifest, fetched.entries,
                               settings.verify_exports));
    fetched.manifest = std::move(*manifest.mutable_manifest());
    return fetched;
  }
  ASSIGN_OR_RETURN(const UniqueFd region,
                   CreateRegion(manifest.region_bytes()));
  message.Clear();
  message.mutable_region()->set_size(manifest.region_bytes());
  RETURN_IF_ERROR(WriteLocalFrame(socket_fd.get(), message, region.get()));
  ASSIGN_OR_RETURN(fetched.tensors,
                   MapRegion(region.get(), manifest.region_bytes(),
                             fetched.entries, manifest));
  RETURN_IF_ERROR(VerifyAsFilled(socket_fd.get(), region.get(), fetched.tensors,
                                 fetched.entries,
                                 manifest.manifest().total_bytes()));
  fetched.manifest = std::move(*manifest.mutable_manifest());
  return fetched;
}

}  // namespace modelstate
