#include "store/memfd_export.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace modelstate {
namespace {

using ::testing::ElementsAre;
using ::testing::Optional;

Tensor Bytes(int64_t count, uint8_t value) {
  const std::vector<uint8_t> data(static_cast<size_t>(count), value);
  return Tensor::FromBytes(DType::kUInt8, {count}, data).value();
}

std::vector<uint8_t> ReadAt(int fd, uint64_t offset, size_t size) {
  std::vector<uint8_t> out(size);
  EXPECT_EQ(pread(fd, out.data(), size, static_cast<off_t>(offset)),
            static_cast<ssize_t>(size));
  return out;
}

TEST(MemfdExportTest, HoldsSealedCopiesAtTheirOffsets) {
  const std::vector<Tensor> tensors = {Bytes(100, 1), Bytes(3, 2)};
  auto made = MemfdExport::Create(tensors, {0, 128}, 131);
  ASSERT_TRUE(made.ok()) << made.status();
  const MemfdExport& exported = **made;
  EXPECT_EQ(exported.size(), 131u);
  EXPECT_EQ(fcntl(exported.fd(), F_GET_SEALS) & kExportSeals, kExportSeals);
  EXPECT_EQ(ReadAt(exported.fd(), 0, 100), std::vector<uint8_t>(100, 1));
  EXPECT_EQ(ReadAt(exported.fd(), 128, 3), std::vector<uint8_t>(3, 2));
  // Nobody can change it: not the daemon, nor a client given the descriptor.
  const uint8_t byte = 9;
  EXPECT_EQ(pwrite(exported.fd(), &byte, 1, 0), -1);
  EXPECT_EQ(errno, EPERM);
  EXPECT_EQ(ftruncate(exported.fd(), 0), -1);
  EXPECT_EQ(
      mmap(nullptr, 131, PROT_READ | PROT_WRITE, MAP_SHARED, exported.fd(), 0),
      MAP_FAILED);
  EXPECT_EQ(fcntl(exported.fd(), F_ADD_SEALS, 0), -1);  // F_SEAL_SEAL.
}

TEST(MemfdExportTest, LocatesAnySubsetOfItsTensorsAndNothingElse) {
  const std::vector<Tensor> tensors = {Bytes(64, 1), Bytes(64, 2),
                                       Bytes(64, 3)};
  auto made = MemfdExport::Create(tensors, {0, 64, 128}, 192);
  ASSERT_TRUE(made.ok()) << made.status();
  EXPECT_THAT((*made)->Locate({tensors[2], tensors[0]}),
              Optional(ElementsAre(128u, 0u)));
  // Equal bytes in another storage are another tensor.
  EXPECT_EQ((*made)->Locate({tensors[0], Bytes(64, 2)}), absl::nullopt);
  // A view of part of an exported tensor is not in the export.
  const Tensor part =
      Tensor::View(DType::kUInt8, {8}, tensors[1].storage(), 8).value();
  EXPECT_EQ((*made)->Locate({part}), absl::nullopt);
}

TEST(MemfdExportTest, RefusesTensorsOutsideItsSize) {
  EXPECT_EQ(MemfdExport::Create({Bytes(10, 1)}, {8}, 16).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MemfdExport::Create({Bytes(10, 1)}, {}, 16).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ExportCacheTest, DropsAnExportOnceOneOfItsSourcesDies) {
  ExportCache cache(1 << 20);
  std::vector<Tensor> tensors = {Bytes(64, 1), Bytes(64, 2)};
  ASSERT_TRUE(cache.Add(MemfdExport::Create(tensors, {0, 64}, 128).value()));
  EXPECT_EQ(cache.Purge(), 0u);
  ASSERT_TRUE(cache.Find({tensors[1]}).has_value());
  tensors.pop_back();  // The last reference to the second tensor's storage.
  EXPECT_FALSE(cache.Find({tensors[0]}).has_value());
  EXPECT_EQ(cache.bytes(), 128u);
  EXPECT_EQ(cache.Purge(), 1u);
  EXPECT_EQ(cache.bytes(), 0u);
  EXPECT_EQ(cache.size(), 0u);
}

TEST(ExportCacheTest, KeepsTheMostRecentlyUsedWithinItsCapacity) {
  ExportCache cache(300);
  const std::vector<Tensor> a = {Bytes(100, 1)}, b = {Bytes(100, 2)},
                            c = {Bytes(100, 3)};
  for (const auto* tensors : {&a, &b, &c})
    ASSERT_TRUE(cache.Add(MemfdExport::Create(*tensors, {0}, 100).value()));
  ASSERT_TRUE(cache.Find(a).has_value());  // b is now the least recent.
  ASSERT_TRUE(cache.Add(MemfdExport::Create(a, {0}, 100).value()));
  EXPECT_FALSE(cache.Find(b).has_value());
  EXPECT_TRUE(cache.Find(c).has_value());
  EXPECT_EQ(cache.bytes(), 300u);
  // One export larger than the capacity is never kept.
  EXPECT_FALSE(cache.Admits(301));
  EXPECT_FALSE(cache.Add(MemfdExport::Create(a, {0}, 301).value()));
  EXPECT_EQ(cache.size(), 3u);
  ExportCache none(0);
  EXPECT_FALSE(none.Admits(0));
  EXPECT_FALSE(none.Add(MemfdExport::Create(a, {0}, 100).value()));
  EXPECT_FALSE(none.Add(MemfdExport::Create({}, {}, 0).value()));
  EXPECT_FALSE(none.Find(a).has_value());
}

}  // namespace
}  // namespace modelstate
