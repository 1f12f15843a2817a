// modelstate._modelstate: the Python extension over modelstate::Client.
//
// It speaks plain Python values (tuples, lists, ints, strings); the torch
// vocabulary lives in modelstate/__init__.py. Tensor bytes never pass through
// Python objects: fetches write into memory Python allocated (torch tensors,
// named by data pointer) and loads read from it, with the GIL released.
//
// Every long call runs on a worker thread while the calling thread waits
// without the GIL and checks for signals every 50 ms, so Ctrl-C cancels the
// RPC (KeyboardInterrupt) even when no byte is moving. Python callbacks
// (allocate, progress) run on the worker with the GIL taken briefly.
//
// Thread-safety: a Client may be used from several Python threads at once.
// Calls should end before the interpreter exits: a call still running in a
// daemon thread at exit may abort the process.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <deque>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "common/limits.h"
#include "model/dtype.h"
#include "model/state_dict.h"
#include "model/tensor.h"

namespace py = pybind11;

namespace modelstate::python {
namespace {

constexpr absl::Duration kSignalPoll = absl::Milliseconds(50);

// Raises the modelstate.Error subclass of `status`'s code (see _errors.py).
[[noreturn]] void Raise(const absl::Status& status) {
  py::object error = py::module_::import("modelstate._errors")
                         .attr("from_status")(static_cast<int>(status.code()),
                                              std::string(status.message()));
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())),
                  error.ptr());
  throw py::error_already_set();
}

void RaiseIfError(const absl::Status& status) {
  if (!status.ok()) Raise(status);
}

template <typename T>
T ValueOrRaise(absl::StatusOr<T> result) {
  RaiseIfError(result.status());
  return *std::move(result);
}

// A Python exception taken out of the interpreter (PyErr_Fetch) to be raised
// again on another thread.
class HeldError {
 public:
  // Takes the current Python error. Requires the GIL.
  void Fetch() {
    if (type_ != nullptr) {  // The first error wins.
      PyErr_Clear();
      return;
    }
    PyErr_Fetch(&type_, &value_, &traceback_);
  }
  bool held() const { return type_ != nullptr; }
  // Raises the held error. Requires the GIL.
  [[noreturn]] void Raise() {
    PyErr_Restore(type_, value_, traceback_);
    type_ = value_ = traceback_ = nullptr;
    throw py::error_already_set();
  }

 private:
  PyObject* type_ = nullptr;
  PyObject* value_ = nullptr;
  PyObject* traceback_ = nullptr;
};

// One interruptible call: see the file comment.
class CallRunner {
 public:
  CallCanceller* canceller() { return &canceller_; }

  // Runs `call` on a worker thread. Requires the GIL (released meanwhile).
  // Raises KeyboardInterrupt (or whatever a signal handler raised), a Python
  // callback's exception, or the call's error, in that order of precedence.
  template <typename T>
  T Run(const std::function<absl::StatusOr<T>()>& call) {
    absl::StatusOr<T> result = absl::UnknownError("not run");
    {
      py::gil_scoped_release release;
      absl::Notification done;
      std::thread worker([&] {
        result = call();
        done.Notify();
      });
      while (!done.WaitForNotificationWithTimeout(kSignalPoll)) {
        // Taking the GIL while the interpreter exits would end this thread
        // with the worker still running.
        if (_Py_IsFinalizing()) continue;
        py::gil_scoped_acquire acquire;
        if (PyErr_CheckSignals() != 0) {
          interrupt_.Fetch();
          canceller_.Cancel();
          break;
        }
      }
      worker.join();
    }
    if (interrupt_.held()) interrupt_.Raise();
    if (callback_error_.held()) callback_error_.Raise();
    return ValueOrRaise(std::move(result));
  }

  // Runs Python code from the worker thread with the GIL. If it raises, keeps
  // the exception for Run to raise, cancels the call and returns false.
  bool WithGil(const std::function<void()>& body) {
    py::gil_scoped_acquire acquire;
    try {
      body();
      return true;
    } catch (py::error_already_set& error) {
      error.restore();
      callback_error_.Fetch();
    } catch (const std::exception& error) {
      PyErr_SetString(PyExc_RuntimeError, error.what());
      callback_error_.Fetch();
    }
    canceller_.Cancel();
    return false;
  }

  // A progress callback that calls `progress(done, total)` in Python.
  // How a call of this runner transfers: `chunk_bytes` per message,
  // `progress` called with the GIL, cancelled with the runner.
  TransferOptions Transfer(uint32_t chunk_bytes, py::object progress) {
    TransferOptions transfer;
    transfer.chunk_bytes = chunk_bytes;
    transfer.canceller = canceller();
    transfer.progress = Progress(std::move(progress));
    return transfer;
  }

  ProgressCallback Progress(py::object progress) {
    if (progress.is_none()) return nullptr;
    auto shared = std::make_shared<py::object>(std::move(progress));
    return [this, shared](uint64_t done, uint64_t total) {
      WithGil([&] { (*shared)(done, total); });
    };
  }

 private:
  CallCanceller canceller_;
  HeldError interrupt_;
  HeldError callback_error_;
};

py::tuple SummaryTuple(const ModelSummary& s) {
  return py::make_tuple(s.name, s.version, s.num_tensors, s.num_bytes,
                        s.root_class);
}

const char* KindName(TensorKind kind) {
  return kind == TensorKind::kBuffer ? "buffer" : "parameter";
}

py::tuple DescriptionTuple(const TensorDescription& t) {
  return py::make_tuple(t.name, KindName(t.kind),
                        std::string(TorchName(t.dtype)), py::cast(t.shape),
                        t.num_bytes, t.checksum);
}

DType ParseDType(const std::string& name) {
  absl::StatusOr<DType> dtype = ParseTorchDType(name);
  if (!dtype.ok()) throw py::type_error("unknown dtype " + name);
  return *dtype;
}

// Destinations from Python's (key, dtype, shape, data_ptr) tuples.
std::vector<Destination> ToDestinations(const py::list& items) {
  std::vector<Destination> destinations;
  destinations.reserve(items.size());
  for (const py::handle& item : items) {
    auto t = item.cast<py::tuple>();
    destinations.push_back(
        {t[0].cast<std::string>(), ParseDType(t[1].cast<std::string>()),
         t[2].cast<Shape>(), reinterpret_cast<void*>(t[3].cast<uintptr_t>())});
  }
  return destinations;
}

// A torch module's layout from Python's nested tuples (see _layout_of in
// __init__.py): (class name, [(name, is_buffer, tensor, persistent)],
// [(child name, layout or None)]), where tensor is None or
// (dtype, shape or None when lazy).
std::shared_ptr<const ModuleLayout> ToLayout(const py::handle& item,
                                             int depth) {
  if (depth > kMaxSpecDepth) throw py::value_error("module tree too deep");
  auto t = item.cast<py::tuple>();
  auto layout = std::make_shared<ModuleLayout>(t[0].cast<std::string>());
  for (const py::handle& slot_item : t[1].cast<py::list>()) {
    auto s = slot_item.cast<py::tuple>();
    ModuleLayout::Slot slot{s[0].cast<std::string>(), absl::nullopt,
                            s[3].cast<bool>()};
    if (!s[2].is_none()) {
      auto tensor = s[2].cast<py::tuple>();
      const bool lazy = tensor[1].is_none();
      slot.tensor = ModuleLayout::TensorShape{
          ParseDType(tensor[0].cast<std::string>()),
          lazy ? Shape{} : tensor[1].cast<Shape>(), lazy};
    }
    layout->AddTensor(
        s[1].cast<bool>() ? TensorKind::kBuffer : TensorKind::kParameter,
        std::move(slot));
  }
  for (const py::handle& child_item : t[2].cast<py::list>()) {
    auto c = child_item.cast<py::tuple>();
    layout->AddChild(c[0].cast<std::string>(),
                     c[1].is_none() ? nullptr : ToLayout(c[1], depth + 1));
  }
  return layout;
}

// torch's load_state_dict checks (PlanLoad) of a module's layout against
// (key, dtype, shape) tuples: (None, keys to fill, casts) or (torch's error
// text, None, None), where casts maps each key whose stored and destination
// dtypes are both floating and differ to the destination's dtype (what a
// refresh asks the server to convert). Other errors (duplicate keys) raise.
py::tuple PlanLoadInto(const py::object& layout, const py::list& fetched,
                       bool strict) {
  std::vector<TensorSpec> inputs;
  inputs.reserve(fetched.size());
  for (const py::handle& item : fetched) {
    auto t = item.cast<py::tuple>();
    inputs.push_back({t[0].cast<std::string>(),
                      ParseDType(t[1].cast<std::string>()),
                      t[2].cast<Shape>()});
  }
  LoadOptions options;
  options.strict = strict;
  absl::StatusOr<LoadPlan> plan =
      PlanLoad(*ToLayout(layout, 0), inputs, options);
  if (absl::IsFailedPrecondition(plan.status()))
    return py::make_tuple(std::string(plan.status().message()), py::none(),
                          py::none());
  RaiseIfError(plan.status());
  py::list keys;
  py::dict casts;
  for (size_t input : plan->apply_order) {
    const TensorSpec& spec = inputs[input];
    keys.append(spec.key);
    const DType wanted = plan->targets[input]->dtype;
    if (wanted != spec.dtype && IsFloatingPoint(wanted) &&
        IsFloatingPoint(spec.dtype))
      casts[py::str(spec.key)] = std::string(TorchName(wanted));
  }
  return py::make_tuple(py::none(), keys, casts);
}

FetchRequest ToFetchRequest(const std::string& model, const py::dict& args) {
  FetchRequest request(model);
  if (args.contains("version") && !args["version"].is_none())
    request.version = args["version"].cast<int64_t>();
  if (args.contains("min_version") && !args["min_version"].is_none())
    request.min_version = args["min_version"].cast<int64_t>();
  if (args.contains("module") && !args["module"].is_none())
    request.module = args["module"].cast<std::string>();
  if (args.contains("keep_module_prefix"))
    request.keep_module_prefix = args["keep_module_prefix"].cast<bool>();
  if (args.contains("keys") && !args["keys"].is_none())
    request.keys = args["keys"].cast<std::vector<std::string>>();
  if (args.contains("recurse")) request.recurse = args["recurse"].cast<bool>();
  if (args.contains("include_buffers"))
    request.include_buffers = args["include_buffers"].cast<bool>();
  if (args.contains("dtype") && !args["dtype"].is_none())
    request.dtype = ParseDType(args["dtype"].cast<std::string>());
  if (args.contains("key_dtypes") && !args["key_dtypes"].is_none()) {
    for (const auto& [key, dtype] :
         args["key_dtypes"].cast<std::map<std::string, std::string>>())
      request.key_dtypes[key] = ParseDType(dtype);
  }
  return request;
}

// A fetched tensor's bytes as a writable Python buffer, for torch.frombuffer:
// the tensor (and the mapping or block it views) lives as long as this object,
// which torch keeps alive with every tensor made over it.
class TensorBytes {
 public:
  explicit TensorBytes(Tensor tensor) : tensor_(std::move(tensor)) {}

  py::buffer_info Buffer() const {
    // Fetched memory is the caller's to write: a private (copy-on-write)
    // mapping of the daemon's export or region, or a received block.
    auto* data = const_cast<uint8_t*>(tensor_.data());
    return py::buffer_info(data, 1, py::format_descriptor<uint8_t>::format(), 1,
                           {static_cast<py::ssize_t>(tensor_.num_bytes())},
                           {1});
  }

 private:
  Tensor tensor_;
};

// The client as Python sees it; shared with the watchers it starts.
class PyClient {
 public:
  explicit PyClient(std::shared_ptr<Client> client)
      : client_(std::move(client)) {}

  static PyClient Connect(const std::string& target, const std::string& tls_ca,
                          const std::string& tls_cert,
                          const std::string& tls_key, bool use_tls,
                          const std::string& lb_policy, double timeout,
                          bool own_connection, const std::string& token,
                          const std::string& local_socket) {
    ClientOptions options;
    options.use_tls = use_tls;
    options.tls_ca_file = tls_ca;
    options.tls_cert_file = tls_cert;
    options.tls_key_file = tls_key;
    options.load_balancing_policy = lb_policy;
    options.own_connection = own_connection;
    options.token = token;
    options.local_socket = local_socket;
    if (timeout > 0) options.timeout = absl::Seconds(timeout);
    return PyClient(ValueOrRaise(Client::Connect(target, options)));
  }

  py::list ListModels() {
    absl::StatusOr<std::vector<ModelSummary>> models;
    {
      py::gil_scoped_release release;
      models = client_->ListModels();
    }
    py::list out;
    for (const ModelSummary& s : ValueOrRaise(std::move(models)))
      out.append(SummaryTuple(s));
    return out;
  }

  py::dict GetModel(const std::string& model, const std::string& module,
                    int64_t version, int64_t min_version) {
    absl::StatusOr<ModelManifest> manifest;
    {
      py::gil_scoped_release release;
      manifest = client_->GetModel(model, module, version, min_version);
    }
    ValueOrRaise(manifest);
    py::list tensors;
    for (const TensorDescription& t : manifest->tensors)
      tensors.append(DescriptionTuple(t));
    py::dict out;
    out["summary"] = SummaryTuple(manifest->summary);
    out["version"] = manifest->version;
    out["retained_versions"] = manifest->retained_versions;
    out["tensors"] = tensors;
    out["architecture_json"] = manifest->architecture_json;
    return out;
  }

  py::tuple CreateModel(const std::string& model, const std::string& arch,
                        uint64_t seed) {
    absl::StatusOr<ModelSummary> summary;
    {
      py::gil_scoped_release release;
      summary = client_->CreateModel(model, arch, seed);
    }
    return SummaryTuple(ValueOrRaise(std::move(summary)));
  }

  py::tuple Rollback(const std::string& model, int64_t version) {
    absl::StatusOr<ModelSummary> summary;
    {
      py::gil_scoped_release release;
      summary = client_->RollbackModel(model, version);
    }
    return SummaryTuple(ValueOrRaise(std::move(summary)));
  }

  void DeleteModel(const std::string& model) {
    absl::Status status;
    {
      py::gil_scoped_release release;
      status = client_->DeleteModel(model);
    }
    RaiseIfError(status);
  }

  // Fetches into memory of the C++ client's (through the same-host socket, a
  // mapping of the daemon's export): returns (version, [(key, kind, dtype,
  // shape, TensorBytes)]) in manifest order.
  py::tuple FetchViews(const std::string& model, const py::dict& args,
                       uint32_t chunk_bytes, py::object progress) {
    const FetchRequest request = ToFetchRequest(model, args);
    CallRunner runner;
    const TransferOptions transfer =
        runner.Transfer(chunk_bytes, std::move(progress));
    const FetchedStateDict fetched = runner.Run<FetchedStateDict>(
        [&] { return client_->Fetch(request, transfer); });
    py::list tensors;
    for (const StateDict::Entry& entry : fetched.state.entries()) {
      tensors.append(py::make_tuple(
          entry.key, entry.kind == TensorKind::kBuffer ? "buffer" : "parameter",
          std::string(TorchName(entry.tensor.dtype())), entry.tensor.shape(),
          TensorBytes(entry.tensor)));
    }
    return py::make_tuple(fetched.version, tensors);
  }

  // Fetches into memory that `allocate(descriptions)` returns as
  // [(key, dtype, shape, data_ptr)]; returns (version, written keys).
  py::tuple FetchInto(const std::string& model, const py::dict& args,
                      py::object allocate, bool allow_partial_write,
                      uint32_t chunk_bytes, py::object progress) {
    const FetchRequest request = ToFetchRequest(model, args);
    CallRunner runner;
    const TransferOptions transfer =
        runner.Transfer(chunk_bytes, std::move(progress));
    std::vector<std::string> written;
    IntoOptions into;
    into.allow_partial_write = allow_partial_write;
    into.written_keys = &written;
    DestinationAllocator allocator =
        [&](const std::vector<TensorDescription>& tensors)
        -> absl::StatusOr<std::vector<Destination>> {
      std::vector<Destination> destinations;
      const bool ok = runner.WithGil([&] {
        py::list described;
        for (const TensorDescription& t : tensors)
          described.append(DescriptionTuple(t));
        destinations = ToDestinations(allocate(described));
      });
      if (!ok) return absl::CancelledError("the allocator raised");
      return destinations;
    };
    const int64_t version = runner.Run<int64_t>(
        [&] { return client_->FetchInto(request, allocator, transfer, into); });
    return py::make_tuple(version, written);
  }

  // Loads tensors Python keeps alive, named by (key, dtype, shape, data_ptr,
  // nbytes); returns (version, missing, unexpected, created).
  py::tuple Load(const std::string& model, const py::list& tensors,
                 const py::dict& args, uint32_t chunk_bytes,
                 py::object progress) {
    LoadRequest request(model);
    request.module = args["module"].cast<std::string>();
    request.strict = args["strict"].cast<bool>();
    request.assign = args["assign"].cast<bool>();
    if (!args["expected_version"].is_none())
      request.expected_version = args["expected_version"].cast<int64_t>();
    request.create_if_missing = args["create_if_missing"].cast<bool>();
    request.buffer_keys = args["buffer_keys"].cast<std::vector<std::string>>();
    request.class_names =
        args["class_names"].cast<std::map<std::string, std::string>>();
    const std::set<std::string> buffers(request.buffer_keys.begin(),
                                        request.buffer_keys.end());
    modelstate::StateDict state;
    // Keys over the same memory (tied parameters) share one storage, so
    // that the tensor goes out once.
    std::map<std::pair<const uint8_t*, size_t>, std::shared_ptr<const Storage>>
        borrowed;
    for (const py::handle& item : tensors) {
      auto t = item.cast<py::tuple>();
      const auto key = t[0].cast<std::string>();
      const auto* data =
          reinterpret_cast<const uint8_t*>(t[3].cast<uintptr_t>());
      const auto size = t[4].cast<size_t>();
      // Python keeps the memory alive for the whole call: borrow, never copy.
      std::shared_ptr<const Storage>& storage = borrowed[{data, size}];
      if (storage == nullptr) storage = Storage::Borrow(data, size, nullptr);
      Tensor tensor =
          ValueOrRaise(Tensor::View(ParseDType(t[1].cast<std::string>()),
                                    t[2].cast<Shape>(), storage, 0));
      RaiseIfError(state.Insert(key, std::move(tensor),
                                buffers.count(key) > 0
                                    ? TensorKind::kBuffer
                                    : TensorKind::kParameter));
    }
    CallRunner runner;
    const TransferOptions transfer =
        runner.Transfer(chunk_bytes, std::move(progress));
    const LoadOutcome outcome = runner.Run<LoadOutcome>(
        [&] { return client_->Load(request, state, transfer); });
    return py::make_tuple(outcome.version, outcome.missing_keys,
                          outcome.unexpected_keys, outcome.created);
  }

  const std::shared_ptr<Client>& client() const { return client_; }

 private:
  std::shared_ptr<Client> client_;
};

const char* EventName(ModelEvent::Type type) {
  switch (type) {
    case ModelEvent::Type::kCreated:
      return "CREATED";
    case ModelEvent::Type::kUpdated:
      return "UPDATED";
    case ModelEvent::Type::kDeleted:
      return "DELETED";
    case ModelEvent::Type::kCurrent:
      return "CURRENT";
    case ModelEvent::Type::kAbsent:
      return "ABSENT";
    case ModelEvent::Type::kListed:
      return "LISTED";
  }
  return "UNKNOWN";
}

// A model's events, read by a thread of its own into a queue that next()
// drains. close() (or the destructor) cancels the watch and joins the thread.
class Watcher {
 public:
  Watcher(std::shared_ptr<Client> client, std::string model,
          int64_t min_version)
      : client_(std::move(client)) {
    thread_ = std::thread([this, model = std::move(model), min_version] {
      absl::Status status = client_->Watch(
          model,
          [this](const ModelEvent& event) {
            absl::MutexLock lock(&mu_);
            events_.push_back(event);
            return true;
          },
          &canceller_, min_version);
      absl::MutexLock lock(&mu_);
      status_ = std::move(status);
      ended_ = true;
    });
  }
  ~Watcher() {
    py::gil_scoped_release release;
    Stop();
  }

  // Returns the next (type, model, version); raises StopIteration once closed
  // or ended cleanly, the stream's error otherwise, KeyboardInterrupt on
  // Ctrl-C (which also closes the watch).
  py::tuple Next() {
    while (true) {
      bool have = false, ended = false;
      ModelEvent event;
      absl::Status status;
      {
        py::gil_scoped_release release;
        absl::MutexLock lock(&mu_);
        mu_.AwaitWithTimeout(absl::Condition(this, &Watcher::Ready),
                             kSignalPoll);
        if (!events_.empty()) {
          event = events_.front();
          events_.pop_front();
          have = true;
        } else if (ended_) {
          ended = true;
          status = status_;
        }
      }
      if (have)
        return py::make_tuple(EventName(event.type), event.model,
                              event.version);
      if (ended) {
        if (status.ok() || canceller_.cancelled()) throw py::stop_iteration();
        Raise(status);
      }
      if (PyErr_CheckSignals() != 0) {
        HeldError interrupt;
        interrupt.Fetch();
        Close();
        interrupt.Raise();
      }
    }
  }

  void Close() {
    py::gil_scoped_release release;
    Stop();
  }

 private:
  bool Ready() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !events_.empty() || ended_;
  }

  void Stop() {
    canceller_.Cancel();
    if (thread_.joinable()) thread_.join();
  }

  std::shared_ptr<Client> client_;
  CallCanceller canceller_;
  absl::Mutex mu_;
  std::deque<ModelEvent> events_ ABSL_GUARDED_BY(mu_);
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace

PYBIND11_MODULE(_modelstate, m) {
  m.doc() = "modelstate's C++ client; use the `modelstate` package instead.";
  py::class_<PyClient>(m, "Client")
      .def_static("connect", &PyClient::Connect, py::arg("target"),
                  py::arg("tls_ca"), py::arg("tls_cert"), py::arg("tls_key"),
                  py::arg("use_tls"), py::arg("lb_policy"), py::arg("timeout"),
                  py::arg("own_connection"), py::arg("token"),
                  py::arg("local_socket"))
      .def("list_models", &PyClient::ListModels)
      .def("get_model", &PyClient::GetModel, py::arg("model"),
           py::arg("module"), py::arg("version"), py::arg("min_version"))
      .def("create_model", &PyClient::CreateModel, py::arg("model"),
           py::arg("arch"), py::arg("seed"))
      .def("rollback", &PyClient::Rollback, py::arg("model"),
           py::arg("version"))
      .def("delete_model", &PyClient::DeleteModel, py::arg("model"))
      .def("fetch_into", &PyClient::FetchInto, py::arg("model"),
           py::arg("args"), py::arg("allocate"), py::arg("allow_partial_write"),
           py::arg("chunk_bytes"), py::arg("progress"))
      .def("fetch_views", &PyClient::FetchViews, py::arg("model"),
           py::arg("args"), py::arg("chunk_bytes"), py::arg("progress"))
      .def("load", &PyClient::Load, py::arg("model"), py::arg("tensors"),
           py::arg("args"), py::arg("chunk_bytes"), py::arg("progress"))
      .def("watch", [](const PyClient& self, const std::string& model,
                       int64_t min_version) {
        return std::make_unique<Watcher>(self.client(), model, min_version);
      });
  m.def("plan_load_into", &PlanLoadInto, py::arg("layout"), py::arg("fetched"),
        py::arg("strict"));
  py::class_<TensorBytes>(m, "TensorBytes", py::buffer_protocol())
      .def_buffer(&TensorBytes::Buffer);
  py::class_<Watcher>(m, "Watcher")
      .def("next", &Watcher::Next)
      .def("close", &Watcher::Close);
}

}  // namespace modelstate::python
