// modelstated: serves PyTorch-style model state over gRPC. See README.md and
// docs/operations.md.
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "model/tensor.h"
#include "server/connection_gate.h"
#include "server/server.h"
#include "store/memory_limit.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50551",
          "host:port to serve on (port 0: any free port)");
ABSL_FLAG(std::vector<std::string>, preload, {},
          "NAME=PATH of a model to load at start (.safetensors checkpoint or "
          "architecture .json); "
          "repeatable");
ABSL_FLAG(std::string, demo_model, "demo",
          "name of the built-in demo CNN to serve; empty to serve none");
ABSL_FLAG(uint32_t, chunk_bytes, modelstate::kDefaultChunkBytes,
          "default chunk size of StateDict streams (max 3 MiB)");
ABSL_FLAG(int64_t, memory_limit_bytes, -1,
          "limit on live tensor bytes; -1: 90% of the cgroup's memory limit "
          "or of physical memory; 0: unlimited");
ABSL_FLAG(int32_t, max_pending_loads, 16,
          "loads in flight at once (each holds staging memory); 0: unlimited; "
          "more are refused with RESOURCE_EXHAUSTED");
ABSL_FLAG(absl::Duration, stream_idle_timeout, absl::Seconds(60),
          "end load streams that send nothing, and fetches whose client reads "
          "nothing, for this long; inf disables");
ABSL_FLAG(std::string, tls_cert, "", "PEM server certificate (enables TLS)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA that client certificates must chain to (mTLS)");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port of a plaintext HTTP listener serving Prometheus metrics "
          "at /metrics, to anyone who reaches it (no credentials); empty for "
          "none");
ABSL_FLAG(bool, metrics_model_labels, true,
          "label per-model metrics (modelstate_model_version, "
          "modelstate_model_bytes) with each model's name, also of models "
          "an --auth_policy hides; false leaves those series out, so that "
          "/metrics names no model");
ABSL_FLAG(std::string, health_listen, "",
          "host:port of an extra plaintext port serving only grpc.health.v1");
ABSL_FLAG(absl::Duration, shutdown_grace, absl::Seconds(30),
          "on SIGTERM/SIGINT, how long streams in flight may take to finish");
ABSL_FLAG(bool, log_rpcs, true, "write one line per RPC to stderr");
ABSL_FLAG(std::string, data_dir, "",
          "persist every committed version here and restore from it at start; "
          "empty: memory only");
ABSL_FLAG(std::string, durability, "sync",
          "with --data_dir: sync (a load returns once durable) or async "
          "(written in the background)");
ABSL_FLAG(int32_t, retain_versions, 1,
          "versions kept per model in memory and on disk, for older snapshots "
          "and rollback");

// Consistent reads (min_version).
ABSL_FLAG(absl::Duration, max_version_wait, absl::Seconds(60),
          "longest a read with min_version waits for the model to reach it "
          "(also when the client's deadline is later or unset); 0: never "
          "wait");
// Authentication and authorization (docs/operations.md).
ABSL_FLAG(std::string, auth_policy, "",
          "JSON policy of principals (bearer-token hashes, client-certificate "
          "names) and their roles per model glob; re-read on SIGHUP and when "
          "the file changes; empty: every caller may do everything");
ABSL_FLAG(
    absl::Duration, auth_policy_poll, absl::Seconds(5),
    "how often --auth_policy is checked for changes; inf: only on SIGHUP");
ABSL_FLAG(std::string, audit_log, "-",
          "one line per write (principal, model, version, bytes): - for "
          "stderr, a file to append to, or empty for none");
ABSL_FLAG(bool, reflection, true, "serve gRPC server reflection");
// Same-host shared-memory fetch (docs/operations.md).
ABSL_FLAG(std::string, local_socket, "",
          "path of a Unix socket (created with mode 0660) on which clients on "
          "this host fetch state dicts through shared memory instead of TCP; "
          "empty for none");
ABSL_FLAG(uint64_t, local_export_bytes, uint64_t{4} << 30,
          "bytes of sealed memfd exports kept for --local_socket fetches "
          "(zero copy; counted by --memory_limit_bytes; least recently used "
          "dropped first); 0 makes none, and every local fetch copies into "
          "the client's memory");
ABSL_FLAG(int32_t, local_max_connections_per_uid, 0,
          "connections one peer uid may hold on --local_socket at once; more "
          "are refused and those clients fetch through gRPC (0: a quarter of "
          "the 64 connection slots)");
// Connection limits: keepalive enforcement, idle connections and
// the minimum chunk. See docs/operations.md.
ABSL_FLAG(absl::Duration, keepalive_min_ping_interval, absl::Seconds(10),
          "clients may ping at most this often; pings that come sooner are "
          "strikes");
ABSL_FLAG(int32_t, keepalive_max_ping_strikes, 2,
          "strikes after which a connection is closed with GOAWAY "
          "(ENHANCE_YOUR_CALM); 0: never");
ABSL_FLAG(absl::Duration, keepalive_time, absl::Minutes(1),
          "ping each connection this often to detect dead peers");
ABSL_FLAG(absl::Duration, keepalive_timeout, absl::Seconds(20),
          "close a connection whose peer does not answer a ping within this");
ABSL_FLAG(absl::Duration, max_connection_idle, absl::Minutes(30),
          "close connections without calls for this long; inf: never");
ABSL_FLAG(int32_t, max_connections, 4096,
          "connections open at once on --listen (lowered to 3/4 of the "
          "open-file limit); past it the oldest connection without an "
          "authenticated call makes room, or the new one is refused");
ABSL_FLAG(absl::Duration, unauthenticated_connection_timeout, absl::Seconds(10),
          "close a connection on which no ModelState call was authenticated "
          "(any ModelState call, without --auth_policy) within this long");
ABSL_FLAG(int32_t, max_concurrent_streams, 64,
          "HTTP/2 streams (calls) one connection may have open at once");
ABSL_FLAG(int64_t, grpc_memory_bytes, int64_t{512} << 20,
          "memory gRPC may hold for the buffers of --listen's connections; "
          "past it gRPC cancels streams");
ABSL_FLAG(uint32_t, min_chunk_bytes, modelstate::kDefaultMinChunkBytes,
          "load chunks below this that do not end their stream are refused; "
          "fetches asking for smaller chunks get this; 0: no minimum");
ABSL_FLAG(absl::Duration, release_memory_interval, absl::Seconds(10),
          "give memory freed after bursts back to the OS this often; 0: never");
// Storage pool (docs/operations.md, "Storage pool").
ABSL_FLAG(uint64_t, storage_pool_bytes, uint64_t{1} << 30,
          "keep up to this many bytes of freed tensor memory (blocks of 2 MiB "
          "and more) for reuse by later loads, within --memory_limit_bytes; "
          "0: give freed memory back to the kernel at once");
// Follower mode (docs/operations.md, "Followers").
ABSL_FLAG(std::string, follow, "",
          "gRPC target of another modelstated (primary or follower) to mirror, "
          "e.g. dns:///modelstate-primary:50551; refuses writes and ignores "
          "--demo_model; empty: a primary");
ABSL_FLAG(std::string, follow_tls_ca, "",
          "PEM CA that the --follow upstream's certificate must chain to "
          "(enables TLS to it)");
ABSL_FLAG(std::string, follow_tls_cert, "",
          "PEM client certificate to present to the --follow upstream (mTLS)");
ABSL_FLAG(std::string, follow_token_file, "",
          "file holding the bearer token to present to the --follow upstream "
          "(when it has an auth policy: a principal with the read role on "
          "every model)");
ABSL_FLAG(std::string, follow_tls_key, "",
          "PEM private key of --follow_tls_cert");
ABSL_FLAG(bool, follow_open_reads, false,
          "let a follower of an upstream that checks its callers (it is given "
          "--follow_token_file or --follow_tls_cert, or the upstream refuses "
          "an unauthenticated ListModels at start) run without an "
          "--auth_policy of its own, serving every model it mirrors to every "
          "caller; without it such a follower refuses to start");
ABSL_FLAG(absl::Duration, follow_retry_max, absl::Seconds(10),
          "while the --follow upstream is unreachable, retries back off "
          "exponentially from 100ms up to this; so do gRPC's reconnection "
          "attempts (from 1s or less), so a returning upstream is reached "
          "within about this");
// Epochs: which history of the primary versions belong to. See
// docs/operations.md, "Primary lost its data".
ABSL_FLAG(std::string, adopt_epoch, "",
          "with --follow: the epoch (16 hex digits, as the upstream's log and "
          "modelstate_follower_upstream_epoch_info show it) of another "
          "history this follower may take on when its upstream has it, "
          "replacing every model it holds; \"any\" takes on whatever the "
          "upstream has; empty: keep serving what is held and log loudly");
ABSL_FLAG(bool, new_epoch, false,
          "a primary's: start a new epoch (history) even if --data_dir kept "
          "one, e.g. after restoring the data dir from a backup; its followers "
          "keep what they hold until told to --adopt_epoch it. Remove it "
          "after that start: every start with it makes another history");
// Follower keepalive: a silent upstream (TCP open, no bytes) is dropped and
// retried instead of followed forever. See docs/operations.md, "Followers".
ABSL_FLAG(absl::Duration, follow_keepalive_time, absl::Seconds(30),
          "ping the --follow upstream this often; at least the upstream's "
          "--keepalive_min_ping_interval (10s by default), which closes the "
          "connection of a client that pings more often; inf: never");
ABSL_FLAG(absl::Duration, follow_keepalive_timeout, absl::Seconds(10),
          "drop the connection to the --follow upstream (and retry) when a "
          "ping gets no answer within this");

namespace {

// absl flags keep the last of repeated flags; --preload may repeat, so fold
// every occurrence into one comma-separated value first.
std::vector<char*> FoldRepeatedPreload(int argc, char** argv,
                                       std::string* folded) {
  std::vector<std::string> values;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (absl::ConsumePrefix(&arg, "--preload=")) {
      values.emplace_back(arg);
    } else if (arg == "--preload" && i + 1 < argc) {
      values.emplace_back(argv[++i]);
    } else {
      args.push_back(argv[i]);
    }
  }
  if (!values.empty()) {
    *folded = absl::StrCat("--preload=", absl::StrJoin(values, ","));
    args.push_back(folded->data());
  }
  return args;
}

}  // namespace

// The --follow flags: the upstream and how to reach it.
absl::Status FollowerOptionsFromFlags(modelstate::ServerOptions& options) {
  options.follow = absl::GetFlag(FLAGS_follow);
  options.follow_client.tls_ca_file = absl::GetFlag(FLAGS_follow_tls_ca);
  options.follow_client.tls_cert_file = absl::GetFlag(FLAGS_follow_tls_cert);
  options.follow_client.tls_key_file = absl::GetFlag(FLAGS_follow_tls_key);
  if (!absl::GetFlag(FLAGS_follow_token_file).empty()) {
    std::string warning;
    absl::StatusOr<std::string> token = modelstate::ReadTokenFile(
        absl::GetFlag(FLAGS_follow_token_file), &warning);
    if (!warning.empty())
      std::fprintf(stderr, "modelstated: warning: %s\n", warning.c_str());
    if (!token.ok()) return token.status();
    options.follow_client.token = *std::move(token);
  }
  options.follow_max_backoff = absl::GetFlag(FLAGS_follow_retry_max);
  absl::StatusOr<modelstate::EpochAdoption> adoption =
      modelstate::ParseEpochAdoption(absl::GetFlag(FLAGS_adopt_epoch));
  if (!adoption.ok()) return adoption.status();
  options.adopt_epoch = *adoption;
  options.follow_open_reads = absl::GetFlag(FLAGS_follow_open_reads);
  options.follow_client.keepalive_time =
      absl::GetFlag(FLAGS_follow_keepalive_time);
  options.follow_client.keepalive_timeout =
      absl::GetFlag(FLAGS_follow_keepalive_timeout);
  if (options.follow_client.keepalive_time <= absl::ZeroDuration() ||
      options.follow_client.keepalive_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "--follow_keepalive_time and --follow_keepalive_timeout must be "
        "positive");
  }
  return absl::OkStatus();
}

// The --preload pairs, or InvalidArgument for one that is not NAME=PATH.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>>
PreloadsFromFlags() {
  std::vector<std::pair<std::string, std::string>> preloads;
  for (const std::string& item : absl::GetFlag(FLAGS_preload)) {
    std::pair<std::string, std::string> pair =
        absl::StrSplit(item, absl::MaxSplits('=', 1));
    if (pair.first.empty() || pair.second.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--preload wants NAME=PATH, got \"", item, "\""));
    }
    preloads.push_back(pair);
  }
  return preloads;
}

// --memory_limit_bytes, or 90% of what the machine or cgroup gives (logged)
// when it is negative.
int64_t MemoryLimitFromFlags() {
  const int64_t flag = absl::GetFlag(FLAGS_memory_limit_bytes);
  if (flag >= 0) return flag;
  const modelstate::DefaultMemoryLimit limit = modelstate::DetectMemoryLimit();
  std::fprintf(stderr, "modelstated: memory limit %lld bytes (90%% of %s)\n",
               static_cast<long long>(limit.bytes), limit.source.c_str());
  return limit.bytes;
}

// Authentication, authorization and the shared-memory side channel.
void AccessOptionsFromFlags(modelstate::ServerOptions& options) {
  options.auth_policy_file = absl::GetFlag(FLAGS_auth_policy);
  options.auth_policy_poll_interval = absl::GetFlag(FLAGS_auth_policy_poll);
  options.audit_log = absl::GetFlag(FLAGS_audit_log);
  options.reflection = absl::GetFlag(FLAGS_reflection);
  options.local_socket = absl::GetFlag(FLAGS_local_socket);
  options.local_export_bytes = absl::GetFlag(FLAGS_local_export_bytes);
  options.local_max_connections_per_uid =
      absl::GetFlag(FLAGS_local_max_connections_per_uid);
}

// Connection limits and the memory gRPC may hold.
void ConnectionOptionsFromFlags(modelstate::ServerOptions& options) {
  options.keepalive_min_ping_interval =
      absl::GetFlag(FLAGS_keepalive_min_ping_interval);
  options.keepalive_max_ping_strikes =
      absl::GetFlag(FLAGS_keepalive_max_ping_strikes);
  options.keepalive_time = absl::GetFlag(FLAGS_keepalive_time);
  options.keepalive_timeout = absl::GetFlag(FLAGS_keepalive_timeout);
  options.max_connection_idle = absl::GetFlag(FLAGS_max_connection_idle);
  options.max_connections = absl::GetFlag(FLAGS_max_connections);
  options.unauthenticated_connection_timeout =
      absl::GetFlag(FLAGS_unauthenticated_connection_timeout);
  options.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  options.grpc_memory_bytes = absl::GetFlag(FLAGS_grpc_memory_bytes);
  options.min_chunk_bytes = absl::GetFlag(FLAGS_min_chunk_bytes);
  options.release_memory_interval =
      absl::GetFlag(FLAGS_release_memory_interval);
}

// The server options the flags ask for, or InvalidArgument for a malformed
// flag.
absl::StatusOr<modelstate::ServerOptions> OptionsFromFlags() {
  modelstate::ServerOptions options;
  options.listen = absl::GetFlag(FLAGS_listen);
  auto preloads = PreloadsFromFlags();
  if (!preloads.ok()) return preloads.status();
  options.preload = *std::move(preloads);
  options.demo_model = absl::GetFlag(FLAGS_demo_model);
  options.chunk_bytes = absl::GetFlag(FLAGS_chunk_bytes);
  options.memory_limit_bytes = MemoryLimitFromFlags();
  options.max_pending_loads = absl::GetFlag(FLAGS_max_pending_loads);
  options.stream_idle_timeout = absl::GetFlag(FLAGS_stream_idle_timeout);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.health_listen = absl::GetFlag(FLAGS_health_listen);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.metrics_model_labels = absl::GetFlag(FLAGS_metrics_model_labels);
  options.log_rpcs = absl::GetFlag(FLAGS_log_rpcs);
  options.data_dir = absl::GetFlag(FLAGS_data_dir);
  const std::string durability = absl::GetFlag(FLAGS_durability);
  if (durability != "sync" && durability != "async") {
    return absl::InvalidArgumentError("--durability must be sync or async");
  }
  options.sync_durability = durability == "sync";
  options.retain_versions = absl::GetFlag(FLAGS_retain_versions);
  options.new_epoch = absl::GetFlag(FLAGS_new_epoch);
  options.max_version_wait = absl::GetFlag(FLAGS_max_version_wait);
  AccessOptionsFromFlags(options);
  ConnectionOptionsFromFlags(options);
  const absl::Status follower = FollowerOptionsFromFlags(options);
  if (!follower.ok()) return follower;
  return options;
}

// What the process needs before any thread starts: descriptors for the
// connection cap, the allocator's and the storage pool's settings.
void PrepareProcess(const modelstate::ServerOptions& options) {
  // Each connection is a descriptor; the connection cap is set below the
  // limit this leaves.
  modelstate::RaiseOpenFileLimit();
  // Before any thread starts (server/memory_release.h): gRPC's receive
  // buffers stay for reuse between the periodic trims.
  if (modelstate::IsTrimPeriod(options.release_memory_interval)) {
    const absl::Status tuned = modelstate::KeepFreedMemoryForReuse();
    if (!tuned.ok()) {
      std::fprintf(stderr, "modelstated: warning: %s\n",
                   std::string(tuned.message()).c_str());
    }
  }
  // Freed tensor memory (the version a load replaced) stages the next load,
  // which then neither faults nor zeroes fresh pages. The store's memory
  // limit bounds the pool too (store/model_store.h, pooled_bytes).
  modelstate::Storage::SetPoolLimit(absl::GetFlag(FLAGS_storage_pool_bytes));
}

// Blocks the stop signals (and SIGHUP, which reloads the auth policy) in
// every thread started after this; one thread waits for them
// (HandleSignals).
sigset_t BlockStopSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

// Tells where the server listens.
void AnnounceListeners(modelstate::Server& server,
                       const modelstate::ServerOptions& options) {
  std::fprintf(stderr, "modelstated: serving on port %d%s\n", server.port(),
               options.tls_cert_file.empty() ? "" : " (TLS)");
  if (server.metrics_port() != 0) {
    std::fprintf(stderr, "modelstated: metrics on port %d\n",
                 server.metrics_port());
  }
  if (!options.local_socket.empty()) {
    std::fprintf(stderr, "modelstated: shared-memory fetches on %s\n",
                 options.local_socket.c_str());
  }
  if (server.health_port() != 0) {
    std::fprintf(stderr, "modelstated: health on port %d\n",
                 server.health_port());
  }
  std::fflush(stderr);
}

// Reloads the auth policy on each SIGHUP; on a stop signal, drains the server
// for up to `grace` and returns.
void HandleSignals(const sigset_t& signals, modelstate::Server& server,
                   absl::Duration grace) {
  int signal = 0;
  while (sigwait(&signals, &signal) == 0 && signal == SIGHUP) {
    const absl::Status reloaded = server.ReloadAuthPolicy();
    // Reload logs its own outcome; only the no-policy case is said here.
    if (absl::IsFailedPrecondition(reloaded)) {
      std::fprintf(stderr, "modelstated: SIGHUP ignored: %s\n",
                   std::string(reloaded.message()).c_str());
    }
  }
  std::fprintf(stderr, "modelstated: signal %d, draining for up to %s\n",
               signal, absl::FormatDuration(grace).c_str());
  server.Shutdown(grace);
}

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "modelstated [--listen=HOST:PORT] [--preload=NAME=PATH ...] "
      "[--tls_cert=PEM --tls_key=PEM "
      "[--tls_client_ca=PEM]]");
  std::string folded;
  std::vector<char*> args = FoldRepeatedPreload(argc, argv, &folded);
  absl::ParseCommandLine(static_cast<int>(args.size()), args.data());

  absl::StatusOr<modelstate::ServerOptions> parsed = OptionsFromFlags();
  if (!parsed.ok()) {
    std::fprintf(stderr, "modelstated: %s\n",
                 std::string(parsed.status().message()).c_str());
    return 2;
  }
  const modelstate::ServerOptions& options = *parsed;
  PrepareProcess(options);
  const sigset_t stop_signals = BlockStopSignals();
  absl::StatusOr<std::unique_ptr<modelstate::Server>> server =
      modelstate::Server::BuildAndStart(options);
  if (!server.ok()) {
    std::fprintf(stderr, "modelstated: %s\n",
                 server.status().ToString().c_str());
    return 1;
  }
  AnnounceListeners(**server, options);
  const absl::Duration grace = absl::GetFlag(FLAGS_shutdown_grace);
  std::thread signal_waiter([&stop_signals, &server, grace] {
    HandleSignals(stop_signals, **server, grace);
  });
  (*server)->Wait();
  signal_waiter.join();
  // Destroying the server ends every call and writes any pending async
  // persistence.
  server->reset();
  std::fprintf(stderr, "modelstated: stopped\n");
  return 0;
}
