#include "store/data_dir.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/test_util.h"
#include "store/startup.h"

namespace modelstate {
namespace {

using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr char kCnn[] = R"({"type": "Sequential", "modules": [
    {"type": "Conv2d", "args": [3, 4, 3]}, {"type": "BatchNorm2d", "args": [4]},
    {"type": "Module", "buffers": {"scratch": {"shape": [2], "persistent": false}}}]})";

// A store keeping `retain` versions per model and persisting through
// `persister` (null: in memory only).
ModelStore::Options Persisting(StatePersister* persister, int retain = 1) {
  ModelStore::Options options;
  options.retain_versions = retain;
  options.persister = persister;
  return options;
}

// A directory of this test process's own under the test temp dir, removed
// when the test ends. CTest runs every TEST as its own process, two at a time,
// so no path may be shared between tests or with a stale earlier run.
class ScratchDir {
 public:
  ScratchDir() {
    std::string pattern = ::testing::TempDir() + "/datadir-XXXXXX";
    if (mkdtemp(pattern.data()) == nullptr) ADD_FAILURE() << "mkdtemp failed";
    path_ = pattern;
  }
  ~ScratchDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string VersionPath(const std::string& dir, const std::string& model,
                        int64_t version, const char* suffix) {
  char name[32];
  std::snprintf(name, sizeof name, "%020lld", static_cast<long long>(version));
  return dir + "/" + model + "/" + name + suffix;
}

void ExpectSameState(const ModulePtr& a, const ModulePtr& b) {
  StateDict sa = GetStateDict(a).value();
  StateDict sb = GetStateDict(b).value();
  ASSERT_EQ(sa.Keys(), sb.Keys());
  for (size_t i = 0; i < sa.size(); ++i) {
    EXPECT_TRUE(sa.entries()[i].tensor.BitwiseEquals(sb.entries()[i].tensor))
        << sa.entries()[i].key;
    EXPECT_EQ(sa.entries()[i].kind, sb.entries()[i].kind);
  }
}

TEST(DataDirTest, PersistedVersionsRestoreExactly) {
  const ScratchDir scratch;
  const std::string& path = scratch.path();
  auto data_dir = DataDir::Open(path).value();
  ModelStore store(Persisting(data_dir.get()));
  ASSERT_TRUE(store.Create("cnn", MustBuild(kCnn, 3), kCnn).ok());
  // An assign load changes a dtype; the restore must keep it.
  StateDict half;
  half.Set("0.bias", FullTensor(DType::kFloat16, {4}, 0.5f));
  LoadRequest assign("cnn");
  assign.assign = true;
  assign.strict = false;
  ASSERT_TRUE(store.Load(assign, half).ok());
  StateDict flat;
  flat.Set("enc.w", FullTensor(DType::kBFloat16, {3, 2}, 1.5f));
  flat.Set("enc.stats", FullTensor(DType::kInt64, {2}, 7), TensorKind::kBuffer);
  LoadRequest create("flat");
  create.create_if_missing = true;
  create.buffer_keys = {"enc.stats"};
  ASSERT_TRUE(store.Load(create, flat).ok());

  RestoreReport report = DataDir::Open(path).value()->Restore();
  EXPECT_THAT(report.problems, IsEmpty());
  ASSERT_EQ(report.models.size(), 2u);
  for (const RestoredModel& restored : report.models) {
    Snapshot live = store.GetSnapshot(restored.snapshot.model).value();
    EXPECT_EQ(restored.snapshot.version, live.version);
    EXPECT_EQ(restored.snapshot.architecture, live.architecture);
    ExpectSameState(restored.snapshot.root, live.root);
  }
  // Only the newest version is kept on disk by default.
  EXPECT_FALSE(
      std::ifstream(VersionPath(path, "cnn", 1, ".safetensors")).good());
  EXPECT_TRUE(
      std::ifstream(VersionPath(path, "cnn", 2, ".safetensors")).good());
  // Deleting a model removes its files.
  ASSERT_TRUE(store.Delete("cnn").ok());
  EXPECT_EQ(DataDir::Open(path).value()->Restore().models.size(), 1u);
}

TEST(DataDirTest, TiedTensorsStayOneTensorWhenRestored) {
  const ScratchDir scratch;
  auto data_dir = DataDir::Open(scratch.path()).value();
  ModelStore store(Persisting(data_dir.get()));
  StateDict tied;
  const Tensor embedding = FullTensor(DType::kFloat32, {8, 4}, 2);
  tied.Set("embed.weight", embedding);
  tied.Set("head.weight", embedding);
  tied.Set("head.bias", FullTensor(DType::kFloat32, {8}, 0));
  LoadRequest create("lm");
  create.create_if_missing = true;
  ASSERT_TRUE(store.Load(create, tied).ok());

  RestoreReport report = DataDir::Open(scratch.path()).value()->Restore();
  EXPECT_THAT(report.problems, IsEmpty());
  ASSERT_EQ(report.models.size(), 1u);
  ExpectSameState(report.models[0].snapshot.root,
                  store.GetSnapshot("lm").value().root);
  const StateDict restored =
      GetStateDict(report.models[0].snapshot.root).value();
  EXPECT_TRUE(restored.Find("embed.weight")
                  ->SharesBytesWith(*restored.Find("head.weight")));
  EXPECT_FALSE(restored.Find("head.bias")
                   ->SharesBytesWith(*restored.Find("head.weight")));
}

TEST(DataDirTest, RestoreReportsAndSkipsDamagedAndForeignFiles) {
  const ScratchDir scratch;
  const std::string& path = scratch.path();
  DataDirOptions keep_two;
  keep_two.keep_versions = 2;
  auto data_dir = DataDir::Open(path, keep_two).value();
  ModelStore store(Persisting(data_dir.get()));
  for (const char* name : {"truncated", "flipped", "fine"}) {
    ASSERT_TRUE(store.Create(name, MustBuild(kCnn), kCnn).ok());
    ASSERT_TRUE(
        store.Load(name, GetStateDict(MustBuild(kCnn, 9)).value()).ok());
  }
  ASSERT_TRUE(store.Create("only", MustBuild(kCnn), kCnn).ok());
  ASSERT_TRUE(store.Create("typed", MustBuild(kCnn), kCnn).ok());
  // Truncate the newest version of one model, flip a data byte of another's,
  // and corrupt the only version of a third.
  const std::string truncated =
      VersionPath(path, "truncated", 2, ".safetensors");
  ASSERT_EQ(truncate(truncated.c_str(), 100), 0);
  const std::string flipped = VersionPath(path, "flipped", 2, ".safetensors");
  {
    std::fstream file(flipped, std::ios::in | std::ios::out | std::ios::binary);
    file.seekg(-3, std::ios::end);
    char byte;
    file.read(&byte, 1);
    byte ^= 0x10;
    file.seekp(-3, std::ios::end);
    file.write(&byte, 1);
  }
  std::ofstream(VersionPath(path, "only", 1, ".manifest.json")) << "{not json";
  // JSON whose fields have other types than a manifest's.
  std::ofstream(VersionPath(path, "typed", 1, ".manifest.json"))
      << R"({"format": 1, "model": 2, "version": 1, "architecture": "",
             "tensors": [{"name": "0.weight", "dtype": 3, "kind": 4}]})";
  std::ofstream(path + "/notes.txt") << "hello";
  std::ofstream(path + "/fine/README") << "hello";
  std::ofstream(path + "/fine/.tmp-00000000000000000009.safetensors.1.1")
      << "partial";

  RestoreReport report = DataDir::Open(path).value()->Restore();
  std::map<std::string, int64_t> versions;
  for (const auto& restored : report.models)
    versions[restored.snapshot.model] = restored.snapshot.version;
  // Damaged newest versions fall back to the older durable one; nothing damaged
  // is loaded.
  EXPECT_EQ(versions["truncated"], 1);
  EXPECT_EQ(versions["flipped"], 1);
  EXPECT_EQ(versions["fine"], 2);
  EXPECT_EQ(versions.count("only"), 0u);
  const std::string problems = ::testing::PrintToString(report.problems);
  EXPECT_THAT(problems, HasSubstr("model truncated version 2 skipped"));
  EXPECT_THAT(problems, HasSubstr("model flipped version 2 skipped: "));
  EXPECT_THAT(problems, HasSubstr("checksum mismatch"));
  EXPECT_THAT(problems, HasSubstr("model only: no version verifies"));
  EXPECT_THAT(problems, HasSubstr("model typed: no version verifies"));
  EXPECT_THAT(problems, HasSubstr("notes.txt: not a model directory"));
  EXPECT_THAT(problems, HasSubstr("README: unrelated file"));
  EXPECT_FALSE(
      std::ifstream(path + "/fine/.tmp-00000000000000000009.safetensors.1.1")
          .good());
}

TEST(DataDirTest, TheAccessPolicyMarkIsKeptAndIsNoModel) {
  const ScratchDir scratch;
  auto data_dir = DataDir::Open(scratch.path()).value();
  EXPECT_FALSE(data_dir->WrittenUnderAccessPolicy());
  ModelStore store(Persisting(data_dir.get()));
  ASSERT_TRUE(store.Create("cnn", MustBuild(kCnn, 3), kCnn).ok());
  ASSERT_TRUE(data_dir->RecordAccessPolicy().ok());
  ASSERT_TRUE(data_dir->RecordAccessPolicy().ok());  // Idempotent.
  auto reopened = DataDir::Open(scratch.path()).value();
  EXPECT_TRUE(reopened->WrittenUnderAccessPolicy());
  const RestoreReport report = reopened->Restore();
  EXPECT_THAT(report.problems, ::testing::IsEmpty());
  ASSERT_EQ(report.models.size(), 1u);
}

// The lineage record keeps the epoch and every deletion, so that after a
// restart a name created again continues its numbering and a follower still
// tells a deleted model from one its upstream has not created yet.
TEST(DataDirTest, TheLineageRecordKeepsTheEpochAndDeletionsAcrossRestarts) {
  const ScratchDir scratch;
  {
    auto data_dir = DataDir::Open(scratch.path()).value();
    EXPECT_EQ(data_dir->Restore().lineage, Lineage{});
    ModelStore store(Persisting(data_dir.get()));
    ASSERT_TRUE(store.RecordEpoch(0x9f3c2a1b4d5e6f70).ok());
    for (const char* name : {"gone", "back", "kept"})
      ASSERT_TRUE(store.Create(name, MustBuild(kCnn), kCnn).ok());
    ASSERT_TRUE(
        store.Load("gone", GetStateDict(MustBuild(kCnn, 2)).value()).ok());
    ASSERT_TRUE(store.Delete("gone").ok());
    ASSERT_TRUE(store.Delete("back").ok());
    ASSERT_TRUE(store.Create("back", MustBuild(kCnn), kCnn).ok());
    EXPECT_EQ(store.GetSnapshot("back").value().version, 2);
  }
  auto reopened = DataDir::Open(scratch.path()).value();
  const RestoreReport report = reopened->Restore();
  EXPECT_THAT(report.problems, IsEmpty());
  EXPECT_EQ(report.lineage.epoch, 0x9f3c2a1b4d5e6f70u);
  EXPECT_FALSE(report.lineage.adopting);
  // "back" is held again: only what is deleted now is remembered (the record
  // may still name it, and the store leaves it out).
  EXPECT_EQ(report.lineage.deleted.at("gone"), 2);
  ModelStore store(Persisting(reopened.get()));
  std::vector<std::string> notes;
  ASSERT_TRUE(PopulateStore({}, reopened.get(), &store, &notes).ok());
  EXPECT_EQ(store.epoch(), 0x9f3c2a1b4d5e6f70u);
  EXPECT_EQ(store.lineage().deleted,
            (std::map<std::string, int64_t>{{"gone", 2}}));
  ASSERT_TRUE(store.Create("gone", MustBuild(kCnn), kCnn).ok());
  EXPECT_EQ(store.GetSnapshot("gone").value().version, 3);
}

TEST(DataDirTest, ADamagedLineageRecordIsReportedAndReadAsNone) {
  const ScratchDir scratch;
  std::ofstream(scratch.path() + "/.lineage.json") << "{\"format\": 1}";
  std::ofstream(scratch.path() + "/.tmp-.lineage.json.1.1") << "partial";
  const RestoreReport report = DataDir::Open(scratch.path()).value()->Restore();
  EXPECT_EQ(report.lineage, Lineage{});
  EXPECT_THAT(::testing::PrintToString(report.problems),
              HasSubstr(".lineage.json: not a modelstate lineage record"));
  EXPECT_THAT(::testing::PrintToString(report.problems),
              ::testing::Not(HasSubstr(".tmp-")));
  EXPECT_FALSE(
      std::ifstream(scratch.path() + "/.tmp-.lineage.json.1.1").good());
}

// A primary keeps the epoch its data dir kept, makes one when there is none,
// and a new one on request.
TEST(DataDirTest, APrimaryKeepsItsEpochUnlessItHasNoneOrIsToldToStartAnew) {
  const ScratchDir scratch;
  auto start = [&scratch](bool new_epoch, std::vector<std::string>* notes) {
    auto data_dir = DataDir::Open(scratch.path()).value();
    ModelStore store(Persisting(data_dir.get()));
    EXPECT_TRUE(PopulateStore({}, data_dir.get(), &store, notes).ok());
    EXPECT_TRUE(EstablishPrimaryEpoch(new_epoch, &store, notes).ok());
    return store.epoch();
  };
  std::vector<std::string> notes;
  const uint64_t first = start(false, &notes);
  EXPECT_NE(first, 0u);
  EXPECT_THAT(::testing::PrintToString(notes), HasSubstr("(new: no lineage"));
  EXPECT_EQ(start(false, &notes), first);
  const uint64_t renewed = start(true, &notes);
  EXPECT_NE(renewed, first);
  EXPECT_THAT(::testing::PrintToString(notes),
              HasSubstr("(new: --new_epoch; it was " + EpochName(first)));
  EXPECT_EQ(start(false, &notes), renewed);
}

TEST(DataDirTest, FullDiskFailsASyncLoadAndChangesNothing) {
  const ScratchDir scratch;
  const std::string& path = scratch.path();
  std::atomic<int64_t> budget{1 << 30};
  DataDirOptions options;
  options.write = [&](int fd, const void* data, size_t size) -> ssize_t {
    if (budget.load() < static_cast<int64_t>(size)) {
      errno = ENOSPC;
      return -1;
    }
    budget -= static_cast<int64_t>(size);
    return write(fd, data, size);
  };
  auto data_dir = DataDir::Open(path, options).value();
  ModelStore store(Persisting(data_dir.get()));
  ASSERT_TRUE(store.Create("m", MustBuild(kCnn), kCnn).ok());
  Snapshot before = store.GetSnapshot("m").value();
  budget = 100;  // The disk is (nearly) full now.
  absl::Status failed =
      store.Load("m", GetStateDict(MustBuild(kCnn, 5)).value()).status();
  EXPECT_EQ(failed.code(), absl::StatusCode::kResourceExhausted) << failed;
  EXPECT_THAT(std::string(failed.message()), HasSubstr("No space left"));
  EXPECT_EQ(store.GetSnapshot("m").value().version, 1);
  EXPECT_EQ(store.GetSnapshot("m").value().root, before.root);
  EXPECT_EQ(store.reserved_bytes(), 0);
  EXPECT_EQ(store.Create("n", MustBuild(kCnn)).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(store.GetSnapshot("n").status().code(),
            absl::StatusCode::kNotFound);
  // On disk: still version 1 and no temporary files.
  RestoreReport report = DataDir::Open(path).value()->Restore();
  ASSERT_EQ(report.models.size(), 1u);
  EXPECT_EQ(report.models[0].snapshot.version, 1);
  EXPECT_THAT(report.problems, IsEmpty());
  budget = 1 << 30;
  EXPECT_EQ(
      store.Load("m", GetStateDict(MustBuild(kCnn, 5)).value()).value().version,
      2);
}

// Forwards to `target` but holds the first Persist until released, so the
// test decides what the background writer finds pending when it gets there.
class GatedPersister : public StatePersister {
 public:
  explicit GatedPersister(StatePersister* target) : target_(target) {}

  absl::Status Persist(const Snapshot& snapshot) override {
    // Only AsyncPersister's one writer thread calls this.
    if (!entered_.HasBeenNotified()) {
      entered_.Notify();
      if (!release_.WaitForNotificationWithTimeout(absl::Seconds(60))) {
        return absl::DeadlineExceededError("the gate was never opened");
      }
    }
    return target_->Persist(snapshot);
  }
  absl::Status Remove(const std::string& model) override {
    return target_->Remove(model);
  }
  absl::Status PersistLineage(const Lineage& lineage) override {
    return target_->PersistLineage(lineage);
  }

  // Waits until the writer is held at the gate; false after `timeout`.
  bool WaitUntilHeld(absl::Duration timeout) {
    return entered_.WaitForNotificationWithTimeout(timeout);
  }
  void Release() { release_.Notify(); }

 private:
  StatePersister* const target_;
  absl::Notification entered_;
  absl::Notification release_;
};

TEST(DataDirTest, AsyncPersisterSkipsSupersededVersions) {
  const ScratchDir scratch;
  const std::string& path = scratch.path();
  auto data_dir = DataDir::Open(path).value();
  GatedPersister gate(data_dir.get());
  AsyncPersister async(&gate);
  ModelStore store(Persisting(&async));
  ASSERT_TRUE(store.Create("m", MustBuild(kCnn), kCnn).ok());
  // Whether the writer keeps up with the loads is up to the scheduler, so it
  // is held on version 1 while versions 2..51 are committed: each supersedes
  // the one before, and only 51 is left to write.
  if (!gate.WaitUntilHeld(absl::Seconds(60))) {
    gate.Release();
    FAIL() << "the writer never picked up version 1";
  }
  for (int i = 0; i < 50; ++i) {
    EXPECT_TRUE(store.Load("m", GetStateDict(MustBuild(kCnn, i)).value()).ok());
  }
  gate.Release();
  async.Flush();
  EXPECT_EQ(async.written(), 2);  // versions 1 and 51
  EXPECT_EQ(async.failures(), 0);
  RestoreReport report = DataDir::Open(path).value()->Restore();
  ASSERT_EQ(report.models.size(), 1u);
  EXPECT_EQ(report.models[0].snapshot.version, 51);
  ExpectSameState(report.models[0].snapshot.root,
                  store.GetSnapshot("m").value().root);
  ASSERT_TRUE(store.Delete("m").ok());
  async.Flush();
  EXPECT_EQ(async.written(), 4);  // And the removal, then the lineage.
  const RestoreReport after = DataDir::Open(path).value()->Restore();
  EXPECT_TRUE(after.models.empty());
  EXPECT_EQ(after.lineage.deleted, (std::map<std::string, int64_t>{{"m", 51}}));
}

TEST(RetainedVersionsTest, RollbackUnderConcurrentReaders) {
  ModelStore store(Persisting(nullptr, 3));
  ASSERT_TRUE(store.Create("m", MustBuild(kCnn, 1), kCnn).ok());
  std::vector<ModulePtr> roots = {store.GetSnapshot("m").value().root};
  for (int seed = 2; seed <= 4; ++seed) {
    ASSERT_TRUE(
        store.Load("m", GetStateDict(MustBuild(kCnn, seed)).value()).ok());
    roots.push_back(store.GetSnapshot("m").value().root);
  }
  EXPECT_THAT(store.RetainedVersions("m").value(), ElementsAre(4, 3, 2));
  EXPECT_EQ(store.GetSnapshot("m", 1).status().code(),
            absl::StatusCode::kNotFound);
  ExpectSameState(store.GetSnapshot("m", 2).value().root, roots[1]);
  // Versions share unchanged tensors: the non-persistent buffer is the same
  // storage in all.
  EXPECT_EQ(store.GetSnapshot("m", 2).value().root->children()[2].module,
            store.GetSnapshot("m", 4).value().root->children()[2].module);

  // Readers run through the rollbacks: each must have read before the first
  // one and must see every version it makes before the next, so reads provably
  // interleave with them whatever the scheduler does.
  constexpr int kReaders = 3;
  absl::Mutex mu;
  std::vector<int64_t> seen(kReaders, 0);  // newest version each reader saw
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < kReaders; ++r) {
    readers.emplace_back([&, r] {
      while (!stop) {
        Snapshot snapshot = store.GetSnapshot("m").value();
        // Every version's tree is one of the four we made, whole.
        bool known = false;
        for (const ModulePtr& root : roots) {
          known |=
              GetStateDict(root)
                  .value()
                  .Find("0.weight")
                  ->SharesBytesWith(
                      *GetStateDict(snapshot.root).value().Find("0.weight"));
        }
        if (!known) ++bad;
        absl::MutexLock lock(&mu);
        seen[r] = std::max(seen[r], snapshot.version);
      }
    });
  }
  auto all_saw = [&](int64_t version) {
    auto reached = [&] {
      for (int64_t v : seen)
        if (v < version) return false;
      return true;
    };
    absl::MutexLock lock(&mu);
    return mu.AwaitWithTimeout(absl::Condition(&reached), absl::Seconds(60));
  };
  EXPECT_TRUE(all_saw(4));
  EXPECT_EQ(store.Rollback("m", 2).value().version, 5);
  EXPECT_TRUE(all_saw(5));
  EXPECT_EQ(store.Rollback("m", 4).value().version, 6);
  EXPECT_TRUE(all_saw(6));
  EXPECT_EQ(store.Rollback("m", 1).status().code(),
            absl::StatusCode::kNotFound);
  stop = true;
  for (auto& reader : readers) reader.join();
  EXPECT_EQ(bad.load(), 0);
  ExpectSameState(store.GetSnapshot("m").value().root, roots[3]);
  EXPECT_THAT(store.RetainedVersions("m").value(), ElementsAre(6, 5, 4));
}

}  // namespace
}  // namespace modelstate
