#include "bench/naive_grpc.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "bench/common.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/server_builder.h"

namespace modelstate::bench {
namespace {

class NaiveService final : public Naive::Service {
 public:
  explicit NaiveService(std::string bytes) : bytes_(std::move(bytes)) {}
  grpc::Status Fetch(grpc::ServerContext*, const FetchRequest* request,
                     grpc::ServerWriter<Blob>* writer) override {
    const uint64_t chunk =
        request->chunk_bytes() ? request->chunk_bytes() : kMiB;
    Blob blob;
    for (uint64_t at = 0; at < bytes_.size(); at += chunk) {
      blob.set_data(
          bytes_.substr(at, std::min<uint64_t>(chunk, bytes_.size() - at)));
      if (!writer->Write(blob)) break;
    }
    return grpc::Status::OK;
  }

 private:
  std::string bytes_;
};

}  // namespace

int ServeNaive(const std::string& file) {
  NaiveService service(ReadWholeFile(file));
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                           &port);
  builder.RegisterService(&service);
  auto server = builder.BuildAndStart();
  std::printf("PORT %d\n", port);
  std::fflush(stdout);
  server->Wait();
  return 0;
}

NaiveGrpcClient::NaiveGrpcClient(int port) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  stub_ = Naive::NewStub(
      grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                grpc::InsecureChannelCredentials(), args));
}

uint64_t NaiveGrpcClient::Fetch(uint64_t expected) {
  grpc::ClientContext context;
  FetchRequest request;
  auto reader = stub_->Fetch(&context, request);
  char* into = FreshBuffer(expected);
  uint64_t at = 0;
  Blob blob;
  while (reader->Read(&blob)) {
    if (at + blob.data().size() > expected) Die("naive fetch overran");
    std::memcpy(into + at, blob.data().data(), blob.data().size());
    at += blob.data().size();
  }
  if (!reader->Finish().ok()) Die("naive fetch failed");
  return at;
}

}  // namespace modelstate::bench
