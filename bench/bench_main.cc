// modelstate_bench: measures modelstated beside raw TCP, a naive gRPC server
// and nginx, in one run, contenders alternating, and prints a markdown table
// and JSON (docs/performance.md).
//
//   modelstate_bench [--quick] [--reps=N] [--work_dir=DIR] [--out=PREFIX]
//
// Child modes (used by the driver itself): serve-tcp FILE, serve-naive FILE.
#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/naive.grpc.pb.h"
#include "client/client.h"
#include "core/safetensors.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/server_builder.h"

namespace modelstate::bench {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGiB = 1 << 30;

double Seconds() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "modelstate_bench: %s\n", message.c_str());
  std::exit(1);
}

template <typename T>
T Check(absl::StatusOr<T> value, const char* what) {
  if (!value.ok()) Die(absl::StrCat(what, ": ", value.status().ToString()));
  return *std::move(value);
}

// ---- Model files
// ---------------------------------------------------------------------------

// Writes (once) a safetensors file of `tensors` float32 tensors totalling about
// `bytes`.
std::string ModelFile(const std::string& dir, int64_t tensors, uint64_t bytes) {
  const std::string path =
      absl::StrCat(dir, "/model-", tensors, "x", bytes, ".safetensors");
  struct stat info;
  if (stat(path.c_str(), &info) == 0 &&
      info.st_size > static_cast<off_t>(bytes))
    return path;
  const int64_t floats = static_cast<int64_t>(bytes / 4 / tensors);
  StateDict state;
  uint64_t x = 88172645463325252ull;
  for (int64_t t = 0; t < tensors; ++t) {
    TensorBuilder builder =
        Check(TensorBuilder::CreateUninitialized(DType::kFloat32, {floats}),
              "allocate");
    float* data = builder.mutable_data_as<float>();
    for (int64_t i = 0; i < floats; ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      data[i] = static_cast<float>(static_cast<int32_t>(x >> 40)) * 1e-6f;
    }
    state.Set(absl::StrFormat("layers.%d.weight", t),
              std::move(builder).Build());
  }
  absl::Status written = WriteSafetensorsFile(path + ".tmp", state);
  if (!written.ok()) Die(written.ToString());
  std::rename((path + ".tmp").c_str(), path.c_str());
  return path;
}

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream data;
  data << in.rdbuf();
  return data.str();
}

// Every contender receives into memory allocated the way modelstate's client
// allocates tensors (Storage::AllocateUninitialized: huge pages for large
// buffers), freshly for each transfer, so the comparison is of transports, not
// allocators. The previous buffer is freed on the next call.
char* FreshBuffer(uint64_t size) {
  static thread_local std::shared_ptr<Storage> buffer;
  buffer.reset();
  buffer = Check(Storage::AllocateUninitialized(size), "allocate");
  return reinterpret_cast<char*>(const_cast<uint8_t*>(buffer->data()));
}

// ---- Child processes
// -----------------------------------------------------------------------

struct Child {
  pid_t pid = -1;
  int port = 0;
};

// Starts `argv`, reads its output (`fd` 1 or 2) until a line containing
// `marker` followed by the port number.
Child Spawn(std::vector<std::string> argv, int fd, const std::string& marker) {
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) Die("pipe");
  Child child;
  child.pid = fork();
  if (child.pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the driver
    dup2(pipe_fds[1], fd);
    close(pipe_fds[0]);
    std::vector<char*> args;
    for (std::string& arg : argv) args.push_back(arg.data());
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(pipe_fds[1]);
  std::string seen;
  char c;
  while (read(pipe_fds[0], &c, 1) == 1) {
    seen += c;
    const size_t at = seen.find(marker);
    if (c == '\n' && at != std::string::npos) {
      child.port = std::atoi(seen.c_str() + at + marker.size());
      break;
    }
  }
  // Keep draining the child's output so it never blocks on a full pipe.
  std::thread([fd = pipe_fds[0]] {
    char buffer[4096];
    while (read(fd, buffer, sizeof buffer) > 0) {
    }
    close(fd);
  }).detach();
  if (child.port == 0)
    Die("child did not report a port: " + argv[0] + " " + seen);
  return child;
}

void Stop(Child& child) {
  if (child.pid > 0) {
    kill(child.pid, SIGTERM);
    waitpid(child.pid, nullptr, 0);
    child.pid = -1;
  }
}

int Listen(int* port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    Die("bind");
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  *port = ntohs(addr.sin_port);
  listen(fd, 64);
  return fd;
}

bool WriteAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t wrote = write(fd, data, size);
    if (wrote <= 0) return false;
    data += wrote;
    size -= static_cast<size_t>(wrote);
  }
  return true;
}

bool ReadAll(int fd, char* data, size_t size) {
  while (size > 0) {
    const ssize_t got = read(fd, data, size);
    if (got <= 0) return false;
    data += got;
    size -= static_cast<size_t>(got);
  }
  return true;
}

// Contender (a): 'G' sends the file's bytes; 'P' + 8-byte length receives that
// many bytes into memory and answers 'K'. The physical limit of a TCP loopback
// transfer here.
int ServeTcp(const std::string& file) {
  const std::string bytes = ReadWholeFile(file);
  std::vector<char> sink;
  int port;
  const int listener = Listen(&port);
  std::printf("PORT %d\n", port);
  std::fflush(stdout);
  while (true) {
    const int fd = accept(listener, nullptr, nullptr);
    if (fd < 0) continue;
    char command;
    while (ReadAll(fd, &command, 1)) {
      if (command == 'G') {
        uint64_t size = bytes.size();
        if (!WriteAll(fd, reinterpret_cast<char*>(&size), 8) ||
            !WriteAll(fd, bytes.data(), bytes.size())) {
          break;
        }
      } else if (command == 'P') {
        uint64_t size;
        if (!ReadAll(fd, reinterpret_cast<char*>(&size), 8)) break;
        char* into = FreshBuffer(size);
        if (!ReadAll(fd, into, size) || !WriteAll(fd, "K", 1)) break;
      }
    }
    close(fd);
  }
}

// Contender (b): the obvious gRPC server, copying the file into 1 MiB `bytes`
// messages.
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

// nginx with sendfile serving the directory of the model files.
Child StartNginx(const std::string& work_dir) {
  int port;
  close(Listen(&port));
  const std::string dir = work_dir + "/nginx";
  mkdir(dir.c_str(), 0755);
  std::ofstream(dir + "/nginx.conf") << absl::StrFormat(
      "worker_processes 1; daemon off; master_process off; pid %s/nginx.pid;\n"
      "error_log %s/error.log;\n"
      "events { worker_connections 256; }\n"
      "http { access_log off; sendfile on; tcp_nopush on; default_type "
      "application/octet-stream;\n"
      "  client_body_temp_path %s; proxy_temp_path %s; fastcgi_temp_path %s;\n"
      "  uwsgi_temp_path %s; scgi_temp_path %s;\n"
      "  server { listen 127.0.0.1:%d; root %s; } }\n",
      dir, dir, dir, dir, dir, dir, dir, port, work_dir);
  Child child;
  child.pid = fork();
  if (child.pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    execl("/usr/sbin/nginx", "nginx", "-p", dir.c_str(), "-c",
          (dir + "/nginx.conf").c_str(), nullptr);
    _exit(127);
  }
  child.port = port;
  for (int i = 0; i < 200; ++i) {  // wait until it accepts connections
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const bool up =
        connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    close(fd);
    if (up) return child;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  Die("nginx did not start; see " + dir + "/error.log");
}

// ---- Fetchers: each moves the bytes into freshly allocated memory
// -------------------------

int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    Die("connect");
  return fd;
}

uint64_t FetchTcp(int fd) {
  uint64_t size;
  if (!WriteAll(fd, "G", 1) || !ReadAll(fd, reinterpret_cast<char*>(&size), 8))
    Die("tcp fetch");
  if (!ReadAll(fd, FreshBuffer(size), size)) Die("tcp fetch");
  return size;
}

void PushTcp(int fd, const std::string& bytes) {
  const uint64_t size = bytes.size();
  char ack;
  if (!WriteAll(fd, "P", 1) ||
      !WriteAll(fd, reinterpret_cast<const char*>(&size), 8) ||
      !WriteAll(fd, bytes.data(), size) || !ReadAll(fd, &ack, 1)) {
    Die("tcp push");
  }
}

uint64_t FetchNaive(Naive::Stub& stub, uint64_t expected) {
  grpc::ClientContext context;
  FetchRequest request;
  auto reader = stub.Fetch(&context, request);
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

struct CurlTarget {
  char* into;
  uint64_t at;
  uint64_t capacity;
};

size_t CurlWrite(char* data, size_t size, size_t count, void* user) {
  auto* target = static_cast<CurlTarget*>(user);
  const size_t bytes = size * count;
  if (target->at + bytes > target->capacity) return 0;
  std::memcpy(target->into + target->at, data, bytes);
  target->at += bytes;
  return bytes;
}

uint64_t FetchNginx(CURL* curl, const std::string& url, uint64_t expected) {
  CurlTarget target{FreshBuffer(expected), 0, expected};
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, CurlWrite);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &target);
  if (curl_easy_perform(curl) != CURLE_OK) Die("curl fetch failed");
  return target.at;
}

uint64_t FetchModelstate(Client& client, const std::string& model,
                         const FetchOptions& options) {
  FetchedStateDict fetched = Check(client.StateDict(model, options), "fetch");
  return fetched.state.TotalBytes();
}

// ---- Statistics and report
// -----------------------------------------------------------------

struct Series {
  std::vector<double> values;
  void Add(double v) { values.push_back(v); }
  double Median() const {
    std::vector<double> v = values;
    std::sort(v.begin(), v.end());
    return v.empty()
               ? 0
               : (v.size() % 2 ? v[v.size() / 2]
                               : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2);
  }
  double Min() const {
    return values.empty() ? 0 : *std::min_element(values.begin(), values.end());
  }
  double Max() const {
    return values.empty() ? 0 : *std::max_element(values.begin(), values.end());
  }
  double Percentile(double p) const {
    std::vector<double> v = values;
    std::sort(v.begin(), v.end());
    return v.empty()
               ? 0
               : v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
  }
};

struct Row {
  std::string id, figure, unit;
  Series series;
  std::string target;
  std::string verdict;  // "met", "missed" or "" when only reported
  std::string note;
};

std::deque<Row>
    rows;  // deque: AddRow hands out references that must stay valid

Row& AddRow(const std::string& id, const std::string& figure,
            const std::string& unit) {
  rows.push_back(Row{id, figure, unit, {}, "", "", ""});
  return rows.back();
}

void Ratio(const std::string& id, const std::string& figure, double value,
           double target, const std::string& target_text) {
  Row& row = AddRow(id, figure, "ratio");
  row.series.Add(value);
  row.target = target_text;
  row.verdict = value >= target ? "met" : "missed";
}

long DaemonPeakRssBytes(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::atol(line.c_str() + 6) * 1024;
  }
  return 0;
}

void ResetPeakRss(pid_t pid) {
  std::ofstream("/proc/" + std::to_string(pid) + "/clear_refs") << "5";
}

std::string Report(bool markdown) {
  std::string out;
  if (markdown) {
    out += "| id | figure | median | min | max | unit | target | verdict |\n";
    out += "|---|---|---|---|---|---|---|---|\n";
    for (const Row& row : rows) {
      out += absl::StrFormat(
          "| %s | %s | %.3f | %.3f | %.3f | %s | %s | %s |\n", row.id,
          row.figure, row.series.Median(), row.series.Min(), row.series.Max(),
          row.unit, row.target, row.verdict);
    }
    return out;
  }
  out = "[\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& row = rows[i];
    out += absl::StrFormat(
        "  {\"id\": \"%s\", \"figure\": \"%s\", \"unit\": \"%s\", \"median\": "
        "%.6f, \"min\": "
        "%.6f, \"max\": %.6f, \"samples\": %d, \"target\": \"%s\", "
        "\"verdict\": \"%s\"}%s\n",
        row.id, row.figure, row.unit, row.series.Median(), row.series.Min(),
        row.series.Max(), row.series.values.size(), row.target, row.verdict,
        i + 1 < rows.size() ? "," : "");
  }
  return out + "]\n";
}

// ---- The suite
// -----------------------------------------------------------------------------

struct Config {
  bool quick = false;
  int reps = 5;
  std::string work_dir = "/tmp/modelstate-bench";
  std::string out;
  std::string self;
  std::string daemon;
};

double GBps(uint64_t bytes, double seconds) { return bytes / seconds / 1e9; }

int RunSuite(const Config& config) {
  mkdir(config.work_dir.c_str(), 0755);
  const uint64_t model_bytes = config.quick ? 64 * kMiB : kGiB;
  const int64_t many_tensors = config.quick ? 10000 : 100000;
  std::vector<uint64_t> sizes =
      config.quick
          ? std::vector<uint64_t>{16 * kMiB, 64 * kMiB}
          : std::vector<uint64_t>{64 * kMiB, 256 * kMiB, kGiB, 4 * kGiB};
  std::fprintf(stderr, "preparing model files in %s\n",
               config.work_dir.c_str());
  const std::string main_file = ModelFile(config.work_dir, 16, model_bytes);
  const std::string many_file =
      ModelFile(config.work_dir, many_tensors, model_bytes);
  const std::string small_file = ModelFile(config.work_dir, 1, 4096);
  std::map<uint64_t, std::string> size_files;
  for (uint64_t size : sizes)
    size_files[size] = ModelFile(config.work_dir, 16, size);

  std::vector<std::string> daemon_args = {config.daemon,
                                          "--listen=127.0.0.1:0",
                                          "--demo_model=",
                                          "--log_rpcs=false",
                                          "--preload=main=" + main_file,
                                          "--preload=many=" + many_file,
                                          "--preload=small=" + small_file};
  for (const auto& [size, file] : size_files) {
    daemon_args.push_back(absl::StrCat("--preload=size", size, "=", file));
  }
  Child daemon = Spawn(daemon_args, 2, "serving on port ");
  // A second daemon holding only the main model, so its RSS speaks of that
  // model alone.
  Child lean = Spawn({config.daemon, "--listen=127.0.0.1:0", "--demo_model=",
                      "--log_rpcs=false", "--preload=main=" + main_file},
                     2, "serving on port ");
  const std::string lean_target = absl::StrCat("127.0.0.1:", lean.port);
  auto lean_client = Check(Client::Connect(lean_target), "connect");
  Child tcp = Spawn({config.self, "serve-tcp", main_file}, 1, "PORT ");
  Child naive = Spawn({config.self, "serve-naive", main_file}, 1, "PORT ");
  Child nginx = StartNginx(config.work_dir);
  const std::string target = absl::StrCat("127.0.0.1:", daemon.port);
  auto client = Check(Client::Connect(target), "connect");
  const int tcp_fd = Connect(tcp.port);
  int one = 1;
  setsockopt(tcp_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  grpc::ChannelArguments naive_args;
  naive_args.SetMaxReceiveMessageSize(64 << 20);
  auto naive_stub = Naive::NewStub(grpc::CreateCustomChannel(
      absl::StrCat("127.0.0.1:", naive.port),
      grpc::InsecureChannelCredentials(), naive_args));
  curl_global_init(CURL_GLOBAL_DEFAULT);
  CURL* curl = curl_easy_init();
  const std::string url =
      absl::StrCat("http://127.0.0.1:", nginx.port, "/",
                   main_file.substr(main_file.rfind('/') + 1));
  struct stat file_info;
  stat(main_file.c_str(), &file_info);
  const uint64_t file_bytes = static_cast<uint64_t>(file_info.st_size);
  // Load the weights into the daemon as a trainer would, so the model lives in
  // anonymous memory rather than in the page cache of its preload file, which
  // the kernel's proactive reclaim on this kind of machine evicts between
  // repetitions.
  SafetensorsFile push_state =
      Check(ReadSafetensorsFile(main_file), "read model file");
  Check(client->LoadStateDict("main", push_state.tensors), "load main");
  const uint64_t tensor_bytes = FetchModelstate(*client, "main", {});

  // P1 and P8: contenders alternate, each repetition in a rotated order.
  Row& ours = AddRow("P1", "modelstate full fetch, 16 tensors", "GB/s");
  Row& raw = AddRow("P1.a", "raw TCP loopback, same bytes", "GB/s");
  Row& grpc_naive =
      AddRow("P1.b", "naive gRPC stream of 1 MiB messages", "GB/s");
  Row& http = AddRow("P1.c", "nginx sendfile + libcurl", "GB/s");
  Row& cast = AddRow(
      "P8", "modelstate fetch with fp32->bf16 cast, source bytes", "GB/s");
  FetchOptions bf16;
  bf16.cast_floating_to = DType::kBFloat16;
  std::vector<std::function<void()>> contenders = {
      [&] {
        const double t = Seconds();
        FetchModelstate(*client, "main", {});
        ours.series.Add(GBps(tensor_bytes, Seconds() - t));
      },
      [&] {
        const double t = Seconds();
        FetchTcp(tcp_fd);
        raw.series.Add(GBps(file_bytes, Seconds() - t));
      },
      [&] {
        const double t = Seconds();
        FetchNaive(*naive_stub, file_bytes);
        grpc_naive.series.Add(GBps(file_bytes, Seconds() - t));
      },
      [&] {
        const double t = Seconds();
        FetchNginx(curl, url, file_bytes);
        http.series.Add(GBps(file_bytes, Seconds() - t));
      },
      [&] {
        const double t = Seconds();
        FetchModelstate(*client, "main", bf16);
        cast.series.Add(GBps(tensor_bytes, Seconds() - t));
      },
  };
  FetchTcp(tcp_fd);  // warm-ups
  FetchNaive(*naive_stub, file_bytes);
  FetchNginx(curl, url, file_bytes);
  std::fprintf(stderr, "P1/P8: %d repetitions\n", config.reps);
  for (int rep = 0; rep < config.reps; ++rep) {
    for (size_t i = 0; i < contenders.size(); ++i)
      contenders[(i + rep) % contenders.size()]();
  }

  // P5: the same bytes as many small tensors.
  Row& many =
      AddRow("P5.many",
             absl::StrCat("modelstate full fetch, ", many_tensors, " tensors"),
             "GB/s");
  FetchModelstate(*client, "many", {});
  std::fprintf(stderr, "P5: %d repetitions\n", config.reps);
  for (int rep = 0; rep < config.reps; ++rep) {
    const double t = Seconds();
    FetchModelstate(*client, "many", {});
    many.series.Add(GBps(tensor_bytes, Seconds() - t));
  }

  // P6: concurrent fetchers (each streams tensors and drops them) and the
  // daemon's peak RSS.
  std::vector<int> fan_out =
      config.quick ? std::vector<int>{1, 4} : std::vector<int>{1, 4, 16};
  std::map<int, Row*> aggregate;
  FetchModelstate(*lean_client, "main", {});  // page the model in
  for (int n : fan_out) {
    Row& row =
        AddRow(absl::StrCat("P6.", n),
               absl::StrCat(n, " concurrent fetchers, aggregate"), "GB/s");
    Row& rss = AddRow(
        absl::StrCat("P6.rss.", n),
        absl::StrCat("daemon peak RSS with ", n, " fetchers / model bytes"),
        "ratio");
    aggregate[n] = &row;
    std::vector<std::unique_ptr<Client>> clients;
    for (int i = 0; i < n; ++i) {
      ClientOptions own;
      own.own_connection = true;
      clients.push_back(Check(Client::Connect(lean_target, own), "connect"));
    }
    std::fprintf(stderr, "P6 with %d fetchers: %d repetitions\n", n,
                 config.reps);
    for (int rep = 0; rep < config.reps; ++rep) {
      ResetPeakRss(lean.pid);
      std::vector<std::thread> threads;
      const double t = Seconds();
      for (int i = 0; i < n; ++i) {
        threads.emplace_back([&, i] {
          Check(clients[i]->StateDictStreaming(
                    "main", {},
                    [](const TensorDescription&, Tensor) {
                      return absl::OkStatus();
                    }),
                "streaming fetch");
        });
      }
      for (auto& thread : threads) thread.join();
      row.series.Add(GBps(tensor_bytes * n, Seconds() - t));
      rss.series.Add(static_cast<double>(DaemonPeakRssBytes(lean.pid)) /
                     tensor_bytes);
    }
    rss.target = "<= 1.1 + 64 MiB/model";
    const double limit = 1.1 + static_cast<double>(64 * kMiB) / tensor_bytes;
    rss.verdict = rss.series.Max() <= limit ? "met" : "missed";
  }

  // P4: push of the whole model vs raw TCP the other way.
  Row& push =
      AddRow("P4", "modelstate push (LoadStateDict), 16 tensors", "GB/s");
  Row& raw_push = AddRow("P4.a", "raw TCP loopback push", "GB/s");
  Row& push_rss = AddRow(
      "RSS.load", "daemon peak RSS during a full load / model bytes", "ratio");
  const std::string push_bytes = ReadWholeFile(main_file);
  std::fprintf(stderr, "P4: %d repetitions\n", config.reps);
  for (int rep = 0; rep < config.reps; ++rep) {
    const double t = Seconds();
    ResetPeakRss(lean.pid);
    Check(lean_client->LoadStateDict("main", push_state.tensors), "push");
    push.series.Add(GBps(tensor_bytes, Seconds() - t));
    push_rss.series.Add(static_cast<double>(DaemonPeakRssBytes(lean.pid)) /
                        tensor_bytes);
    const double u = Seconds();
    PushTcp(tcp_fd, push_bytes);
    raw_push.series.Add(GBps(push_bytes.size(), Seconds() - u));
  }

  // P7: one 4 KiB tensor by key vs an empty unary RPC.
  Row& small = AddRow("P7.fetch", "fetch one 4 KiB tensor by key, p50", "us");
  Row& small99 =
      AddRow("P7.fetch99", "fetch one 4 KiB tensor by key, p99", "us");
  Row& empty = AddRow("P7.empty", "empty unary RPC (health Check), p50", "us");
  Row& empty99 =
      AddRow("P7.empty99", "empty unary RPC (health Check), p99", "us");
  Series fetch_latency, empty_latency;
  FetchOptions by_key;
  by_key.keys = {"layers.0.weight"};
  const int iterations = config.quick ? 200 : 2000;
  for (int block = 0; block < iterations / 100; ++block) {
    for (int i = 0; i < 100; ++i) {
      const double t = Seconds();
      FetchModelstate(*client, "small", by_key);
      fetch_latency.Add((Seconds() - t) * 1e6);
    }
    for (int i = 0; i < 100; ++i) {
      const double t = Seconds();
      Check(client->CheckHealth(), "health");
      empty_latency.Add((Seconds() - t) * 1e6);
    }
  }
  small.series.Add(fetch_latency.Percentile(0.5));
  small99.series.Add(fetch_latency.Percentile(0.99));
  empty.series.Add(empty_latency.Percentile(0.5));
  empty99.series.Add(empty_latency.Percentile(0.99));

  // P10: how the cost grows with the model.
  std::map<uint64_t, Row*> by_size;
  for (uint64_t size : sizes) {
    Row& row = AddRow(
        absl::StrCat("P10.", size / kMiB, "MiB"),
        absl::StrCat("modelstate full fetch, ", size / kMiB, " MiB model"),
        "GB/s");
    by_size[size] = &row;
    const std::string model = absl::StrCat("size", size);
    FetchModelstate(*client, model, {});
    const uint64_t bytes = client->GetModel(model).value().summary.num_bytes;
    std::fprintf(stderr, "P10 %llu MiB: %d repetitions\n",
                 static_cast<unsigned long long>(size / kMiB), config.reps);
    for (int rep = 0; rep < config.reps; ++rep) {
      const double t = Seconds();
      FetchModelstate(*client, model, {});
      row.series.Add(GBps(bytes, Seconds() - t));
    }
  }

  // Ratios against the targets.
  Ratio("P1/a", "P1 / raw TCP", ours.series.Median() / raw.series.Median(), 0.9,
        ">= 0.9");
  Ratio("P1/b", "P1 / naive gRPC",
        ours.series.Median() / grpc_naive.series.Median(), 1.2, ">= 1.2");
  Ratio("P1/c", "P1 / nginx", ours.series.Median() / http.series.Median(), 1.0,
        ">= 1.0");
  Ratio("P4/a", "P4 / raw TCP push",
        push.series.Median() / raw_push.series.Median(), 0.8, ">= 0.8");
  Ratio("P5", "many tensors / 16 tensors",
        many.series.Median() / ours.series.Median(), 0.7, ">= 0.7");
  Ratio("P6", absl::StrCat(fan_out.back(), " fetchers aggregate / 1 fetcher"),
        aggregate[fan_out.back()]->series.Median() /
            aggregate[1]->series.Median(),
        0.9, ">= 0.9");
  {
    Row& row = AddRow("P7", "p50 fetch-by-key / p50 empty RPC", "ratio");
    row.series.Add(small.series.Median() / empty.series.Median());
    row.target = "<= 2.0";
    row.verdict = row.series.Median() <= 2.0 ? "met" : "missed";
  }
  Ratio("P8", "cast fetch (source bytes/s) / P1",
        cast.series.Median() / ours.series.Median(), 1.3, ">= 1.3");
  {
    const double reference =
        by_size[sizes[sizes.size() > 2 ? 2 : sizes.size() - 1]]
            ->series.Median();
    double worst = 0;
    for (const auto& [size, row] : by_size) {
      worst = std::max(worst, std::abs(row->series.Median() / reference - 1));
    }
    Row& row = AddRow("P10", "largest deviation of GB/s across model sizes",
                      "fraction");
    row.series.Add(worst);
    row.target = "<= 0.15";
    row.verdict = worst <= 0.15 ? "met" : "missed";
  }

  curl_easy_cleanup(curl);
  close(tcp_fd);
  client.reset();
  lean_client.reset();
  Stop(lean);
  Stop(nginx);
  Stop(tcp);
  Stop(naive);
  Stop(daemon);

  const std::string markdown = Report(true);
  const std::string json = Report(false);
  std::printf("%s\n%s", markdown.c_str(), json.c_str());
  if (!config.out.empty()) {
    std::ofstream(config.out + ".md") << markdown;
    std::ofstream(config.out + ".json") << json;
  }
  return 0;
}

}  // namespace
}  // namespace modelstate::bench

int main(int argc, char** argv) {
  using modelstate::bench::Config;
  signal(SIGPIPE, SIG_IGN);
  if (argc >= 3 && std::string(argv[1]) == "serve-tcp")
    return modelstate::bench::ServeTcp(argv[2]);
  if (argc >= 3 && std::string(argv[1]) == "serve-naive") {
    return modelstate::bench::ServeNaive(argv[2]);
  }
  Config config;
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  self[n > 0 ? n : 0] = '\0';
  config.self = self;
  config.daemon = MODELSTATED_PATH;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--quick") {
      config.quick = true;
      config.reps = 3;
    } else if (arg.rfind("--reps=", 0) == 0) {
      config.reps = std::max(1, std::atoi(arg.c_str() + 7));
    } else if (arg.rfind("--work_dir=", 0) == 0) {
      config.work_dir = arg.substr(11);
    } else if (arg.rfind("--out=", 0) == 0) {
      config.out = arg.substr(6);
    } else {
      std::fprintf(stderr,
                   "usage: modelstate_bench [--quick] [--reps=N] "
                   "[--work_dir=DIR] [--out=PREFIX]\n");
      return 2;
    }
  }
  return modelstate::bench::RunSuite(config);
}
