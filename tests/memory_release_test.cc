// MemoryReleaser's malloc policy: frees keep their memory for reuse until the
// periodic trim, which then gives it back.
#include "server/memory_release.h"

#include <malloc.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/sanitizers.h"
#include "gtest/gtest.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

// As the daemon's main does, before any thread of the test allocates.
const bool kTuned = KeepFreedMemoryForReuse().ok();

constexpr size_t kBlockBytes = 4 << 20;  // gRPC's largest read buffer
// Together below kTrimThresholdBytes, which free() keeps.
constexpr int kBlocks = kTrimThresholdBytes / kBlockBytes - 2;

// Allocates and touches kBlocks blocks of kBlockBytes on this thread (the main
// arena), returning how many bytes malloc mapped for them on their own.
size_t AllocateBlocks(std::vector<void*>& blocks) {
  // Reserved first, so that the vector's own buffer does not land above the
  // blocks and pin the heap's top.
  blocks.reserve(kBlocks);
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
  ASSERT_TRUE(kTuned);
  std::vector<void*> blocks;
  // glibc's defaults would map the first 4 MiB block on its own (its dynamic
  // threshold starts at 128 KiB) and give the freed top back at once.
  EXPECT_EQ(AllocateBlocks(blocks), 0u);
  const size_t heap_with_blocks = mallinfo2().arena;
  FreeBlocks(blocks);
  EXPECT_GE(mallinfo2().fordblks, kBlocks * kBlockBytes)
      << "freed buffers were given back on free()";
  EXPECT_GE(mallinfo2().arena, heap_with_blocks - kBlockBytes);

  // The periodic trim returns them: the heap's top shrinks (free pages in
  // the middle of the heap would go too, but the blocks are at its top).
  MemoryReleaser releaser(absl::Milliseconds(100));
  EXPECT_TRUE(testing_support::WaitUntil(
      [&] {
        return mallinfo2().arena + kBlocks * kBlockBytes / 2 <=
               heap_with_blocks;
      },
      absl::Seconds(10)))
      << "heap " << mallinfo2().arena << " bytes, " << heap_with_blocks
      << " with the blocks";
}

// The number of arenas malloc has made (malloc_info's <heap> elements).
int MallocArenas() {
  char* text = nullptr;
  size_t size = 0;
  FILE* out = open_memstream(&text, &size);
  malloc_info(0, out);
  std::fclose(out);
  const std::string info(text, size);
  std::free(text);
  int arenas = 0;
  for (size_t at = info.find("<heap nr="); at != std::string::npos;
       at = info.find("<heap nr=", at + 1))
    ++arenas;
  return arenas;
}

TEST(MemoryReleaserTest, ThreadsShareAtMostOneArenaPerCore) {
  if (kUnderAsan) GTEST_SKIP() << "ASan's allocator ignores mallopt";
  ASSERT_TRUE(kTuned);
  // More threads than the bound, each allocating while all are alive: glibc
  // would give each its own arena up to eight per core.
  const int threads = 2 * MallocArenaBound() + 1;
  std::atomic<int> allocated{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> workers;
  for (int i = 0; i < threads; ++i) {
    workers.emplace_back([&] {
      void* block = std::malloc(1 << 20);
      asm volatile("" : : "r"(block) : "memory");
      ++allocated;
      while (!done) std::this_thread::yield();
      std::free(block);
    });
  }
  while (allocated < threads) std::this_thread::yield();
  const int arenas = MallocArenas();
  done = true;
  for (std::thread& worker : workers) worker.join();
  EXPECT_GE(arenas, 1);
  EXPECT_LE(arenas, MallocArenaBound());
}

}  // namespace
}  // namespace modelstate
