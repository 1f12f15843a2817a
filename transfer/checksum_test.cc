#include "transfer/checksum.h"

#include <algorithm>
#include <string>

#include "gtest/gtest.h"
#include "model/tensor.h"

namespace modelstate {
namespace {

// Whatever the pieces, the cursor's checksum is ChecksumOf the whole.
TEST(ChecksumCursorTest, AnyCutOfTheBytesGivesTheOneShotChecksum) {
  std::string bytes(1000, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 7);
  const uint64_t expected = ChecksumOf(bytes.data(), bytes.size());
  ChecksumCursor cursor;
  for (size_t piece :
       {size_t{1}, size_t{3}, size_t{64}, size_t{999}, size_t{1000}}) {
    SCOPED_TRACE(piece);
    cursor.Begin(bytes.size());
    for (size_t at = 0; at < bytes.size(); at += piece) {
      cursor.Update(bytes.data() + at, std::min(piece, bytes.size() - at));
    }
    EXPECT_EQ(cursor.hashed(), bytes.size());
    EXPECT_EQ(cursor.Digest(), expected);
  }
}

TEST(ChecksumCursorTest, AnEmptyItemHasTheChecksumOfNoBytes) {
  ChecksumCursor cursor;
  cursor.Begin(0);
  EXPECT_EQ(cursor.Digest(), ChecksumOf(nullptr, 0));
  // A cursor reused after a long item starts afresh.
  const std::string bytes(100, 'x');
  cursor.Begin(bytes.size());
  cursor.Update(bytes.data(), 10);
  cursor.Update(bytes.data() + 10, 90);
  cursor.Begin(0);
  EXPECT_EQ(cursor.Digest(), ChecksumOf(nullptr, 0));
}

}  // namespace
}  // namespace modelstate
