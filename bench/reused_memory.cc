#include "bench/reused_memory.h"

#include <cstdio>
#include <functional>
#include <memory>
#include <utility>

#include "bench/common.h"
#include "model/tensor.h"

namespace modelstate::bench {
namespace {

// The worker's weights: one buffer per tensor of the model, allocated as the
// client allocates tensors.
struct Weights {
  std::vector<std::shared_ptr<Storage>> storage;
  std::vector<Destination> destinations;
  uint64_t bytes = 0;
};

Weights AllocateWeights(Client& client, const std::string& model) {
  const ModelManifest manifest = Check(client.GetModel(model), "P1r manifest");
  Weights weights;
  for (const TensorDescription& tensor : manifest.tensors) {
    weights.storage.push_back(
        Check(Storage::AllocateUninitialized(tensor.num_bytes), "allocate"));
    weights.destinations.push_back({tensor.name, tensor.dtype, tensor.shape,
                                    weights.storage.back()->mutable_data()});
    weights.bytes += tensor.num_bytes;
  }
  return weights;
}

}  // namespace

ReusedMemorySamples MeasureReusedMemory(Client& client, RawTcpClient& tcp,
                                        const std::string& model, int reps) {
  Weights weights = AllocateWeights(client, model);
  IntoOptions in_place;
  in_place.allow_partial_write = true;
  const uint64_t file_bytes = tcp.Fetch();
  std::shared_ptr<Storage> file =
      Check(Storage::AllocateUninitialized(file_bytes), "allocate");
  char* file_data = reinterpret_cast<char*>(file->mutable_data());
  struct Contender {
    std::vector<double>* samples;
    uint64_t bytes;
    std::function<void()> fetch;
  };
  ReusedMemorySamples samples;
  const std::vector<Contender> contenders = {
      {&samples.in_place, weights.bytes,
       [&] {
         Check(client.FetchInto(model, weights.destinations, {}, in_place),
               "P1r fetch");
       }},
      {&samples.staged, weights.bytes,
       [&] {
         Check(client.FetchInto(model, weights.destinations),
               "P1r staged fetch");
       }},
      {&samples.raw_tcp, file_bytes,
       [&] { tcp.FetchInto(file_data, file_bytes); }},
  };
  for (const Contender& each : contenders) each.fetch();  // Warm-ups.
  std::fprintf(stderr, "P1r: %d repetitions\n", reps);
  for (int rep = 0; rep < reps; ++rep) {
    for (size_t i = 0; i < contenders.size(); ++i) {
      const Contender& next = contenders[(i + rep) % contenders.size()];
      const double start = Seconds();
      next.fetch();
      next.samples->push_back(GBps(next.bytes, Seconds() - start));
    }
  }
  return samples;
}

void AddReusedMemoryRows(ReusedMemorySamples samples, Results& results) {
  results.Add("P1r",
              "in-place refresh into reused memory (StateDictInto, "
              "allow_partial_write)",
              "GB/s", std::move(samples.in_place));
  results.Add("P1r.staged",
              "refresh into reused memory, verified in staging first "
              "(StateDictInto default)",
              "GB/s", std::move(samples.staged));
  results.Add("P1r.a", "raw TCP loopback into reused memory, same bytes",
              "GB/s", std::move(samples.raw_tcp));
}

}  // namespace modelstate::bench
