#include "fuzz/wire_fuzz.h"

#include <algorithm>
#include <cstdint>

#include "google/protobuf/stubs/logging.h"
#include "grpcpp/support/slice.h"

namespace modelstate {

grpc::ByteBuffer Sliced(const std::string& bytes,
                        const std::vector<size_t>& cuts) {
  std::vector<grpc::Slice> slices;
  size_t at = 0;
  for (size_t cut : cuts) {
    cut = std::min(cut, bytes.size() - at);
    slices.emplace_back(bytes.data() + at, cut);
    at += cut;
  }
  slices.emplace_back(bytes.data() + at, bytes.size() - at);
  return grpc::ByteBuffer(slices.data(), slices.size());
}

std::vector<size_t> ConsumeCuts(FuzzedDataProvider& in) {
  std::vector<size_t> cuts(in.ConsumeIntegralInRange<int>(0, 6));
  for (size_t& cut : cuts) cut = in.ConsumeIntegralInRange<size_t>(0, 64);
  return cuts;
}

}  // namespace modelstate

// Invalid UTF-8 in string fields is an expected parse failure, not news.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}
