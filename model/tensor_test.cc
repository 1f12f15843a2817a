#include "model/tensor.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "gtest/gtest.h"

namespace modelstate {
namespace {

TEST(TensorTest, ZeroSizeAndScalarTensors) {
  Tensor empty = Tensor::Zeros(DType::kFloat32, {0, 5}).value();
  EXPECT_EQ(empty.num_elements(), 0);
  EXPECT_EQ(empty.num_bytes(), 0u);
  Tensor scalar = Tensor::Zeros(DType::kInt64, {}).value();
  EXPECT_EQ(scalar.num_elements(), 1);
  EXPECT_EQ(scalar.num_bytes(), 8u);
  EXPECT_EQ(TorchSizeString({}), "torch.Size([])");
  EXPECT_EQ(TorchSizeString({2, 3}), "torch.Size([2, 3])");
}

TEST(TensorTest, SizesAreOverflowChecked) {
  const int64_t big = std::numeric_limits<int64_t>::max() / 2 + 1;
  EXPECT_FALSE(NumElements({big, 2}).ok());
  EXPECT_FALSE(NumBytes(DType::kFloat32, {big}).ok());
  EXPECT_FALSE(NumElements({-1}).ok());
  EXPECT_EQ(NumBytes(DType::kFloat64, {3, 4}).value(), 96);
  EXPECT_FALSE(Tensor::Zeros(DType::kFloat32, {big, 2}).ok());
}

TEST(TensorTest, StorageIsAlignedAndSharedWithoutCopies) {
  Tensor a = Tensor::Zeros(DType::kFloat32, {3, 7}).value();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data()) % 64, 0u);
  Tensor b = a;
  EXPECT_EQ(a.data(), b.data());
  EXPECT_TRUE(a.SharesBytesWith(b));
  Tensor same_dtype = a.CastTo(DType::kFloat32).value();
  EXPECT_EQ(same_dtype.data(), a.data());
  Tensor reshaped = a.Reshape({21}).value();
  EXPECT_EQ(reshaped.data(), a.data());
  EXPECT_FALSE(a.Reshape({20}).ok());
  Tensor cast = a.CastTo(DType::kFloat16).value();
  EXPECT_NE(cast.data(), a.data());
  EXPECT_EQ(cast.num_bytes(), 42u);
}

TEST(TensorTest, LargeStoragesAreHugePageAlignedAndAllocateZeroes) {
  constexpr size_t kHugePage = 2 << 20;
  auto small = Storage::Allocate(100).value();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(small->data()) % 64, 0u);
  auto large = Storage::Allocate(kHugePage + 1).value();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(large->data()) % kHugePage, 0u);
  for (size_t i = 0; i < large->size(); i += 4096)
    EXPECT_EQ(large->data()[i], 0);
  EXPECT_EQ(large->data()[large->size() - 1], 0);
  auto builder = TensorBuilder::Create(DType::kUInt8, {kHugePage}).value();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(builder.mutable_data()) % kHugePage,
            0u);
  EXPECT_EQ(builder.mutable_data()[kHugePage / 2], 0);
}

// The pool of freed large blocks: reuse of the same rounded size, its bound,
// and that reuse changes no result (Allocate still zeroes).
class StoragePoolTest : public ::testing::Test {
 protected:
  static constexpr size_t kHugePage = 2 << 20;
  void SetUp() override {
    Storage::SetPoolLimit(0);  // empties what earlier tests left
    Storage::SetPoolLimit(8 * kHugePage);
  }
  void TearDown() override { Storage::SetPoolLimit(size_t{1} << 30); }
};

TEST_F(StoragePoolTest, FreedLargeBlockIsReusedForTheSameRoundedSize) {
  const uint8_t* first;
  {
    auto storage = Storage::AllocateUninitialized(2 * kHugePage).value();
    first = storage->data();
  }
  EXPECT_EQ(Storage::pooled_bytes(), 2 * kHugePage);
  auto reused = Storage::AllocateUninitialized(2 * kHugePage - 5).value();
  EXPECT_EQ(reused->data(), first);
  EXPECT_EQ(reused->size(), 2 * kHugePage - 5);
  EXPECT_EQ(Storage::pooled_bytes(), 0u);
}

// Fills `storage` with `value`, so that a test can tell which pages moved
// where.
void FillPages(Storage& storage, uint8_t value) {
  std::memset(storage.mutable_data(), value, storage.size());
}

TEST_F(StoragePoolTest, ASmallerAllocationTakesPartOfALargerPooledBlock) {
  {
    auto big = Storage::AllocateUninitialized(4 * kHugePage).value();
    FillPages(*big, 0xab);
  }
  ASSERT_EQ(Storage::pooled_bytes(), 4 * kHugePage);
  auto part = Storage::AllocateUninitialized(kHugePage).value();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(part->data()) % kHugePage, 0u);
  EXPECT_EQ(Storage::pooled_bytes(), 3 * kHugePage);
  // Its pages are the pooled ones, moved rather than fresh (which read 0).
  for (size_t i = 0; i < kHugePage; i += 4096)
    ASSERT_EQ(part->data()[i], 0xab) << i;
  FillPages(*part, 1);
  auto rest = Storage::AllocateUninitialized(3 * kHugePage).value();
  EXPECT_EQ(Storage::pooled_bytes(), 0u);
  for (size_t i = 0; i < rest->size(); i += 4096)
    ASSERT_EQ(rest->data()[i], 0xab) << i;
  EXPECT_EQ(part->data()[kHugePage - 1], 1);
}

TEST_F(StoragePoolTest, ALargerAllocationGathersPooledBlocksAndFreshPages) {
  // A load's float16 tensors freed after conversion to float32: two pooled
  // blocks of half the size make one new block, plus fresh pages for what
  // the pool lacks.
  {
    auto a = Storage::AllocateUninitialized(kHugePage).value();
    auto b = Storage::AllocateUninitialized(2 * kHugePage).value();
    FillPages(*a, 0xa1);
    FillPages(*b, 0xb2);
    b.reset();
    a.reset();  // the newest
  }
  ASSERT_EQ(Storage::pooled_bytes(), 3 * kHugePage);
  auto whole = Storage::AllocateUninitialized(4 * kHugePage).value();
  EXPECT_EQ(Storage::pooled_bytes(), 0u);
  // Newest first: a's page, then b's two, then one fresh (zero) page.
  const uint8_t* data = whole->data();
  for (size_t i = 0; i < kHugePage; i += 4096) {
    ASSERT_EQ(data[i], 0xa1) << i;
    ASSERT_EQ(data[kHugePage + i], 0xb2) << i;
    ASSERT_EQ(data[2 * kHugePage + i], 0xb2) << i;
    ASSERT_EQ(data[3 * kHugePage + i], 0) << i;
  }
  // An assembled block spans several mappings; freeing it and splitting it
  // again still works.
  FillPages(*whole, 7);
  whole.reset();
  ASSERT_EQ(Storage::pooled_bytes(), 4 * kHugePage);
  auto again = Storage::AllocateUninitialized(3 * kHugePage).value();
  auto last = Storage::AllocateUninitialized(kHugePage).value();
  EXPECT_EQ(Storage::pooled_bytes(), 0u);
  EXPECT_EQ(again->data()[3 * kHugePage - 1], 7);
  EXPECT_EQ(last->data()[0], 7);
}

// A budget with a settable headroom, as a store with a memory limit gives.
class FixedBudget : public StoragePoolBudget {
 public:
  explicit FixedBudget(int64_t headroom) : headroom_(headroom) {
    Storage::AddPoolBudget(this);
  }
  ~FixedBudget() override { Storage::RemovePoolBudget(this); }
  int64_t HeadroomBytes() const override { return headroom_; }

 private:
  int64_t headroom_;
};

TEST_F(StoragePoolTest, PoolKeepsWithinEveryBudgetAndTrimsOnRequest) {
  {
    const FixedBudget roomy(8 * kHugePage);
    const FixedBudget tight(3 * kHugePage);
    std::vector<std::shared_ptr<Storage>> storages;
    for (int i = 0; i < 4; ++i)
      storages.push_back(Storage::AllocateUninitialized(kHugePage).value());
    storages.clear();
    EXPECT_EQ(Storage::pooled_bytes(), 3 * kHugePage);
  }
  // Without budgets only the limit (8 huge pages) bounds it.
  {
    std::vector<std::shared_ptr<Storage>> storages;
    for (int i = 0; i < 2; ++i)
      storages.push_back(Storage::AllocateUninitialized(kHugePage).value());
  }
  EXPECT_EQ(Storage::pooled_bytes(), 3 * kHugePage);
  EXPECT_EQ(Storage::TrimPool(kHugePage + 1), 2 * kHugePage);
  EXPECT_EQ(Storage::pooled_bytes(), kHugePage);
  EXPECT_EQ(Storage::TrimPool(100 * kHugePage), kHugePage);
  EXPECT_EQ(Storage::pooled_bytes(), 0u);
}

TEST_F(StoragePoolTest, ABudgetSeesTheFreedStorageUncharged) {
  // A store at its limit frees a version: the freed bytes are headroom.
  auto accountant = std::make_shared<MemoryAccountant>();
  class LiveBudget : public StoragePoolBudget {
   public:
    explicit LiveBudget(const MemoryAccountant& accountant)
        : accountant_(accountant) {}
    int64_t HeadroomBytes() const override {
      return 2 * kHugePage + 1000 - accountant_.live_bytes() -
             accountant_.metadata_bytes();
    }

   private:
    const MemoryAccountant& accountant_;
  } budget(*accountant);
  Storage::AddPoolBudget(&budget);
  {
    auto storage = Storage::AllocateUninitialized(2 * kHugePage).value();
    storage->AttachAccountant(accountant);
    EXPECT_EQ(accountant->live_bytes(), static_cast<int64_t>(2 * kHugePage));
  }
  EXPECT_EQ(accountant->live_bytes(), 0);
  EXPECT_EQ(Storage::pooled_bytes(), 2 * kHugePage);
  Storage::RemovePoolBudget(&budget);
}

TEST_F(StoragePoolTest, AllocateZeroesAReusedBlock) {
  {
    auto dirty = Storage::AllocateUninitialized(kHugePage).value();
    std::memset(dirty->mutable_data(), 0xab, kHugePage);
  }
  ASSERT_EQ(Storage::pooled_bytes(), kHugePage);
  auto zeroed = Storage::Allocate(kHugePage).value();
  EXPECT_EQ(Storage::pooled_bytes(), 0u);
  for (size_t i = 0; i < kHugePage; ++i) ASSERT_EQ(zeroed->data()[i], 0) << i;
}

TEST_F(StoragePoolTest, PoolNeverHoldsMoreThanItsLimit) {
  std::vector<std::shared_ptr<Storage>> storages;
  for (int i = 0; i < 6; ++i)
    storages.push_back(Storage::AllocateUninitialized(3 * kHugePage).value());
  storages.clear();  // 6 blocks of 3 huge pages freed; 2 fit in 8.
  EXPECT_EQ(Storage::pooled_bytes(), 6 * kHugePage);
  Storage::SetPoolLimit(4 * kHugePage);
  EXPECT_EQ(Storage::pooled_bytes(), 3 * kHugePage);
  Storage::SetPoolLimit(0);
  EXPECT_EQ(Storage::pooled_bytes(), 0u);
  { auto freed = Storage::AllocateUninitialized(kHugePage).value(); }
  EXPECT_EQ(Storage::pooled_bytes(), 0u);
}

TEST_F(StoragePoolTest, SmallBlocksAreNotPooled) {
  { auto small = Storage::AllocateUninitialized(kHugePage - 1).value(); }
  EXPECT_EQ(Storage::pooled_bytes(), 0u);
}

TEST_F(StoragePoolTest, ConcurrentAllocationsAndFreesKeepBlocksDistinct) {
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t, &wrong] {
      for (int i = 0; i < 50; ++i) {
        auto storage = Storage::AllocateUninitialized(kHugePage).value();
        std::memset(storage->mutable_data(), t, kHugePage);
        std::this_thread::yield();
        for (size_t j = 0; j < kHugePage; j += 4096)
          if (storage->data()[j] != t) ++wrong;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_LE(Storage::pooled_bytes(), 8 * kHugePage);
}

TEST(TensorTest, AllocationsOverTheCeilingAreRefused) {
  Storage::SetMaxAllocation(4 << 20);
  // Both paths: a large block (huge-page aligned) and a small one.
  EXPECT_EQ(Storage::AllocateUninitialized(6 << 20).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(Storage::AllocateUninitialized(4 << 20).ok());
  EXPECT_TRUE(Storage::AllocateUninitialized(1000).ok());
  Storage::SetMaxAllocation(1000);
  EXPECT_EQ(Storage::AllocateUninitialized(5000).status().code(),
            absl::StatusCode::kResourceExhausted);
  Storage::SetMaxAllocation(SIZE_MAX);
  EXPECT_TRUE(Storage::AllocateUninitialized(6 << 20).ok());
}

TEST(TensorTest, OnlyAllocatedStoragesAreWritable) {
  auto storage = Storage::Allocate(8).value();
  storage->mutable_data()[3] = 42;
  EXPECT_EQ(storage->data(), storage->mutable_data());
  Tensor view = Tensor::View(DType::kUInt8, {8}, storage, 0).value();
  EXPECT_EQ(view.data()[3], 42);

  // Borrowed memory is read-only: Borrow hands out only a const Storage.
  static_assert(std::is_same<decltype(Storage::Borrow(nullptr, 0, nullptr)),
                             std::shared_ptr<const Storage>>::value,
                "a borrowed storage must not be writable");
  const uint8_t bytes[4] = {1, 2, 3, 4};
  auto owner = std::make_shared<int>(0);
  std::weak_ptr<int> watch = owner;
  std::shared_ptr<const Storage> borrowed =
      Storage::Borrow(bytes, sizeof bytes, std::move(owner));
  EXPECT_EQ(borrowed->data(), bytes);
  EXPECT_FALSE(watch.expired());
  borrowed.reset();
  EXPECT_TRUE(watch.expired());
}

TEST(TensorTest, FromBytesChecksTheSize) {
  const uint8_t bytes[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  EXPECT_TRUE(Tensor::FromBytes(DType::kInt32, {2}, {bytes, 8}).ok());
  EXPECT_FALSE(Tensor::FromBytes(DType::kInt32, {3}, {bytes, 8}).ok());
  Tensor t = Tensor::FromBytes(DType::kUInt8, {8}, {bytes, 8}).value();
  EXPECT_TRUE(t.BitwiseEquals(
      Tensor::FromBytes(DType::kUInt8, {8}, {bytes, 8}).value()));
  EXPECT_EQ(
      t.Checksum(),
      Tensor::FromBytes(DType::kUInt8, {8}, {bytes, 8}).value().Checksum());
  EXPECT_FALSE(t.BitwiseEquals(
      Tensor::FromBytes(DType::kUInt8, {2, 4}, {bytes, 8}).value()));
}

TEST(TensorTest, ViewsStayInsideTheirStorage) {
  auto storage = Storage::Allocate(16).value();
  EXPECT_TRUE(Tensor::View(DType::kFloat32, {2}, storage, 8).ok());
  EXPECT_FALSE(Tensor::View(DType::kFloat32, {3}, storage, 8).ok());
  EXPECT_FALSE(Tensor::View(DType::kFloat32, {0}, storage, 17).ok());
}

TEST(TensorTest, AccountantCountsLiveStoragesOnce) {
  auto accountant = std::make_shared<MemoryAccountant>();
  {
    Tensor a = Tensor::Zeros(DType::kFloat32, {256}).value();
    a.storage()->AttachAccountant(accountant);
    a.storage()->AttachAccountant(accountant);
    Tensor copy = a;
    EXPECT_EQ(accountant->live_bytes(), 1024);
  }
  EXPECT_EQ(accountant->live_bytes(), 0);
}

TEST(TensorTest, AStorageKeepsItsAccountantAlive) {
  Tensor a = Tensor::Zeros(DType::kFloat32, {4}).value();
  auto accountant = std::make_shared<MemoryAccountant>();
  std::weak_ptr<MemoryAccountant> watch = accountant;
  a.storage()->AttachAccountant(accountant);
  accountant.reset();
  EXPECT_FALSE(watch.expired());
  a = Tensor();
  EXPECT_TRUE(watch.expired());
}

TEST(TensorTest, AStorageIsChargedItsBytesAndItsOverheadOnce) {
  auto accountant = std::make_shared<MemoryAccountant>();
  {
    Tensor empty = Tensor::Zeros(DType::kFloat32, {0}).value();
    Tensor a = Tensor::Zeros(DType::kFloat32, {10}).value();
    empty.storage()->AttachAccountant(accountant);
    a.storage()->AttachAccountant(accountant);
    a.storage()->AttachAccountant(accountant);
    EXPECT_EQ(accountant->live_bytes(), 40);
    EXPECT_EQ(accountant->metadata_bytes(), 2 * kStorageOverheadBytes);
  }
  EXPECT_EQ(accountant->live_bytes(), 0);
  EXPECT_EQ(accountant->metadata_bytes(), 0);
}

TEST(TensorTest, ACopiedChargeStartsUncharged) {
  auto accountant = std::make_shared<MemoryAccountant>();
  MemoryCharge charge;
  EXPECT_TRUE(charge.Charge(accountant, 5, 7));
  EXPECT_FALSE(charge.Charge(accountant, 5, 7));
  {
    MemoryCharge copy = charge;
    EXPECT_EQ(accountant->metadata_bytes(), 7);
    EXPECT_TRUE(copy.Charge(accountant, 0, 3));
    EXPECT_EQ(accountant->metadata_bytes(), 10);
  }
  EXPECT_EQ(accountant->live_bytes(), 5);
  EXPECT_EQ(accountant->metadata_bytes(), 7);
}

}  // namespace
}  // namespace modelstate
