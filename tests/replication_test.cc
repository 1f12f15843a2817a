// modelstated --follow with real daemons on loopback: a chain primary ->
// follower -> follower mirrors every commit bit-exact and in order, followers
// refuse writes, sync only changed tensors, survive SIGKILL mid-sync with their
// data dir, keep serving while the primary is down and catch up after it
// restarts from its data dir, and reach a TLS upstream with a client
// certificate; a follower of an upstream that checks its callers starts only
// with an auth policy of its own or --follow_open_reads.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "access/access_policy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/module_factory.h"
#include "tests/follower_support.h"
#include "tests/proxy.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using follower_support::FollowerArgs;
using follower_support::Version;
using follower_support::VersionOf;

using ::testing::HasSubstr;
using ::testing::Not;
using testing_support::ConnectTo;
using testing_support::CuttingProxy;
using testing_support::Daemon;
using testing_support::FilledLike;
using testing_support::MetricsPort;
using testing_support::MetricValue;
using testing_support::ScratchDir;
using testing_support::WaitUntil;

constexpr char kNet[] = R"({"type": "Sequential", "modules": [
    {"type": "Linear", "args": [256, 256]}, {"type": "BatchNorm1d", "args": [256]},
    {"type": "ReLU"}, {"type": "Linear", "args": [256, 64]}]})";

// Every wait in this file is bounded by this.
constexpr absl::Duration kWait = absl::Seconds(60);

std::map<std::string, uint64_t> Checksums(const StateDict& state) {
  std::map<std::string, uint64_t> out;
  for (const auto& entry : state.entries())
    out[entry.key] = entry.tensor.Checksum();
  return out;
}

// The same keys in the same order, kinds, dtypes, shapes and bytes.
void ExpectBitExact(const StateDict& got, const StateDict& want) {
  ASSERT_EQ(got.Keys(), want.Keys());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got.entries()[i].kind, want.entries()[i].kind);
    EXPECT_TRUE(got.entries()[i].tensor.BitwiseEquals(want.entries()[i].tensor))
        << want.entries()[i].key;
  }
}

// A state dict shaped like `shape` with random float32 values.
StateDict RandomLike(const StateDict& shape, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  StateDict out;
  for (const auto& entry : shape.entries()) {
    std::vector<float> values(entry.tensor.num_elements());
    for (float& value : values) value = normal(rng);
    Tensor tensor =
        Tensor::FromBytes(DType::kFloat32, entry.tensor.shape(),
                          {reinterpret_cast<const uint8_t*>(values.data()),
                           values.size() * sizeof(float)})
            .value();
    out.Set(entry.key, tensor.CastTo(entry.tensor.dtype()).value(), entry.kind);
  }
  return out;
}

// Writes a policy giving the principal `name`, holding `token`, the read role
// on the models `glob` matches.
void WriteReadPolicy(const std::string& path, const std::string& name,
                     const std::string& token, const std::string& glob) {
  std::ofstream(path) << absl::StrCat(
      R"({"version": 1, "principals": [{"name": ")", name,
      R"(", "token_sha256": [")", Sha256Hex(token),
      R"("], "roles": [{"models": ")", glob, R"(", "role": "read"}]}]})");
}

bool Serving(Client& client) {
  absl::StatusOr<bool> serving = client.CheckHealth();
  return serving.ok() && *serving;
}

// Collects a model's events on a thread of its own until destroyed.
class EventLog {
 public:
  EventLog(const std::string& address, const std::string& model)
      : client_(ConnectTo(address)) {
    thread_ = std::thread([this, model] {
      client_
          ->Watch(
              model,
              [this](const ModelEvent& event) {
                absl::MutexLock lock(&mu_);
                events_.push_back(event);
                return true;
              },
              &canceller_)
          .IgnoreError();
    });
  }
  ~EventLog() {
    canceller_.Cancel();
    thread_.join();
  }
  std::vector<ModelEvent> events() {
    absl::MutexLock lock(&mu_);
    return events_;
  }

 private:
  std::unique_ptr<Client> client_;
  CallCanceller canceller_;
  absl::Mutex mu_;
  std::vector<ModelEvent> events_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

// Versions only grow, each one a version the primary committed, ending at
// `last` (or DELETED when `last` is 0).
void ExpectCommitOrder(const std::vector<ModelEvent>& events,
                       const std::set<int64_t>& committed, int64_t last) {
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.front().type, ModelEvent::Type::kAbsent);
  int64_t previous = 0;
  for (size_t i = 1; i < events.size(); ++i) {
    const ModelEvent& event = events[i];
    if (event.type == ModelEvent::Type::kDeleted) {
      EXPECT_EQ(i, events.size() - 1) << "events after the delete";
      continue;
    }
    EXPECT_GT(event.version, previous);
    EXPECT_EQ(committed.count(event.version), 1u) << event.version;
    previous = event.version;
  }
  if (last == 0) {
    EXPECT_EQ(events.back().type, ModelEvent::Type::kDeleted);
  } else {
    EXPECT_EQ(events.back().version, last);
  }
}

TEST(ReplicationTest, ChainMirrorsEveryCommitBitExactInCommitOrder) {
  Daemon primary({"--demo_model=", "--log_rpcs=false", "--retain_versions=3"});
  Daemon a(FollowerArgs(primary.address(), {"--retain_versions=3"}));
  Daemon b(FollowerArgs(a.address(), {"--retain_versions=3"}));
  ASSERT_GT(b.port(), 0);
  auto to_primary = ConnectTo(primary.address());
  auto to_a = ConnectTo(a.address());
  auto to_b = ConnectTo(b.address());
  ASSERT_TRUE(WaitUntil([&] { return Serving(*to_a) && Serving(*to_b); }));

  EventLog net_on_a(a.address(), "net");
  EventLog net_on_b(b.address(), "net");
  EventLog scratch_on_b(b.address(), "scratch");
  ASSERT_TRUE(WaitUntil([&] {
    return !net_on_a.events().empty() && !net_on_b.events().empty() &&
           !scratch_on_b.events().empty();
  }));

  std::set<int64_t> committed;
  committed.insert(to_primary->CreateModel("net", kNet, 1)->version);
  ASSERT_TRUE(to_primary->CreateModel("scratch", kNet, 2).ok());
  const StateDict shape = to_primary->StateDict("net")->state;
  std::mt19937 rng(11);
  for (int i = 0; i < 20; ++i) {
    absl::StatusOr<LoadOutcome> loaded =
        to_primary->LoadStateDict("net", RandomLike(shape, rng));
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    committed.insert(loaded->version);
  }
  const int64_t last = to_primary->RollbackModel("net", 19).value().version;
  committed.insert(last);
  ASSERT_TRUE(to_primary->DeleteModel("scratch").ok());
  const absl::Time committed_at = absl::Now();

  const Version want = VersionOf(*to_primary, "net");
  EXPECT_EQ(want.version, 22);
  ASSERT_TRUE(WaitUntil([&] {
    return VersionOf(*to_b, "net") == want &&
           VersionOf(*to_b, "scratch").version == 0;
  }));
  std::printf("propagation primary -> A -> B of the last commit: %s\n",
              absl::FormatDuration(absl::Now() - committed_at).c_str());
  EXPECT_EQ(VersionOf(*to_a, "net"), want);
  EXPECT_EQ(VersionOf(*to_a, "scratch").version, 0);

  const StateDict on_primary = to_primary->StateDict("net")->state;
  ExpectBitExact(to_a->StateDict("net")->state, on_primary);
  ExpectBitExact(to_b->StateDict("net")->state, on_primary);
  const ModelManifest manifest = to_primary->GetModel("net").value();
  const ModelManifest on_b = to_b->GetModel("net").value();
  EXPECT_EQ(on_b.summary.root_class, manifest.summary.root_class);
  EXPECT_EQ(on_b.class_names, manifest.class_names);
  EXPECT_EQ(on_b.architecture_json, manifest.architecture_json);
  EXPECT_EQ(to_b->ListModels()->size(), 1u);

  ASSERT_TRUE(WaitUntil([&] {
    return net_on_a.events().back().version == last &&
           net_on_b.events().back().version == last &&
           scratch_on_b.events().back().type == ModelEvent::Type::kDeleted;
  }));
  ExpectCommitOrder(net_on_a.events(), committed, last);
  ExpectCommitOrder(net_on_b.events(), committed, last);
  ExpectCommitOrder(scratch_on_b.events(), {1}, 0);
  EXPECT_THAT(b.Log(), HasSubstr("follow: synced net to version"));
  EXPECT_THAT(b.Log(), HasSubstr("follow: deleted scratch"));
}

// A follower keeps every version's tensors, sharing the unchanged ones
// across versions: none may sit in a block that keeps others alive
// (TransferOptions::packing), though a client's fetch packs them.
TEST(ReplicationTest, AFollowerKeepsEachTensorInAStorageOfItsOwn) {
  auto primary = testing_support::StartServer();
  auto writer = ConnectTo(*primary);
  const int64_t version = writer->CreateModel("net", kNet, 3).value().version;
  ServerOptions options;
  options.follow = absl::StrCat("127.0.0.1:", primary->port());
  options.follow_max_backoff = absl::Milliseconds(100);
  auto follower = testing_support::StartServer(options);
  auto reader = ConnectTo(*follower);
  ASSERT_TRUE(WaitUntil([&] {
    absl::StatusOr<ModelManifest> manifest = reader->GetModel("net");
    return manifest.ok() && manifest->version == version;
  }));
  const StateDict expected = testing_support::CoreState(*primary, "net");
  const StateDict kept = testing_support::CoreState(*follower, "net");
  ASSERT_EQ(kept.size(), expected.size());
  int small = 0;
  for (size_t i = 0; i < kept.size(); ++i) {
    const Tensor& tensor = kept.entries()[i].tensor;
    EXPECT_TRUE(tensor.BitwiseEquals(expected.entries()[i].tensor));
    if (tensor.num_bytes() == 0) continue;
    EXPECT_EQ(tensor.storage()->size(), tensor.num_bytes())
        << kept.entries()[i].key;
    if (tensor.num_bytes() < kPackedTensorMaxBytes) ++small;
  }
  EXPECT_GE(small, 2);  // Enough to share a block, had they been packed.
  // The same model fetched by a client is packed.
  const StateDict fetched = reader->StateDict("net").value().state;
  std::set<const Storage*> storages;
  for (const StateDict::Entry& entry : fetched.entries())
    storages.insert(entry.tensor.storage().get());
  EXPECT_LT(storages.size(), fetched.size());
}

TEST(ReplicationTest, WritesToAFollowerFailNamingTheUpstreamAndChangeNothing) {
  Daemon primary({"--demo_model=", "--log_rpcs=false", "--retain_versions=2"});
  Daemon follower(FollowerArgs(primary.address(), {"--retain_versions=2"}));
  auto to_primary = ConnectTo(primary.address());
  auto to_follower = ConnectTo(follower.address());
  ASSERT_TRUE(to_primary->CreateModel("net", kNet, 1).ok());
  // The follower must hold version 1 itself (a follower that falls behind
  // skips versions) for the read of it below.
  const Version first = VersionOf(*to_primary, "net");
  ASSERT_TRUE(
      WaitUntil([&] { return VersionOf(*to_follower, "net") == first; }));
  const StateDict shape = to_primary->StateDict("net")->state;
  ASSERT_TRUE(to_primary->LoadStateDict("net", FilledLike(shape, 2)).ok());
  const Version before = VersionOf(*to_primary, "net");
  ASSERT_TRUE(
      WaitUntil([&] { return VersionOf(*to_follower, "net") == before; }));

  LoadRequest create("new");
  create.create_if_missing = true;
  const std::vector<absl::Status> refused = {
      to_follower->CreateModel("other", kNet).status(),
      to_follower->DeleteModel("net"),
      to_follower->LoadStateDict("net", FilledLike(shape, 3)).status(),
      to_follower->LoadStateDict(create, FilledLike(shape, 3)).status(),
      to_follower->RollbackModel("net", 1).status(),
  };
  for (const absl::Status& status : refused) {
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
    EXPECT_THAT(status.message(), HasSubstr(primary.address())) << status;
  }
  EXPECT_EQ(VersionOf(*to_follower, "net"), before);
  EXPECT_EQ(VersionOf(*to_primary, "net"), before);
  EXPECT_EQ(to_follower->ListModels()->size(), 1u);
  EXPECT_EQ(to_primary->ListModels()->size(), 1u);
  // Reads are served, of retained versions too.
  FetchRequest old("net");
  old.version = 1;
  absl::StatusOr<FetchedStateDict> on_follower = to_follower->StateDict(old);
  ASSERT_TRUE(on_follower.ok()) << on_follower.status();
  EXPECT_EQ(Checksums(on_follower->state),
            Checksums(to_primary->StateDict(old)->state));
}

TEST(ReplicationTest, DeltaSyncOfOne4KiBTensorOfA256MiBModelFetchesUnder1MiB) {
  Daemon primary({"--demo_model=", "--log_rpcs=false"});
  Daemon follower(FollowerArgs(primary.address()));
  const int metrics = MetricsPort(follower);
  ASSERT_GT(metrics, 0);
  auto to_primary = ConnectTo(primary.address());
  auto to_follower = ConnectTo(follower.address());
  // 64 tensors of 4 MiB, each with values of its own, and one of 4 KiB.
  StateDict distinct;
  for (int i = 0; i < 64; ++i) {
    StateDict one;
    one.Set(absl::StrCat("layers.", i, ".weight"),
            Tensor::Zeros(DType::kFloat32, {1024, 1024}).value());
    distinct.Set(absl::StrCat("layers.", i, ".weight"),
                 FilledLike(one, static_cast<float>(i)).entries()[0].tensor);
  }
  StateDict small;
  small.Set("head.bias", Tensor::Zeros(DType::kFloat32, {1024}).value());
  distinct.Set("head.bias", FilledLike(small, -1).entries()[0].tensor);
  ASSERT_EQ(distinct.TotalBytes(), 256u * 1024 * 1024 + 4096);
  LoadRequest create("big");
  create.create_if_missing = true;
  ASSERT_TRUE(to_primary->LoadStateDict(create, distinct).ok());
  ASSERT_TRUE(
      WaitUntil([&] { return VersionOf(*to_follower, "big").version == 1; }));
  const double fetched_before =
      MetricValue(metrics, "modelstate_follower_fetched_bytes_total");
  EXPECT_EQ(fetched_before, 256.0 * 1024 * 1024 + 4096);
  const std::string log = follower.Log();
  const size_t first = log.find("follow: synced big to version 1");
  ASSERT_NE(first, std::string::npos);
  std::printf("full sync: %s\n",
              log.substr(first, log.find('\n', first) - first).c_str());

  LoadRequest change("big");
  change.strict = false;
  ASSERT_TRUE(to_primary->LoadStateDict(change, FilledLike(small, 5)).ok());
  const Version want = VersionOf(*to_primary, "big");
  ASSERT_EQ(want.version, 2);
  ASSERT_TRUE(
      WaitUntil([&] { return VersionOf(*to_follower, "big") == want; }));
  const double fetched =
      MetricValue(metrics, "modelstate_follower_fetched_bytes_total") -
      fetched_before;
  const std::string log_after = follower.Log();
  const size_t delta = log_after.find("follow: synced big to version 2");
  ASSERT_NE(delta, std::string::npos);
  std::printf(
      "delta sync: %s\n",
      log_after.substr(delta, log_after.find('\n', delta) - delta).c_str());
  EXPECT_LT(fetched, 1024 * 1024);
  EXPECT_EQ(fetched, 4096);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_reused_tensors_total"),
            64);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_syncs_total"), 2);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_lag_versions"), 0);
  EXPECT_THAT(
      follower.Log(),
      HasSubstr("follow: synced big to version 2 from " + primary.address() +
                ": fetched 1 tensors (4096 bytes), reused 64 tensors"));
}

TEST(ReplicationTest, KilledMidSyncRestartsFromItsDataDirNeverTorn) {
  const ScratchDir scratch;
  const std::string dir = scratch.file("follower");
  Daemon primary({"--demo_model=", "--log_rpcs=false"});
  auto to_primary = ConnectTo(primary.address());
  // 16 tensors of 4 MiB: every version fills all of them with one value of
  // its own, so a torn version would mix values (and checksums).
  StateDict shape;
  for (int i = 0; i < 16; ++i) {
    shape.Set(absl::StrCat("w", i),
              Tensor::Zeros(DType::kFloat32, {1024, 1024}).value());
  }
  std::map<int64_t, std::map<std::string, uint64_t>> pushed;
  LoadRequest create("net");
  create.create_if_missing = true;
  ASSERT_TRUE(to_primary->LoadStateDict(create, FilledLike(shape, 1)).ok());
  pushed[1] = Checksums(FilledLike(shape, 1));
  std::mt19937 rng(7);
  int64_t version = 1;
  int killed_before_commit = 0;
  for (int trial = 0; trial <= 6; ++trial) {
    SCOPED_TRACE(absl::StrCat("trial ", trial));
    Daemon follower(FollowerArgs(primary.address(), {"--data_dir=" + dir}));
    ASSERT_GT(follower.port(), 0);
    auto to_follower = ConnectTo(follower.address());
    // What it restored is a version the primary committed, whole.
    const Version restored = VersionOf(*to_follower, "net");
    if (restored.version != 0) {
      ASSERT_EQ(pushed.count(restored.version), 1u);
      EXPECT_EQ(restored.checksums, pushed[restored.version]);
    }
    if (restored.version == version - 1) ++killed_before_commit;
    EXPECT_THAT(follower.Log(), Not(HasSubstr("skipped")));
    // It catches up with the primary, fetching only what it lacks: nothing
    // when it restored the primary's version.
    ASSERT_TRUE(WaitUntil(
        [&] { return VersionOf(*to_follower, "net").version == version; }));
    EXPECT_EQ(VersionOf(*to_follower, "net").checksums, pushed[version]);
    if (restored.version == version) {
      EXPECT_THAT(follower.Log(), Not(HasSubstr("follow: synced")));
    }
    if (trial == 6) break;

    // A new version; a reader polls the follower during its sync, which
    // SIGKILL ends at a random point.
    std::atomic<bool> stop{false};
    std::vector<Version> seen;
    std::thread reader([&] {
      auto polling = ConnectTo(follower.address());
      while (!stop) {
        Version now = VersionOf(*polling, "net");
        if (now.version != 0) seen.push_back(std::move(now));
      }
    });
    const float value = static_cast<float>(version + 1);
    pushed[version + 1] = Checksums(FilledLike(shape, value));
    ASSERT_TRUE(
        to_primary->LoadStateDict("net", FilledLike(shape, value)).ok());
    ++version;
    absl::SleepFor(
        absl::Milliseconds(std::uniform_int_distribution<>(0, 120)(rng)));
    EXPECT_EQ(follower.Stop(SIGKILL, 10), SIGKILL);
    stop = true;
    reader.join();
    for (const Version& read : seen) {
      ASSERT_EQ(pushed.count(read.version), 1u);
      EXPECT_EQ(read.checksums, pushed[read.version]) << read.version;
    }
  }
  std::printf("SIGKILL landed before the follower's commit in %d of 6 trials\n",
              killed_before_commit);
}

TEST(ReplicationTest,
     FollowersServeWhileThePrimaryIsDownAndCatchUpAfterRestart) {
  const ScratchDir scratch;
  const std::string dir = scratch.file("primary");
  auto primary = std::make_unique<Daemon>(std::vector<std::string>{
      "--data_dir=" + dir, "--demo_model=", "--log_rpcs=false"});
  const std::string address = primary->address();
  Daemon a(FollowerArgs(address));
  Daemon b(FollowerArgs(a.address()));
  auto to_a = ConnectTo(a.address());
  auto to_b = ConnectTo(b.address());
  {
    auto to_primary = ConnectTo(address);
    ASSERT_TRUE(to_primary->CreateModel("net", kNet, 1).ok());
    const StateDict shape = to_primary->StateDict("net")->state;
    ASSERT_TRUE(to_primary->LoadStateDict("net", FilledLike(shape, 2)).ok());
  }
  ASSERT_TRUE(WaitUntil([&] { return VersionOf(*to_b, "net").version == 2; }));
  const Version v2 = VersionOf(*to_b, "net");
  const int metrics_a = MetricsPort(a);

  EXPECT_EQ(primary->Stop(SIGTERM, 30), 0);
  primary.reset();
  ASSERT_TRUE(WaitUntil([&] {
    return MetricValue(metrics_a, "modelstate_follower_connected") == 0;
  }));
  absl::SleepFor(absl::Milliseconds(500));  // A few failed retries.
  for (Client* client : {to_a.get(), to_b.get()}) {
    EXPECT_TRUE(Serving(*client));
    EXPECT_EQ(VersionOf(*client, "net"), v2);
    EXPECT_TRUE(client->StateDict("net").ok());
  }
  EXPECT_THAT(a.Log(), HasSubstr("unavailable"));
  const double fetched_before =
      MetricValue(metrics_a, "modelstate_follower_fetched_bytes_total");

  // Back on the same address, from its data dir: the same version numbers and
  // bytes, so nothing is fetched again; a new load then travels down the chain.
  Daemon restarted({"--listen=" + address, "--data_dir=" + dir,
                    "--demo_model=", "--log_rpcs=false"});
  ASSERT_GT(restarted.port(), 0);
  ASSERT_TRUE(WaitUntil([&] {
    return MetricValue(metrics_a, "modelstate_follower_connected") == 1;
  }));
  EXPECT_EQ(MetricValue(metrics_a, "modelstate_follower_fetched_bytes_total"),
            fetched_before);
  auto to_primary = ConnectTo(restarted.address());
  const StateDict shape = to_primary->StateDict("net")->state;
  ASSERT_TRUE(to_primary->LoadStateDict("net", FilledLike(shape, 3)).ok());
  const Version v3 = VersionOf(*to_primary, "net");
  EXPECT_EQ(v3.version, 3);
  ASSERT_TRUE(WaitUntil([&] {
    return VersionOf(*to_a, "net") == v3 && VersionOf(*to_b, "net") == v3;
  }));
}

TEST(ReplicationTest, AFollowerRestartedEmptyDoesNotEmptyItsFollowers) {
  const ScratchDir scratch;
  const std::string dir = scratch.file("primary");
  auto primary = std::make_unique<Daemon>(std::vector<std::string>{
      "--data_dir=" + dir, "--demo_model=", "--log_rpcs=false"});
  const std::string address = primary->address();
  ASSERT_TRUE(ConnectTo(address)->CreateModel("net", kNet, 1).ok());
  auto a = std::make_unique<Daemon>(FollowerArgs(address));
  const std::string a_address = a->address();
  Daemon b(FollowerArgs(a_address));
  auto to_b = ConnectTo(b.address());
  ASSERT_TRUE(WaitUntil([&] { return VersionOf(*to_b, "net").version == 1; }));
  const Version held = VersionOf(*to_b, "net");
  const int metrics_b = MetricsPort(b);

  // A comes back without models while the primary is away: it has nothing
  // to list, and must not make B drop what it serves.
  EXPECT_EQ(primary->Stop(SIGTERM, 30), 0);
  primary.reset();
  EXPECT_EQ(a->Stop(SIGKILL, 10), SIGKILL);
  a.reset();
  Daemon a_again(FollowerArgs(address, {"--listen=" + a_address}));
  ASSERT_GT(a_again.port(), 0);
  EXPECT_TRUE(WaitUntil([&] {
    return MetricValue(metrics_b,
                       "modelstate_follower_upstream_failures_total") >= 3;
  }));
  EXPECT_EQ(VersionOf(*to_b, "net"), held);
  EXPECT_TRUE(Serving(*to_b));

  // Once A has mirrored the restarted primary, B follows again, without
  // having deleted or fetched anything.
  const double fetched =
      MetricValue(metrics_b, "modelstate_follower_fetched_bytes_total");
  Daemon primary_again({"--listen=" + address, "--data_dir=" + dir,
                        "--demo_model=", "--log_rpcs=false"});
  ASSERT_TRUE(WaitUntil([&] {
    return MetricValue(metrics_b, "modelstate_follower_connected") == 1;
  }));
  EXPECT_EQ(VersionOf(*to_b, "net"), held);
  EXPECT_EQ(MetricValue(metrics_b, "modelstate_follower_deletes_total"), 0);
  EXPECT_EQ(MetricValue(metrics_b, "modelstate_follower_fetched_bytes_total"),
            fetched);
}

TEST(ReplicationTest, FollowsATlsUpstreamWithAClientCertificate) {
  const testing_support::Certificates certs =
      testing_support::MakeCertificates();
  // The primary in process: its port line carries a TLS suffix.
  ServerOptions tls;
  tls.demo_model = "demo";
  tls.tls_cert_file = certs.server_cert;
  tls.tls_key_file = certs.server_key;
  tls.tls_client_ca_file = certs.ca;
  auto primary = testing_support::StartServer(tls);
  ASSERT_NE(primary, nullptr);
  const std::string upstream = "localhost:" + std::to_string(primary->port());
  // It presents a certificate, so it needs a policy of its own or this.
  Daemon follower(FollowerArgs(
      upstream,
      {"--follow_tls_ca=" + certs.ca, "--follow_tls_cert=" + certs.client_cert,
       "--follow_tls_key=" + certs.client_key, "--follow_open_reads"}));
  // Without a client certificate the upstream refuses it: never SERVING.
  Daemon refused(FollowerArgs(upstream, {"--follow_tls_ca=" + certs.ca}));
  auto to_follower = ConnectTo(follower.address());
  ASSERT_TRUE(WaitUntil([&] { return Serving(*to_follower); }));
  EXPECT_EQ(VersionOf(*to_follower, "demo").version, 1);
  auto to_refused = ConnectTo(refused.address());
  EXPECT_TRUE(refused.WaitForLog("unavailable", kWait));
  EXPECT_FALSE(Serving(*to_refused));
  EXPECT_EQ(to_refused->ListModels()->size(), 0u);
}

// Against an upstream with an auth policy, a follower presents the token of
// --follow_token_file; one without a token, or with a token for another
// principal whose role does not cover every model, does not get the listing.
TEST(ReplicationTest, FollowsAnUpstreamWithAnAuthPolicyWithItsToken) {
  ScratchDir dir;
  const std::string policy = dir.file("policy.json");
  WriteReadPolicy(policy, "replica", "replica-token", "*");
  std::ofstream(dir.file("token")) << "replica-token\n";
  std::ofstream(dir.file("wrong")) << "not-the-token\n";
  ServerOptions options;
  options.demo_model = "demo";
  options.auth_policy_file = policy;
  auto primary = testing_support::StartServer(options);
  ASSERT_NE(primary, nullptr);
  const std::string upstream = "127.0.0.1:" + std::to_string(primary->port());
  // Both present tokens, so they need a policy of their own or this.
  Daemon follower(FollowerArgs(
      upstream,
      {"--follow_token_file=" + dir.file("token"), "--follow_open_reads"}));
  Daemon refused(FollowerArgs(
      upstream,
      {"--follow_token_file=" + dir.file("wrong"), "--follow_open_reads"}));
  auto to_follower = ConnectTo(follower.address());
  ASSERT_TRUE(WaitUntil([&] { return Serving(*to_follower); }));
  EXPECT_EQ(VersionOf(*to_follower, "demo").version, 1);
  auto to_refused = ConnectTo(refused.address());
  EXPECT_TRUE(refused.WaitForLog("UNAUTHENTICATED", kWait));
  EXPECT_FALSE(Serving(*to_refused));
  EXPECT_EQ(to_refused->ListModels()->size(), 0u);
  const testing_support::CommandResult missing =
      testing_support::RunCommand(testing_support::DaemonPath() +
                                  " --listen=127.0.0.1:0 --follow=" + upstream +
                                  " --follow_token_file=" + dir.file("absent"));
  EXPECT_EQ(missing.exit_code, 2);
}

// How long the refusals below may take: a daemon that starts instead runs
// until this kills it, and the test fails on its exit code.
constexpr absl::Duration kRefusalWait = absl::Seconds(20);

// The upstream of the tests below: the demo model, readable only with
// "replica-token" (the follower's token file, `dir`/token).
std::unique_ptr<Server> StartUpstreamThatChecksCallers(const ScratchDir& dir) {
  WriteReadPolicy(dir.file("upstream-policy.json"), "replica", "replica-token",
                  "*");
  std::ofstream(dir.file("token")) << "replica-token\n";
  ServerOptions options;
  options.demo_model = "demo";
  options.auth_policy_file = dir.file("upstream-policy.json");
  return testing_support::StartServer(options);
}

// A follower that presents credentials to its upstream would hand what they
// unlock to every caller: without a policy of its own it does not start.
TEST(ReplicationTest,
     AFollowerWithCredentialsButNoPolicyOfItsOwnRefusesToStart) {
  ScratchDir dir;
  auto primary = StartUpstreamThatChecksCallers(dir);
  ASSERT_NE(primary, nullptr);
  const std::string follower =
      testing_support::DaemonPath() +
      " --listen=127.0.0.1:0 --log_rpcs=false --follow=127.0.0.1:" +
      std::to_string(primary->port());
  const testing_support::CommandResult with_token = testing_support::RunCommand(
      follower + " --follow_token_file=" + dir.file("token"), kRefusalWait);
  EXPECT_EQ(with_token.exit_code, 1);
  EXPECT_THAT(with_token.output,
              HasSubstr("presents credentials to 127.0.0.1:"));
  EXPECT_THAT(with_token.output,
              HasSubstr("(--follow_token_file) but has no --auth_policy of "
                        "its own"));
  const testing_support::Certificates certs =
      testing_support::MakeCertificates();
  const testing_support::CommandResult with_certificate =
      testing_support::RunCommand(
          follower + " --follow_tls_ca=" + certs.ca + " --follow_tls_cert=" +
              certs.client_cert + " --follow_tls_key=" + certs.client_key,
          kRefusalWait);
  EXPECT_EQ(with_certificate.exit_code, 1);
  EXPECT_THAT(with_certificate.output,
              HasSubstr("(--follow_tls_cert) but has no --auth_policy"));
}

// Without credentials it asks the upstream for a listing at start; refused
// with UNAUTHENTICATED, it does not start either.
TEST(ReplicationTest,
     AFollowerOfAnUpstreamThatChecksCallersRefusesToStartOpen) {
  ScratchDir dir;
  auto primary = StartUpstreamThatChecksCallers(dir);
  ASSERT_NE(primary, nullptr);
  const std::string upstream = "127.0.0.1:" + std::to_string(primary->port());
  const testing_support::CommandResult refused = testing_support::RunCommand(
      testing_support::DaemonPath() +
          " --listen=127.0.0.1:0 --log_rpcs=false --follow=" + upstream,
      kRefusalWait);
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_THAT(refused.output,
              HasSubstr(upstream + " checks its callers (ListModels without "
                                   "credentials: "));
  // Told that reads are open, it starts (and gets nothing without a token).
  Daemon open(FollowerArgs(upstream, {"--follow_open_reads"}));
  EXPECT_GT(open.port(), 0);
  EXPECT_TRUE(open.WaitForLog("UNAUTHENTICATED", kWait));
}

// --follow_open_reads: the follower starts, says at start that it serves the
// upstream's protected models to everyone, and does.
TEST(ReplicationTest,
     WithFollowOpenReadsAFollowerStartsWarnsAndServesEveryone) {
  ScratchDir dir;
  auto primary = StartUpstreamThatChecksCallers(dir);
  ASSERT_NE(primary, nullptr);
  const std::string upstream = "127.0.0.1:" + std::to_string(primary->port());
  Daemon follower(FollowerArgs(
      upstream,
      {"--follow_token_file=" + dir.file("token"), "--follow_open_reads"}));
  ASSERT_GT(follower.port(), 0);
  EXPECT_THAT(follower.Log(),
              HasSubstr("WARNING: --follow_open_reads: every client that "
                        "reaches 127.0.0.1:0 may read every model mirrored "
                        "from " +
                        upstream));
  auto anyone = ConnectTo(follower.address());
  ASSERT_TRUE(WaitUntil([&] { return Serving(*anyone); }));
  EXPECT_EQ(VersionOf(*anyone, "demo").version, 1);
}

// With a policy of its own the follower starts, no warning, and its callers
// need credentials of its policy.
TEST(ReplicationTest, WithAPolicyOfItsOwnAFollowerStartsAndChecksItsCallers) {
  ScratchDir dir;
  auto primary = StartUpstreamThatChecksCallers(dir);
  ASSERT_NE(primary, nullptr);
  WriteReadPolicy(dir.file("follower-policy.json"), "worker", "worker-token",
                  "demo");
  const std::string upstream = "127.0.0.1:" + std::to_string(primary->port());
  Daemon follower(FollowerArgs(
      upstream, {"--follow_token_file=" + dir.file("token"),
                 "--auth_policy=" + dir.file("follower-policy.json")}));
  ASSERT_GT(follower.port(), 0);
  auto anonymous = ConnectTo(follower.address());
  ASSERT_TRUE(WaitUntil([&] { return Serving(*anonymous); }));
  EXPECT_EQ(anonymous->GetModel("demo").status().code(),
            absl::StatusCode::kUnauthenticated);
  ClientOptions worker_options;
  worker_options.token = "worker-token";
  worker_options.timeout = testing_support::kCallTimeout;
  auto worker = Client::Connect(follower.address(), worker_options).value();
  EXPECT_EQ(VersionOf(*worker, "demo").version, 1);
  EXPECT_THAT(follower.Log(), Not(HasSubstr("follow_open_reads")));
}

// A data dir that a follower with a policy filled may hold protected
// models: restarted without credentials or a policy, and with its upstream
// out of reach (so no probe can tell), the follower still refuses to serve it.
TEST(ReplicationTest, AFollowerWithoutAPolicyRefusesADataDirWrittenUnderOne) {
  ScratchDir dir;
  auto primary = StartUpstreamThatChecksCallers(dir);
  ASSERT_NE(primary, nullptr);
  WriteReadPolicy(dir.file("follower-policy.json"), "worker", "worker-token",
                  "demo");
  const std::string data = "--data_dir=" + dir.file("data");
  {
    Daemon follower(FollowerArgs(
        "127.0.0.1:" + std::to_string(primary->port()),
        {"--follow_token_file=" + dir.file("token"),
         "--auth_policy=" + dir.file("follower-policy.json"), data}));
    ASSERT_GT(follower.port(), 0);
    ASSERT_TRUE(follower.WaitForLog("demo", kWait));
    ClientOptions worker_options;
    worker_options.token = "worker-token";
    worker_options.timeout = testing_support::kCallTimeout;
    auto worker = Client::Connect(follower.address(), worker_options).value();
    ASSERT_TRUE(WaitUntil([&] { return worker->GetModel("demo").ok(); }));
    EXPECT_EQ(follower.Stop(SIGTERM, 30), 0);
  }
  const std::string unreachable = " --follow=127.0.0.1:1 ";
  const testing_support::CommandResult refused = testing_support::RunCommand(
      testing_support::DaemonPath() + " --listen=127.0.0.1:0 --log_rpcs=false" +
          unreachable + data,
      kRefusalWait);
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_THAT(refused.output,
              HasSubstr("holds models written under an --auth_policy"));
  // On purpose, it serves them to everyone.
  Daemon open(FollowerArgs("127.0.0.1:1", {"--follow_open_reads", data}));
  ASSERT_GT(open.port(), 0);
  EXPECT_EQ(VersionOf(*ConnectTo(open.address()), "demo").version, 1);
}

TEST(ReplicationTest, FollowOpenReadsNeedsFollow) {
  const testing_support::CommandResult refused = testing_support::RunCommand(
      testing_support::DaemonPath() +
          " --listen=127.0.0.1:0 --log_rpcs=false --follow_open_reads",
      kRefusalWait);
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_THAT(refused.output, HasSubstr("--follow_open_reads needs --follow"));
}

TEST(ReplicationTest, FollowRefusesPreloadsAndANonPositiveRetryCap) {
  const std::string daemon =
      testing_support::DaemonPath() +
      " --listen=127.0.0.1:0 --follow=127.0.0.1:1 --log_rpcs=false ";
  const testing_support::CommandResult preload =
      testing_support::RunCommand(daemon + "--preload=x=/nonexistent");
  EXPECT_EQ(preload.exit_code, 1);
  EXPECT_THAT(preload.output,
              HasSubstr("--preload can't be used with --follow"));
  const testing_support::CommandResult retry =
      testing_support::RunCommand(daemon + "--follow_retry_max=0s");
  EXPECT_EQ(retry.exit_code, 1);
  EXPECT_THAT(retry.output, HasSubstr("--follow_retry_max must be positive"));
}

// A retry the follower logged: the delay it announced ("retrying in 400ms")
// and when the test saw the line.
struct Retry {
  absl::Duration delay;
  absl::Time seen;
};

// The first `count` retries `daemon` logs past byte `from` of its log, read as
// they come (every 2 ms); fewer if they do not come within kWait.
std::vector<Retry> ReadRetries(Daemon& daemon, size_t from, size_t count) {
  const std::string marker = "retrying in ";
  std::vector<Retry> retries;
  const absl::Time deadline = absl::Now() + kWait;
  while (retries.size() < count && absl::Now() < deadline) {
    const std::string log = daemon.Log();
    for (size_t end; (end = log.find('\n', from)) != std::string::npos;
         from = end + 1) {
      const std::string line = log.substr(from, end - from);
      const size_t at = line.rfind(marker);
      absl::Duration delay;
      if (at != std::string::npos &&
          absl::ParseDuration(line.substr(at + marker.size()), &delay)) {
        retries.push_back({delay, absl::Now()});
      }
    }
    absl::SleepFor(absl::Milliseconds(2));
  }
  return retries;
}

// With its upstream gone, a follower's retries back off from 100ms, doubling,
// up to --follow_retry_max, and come that often. Two caps, both below the
// default (10s), so that a flag that did not reach the follower fails both.
TEST(ReplicationTest, RetriesBackOffDoublingUpToFollowRetryMax) {
  using absl::Milliseconds;
  const std::map<std::string, std::vector<absl::Duration>> expected = {
      {"300ms",
       {Milliseconds(100), Milliseconds(200), Milliseconds(300),
        Milliseconds(300), Milliseconds(300), Milliseconds(300)}},
      {"700ms",
       {Milliseconds(100), Milliseconds(200), Milliseconds(400),
        Milliseconds(700), Milliseconds(700), Milliseconds(700)}}};
  for (const auto& [cap, delays] : expected) {
    SCOPED_TRACE(absl::StrCat("--follow_retry_max=", cap));
    Daemon primary({"--demo_model=demo", "--log_rpcs=false"});
    Daemon follower({"--follow=" + primary.address(), "--log_rpcs=false",
                     "--follow_retry_max=" + cap});
    auto to_follower = ConnectTo(follower.address());
    ASSERT_TRUE(WaitUntil([&] { return Serving(*to_follower); }));
    const size_t from = follower.Log().size();
    EXPECT_EQ(primary.Stop(SIGKILL, 10), SIGKILL);

    const std::vector<Retry> retries =
        ReadRetries(follower, from, delays.size());
    ASSERT_EQ(retries.size(), delays.size()) << follower.Log();
    std::string gaps;
    for (size_t i = 0; i < retries.size(); ++i) {
      EXPECT_EQ(retries[i].delay, delays[i]) << "retry " << i;
      if (i == 0) continue;
      // Each retry fails at once (nothing listens), so the lines are the
      // previous delay apart.
      const absl::Duration gap = retries[i].seen - retries[i - 1].seen;
      absl::StrAppend(&gaps, " ", absl::FormatDuration(gap));
      EXPECT_GE(gap, delays[i - 1] - Milliseconds(50)) << "retry " << i;
      EXPECT_LE(gap, delays[i - 1] + absl::Seconds(1)) << "retry " << i;
    }
    std::printf("--follow_retry_max=%s: gaps between retries:%s\n", cap.c_str(),
                gaps.c_str());
  }
}

// A follower whose connection to the upstream drops during a 256 MiB sync, at
// 40% and again at 80% with the upstream away for 10 s after that (longer
// than a client's default resumes last), resumes the fetch of the pinned
// version from the byte it reached each time: it ends bit-exact, having moved
// at most 1.1 times the model instead of starting over.
TEST(ReplicationTest, ASyncCutShortResumesFromTheByteItReached) {
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  constexpr uint64_t kModel = 256 * kMiB;
  Daemon primary({"--demo_model=", "--log_rpcs=false"});
  StateDict big;
  for (int i = 0; i < 16; ++i) {
    StateDict one;
    one.Set("w", Tensor::Zeros(DType::kFloat32, {4 * 1024 * 1024}).value());
    big.Set(absl::StrCat("layers.", i, ".weight"),
            FilledLike(one, static_cast<float>(i + 1)).entries()[0].tensor);
  }
  ASSERT_EQ(big.TotalBytes(), kModel);
  LoadRequest create("big");
  create.create_if_missing = true;
  ASSERT_TRUE(ConnectTo(primary.address())->LoadStateDict(create, big).ok());
  CuttingProxy proxy(primary.port(), {kModel * 4 / 10, kModel * 4 / 10});
  proxy.set_on_cut([&proxy](int cuts) {
    if (cuts == 2) proxy.RefuseUntil(absl::Now() + absl::Seconds(10));
  });
  Daemon follower(FollowerArgs(proxy.address()));
  const int metrics = MetricsPort(follower);
  ASSERT_GT(metrics, 0);
  auto to_follower = ConnectTo(follower.address());
  ASSERT_TRUE(
      WaitUntil([&] { return VersionOf(*to_follower, "big").version == 1; }));
  const double ratio = static_cast<double>(proxy.downstream_bytes()) / kModel;
  std::printf("%d connections, %.4fx the model through the proxy\n",
              proxy.connections(), ratio);
  EXPECT_GE(proxy.connections(), 3);
  EXPECT_LE(ratio, 1.1);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_fetched_bytes_total"),
            kModel);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_syncs_total"), 1);
  ExpectBitExact(to_follower->StateDict("big")->state, big);
}

}  // namespace
}  // namespace modelstate
