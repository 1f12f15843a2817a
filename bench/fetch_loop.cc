#include "bench/fetch_loop.h"

#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "bench/common.h"
#include "client/client.h"

namespace modelstate::bench {
namespace {

// Destinations for every tensor of `manifest`, allocated with plain new[] (as
// torch's CPU allocator does, no huge-page advice) and touched, like the
// tensors of a worker's nn.Module that refresh overwrites.
std::vector<Destination> Preallocate(
    const ModelManifest& manifest, std::vector<std::unique_ptr<char[]>>& owned,
    uint64_t& total) {
  std::vector<Destination> destinations;
  for (const TensorDescription& tensor : manifest.tensors) {
    owned.emplace_back(new char[tensor.num_bytes]);
    std::memset(owned.back().get(), 0, tensor.num_bytes);
    destinations.push_back(
        {tensor.name, tensor.dtype, tensor.shape, owned.back().get()});
    total += tensor.num_bytes;
  }
  return destinations;
}

}  // namespace

int FetchLoop(const std::string& address, const std::string& model, int reps,
              const std::string& mode) {
  if (mode != "state-dict" && mode != "into" && mode != "into-partial") {
    std::fprintf(stderr, "fetch-loop: unknown mode %s\n", mode.c_str());
    return 2;
  }
  std::unique_ptr<Client> client = Check(Client::Connect(address), "connect");
  // The manifest call also opens the connection, outside the timing.
  const ModelManifest manifest = Check(client->GetModel(model), "GetModel");
  std::vector<std::unique_ptr<char[]>> owned;
  uint64_t total = 0;
  const std::vector<Destination> destinations =
      Preallocate(manifest, owned, total);
  if (mode == "state-dict") owned.clear();  // Not needed: StateDict allocates.
  IntoOptions into;
  into.allow_partial_write = mode == "into-partial";
  for (int rep = 0; rep < reps; ++rep) {
    const double start = Seconds();
    if (mode == "state-dict") {
      FetchedStateDict fetched = Check(client->Fetch(model), "StateDict");
      const double seconds = Seconds() - start;  // Before the free.
      std::printf("%s %.6f\n", mode.c_str(), GBps(total, seconds));
    } else {
      Check(client->FetchInto(model, destinations, {}, into), "StateDictInto");
      std::printf("%s %.6f\n", mode.c_str(), GBps(total, Seconds() - start));
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace modelstate::bench
