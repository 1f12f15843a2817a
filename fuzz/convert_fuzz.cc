// The proto -> core conversions the server applies to requests (proto/convert)
// on messages parsed from the input: the first byte picks LoadHeader or
// StateDictRequest, the rest is the serialized message. A LoadHeader's
// manifest is validated (ToTransferEntries) and sized (TransferSizes) as the
// load handler does; a request that converts must convert back to an
// equivalent message.
#include <cstdint>
#include <string>

#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "proto/convert.h"
#include "transfer/transfer.h"

namespace modelstate {
namespace {

void FuzzLoadHeader(const std::string& bytes) {
  v1::LoadHeader header;
  if (!header.ParseFromString(bytes)) return;
  absl::StatusOr<LoadRequest> request = FromProto(header);
  absl::StatusOr<std::vector<TransferEntry>> entries =
      ToTransferEntries(header.tensors());
  if (entries.ok()) {
    (void)TransferSizes(*entries);
    (void)ToTensorSpecs(*entries);
  }
  if (!request.ok()) return;
  if (request->model != header.model() ||
      request->strict == header.non_strict() ||
      request->create_if_missing != header.create_if_missing() ||
      request->class_names.size() !=
          static_cast<size_t>(header.class_names().size()))
    __builtin_trap();
}

// `message` serialized with map entries in key order, so that two equal
// messages give equal bytes whatever order their maps were filled in.
std::string Deterministic(const google::protobuf::MessageLite& message) {
  std::string out;
  {
    google::protobuf::io::StringOutputStream stream(&out);
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    message.SerializeToCodedStream(&coded);
  }
  return out;
}

void FuzzStateDictRequest(const std::string& bytes) {
  v1::StateDictRequest proto;
  if (!proto.ParseFromString(bytes)) return;
  absl::StatusOr<FetchRequest> request = FromProto(proto);
  if (!request.ok()) return;
  v1::StateDictRequest back = ToProto(*request);
  // chunk_bytes belongs to the transport, and unknown fields to nobody: neither
  // round-trips.
  proto.clear_chunk_bytes();
  proto.DiscardUnknownFields();
  if (Deterministic(back) != Deterministic(proto)) __builtin_trap();
}

}  // namespace
}  // namespace modelstate

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] & 1) {
    modelstate::FuzzLoadHeader(bytes);
  } else {
    modelstate::FuzzStateDictRequest(bytes);
  }
  return 0;
}
