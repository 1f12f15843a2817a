// modelstatectl: command line of the modelstate client. `modelstatectl --help`
// lists the flags.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/format.h"
#include "common/file_util.h"
#include "common/malloc_policy.h"
#include "common/status_macros.h"
#include "model/safetensors.h"
#include "proto/convert.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50551", "HOST:PORT of modelstated");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA that signed the server's certificate (enables TLS)");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate (mTLS)");
ABSL_FLAG(std::string, tls_key, "", "PEM key of --tls_cert");
ABSL_FLAG(std::string, tls_server_name, "",
          "name to verify the server certificate against");
ABSL_FLAG(std::string, lb_policy, "",
          "gRPC load balancing, e.g. round_robin with a dns:/// target of a "
          "headless Service");
ABSL_FLAG(absl::Duration, timeout, absl::InfiniteDuration(),
          "deadline of each call");
ABSL_FLAG(std::string, module, "", "submodule path (info, fetch, load)");
ABSL_FLAG(std::string, arch, "", "architecture spec .json (create)");
ABSL_FLAG(std::string, from, "",
          ".safetensors checkpoint to create the model from (create)");
ABSL_FLAG(uint64_t, seed, 0, "seed of random initialisers (create --arch)");
ABSL_FLAG(std::vector<std::string>, keys, {}, "only these keys (fetch)");
ABSL_FLAG(std::string, dtype, "",
          "cast floating tensors: bf16, f16 or f32 (fetch)");
ABSL_FLAG(bool, no_buffers, false, "parameters only (fetch)");
ABSL_FLAG(bool, strip_module_prefix, false,
          "with --module: keys relative to the submodule, as torch's "
          "submodule.state_dict() (fetch)");
ABSL_FLAG(bool, fsync, false,
          "fsync the fetched file and its directory before reporting success "
          "(fetch)");
ABSL_FLAG(bool, non_strict, false, "torch's strict=False (load)");
ABSL_FLAG(bool, assign, false, "torch's assign=True (load)");
ABSL_FLAG(int64_t, if_version, -1,
          "load only if the model is at this version (load)");
ABSL_FLAG(int64_t, count, 0, "stop after this many events; 0: never (watch)");
ABSL_FLAG(uint32_t, chunk_bytes, 0, "chunk size of transfers; 0: default");
ABSL_FLAG(int64_t, version, 0,
          "a retained version instead of the current one (info, fetch)");
ABSL_FLAG(uint32_t, receive_window_bytes, 4u << 20,
          "bytes in flight per stream (fixed HTTP/2 window), bounding the "
          "CLI's memory; 0: gRPC's adaptive window");
ABSL_FLAG(int64_t, min_version, 0,
          "consistent reads: wait (up to --timeout, or the server's "
          "--max_version_wait) until the model is at this version or later; "
          "UNAVAILABLE if it does not get there (fetch, info, watch)");
ABSL_FLAG(int32_t, max_resumes, 8,
          "resume a fetch this many times after dropped connections, from the "
          "byte reached; 0: never");
// Authentication: a bearer token from a file (never from the command line,
// where other users could read it), else from $MODELSTATE_TOKEN.
ABSL_FLAG(std::string, token_file, "",
          "file holding a bearer token for a server with an auth policy; "
          "default: $MODELSTATE_TOKEN, if set");
ABSL_FLAG(bool, bytes, false,
          "exact byte counts instead of KiB, MiB, GiB (models, info)");

namespace modelstate {
namespace {

constexpr char kUsage[] =
    R"(modelstatectl [--server=HOST:PORT] [--tls_ca=PEM] [--tls_cert=PEM --tls_key=PEM] [--token_file=F] COMMAND
  models [--bytes]                                    name, version, tensors, size
  info MODEL [--module=PATH] [--version=N] [--min_version=N] [--bytes]  key, kind, dtype, shape, size, checksum
  create MODEL --arch=SPEC.json | --from=FILE.safetensors
  delete MODEL
  fetch MODEL OUT.safetensors [--module=PATH [--strip_module_prefix]] [--keys=a,b] [--dtype=bf16|f16|f32] [--no_buffers] [--version=N] [--min_version=N] [--max_resumes=N] [--fsync]
  load MODEL IN.safetensors [--module=PATH] [--non_strict] [--assign] [--if_version=N]
  watch MODEL [--count=N] [--min_version=N]
  versions MODEL                                      retained versions, newest first
  rollback MODEL VERSION                              make a retained version current again
  health                                              SERVING or NOT_SERVING (exit 0 or 1)
"pull" and "push" are older names of fetch and load.)";

// Exit codes: 0 success, 1 the call failed, 2 bad usage.
int Fail(const absl::Status &status) {
  std::fprintf(stderr, "ERROR: %s: %s\n",
               absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  return 1;
}

int Usage(const std::string &problem) {
  std::fprintf(stderr, "modelstatectl: %s\n%s\n", problem.c_str(), kUsage);
  return 2;
}

// A size in a table: "1.5 MiB", or the exact count with --bytes.
std::string Size(uint64_t bytes) {
  return absl::GetFlag(FLAGS_bytes) ? absl::StrCat(bytes) : HumanBytes(bytes);
}

const char *SizeHeader() {
  return absl::GetFlag(FLAGS_bytes) ? "BYTES" : "SIZE";
}

// A progress bar with bytes/s on stderr, only when stderr is a terminal.
class ProgressBar {
 public:
  explicit ProgressBar(const char *verb)
      : verb_(verb), enabled_(isatty(STDERR_FILENO)) {}
  ~ProgressBar() {
    if (drawn_) std::fprintf(stderr, "\n");
  }
  ProgressCallback Callback() {
    if (!enabled_) return nullptr;
    return [this](uint64_t done, uint64_t total) { Draw(done, total); };
  }

 private:
  void Draw(uint64_t done, uint64_t total) {
    const absl::Time now = absl::Now();
    if (done != total && now - last_ < absl::Milliseconds(100)) return;
    last_ = now;
    const double seconds = std::max(1e-6, absl::ToDoubleSeconds(now - start_));
    const double fraction =
        total == 0 ? 1.0 : static_cast<double>(done) / total;
    const int width = 30;
    const int filled = static_cast<int>(fraction * width);
    std::fprintf(stderr, "\r%s [%s%s] %3.0f%% %s/%s %s/s   ", verb_,
                 std::string(filled, '=').c_str(),
                 std::string(width - filled, ' ').c_str(), fraction * 100,
                 HumanBytes(done).c_str(), HumanBytes(total).c_str(),
                 HumanBytes(static_cast<uint64_t>(done / seconds)).c_str());
    drawn_ = true;
  }

  const char *verb_;
  bool enabled_;
  bool drawn_ = false;
  absl::Time start_ = absl::Now();
  absl::Time last_ = absl::InfinitePast();
};

std::string ShapeString(const Shape &shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int Models(Client &client) {
  absl::StatusOr<std::vector<ModelSummary>> models = client.ListModels();
  if (!models.ok()) return Fail(models.status());
  std::printf("%-24s %8s %8s %14s\n", "NAME", "VERSION", "TENSORS",
              SizeHeader());
  for (const ModelSummary &model : *models) {
    std::printf("%-24s %8lld %8lld %14s\n", model.name.c_str(),
                static_cast<long long>(model.version),
                static_cast<long long>(model.num_tensors),
                Size(model.num_bytes).c_str());
  }
  return 0;
}

int Info(Client &client, const std::string &model) {
  absl::StatusOr<ModelManifest> manifest = client.GetModel(
      model, absl::GetFlag(FLAGS_module), absl::GetFlag(FLAGS_version),
      absl::GetFlag(FLAGS_min_version));
  if (!manifest.ok()) return Fail(manifest.status());
  const uint64_t bytes = manifest->summary.num_bytes;
  const std::string total = absl::GetFlag(FLAGS_bytes)
                                ? absl::StrCat(bytes, " bytes")
                                : HumanBytes(bytes);
  std::printf("model %s version %lld class %s: %lld tensors, %s\n",
              model.c_str(), static_cast<long long>(manifest->summary.version),
              manifest->summary.root_class.c_str(),
              static_cast<long long>(manifest->summary.num_tensors),
              total.c_str());
  std::printf("%-48s %-9s %-13s %-20s %12s %16s\n", "KEY", "KIND", "DTYPE",
              "SHAPE", SizeHeader(), "XXH3");
  for (const TensorDescription &tensor : manifest->tensors) {
    std::printf("%-48s %-9s %-13s %-20s %12s %016llx\n", tensor.name.c_str(),
                tensor.kind == TensorKind::kBuffer ? "buffer" : "parameter",
                std::string(TorchName(tensor.dtype)).c_str(),
                ShapeString(tensor.shape).c_str(),
                Size(tensor.num_bytes).c_str(),
                static_cast<unsigned long long>(tensor.checksum));
  }
  return 0;
}

// The chunk size flag and a progress bar.
TransferOptions Transfer(ProgressBar &bar) {
  TransferOptions transfer;
  transfer.chunk_bytes = absl::GetFlag(FLAGS_chunk_bytes);
  transfer.progress = bar.Callback();
  transfer.max_resumes = absl::GetFlag(FLAGS_max_resumes);
  return transfer;
}

int PrintLoad(const absl::StatusOr<LoadOutcome> &result) {
  if (!result.ok()) return Fail(result.status());
  std::printf("version %lld%s\n", static_cast<long long>(result->version),
              result->created ? " (created)" : "");
  std::printf("missing keys: %s\n",
              result->missing_keys.empty()
                  ? "none"
                  : absl::StrJoin(result->missing_keys, ", ").c_str());
  std::printf("unexpected keys: %s\n",
              result->unexpected_keys.empty()
                  ? "none"
                  : absl::StrJoin(result->unexpected_keys, ", ").c_str());
  return 0;
}

int Create(Client &client, const std::string &model) {
  const std::string arch = absl::GetFlag(FLAGS_arch);
  const std::string from = absl::GetFlag(FLAGS_from);
  if (arch.empty() == from.empty())
    return Usage("create needs exactly one of --arch or --from");
  if (!arch.empty()) {
    absl::StatusOr<std::string> text = ReadFileToString(arch);
    if (!text.ok()) return Fail(text.status());
    absl::StatusOr<ModelSummary> created =
        client.CreateModel(model, *text, absl::GetFlag(FLAGS_seed));
    if (!created.ok()) return Fail(created.status());
    std::printf("created %s version %lld: %lld tensors, %llu bytes\n",
                model.c_str(), static_cast<long long>(created->version),
                static_cast<long long>(created->num_tensors),
                static_cast<unsigned long long>(created->num_bytes));
    return 0;
  }
  absl::StatusOr<SafetensorsFile> file = ReadSafetensorsFile(from);
  if (!file.ok()) return Fail(file.status());
  LoadRequest request(model);
  request.create_if_missing = true;
  request.expected_version = 0;  // Refuse to overwrite an existing model.
  ProgressBar bar("create");
  absl::StatusOr<LoadOutcome> result =
      client.Load(request, file->tensors, Transfer(bar));
  if (!result.ok() && result.status().code() == absl::StatusCode::kAborted) {
    return Fail(absl::AlreadyExistsError(
        absl::StrCat("model \"", model, "\" already exists")));
  }
  return PrintLoad(result);
}

// The selection flags of fetch.
absl::StatusOr<FetchRequest> FetchSelection(const std::string &model) {
  FetchRequest request(model);
  request.module = absl::GetFlag(FLAGS_module);
  request.keys = absl::GetFlag(FLAGS_keys);
  request.include_buffers = !absl::GetFlag(FLAGS_no_buffers);
  request.keep_module_prefix = !absl::GetFlag(FLAGS_strip_module_prefix);
  request.version = absl::GetFlag(FLAGS_version);
  request.min_version = absl::GetFlag(FLAGS_min_version);
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (!dtype.empty()) {
    if (dtype != "bf16" && dtype != "f16" && dtype != "f32") {
      return absl::InvalidArgumentError("--dtype must be bf16, f16 or f32");
    }
    request.dtype = ParseTorchDType(dtype).value();
  }
  return request;
}

// What a fetch wrote, for its closing line.
struct Fetched {
  int64_t version = 0;
  size_t tensors = 0;
  uint64_t bytes = 0;
  bool synced = false;
};

// Streams the state dict into a safetensors file at `path`: the header is
// written as soon as the stream's manifest arrives, and each piece of a tensor
// goes to its place in the file as it arrives, so the client holds no tensor,
// only the messages in flight, whatever the model's size. The file appears at
// `path` only once complete and every tensor verified
// (SafetensorsStreamWriter, Client::FetchToWriter).
absl::StatusOr<Fetched> FetchToFile(Client &client, const FetchRequest &request,
                                    TransferOptions transfer,
                                    const std::string &path) {
  SafetensorsStreamWriter::Options options;
  options.fsync = absl::GetFlag(FLAGS_fsync);
  std::unique_ptr<SafetensorsStreamWriter> writer;
  std::vector<std::string> names;
  Fetched fetched;
  transfer.on_manifest =
      [&](const std::vector<TensorDescription> &manifest) -> absl::Status {
    std::vector<SafetensorsTensorInfo> tensors;
    tensors.reserve(manifest.size());
    for (const TensorDescription &tensor : manifest) {
      tensors.push_back({tensor.name, tensor.dtype, tensor.shape});
      names.push_back(tensor.name);
      fetched.bytes += tensor.num_bytes;
    }
    fetched.tensors = manifest.size();
    ASSIGN_OR_RETURN(
        writer, SafetensorsStreamWriter::Create(path, std::move(tensors),
                                                {{"format", "pt"}}, options));
    return absl::OkStatus();
  };
  ASSIGN_OR_RETURN(
      fetched.version,
      client.FetchToWriter(
          request, transfer,
          [&](size_t index, uint64_t offset, absl::string_view piece) {
            return writer->WritePiece(names[index], offset, piece);
          }));
  if (writer == nullptr)
    return absl::InternalError("the stream had no manifest");
  RETURN_IF_ERROR(writer->Commit());
  fetched.synced = writer->synced();
  return fetched;
}

int FetchCommand(Client &client, const std::string &model,
                 const std::string &path) {
  absl::StatusOr<FetchRequest> request = FetchSelection(model);
  if (!request.ok()) return Usage(std::string(request.status().message()));
  ProgressBar bar("fetch");
  absl::StatusOr<Fetched> fetched =
      FetchToFile(client, *request, Transfer(bar), path);
  if (!fetched.ok()) return Fail(fetched.status());
  // Worded as before fetch was the command's name: scripts read this line.
  std::printf("pulled %s version %lld: %zu tensors, %llu bytes -> %s%s\n",
              model.c_str(), static_cast<long long>(fetched->version),
              fetched->tensors, static_cast<unsigned long long>(fetched->bytes),
              path.c_str(), fetched->synced ? " (fsynced)" : "");
  return 0;
}

int LoadCommand(Client &client, const std::string &model,
                const std::string &path) {
  absl::StatusOr<SafetensorsFile> file = ReadSafetensorsFile(path);
  if (!file.ok()) return Fail(file.status());
  LoadRequest request(model);
  request.strict = !absl::GetFlag(FLAGS_non_strict);
  request.assign = absl::GetFlag(FLAGS_assign);
  request.module = absl::GetFlag(FLAGS_module);
  if (absl::GetFlag(FLAGS_if_version) >= 0)
    request.expected_version = absl::GetFlag(FLAGS_if_version);
  ProgressBar bar("load");
  return PrintLoad(client.Load(request, file->tensors, Transfer(bar)));
}

int Watch(Client &client, const std::string &model) {
  const int64_t count = absl::GetFlag(FLAGS_count);
  int64_t seen = 0;
  absl::Status status = client.Watch(
      model,
      [&](const ModelEvent &event) {
        std::printf(
            "%s %s %lld\n",
            v1::WatchModelResponse::Type_Name(ToProto(event).type()).c_str(),
            event.model.c_str(), static_cast<long long>(event.version));
        std::fflush(stdout);
        return count <= 0 || ++seen < count;
      },
      /*canceller=*/nullptr, absl::GetFlag(FLAGS_min_version));
  return status.ok() ? 0 : Fail(status);
}

// The bearer token of --token_file (surrounding whitespace stripped), else of
// $MODELSTATE_TOKEN, else none. A token file others may read is used with a
// warning on stderr.
absl::StatusOr<std::string> Token() {
  const std::string path = absl::GetFlag(FLAGS_token_file);
  if (path.empty()) {
    const char *env = std::getenv("MODELSTATE_TOKEN");
    return std::string(absl::StripAsciiWhitespace(env ? env : ""));
  }
  std::string warning;
  absl::StatusOr<std::string> token = ReadTokenFile(path, &warning);
  if (!warning.empty())
    std::fprintf(stderr, "modelstatectl: warning: %s\n", warning.c_str());
  return token;
}

int Versions(Client &client, const std::string &model) {
  absl::StatusOr<ModelManifest> manifest = client.GetModel(model);
  if (!manifest.ok()) return Fail(manifest.status());
  for (int64_t version : manifest->retained_versions) {
    std::printf("%lld%s\n", static_cast<long long>(version),
                version == manifest->summary.version ? " (current)" : "");
  }
  return 0;
}

int Rollback(Client &client, const std::string &model,
             const std::string &version_text) {
  int64_t version;
  if (!absl::SimpleAtoi(version_text, &version))
    return Usage("VERSION must be a number");
  absl::StatusOr<ModelSummary> rolled = client.RollbackModel(model, version);
  if (!rolled.ok()) return Fail(rolled.status());
  std::printf("%s is at version %lld (the state of version %lld)\n",
              model.c_str(), static_cast<long long>(rolled->version),
              static_cast<long long>(version));
  return 0;
}

int Run(const std::vector<char *> &positional) {
  if (positional.size() < 2) return Usage("missing COMMAND");
  const std::string command = positional[1];
  std::vector<std::string> args(positional.begin() + 2, positional.end());
  ClientOptions options;
  options.tls_ca_file = absl::GetFlag(FLAGS_tls_ca);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  options.timeout = absl::GetFlag(FLAGS_timeout);
  options.load_balancing_policy = absl::GetFlag(FLAGS_lb_policy);
  options.receive_window_bytes = absl::GetFlag(FLAGS_receive_window_bytes);
  absl::StatusOr<std::string> token = Token();
  if (!token.ok()) return Fail(token.status());
  options.token = *std::move(token);
  absl::StatusOr<std::unique_ptr<Client>> client =
      Client::Connect(absl::GetFlag(FLAGS_server), options);
  if (!client.ok()) return Fail(client.status());
  auto want = [&](size_t n) { return args.size() == n; };
  if (command == "models" && want(0)) return Models(**client);
  if (command == "info" && want(1)) return Info(**client, args[0]);
  if (command == "create" && want(1)) return Create(**client, args[0]);
  if (command == "delete" && want(1)) {
    absl::Status deleted = (*client)->DeleteModel(args[0]);
    if (!deleted.ok()) return Fail(deleted);
    std::printf("deleted %s\n", args[0].c_str());
    return 0;
  }
  if ((command == "fetch" || command == "pull") && want(2))
    return FetchCommand(**client, args[0], args[1]);
  if ((command == "load" || command == "push") && want(2))
    return LoadCommand(**client, args[0], args[1]);
  if (command == "watch" && want(1)) return Watch(**client, args[0]);
  if (command == "versions" && want(1)) return Versions(**client, args[0]);
  if (command == "rollback" && want(2))
    return Rollback(**client, args[0], args[1]);
  if (command == "health" && want(0)) {
    absl::StatusOr<bool> serving = (*client)->CheckHealth();
    if (!serving.ok()) return Fail(serving.status());
    std::printf("%s\n", *serving ? "SERVING" : "NOT_SERVING");
    return *serving ? 0 : 1;
  }
  return Usage(absl::StrCat("bad command or arguments: ", command));
}

}  // namespace
}  // namespace modelstate

int main(int argc, char **argv) {
  // A fetch or load moves gigabytes through gRPC's buffers of a few MiB each:
  // kept in the heap, they are reused instead of faulted in afresh. Before
  // any thread starts, as glibc wants.
  const absl::Status kept = modelstate::KeepFreedMemoryForReuse();
  if (!kept.ok())
    std::fprintf(stderr, "warning: %s\n", kept.ToString().c_str());
  absl::SetProgramUsageMessage(modelstate::kUsage);
  std::vector<char *> positional = absl::ParseCommandLine(argc, argv);
  return modelstate::Run(positional);
}
