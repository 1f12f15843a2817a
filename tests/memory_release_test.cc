// MemoryReleaser's malloc policy: frees keep their memory for reuse until the
// periodic trim, which then gives it back.
#include "server/memory_release.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/sanitizers.h"
#include "gtest/gtest.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

constexpr size_t kBlockBytes = 4 << 20;  // gRPC's largest read buffer
constexpr int kBlocks = 8;

// Allocates and touches kBlocks blocks of kBlockBytes on this thread (the main
// arena), returning how many bytes malloc mapped for them on their own.
size_t AllocateBlocks(std::vector<void*>& blocks) {
  const size_t mapped_before = mallinfo2().hblkhd;
  for (int i = 0; i < kBlocks; ++i) {
    void* block = std::malloc(kBlockBytes);
    std::memset(block, 1, kBlockBytes);
    asm volatile("" : : "r"(block) : "memory");  // keep the pair un-elided
    blocks.push_back(block);
  }
  return mallinfo2().hblkhd - mapped_before;
}

void FreeBlocks(std::vector<void*>& blocks) {
  for (void* block : blocks) std::free(block);
  blocks.clear();
}

TEST(MemoryReleaserTest, FreedBuffersStayForReuseUntilTheTrim) {
  if (kUnderAsan) GTEST_SKIP() << "ASan's allocator ignores mallopt";
  // The first trim comes a period after this, long after the checks of what
  // free() kept.
  MemoryReleaser releaser(absl::Seconds(2));
  std::vector<void*> blocks;
  // glibc's defaults would map the first 4 MiB block on its own (its dynamic
  // threshold starts at 128 KiB) and give the freed top back at once.
  EXPECT_EQ(AllocateBlocks(blocks), 0u);
  const size_t heap_with_blocks = mallinfo2().arena;
  FreeBlocks(blocks);
  EXPECT_GE(mallinfo2().fordblks, kBlocks * kBlockBytes)
      << "freed buffers were given back on free()";
  EXPECT_GE(mallinfo2().arena, heap_with_blocks - kBlockBytes);

  // The periodic trim returns them.
  EXPECT_TRUE(testing_support::WaitUntil(
      [&] {
        return mallinfo2().arena + kBlocks * kBlockBytes / 2 <=
               heap_with_blocks;
      },
      absl::Seconds(10)))
      << "heap " << mallinfo2().arena << " bytes, " << heap_with_blocks
      << " with the blocks";
}

}  // namespace
}  // namespace modelstate
