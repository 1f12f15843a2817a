#include "server/header_check.h"

#include <utility>

#include "grpc/grpc.h"
#include "grpc/grpc_security.h"
#include "grpc/slice.h"
#include "grpcpp/security/auth_metadata_processor.h"

namespace modelstate {
namespace {

constexpr char kAuthorization[] = "authorization";
constexpr char kPath[] = ":path";

std::string Text(const grpc_slice& slice) {
  return std::string(reinterpret_cast<const char*>(GRPC_SLICE_START_PTR(slice)),
                     GRPC_SLICE_LENGTH(slice));
}

// Over TLS: gRPC's C++ hook, run inline (checking a token is quick).
class TlsHeaderProcessor : public grpc::AuthMetadataProcessor {
 public:
  explicit TlsHeaderProcessor(HeaderCheck check) : check_(std::move(check)) {}
  bool IsBlocking() const override { return false; }
  grpc::Status Process(const InputMetadata& metadata,
                       grpc::AuthContext* context, OutputMetadata*,
                       OutputMetadata*) override {
    std::string path;
    const auto found = metadata.find(kPath);
    if (found != metadata.end())
      path.assign(found->second.data(), found->second.size());
    std::vector<std::string> authorization;
    const auto range = metadata.equal_range(kAuthorization);
    for (auto it = range.first; it != range.second; ++it)
      authorization.emplace_back(it->second.data(), it->second.size());
    return check_(path, authorization, context);
  }

 private:
  const HeaderCheck check_;
};

// Over plaintext: gRPC's C++ wrapper of plaintext credentials takes no
// processor, so the port is added through the C core, whose plaintext
// credentials do take one.
class PlaintextCheckingHeaders : public grpc::ServerCredentials {
 public:
  explicit PlaintextCheckingHeaders(HeaderCheck check)
      : check_(std::move(check)) {}

  void SetAuthMetadataProcessor(
      const std::shared_ptr<grpc::AuthMetadataProcessor>&) override {}

 private:
  int AddPortToServer(const std::string& address,
                      grpc_server* server) override {
    grpc_server_credentials* credentials =
        grpc_insecure_server_credentials_create();
    grpc_auth_metadata_processor processor{&Process, &Destroy,
                                           new HeaderCheck(check_)};
    grpc_server_credentials_set_auth_metadata_processor(credentials, processor);
    const int port =
        grpc_server_add_http2_port(server, address.c_str(), credentials);
    grpc_server_credentials_release(credentials);
    return port;
  }

  static void Process(void* state, grpc_auth_context*,
                      const grpc_metadata* metadata, size_t count,
                      grpc_process_auth_metadata_done_cb done,
                      void* user_data) {
    std::string path;
    std::vector<std::string> authorization;
    for (size_t i = 0; i < count; ++i) {
      const grpc_slice& key = metadata[i].key;
      const absl::string_view name(
          reinterpret_cast<const char*>(GRPC_SLICE_START_PTR(key)),
          GRPC_SLICE_LENGTH(key));
      if (name == kPath) path = Text(metadata[i].value);
      if (name != kAuthorization) continue;
      authorization.push_back(Text(metadata[i].value));
    }
    const grpc::Status status =
        (*static_cast<HeaderCheck*>(state))(path, authorization, nullptr);
    done(user_data, nullptr, 0, nullptr, 0,
         static_cast<grpc_status_code>(status.error_code()),
         status.ok() ? nullptr : status.error_message().c_str());
  }

  static void Destroy(void* state) { delete static_cast<HeaderCheck*>(state); }

  const HeaderCheck check_;
};

}  // namespace

std::shared_ptr<grpc::ServerCredentials> CheckingHeaders(
    std::shared_ptr<grpc::ServerCredentials> tls, HeaderCheck check) {
  if (tls == nullptr)
    return std::make_shared<PlaintextCheckingHeaders>(std::move(check));
  tls->SetAuthMetadataProcessor(
      std::make_shared<TlsHeaderProcessor>(std::move(check)));
  return tls;
}

}  // namespace modelstate
