// Shared by the fuzz targets of the wire code (modelstate_wire): inputs cut
// into grpc slices where the fuzzer chooses, as gRPC hands a message over in
// pieces of whatever size the transport read.
#ifndef MODELSTATE_FUZZ_WIRE_FUZZ_H_
#define MODELSTATE_FUZZ_WIRE_FUZZ_H_

#include <cstddef>
#include <string>
#include <vector>

#include "fuzzer/FuzzedDataProvider.h"
#include "grpcpp/support/byte_buffer.h"

namespace modelstate {

// `bytes` as a ByteBuffer of slices of the lengths in `cuts` (each clamped to
// what is left), then one slice of the rest.
grpc::ByteBuffer Sliced(const std::string& bytes,
                        const std::vector<size_t>& cuts);

// Up to six slice lengths of at most 64 bytes, taken from the front of `in`.
std::vector<size_t> ConsumeCuts(FuzzedDataProvider& in);

}  // namespace modelstate

#endif  // MODELSTATE_FUZZ_WIRE_FUZZ_H_
