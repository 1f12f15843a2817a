#include "server/local_transfer.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/file_util.h"
#include "common/limits.h"
#include "common/status_macros.h"
#include "proto/convert.h"
#include "transfer/transfer.h"

namespace modelstate {
namespace {

absl::Status Errno(absl::string_view what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

absl::StatusOr<LocalPeer> PeerOf(int connection) {
  ucred credentials{};
  socklen_t size = sizeof(credentials);
  if (getsockopt(connection, SOL_SOCKET, SO_PEERCRED, &credentials, &size) !=
          0 ||
      size != sizeof(credentials) || credentials.pid <= 0) {
    return absl::PermissionDeniedError(
        "the local socket's peer has no credentials");
  }
  return LocalPeer{credentials.pid, credentials.uid, credentials.gid};
}

// Checks that `fd` is a region this daemon may write without risk: a memfd
// (only shmem files take seals) sealed against shrinking, so pwrite can
// neither fault nor block, of exactly `size` bytes.
absl::Status CheckRegion(int fd, uint64_t size) {
  struct stat info {};
  if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode))
    return absl::InvalidArgumentError("the region is not a memfd");
  const int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
    return absl::InvalidArgumentError(
        "the region must be a memfd sealed against shrinking (F_SEAL_SHRINK)");
  }
  if ((seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) != 0)
    return absl::InvalidArgumentError("the region is sealed against writes");
  if (static_cast<uint64_t>(info.st_size) != size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the region has ", info.st_size, " bytes, expected ", size));
  }
  return absl::OkStatus();
}

// Bytes written between two progress reports: large enough that a model of
// many small tensors costs few frames, small enough that the client verifies
// a 1 GiB model in about 16 steps behind the writes.
constexpr uint64_t kProgressBytes = 32u << 20;

// Writes each tensor at its offset of the region: one copy, by the kernel.
// Calls `report(n)` whenever the first n tensors are written and at least
// kProgressBytes have been since the last report; its error stops the fill.
absl::Status FillRegion(int fd, const std::vector<Tensor>& tensors,
                        const std::vector<uint64_t>& offsets,
                        const std::function<absl::Status(size_t)>& report) {
  uint64_t unreported = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const absl::Status written =
        WriteFullyAt(fd, offsets[i], tensors[i].data(), tensors[i].num_bytes(),
                     "the region");
    // Whatever the errno, the client's region could not take the bytes.
    if (!written.ok()) return absl::ResourceExhaustedError(written.message());
    unreported += tensors[i].num_bytes();
    if (unreported >= kProgressBytes && i + 1 < tensors.size()) {
      RETURN_IF_ERROR(report(i + 1));
      unreported = 0;
    }
  }
  return absl::OkStatus();
}

v1::LocalResponse ErrorResponse(const absl::Status& status) {
  v1::LocalResponse response;
  *response.mutable_error() = ToLocalStatus(status);
  return response;
}

// A fetch planned and held: the snapshot's tensors stay alive while it does.
struct HeldFetch {
  FetchPlan plan;
  std::vector<Tensor> tensors;
  LocalRegionLayout layout;
  uint64_t total_bytes = 0;
};

// The fetch `request` asks for, once `peer` may make it; the error to send
// otherwise.
absl::StatusOr<FetchRequest> AuthorizedFetch(
    const LocalPeer& peer, const LocalAuthorizer& authorize,
    const v1::LocalFetchRequest& request) {
  ASSIGN_OR_RETURN(FetchRequest fetch, FromProto(request.request()));
  if (authorize) RETURN_IF_ERROR(authorize(peer, request.token(), fetch));
  // A region holds every tensor at its own offset; copies on one host cost
  // little, so shared tensors are filled once per key.
  fetch.accept_shared_tensors = false;
  return fetch;
}

absl::StatusOr<HeldFetch> PlanFetch(ModelStore* store,
                                    const FetchRequest& fetch) {
  HeldFetch held;
  ASSIGN_OR_RETURN(held.plan, store->Fetch(fetch));
  held.tensors = held.plan.state->Tensors();
  std::vector<uint64_t> sizes;
  for (const Tensor& tensor : held.tensors) {
    sizes.push_back(tensor.num_bytes());
    held.total_bytes += tensor.num_bytes();
  }
  ASSIGN_OR_RETURN(held.layout, LayOutLocalRegion(sizes));
  return held;
}

// Fills `region`, which the client says is `size` bytes, with the tensors of
// `held`, reporting progress on `connection`. A report that cannot be sent
// means the client is gone: the fill stops there, with that error in `*sent`.
// Returns what the client is told of the fill.
absl::Status FillReceivedRegion(int connection, int region, uint64_t size,
                                const HeldFetch& held, absl::Status* sent) {
  if (size != held.layout.region_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LocalRegion.size is ", size, ", expected ", held.layout.region_bytes));
  }
  RETURN_IF_ERROR(CheckRegion(region, held.layout.region_bytes));
  return FillRegion(region, held.tensors, held.layout.offsets,
                    [&](size_t written) {
                      v1::LocalResponse progress;
                      progress.mutable_progress()->set_tensors_written(
                          static_cast<uint32_t>(written));
                      *sent = WriteLocalFrame(connection, progress);
                      return *sent;
                    });
}

}  // namespace

absl::StatusOr<std::unique_ptr<LocalTransferServer>> LocalTransferServer::Start(
    ModelStore* store, LocalTransferOptions options) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (options.path.empty() || options.path.size() >= sizeof(address.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("local socket path must have 1 to ",
                     sizeof(address.sun_path) - 1, " characters"));
  }
  if (options.max_connections < 1 || options.max_connections_per_uid < 0 ||
      options.idle_timeout <= absl::ZeroDuration() ||
      options.request_timeout <= absl::ZeroDuration() ||
      options.authorization_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "local socket: max_connections and the timeouts must be positive, "
        "max_connections_per_uid not negative");
  }
  std::memcpy(address.sun_path, options.path.data(), options.path.size());
  UniqueFd listener(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!listener.valid()) return Errno("cannot create the local socket");
  // A socket file left by an earlier daemon is replaced; anything else there
  // is an error from bind.
  struct stat existing {};
  if (lstat(options.path.c_str(), &existing) == 0 && S_ISSOCK(existing.st_mode))
    unlink(options.path.c_str());
  if (bind(listener.get(), reinterpret_cast<const sockaddr*>(&address),
           sizeof(address)) != 0) {
    return Errno(absl::StrCat("cannot bind the local socket ", options.path));
  }
  if (chmod(options.path.c_str(), options.socket_mode) != 0 ||
      listen(listener.get(), 64) != 0) {
    absl::Status error = Errno(absl::StrCat("cannot listen on ", options.path));
    unlink(options.path.c_str());
    return error;
  }
  std::unique_ptr<LocalTransferServer> server(
      new LocalTransferServer(store, std::move(options), std::move(listener)));
  if (!server->wake_.valid() || !server->exported_.valid())
    return Errno("cannot create an eventfd");
  server->acceptor_ = std::thread([raw = server.get()] { raw->AcceptLoop(); });
  return server;
}

LocalTransferServer::LocalTransferServer(ModelStore* store,
                                         LocalTransferOptions options,
                                         UniqueFd listener)
    : store_(store),
      options_(std::move(options)),
      max_connections_per_uid_(options_.max_connections_per_uid > 0
                                   ? options_.max_connections_per_uid
                                   : std::max(1, options_.max_connections / 4)),
      listener_(std::move(listener)),
      wake_(eventfd(0, EFD_CLOEXEC)),
      exported_(eventfd(0, EFD_CLOEXEC)),
      exports_(options_.export_bytes) {}

LocalTransferServer::~LocalTransferServer() {
  if (wake_.valid()) {
    const uint64_t one = 1;
    // An eventfd counter cannot overflow from one write; no error to handle.
    (void)!write(wake_.get(), &one, sizeof(one));
  }
  if (acceptor_.joinable()) acceptor_.join();
  std::vector<std::thread> handlers;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, connection] : connections_) {
      if (connection.fd >= 0) shutdown(connection.fd, SHUT_RDWR);
      handlers.push_back(std::move(connection.handler));
    }
  }
  for (std::thread& handler : handlers) handler.join();
  unlink(options_.path.c_str());
}

int LocalTransferServer::active_connections() const {
  absl::MutexLock lock(&mu_);
  return active_;
}

int64_t LocalTransferServer::fetches_served() const {
  absl::MutexLock lock(&mu_);
  return fetches_served_;
}

int64_t LocalTransferServer::fetches_from_exports() const {
  absl::MutexLock lock(&mu_);
  return fetches_from_exports_;
}

void LocalTransferServer::CountServed(bool from_export) {
  absl::MutexLock lock(&mu_);
  ++fetches_served_;
  if (from_export) ++fetches_from_exports_;
}

void LocalTransferServer::AcceptLoop() {
  pollfd watched[3] = {{listener_.get(), POLLIN, 0},
                       {wake_.get(), POLLIN, 0},
                       {exported_.get(), POLLIN, 0}};
  while (true) {
    Reap();
    // Exports of versions that died give their memory back within a second:
    // while any is kept, the loop wakes that often to look (and a new export
    // wakes it to start).
    exports_.Purge();
    const int timeout_ms = exports_.size() > 0 ? 1000 : -1;
    const int ready = poll(watched, 3, timeout_ms);
    if (ready == 0) continue;
    if (ready < 0) {
      if (errno == EINTR) continue;
      std::fprintf(stderr, "modelstated: local socket: poll: %s\n",
                   std::strerror(errno));
      return;
    }
    if (watched[1].revents != 0) return;
    if (watched[2].revents != 0) {
      uint64_t count;
      (void)!read(exported_.get(), &count, sizeof(count));  // Drains it.
    }
    if (watched[0].revents == 0) continue;
    UniqueFd connection(
        accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (connection.valid()) {
      Admit(std::move(connection));
    } else if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
               errno == ENOMEM) {
      // The connection stays queued and poll would report it again at once:
      // wait for descriptors or memory to come free instead of spinning.
      absl::SleepFor(absl::Milliseconds(50));
    }  // Otherwise (a peer gone before accept) the loop just goes on.
  }
}

void LocalTransferServer::Admit(UniqueFd connection) {
  const absl::StatusOr<LocalPeer> peer = PeerOf(connection.get());
  absl::Status admitted = peer.status();
  {
    absl::MutexLock lock(&mu_);
    if (admitted.ok()) admitted = CheckRoomFor(*peer);
    if (admitted.ok()) {
      const uint64_t id = next_id_++;
      ++active_;
      ++active_per_uid_[peer->uid];
      Connection& entry = connections_[id];
      entry.fd = connection.Release();
      entry.handler = std::thread(
          [this, id, fd = entry.fd, peer = *peer] { Serve(id, fd, peer); });
      return;
    }
  }
  // The refusal is a small frame that the socket's buffer takes at once; the
  // timeout only guards the accepting thread against surprises.
  (void)SetSocketTimeouts(connection.get(), absl::Seconds(1));
  (void)WriteLocalFrame(connection.get(), ErrorResponse(admitted));
}

absl::Status LocalTransferServer::CheckRoomFor(const LocalPeer& peer) const {
  if (active_ >= options_.max_connections)
    return absl::ResourceExhaustedError("too many local connections");
  const auto of_uid = active_per_uid_.find(peer.uid);
  if (of_uid != active_per_uid_.end() &&
      of_uid->second >= max_connections_per_uid_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("too many local connections of uid ", peer.uid,
                     " (at most ", max_connections_per_uid_, ")"));
  }
  return absl::OkStatus();
}

void LocalTransferServer::Reap() {
  std::vector<std::thread> finished;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = connections_.begin(); it != connections_.end();) {
      if (it->second.fd >= 0) {
        ++it;
        continue;
      }
      finished.push_back(std::move(it->second.handler));
      it = connections_.erase(it);
    }
  }
  for (std::thread& handler : finished) handler.join();
}

void LocalTransferServer::Serve(uint64_t id, int connection,
                                const LocalPeer& peer) {
  absl::Time unauthorized_until = absl::Now() + options_.authorization_timeout;
  absl::Status status = SetSocketTimeouts(connection, options_.idle_timeout);
  while (status.ok()) {
    v1::LocalRequest request;
    status = ReadRequest(connection, unauthorized_until, &request,
                         /*received_fd=*/nullptr);
    if (status.ok())
      status = Answer(connection, peer, request, &unauthorized_until);
  }
  // A clean close, a timeout or a broken socket need no answer; a request we
  // could not make sense of does.
  if (status.code() == absl::StatusCode::kInvalidArgument)
    (void)WriteLocalFrame(connection, ErrorResponse(status));
  absl::MutexLock lock(&mu_);
  close(connection);
  connections_[id].fd = -1;
  --active_;
  if (--active_per_uid_[peer.uid] == 0) active_per_uid_.erase(peer.uid);
}

absl::Status LocalTransferServer::ReadRequest(int connection,
                                              absl::Time first_byte_by,
                                              v1::LocalRequest* request,
                                              UniqueFd* received_fd) {
  RETURN_IF_ERROR(AwaitLocalFrame(connection, first_byte_by));
  const absl::Time deadline =
      std::min(first_byte_by, absl::Now() + options_.request_timeout);
  return ReadLocalFrame(connection, kMaxLocalRequestBytes, request, received_fd,
                        deadline);
}

absl::Status LocalTransferServer::Answer(int connection, const LocalPeer& peer,
                                         const v1::LocalRequest& request,
                                         absl::Time* unauthorized_until) {
  if (!request.has_fetch()) {
    return absl::InvalidArgumentError(
        "a local connection must start with a fetch request");
  }
  const absl::StatusOr<FetchRequest> fetch =
      AuthorizedFetch(peer, options_.authorize, request.fetch());
  // A refused request leaves the connection usable, within the time an
  // unauthorized connection has.
  if (!fetch.ok())
    return WriteLocalFrame(connection, ErrorResponse(fetch.status()));
  *unauthorized_until = absl::InfiniteFuture();
  return ServeFetch(connection, *fetch, request.fetch().accept_export());
}

absl::Status LocalTransferServer::ServeFetch(int connection,
                                             const FetchRequest& fetch,
                                             bool accept_export) {
  absl::StatusOr<HeldFetch> held = PlanFetch(store_, fetch);
  if (!held.ok())
    return WriteLocalFrame(connection, ErrorResponse(held.status()));
  v1::LocalResponse response;
  v1::LocalManifest* manifest = response.mutable_manifest();
  *manifest->mutable_manifest() = ToManifest(held->plan, held->total_bytes);
  const absl::optional<ExportCache::Found> exported =
      accept_export ? ExportFor(held->tensors, held->layout.offsets,
                                held->layout.region_bytes)
                    : absl::nullopt;
  if (exported.has_value()) {
    for (uint64_t offset : exported->offsets) manifest->add_offsets(offset);
    manifest->set_region_bytes(exported->source->size());
    manifest->set_shared_export(true);
    // Counted before the client can see it, as a filled region is.
    CountServed(/*from_export=*/true);
    return WriteLocalFrame(connection, response, exported->source->fd());
  }
  for (uint64_t offset : held->layout.offsets) manifest->add_offsets(offset);
  manifest->set_region_bytes(held->layout.region_bytes);
  RETURN_IF_ERROR(WriteLocalFrame(connection, response));

  v1::LocalRequest next;
  UniqueFd region;
  RETURN_IF_ERROR(
      ReadRequest(connection, absl::InfiniteFuture(), &next, &region));
  if (!next.has_region() || !region.valid()) {
    return absl::InvalidArgumentError(
        "expected the region (LocalRegion with one descriptor) after the "
        "manifest");
  }
  absl::Status sent;
  const absl::Status filled = FillReceivedRegion(
      connection, region.get(), next.region().size(), *held, &sent);
  region.Reset();
  RETURN_IF_ERROR(sent);
  if (!filled.ok()) return WriteLocalFrame(connection, ErrorResponse(filled));
  CountServed(/*from_export=*/false);
  response.Clear();
  response.mutable_filled()->set_total_bytes(held->total_bytes);
  return WriteLocalFrame(connection, response);
}

absl::optional<ExportCache::Found> LocalTransferServer::ExportFor(
    const std::vector<Tensor>& tensors, const std::vector<uint64_t>& offsets,
    uint64_t size) {
  absl::optional<ExportCache::Found> found = exports_.Find(tensors);
  if (found.has_value() || !exports_.Admits(size)) return found;
  absl::MutexLock making(&making_export_mu_);
  found = exports_.Find(tensors);  // Made while this fetch waited?
  if (found.has_value()) return found;
  // Exports of dead versions give their bytes back before the limit is asked.
  exports_.Purge();
  if (!store_->CheckMemoryFor(static_cast<int64_t>(size)).ok())
    return absl::nullopt;
  absl::StatusOr<std::shared_ptr<const MemfdExport>> made =
      MemfdExport::Create(tensors, offsets, size);
  if (!made.ok()) {
    std::fprintf(stderr, "modelstated: local socket: no export: %s\n",
                 made.status().ToString().c_str());
    return absl::nullopt;
  }
  // Checked again while charging: a load may have taken the room meanwhile.
  if (!store_->ChargeIfFits((*made)->charge(), static_cast<int64_t>(size))
           .ok() ||
      !exports_.Add(*made))
    return absl::nullopt;
  const uint64_t one = 1;
  // Starts AcceptLoop's sweep; an eventfd counter cannot overflow from this.
  (void)!write(exported_.get(), &one, sizeof(one));
  return ExportCache::Found{*std::move(made), offsets};
}

}  // namespace modelstate
