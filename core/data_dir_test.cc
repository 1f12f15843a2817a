#include "core/data_dir.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <thread>

#include "core/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace modelstate {
namespace {

using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr char kCnn[] = R"({"type": "Sequential", "modules": [
    {"type": "Conv2d", "args": [3, 4, 3]}, {"type": "BatchNorm2d", "args": [4]},
    {"type": "Module", "buffers": {"scratch": {"shape": [2], "persistent": false}}}]})";

std::string FreshDir(const std::string& name) {
  const std::string dir = ::testing::TempDir() + "/datadir-" + name + "-" +
                          std::to_string(getpid());
  std::system(("rm -rf " + dir).c_str());
  return dir;
}

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
  const std::string path = FreshDir("roundtrip");
  auto data_dir = DataDir::Open(path).value();
  ModelStore store(ModelStore::Options{0, 1, data_dir.get()});
  ASSERT_TRUE(store.Create("cnn", MustBuild(kCnn, 3), kCnn).ok());
  // An assign load changes a dtype; the restore must keep it.
  StateDict half;
  half.Set("0.bias", FullTensor(DType::kFloat16, {4}, 0.5f));
  StoreLoadOptions assign;
  assign.load.assign = true;
  assign.load.strict = false;
  ASSERT_TRUE(store.Load("cnn", half, assign).ok());
  StateDict flat;
  flat.Set("enc.w", FullTensor(DType::kBFloat16, {3, 2}, 1.5f));
  flat.Set("enc.stats", FullTensor(DType::kInt64, {2}, 7), TensorKind::kBuffer);
  StoreLoadOptions create;
  create.create_if_missing = true;
  create.buffer_keys = {"enc.stats"};
  ASSERT_TRUE(store.Load("flat", flat, create).ok());

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

TEST(DataDirTest, RestoreReportsAndSkipsDamagedAndForeignFiles) {
  const std::string path = FreshDir("damaged");
  DataDirOptions keep_two;
  keep_two.keep_versions = 2;
  auto data_dir = DataDir::Open(path, keep_two).value();
  ModelStore store(ModelStore::Options{0, 1, data_dir.get()});
  for (const char* name : {"truncated", "flipped", "fine"}) {
    ASSERT_TRUE(store.Create(name, MustBuild(kCnn), kCnn).ok());
    ASSERT_TRUE(
        store.Load(name, GetStateDict(MustBuild(kCnn, 9)).value(), {}).ok());
  }
  ASSERT_TRUE(store.Create("only", MustBuild(kCnn), kCnn).ok());
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
  EXPECT_THAT(problems, HasSubstr("notes.txt: not a model directory"));
  EXPECT_THAT(problems, HasSubstr("README: unrelated file"));
  EXPECT_FALSE(
      std::ifstream(path + "/fine/.tmp-00000000000000000009.safetensors.1.1")
          .good());
}

TEST(DataDirTest, FullDiskFailsASyncLoadAndChangesNothing) {
  const std::string path = FreshDir("full");
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
  ModelStore store(ModelStore::Options{0, 1, data_dir.get()});
  ASSERT_TRUE(store.Create("m", MustBuild(kCnn), kCnn).ok());
  Snapshot before = store.GetSnapshot("m").value();
  budget = 100;  // The disk is (nearly) full now.
  absl::Status failed =
      store.Load("m", GetStateDict(MustBuild(kCnn, 5)).value(), {}).status();
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
  EXPECT_EQ(store.Load("m", GetStateDict(MustBuild(kCnn, 5)).value(), {})
                .value()
                .version,
            2);
}

TEST(DataDirTest, AsyncPersisterSkipsSupersededVersions) {
  const std::string path = FreshDir("async");
  auto data_dir = DataDir::Open(path).value();
  AsyncPersister async(data_dir.get());
  ModelStore store(ModelStore::Options{0, 1, &async});
  ASSERT_TRUE(store.Create("m", MustBuild(kCnn), kCnn).ok());
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(
        store.Load("m", GetStateDict(MustBuild(kCnn, i)).value(), {}).ok());
  }
  async.Flush();
  EXPECT_LT(async.written(),
            51);  // some versions were superseded before being written
  EXPECT_EQ(async.failures(), 0);
  RestoreReport report = DataDir::Open(path).value()->Restore();
  ASSERT_EQ(report.models.size(), 1u);
  EXPECT_EQ(report.models[0].snapshot.version, 51);
  ExpectSameState(report.models[0].snapshot.root,
                  store.GetSnapshot("m").value().root);
  ASSERT_TRUE(store.Delete("m").ok());
  async.Flush();
  EXPECT_TRUE(DataDir::Open(path).value()->Restore().models.empty());
}

TEST(RetainedVersionsTest, RollbackUnderConcurrentReaders) {
  ModelStore store(ModelStore::Options{0, 3, nullptr});
  ASSERT_TRUE(store.Create("m", MustBuild(kCnn, 1), kCnn).ok());
  std::vector<ModulePtr> roots = {store.GetSnapshot("m").value().root};
  for (int seed = 2; seed <= 4; ++seed) {
    ASSERT_TRUE(
        store.Load("m", GetStateDict(MustBuild(kCnn, seed)).value(), {}).ok());
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

  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 3; ++r) {
    readers.emplace_back([&] {
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
      }
    });
  }
  EXPECT_EQ(store.Rollback("m", 2).value(), 5);
  EXPECT_EQ(store.Rollback("m", 4).value(), 6);
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
