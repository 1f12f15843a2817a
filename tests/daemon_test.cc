// modelstated as a real subprocess: the modelstatectl contract, preloading, and
// SIGTERM draining a stream in flight.
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "model/safetensors.h"
#include "modelstate/v1/model_state.grpc.pb.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;
using testing_support::CtlPath;
using testing_support::Daemon;
using testing_support::RunCommand;
using testing_support::ScratchDir;

std::string Ctl(const Daemon& daemon, const std::string& args) {
  return CtlPath() + " --server=" + daemon.address() + " " + args;
}

std::string SourcePath(const std::string& relative) {
  return std::string(MODELSTATE_SOURCE_DIR) + "/" + relative;
}

TEST(DaemonTest, ModelstatectlCommandContract) {
  const ScratchDir scratch;
  const std::string& dir = scratch.path();
  Daemon daemon({"--preload=cnn=" + SourcePath("tests/models/cnn.json"),
                 "--preload=mlp=" + SourcePath("tests/models/mlp.json")});
  ASSERT_GT(daemon.port(), 0);
  // Without --memory_limit_bytes the daemon takes 90% of its cgroup's limit
  // or of physical memory, and says which.
  EXPECT_THAT(daemon.Log(), HasSubstr("modelstated: memory limit "));
  EXPECT_THAT(daemon.Log(), HasSubstr(" bytes (90% of "));

  auto models = RunCommand(Ctl(daemon, "models"));
  EXPECT_EQ(models.exit_code, 0) << models.output;
  EXPECT_THAT(models.output, HasSubstr("cnn"));
  EXPECT_THAT(models.output,
              HasSubstr("demo"));  // the built-in demo is on by default

  auto info = RunCommand(Ctl(daemon, "info cnn --module=1"));
  EXPECT_EQ(info.exit_code, 0) << info.output;
  EXPECT_THAT(info.output, HasSubstr("1.num_batches_tracked"));
  EXPECT_THAT(info.output, HasSubstr("buffer"));
  EXPECT_THAT(info.output, HasSubstr("int64"));

  const std::string pulled = dir + "/cnn.safetensors";
  auto pull = RunCommand(Ctl(daemon, "pull cnn " + pulled));
  EXPECT_EQ(pull.exit_code, 0) << pull.output;
  SafetensorsFile file = ReadSafetensorsFile(pulled).value();
  EXPECT_EQ(file.tensors.size(), 15u);

  auto push = RunCommand(Ctl(daemon, "push cnn " + pulled + " --if_version=1"));
  EXPECT_EQ(push.exit_code, 0) << push.output;
  EXPECT_THAT(push.output, HasSubstr("version 2"));
  auto conflict =
      RunCommand(Ctl(daemon, "push cnn " + pulled + " --if_version=1"));
  EXPECT_NE(conflict.exit_code, 0);
  EXPECT_THAT(conflict.output, HasSubstr("ABORTED"));

  const std::string conv = dir + "/conv.safetensors";
  ASSERT_EQ(
      RunCommand(
          Ctl(daemon, "pull cnn " + conv +
                          " --module=0 --strip_module_prefix --dtype=bf16"))
          .exit_code,
      0);
  EXPECT_EQ(ReadSafetensorsFile(conv).value().tensors.Find("weight")->dtype(),
            DType::kBFloat16);
  auto wrong_place = RunCommand(Ctl(daemon, "push cnn " + conv));
  EXPECT_EQ(wrong_place.exit_code, 1);
  EXPECT_THAT(wrong_place.output, HasSubstr("FAILED_PRECONDITION"));
  EXPECT_THAT(wrong_place.output, HasSubstr("Missing key(s) in state_dict"));
  // Not strict, nothing matches at the root: torch accepts it and reports the
  // keys.
  auto loose = RunCommand(Ctl(daemon, "push cnn " + conv + " --non_strict"));
  EXPECT_EQ(loose.exit_code, 0) << loose.output;
  EXPECT_THAT(loose.output, HasSubstr("unexpected keys: bias, weight"));
  auto into_module =
      RunCommand(Ctl(daemon, "push cnn " + conv + " --module=0"));
  EXPECT_EQ(into_module.exit_code, 0) << into_module.output;
  EXPECT_THAT(into_module.output, HasSubstr("missing keys: none"));
  auto partial =
      RunCommand(Ctl(daemon, "push mlp " + conv + " --non_strict --module=0"));
  EXPECT_EQ(partial.exit_code, 1);  // shape mismatch fails even when not strict
  EXPECT_THAT(partial.output, HasSubstr("size mismatch for weight"));

  auto create = RunCommand(Ctl(daemon, "create copy --from=" + pulled));
  EXPECT_EQ(create.exit_code, 0) << create.output;
  auto again = RunCommand(Ctl(daemon, "create copy --from=" + pulled));
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_THAT(again.output, HasSubstr("ALREADY_EXISTS"));
  auto arch = RunCommand(Ctl(
      daemon, "create net --arch=" + SourcePath("tests/models/llama.json")));
  EXPECT_EQ(arch.exit_code, 0) << arch.output;
  auto watch = RunCommand(Ctl(daemon, "watch net --count=1"));
  EXPECT_EQ(watch.exit_code, 0);
  EXPECT_THAT(watch.output, HasSubstr("CURRENT net 1"));
  EXPECT_EQ(RunCommand(Ctl(daemon, "delete net")).exit_code, 0);
  auto gone = RunCommand(Ctl(daemon, "info net"));
  EXPECT_EQ(gone.exit_code, 1);
  EXPECT_THAT(gone.output, HasSubstr("NOT_FOUND"));
  EXPECT_EQ(RunCommand(Ctl(daemon, "health")).exit_code, 0);
  EXPECT_EQ(RunCommand(Ctl(daemon, "frobnicate")).exit_code, 2);

  // One log line per RPC.
  EXPECT_THAT(daemon.Log(), HasSubstr("rpc=StateDict model=cnn bytes="));
  EXPECT_THAT(daemon.Log(), HasSubstr("status=ABORTED"));
  EXPECT_EQ(daemon.Stop(SIGTERM, 30), 0);
}

TEST(DaemonTest, BadPreloadFailsTheStart) {
  const ScratchDir scratch;
  const std::string bad = scratch.file("bad.safetensors");
  std::ofstream(bad) << "not a safetensors file";
  auto result = RunCommand(testing_support::DaemonPath() +
                           " --listen=127.0.0.1:0 --preload=x=" + bad);
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_THAT(result.output, HasSubstr("preload x: "));
  EXPECT_THAT(result.output, HasSubstr("bad.safetensors: header too large"));
}

// Polls new calls until one is refused; false if none was within `timeout`.
// gRPC stops taking calls as its Shutdown starts, a moment after the daemon
// logs that it drains, so a call may get in between.
bool NewCallsAreRefused(const std::string& address, absl::Duration timeout) {
  ClientOptions quick;
  quick.timeout = absl::Seconds(2);
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (!Client::Connect(address, quick).value()->ListModels().ok())
      return true;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return false;
}

TEST(DaemonTest, SigtermDrainsAStreamInFlight) {
  // 64 MiB in 64 KiB chunks: flow control holds the stream in flight while
  // the test is not reading, so it is still running when SIGTERM arrives.
  const ScratchDir scratch;
  const std::string spec = scratch.file("big.json");
  std::ofstream(spec)
      << R"({"type": "Module", "parameters": {"w": {"shape": [16777216], "init": "ones"}}})";
  Daemon daemon(
      {"--preload=big=" + spec, "--demo_model=", "--shutdown_grace=60s"});
  ASSERT_GT(daemon.port(), 0);
  auto channel =
      grpc::CreateChannel(daemon.address(), grpc::InsecureChannelCredentials());
  auto stub = v1::ModelState::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::minutes(5));
  v1::StateDictRequest request;
  request.set_model("big");
  request.set_chunk_bytes(64 << 10);
  auto reader = stub->StateDict(&context, request);
  v1::StateDictResponse response;
  uint64_t received = 0;
  int messages = 0;
  while (reader->Read(&response)) {
    if (response.has_chunk()) received += response.chunk().data().size();
    if (++messages == 20) {
      // The daemon is told to stop and has begun before the test reads on.
      EXPECT_TRUE(daemon.Signal(SIGTERM));
      EXPECT_TRUE(daemon.WaitForLog("draining", absl::Seconds(60)))
          << daemon.Log();
      EXPECT_TRUE(NewCallsAreRefused(daemon.address(), absl::Seconds(60)));
    }
    if (messages < 200)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(received, uint64_t{64} << 20);
  EXPECT_TRUE(response.has_end());
  EXPECT_EQ(daemon.WaitForExit(absl::Seconds(60)), 0) << daemon.Log();
}

}  // namespace
}  // namespace modelstate
