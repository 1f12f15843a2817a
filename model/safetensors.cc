#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <limits>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "model/names.h"
#include "nlohmann/json.hpp"

namespace modelstate {
namespace {

// A sorted map: nlohmann's ordered_json finds keys by linear search, which is
// quadratic for a header of 100,000 tensors. Entries are put in data order
// afterwards.
using Json = nlohmann::json;

constexpr uint64_t kLengthBytes = 8;
constexpr uint64_t kMmapThreshold = 1 << 20;

absl::Status Invalid(absl::string_view kind, absl::string_view detail) {
  return absl::InvalidArgumentError(absl::StrCat(kind, ": ", detail));
}

uint64_t ReadLittleEndian64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Collects the keys of the top-level object and remembers the first repeated
// one.
struct TopLevelKeys : nlohmann::json_sax<Json> {
  int depth = 0;
  absl::flat_hash_set<std::string> seen;
  std::string duplicate;

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return ++depth, true; }
  bool end_object() override { return --depth, true; }
  bool start_array(std::size_t) override { return ++depth, true; }
  bool end_array() override { return --depth, true; }
  bool key(string_t& key) override {
    if (depth == 1 && duplicate.empty() && !seen.insert(key).second)
      duplicate = key;
    return true;
  }
  bool parse_error(std::size_t, const std::string&,
                   const nlohmann::detail::exception&) override {
    return false;
  }
};

absl::StatusOr<uint64_t> JsonUnsigned(const Json& value,
                                      absl::string_view what) {
  if (!value.is_number_unsigned()) {
    return Invalid("invalid header",
                   absl::StrCat(what, " must be a non-negative integer"));
  }
  return value.get<uint64_t>();
}

absl::StatusOr<SafetensorsEntry> ParseEntry(const std::string& name,
                                            const Json& info) {
  if (!info.is_object()) {
    return Invalid("invalid header",
                   absl::StrCat("entry \"", name, "\" is not an object"));
  }
  auto dtype_it = info.find("dtype");
  auto shape_it = info.find("shape");
  auto offsets_it = info.find("data_offsets");
  if (dtype_it == info.end() || shape_it == info.end() ||
      offsets_it == info.end()) {
    return Invalid("invalid header",
                   absl::StrCat("entry \"", name,
                                "\" needs dtype, shape and data_offsets"));
  }
  if (!dtype_it->is_string()) {
    return Invalid("invalid header",
                   absl::StrCat("dtype of \"", name, "\" is not a string"));
  }
  absl::StatusOr<DType> dtype =
      ParseSafetensorsDType(dtype_it->get<std::string>());
  if (!dtype.ok()) return Invalid("invalid header", dtype.status().message());
  if (!shape_it->is_array()) {
    return Invalid("invalid header",
                   absl::StrCat("shape of \"", name, "\" is not an array"));
  }
  SafetensorsEntry entry{name, *dtype, {}, 0, 0};
  bool dim_overflow = false;
  for (const Json& dim : *shape_it) {
    ASSIGN_OR_RETURN(
        uint64_t d, JsonUnsigned(dim, absl::StrCat("shape of \"", name, "\"")));
    if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      dim_overflow = true;
    entry.shape.push_back(static_cast<int64_t>(d));
  }
  if (dim_overflow)
    entry.shape.assign(1, -1);  // Reported as an overflow during validation.
  if (!offsets_it->is_array() || offsets_it->size() != 2) {
    return Invalid("invalid header", absl::StrCat("data_offsets of \"", name,
                                                  "\" must be [begin, end]"));
  }
  ASSIGN_OR_RETURN(entry.begin, JsonUnsigned((*offsets_it)[0], "data_offsets"));
  ASSIGN_OR_RETURN(entry.end, JsonUnsigned((*offsets_it)[1], "data_offsets"));
  return entry;
}

}  // namespace

absl::StatusOr<uint64_t> SafetensorsHeaderLength(
    absl::Span<const uint8_t> prefix, uint64_t file_size) {
  if (file_size < kLengthBytes || prefix.size() < kLengthBytes) {
    return Invalid("header too small",
                   absl::StrCat("file has ", file_size, " bytes"));
  }
  const uint64_t n = ReadLittleEndian64(prefix.data());
  if (n > kSafetensorsMaxHeaderBytes) {
    return Invalid(
        "header too large",
        absl::StrCat(n, " bytes exceeds ", kSafetensorsMaxHeaderBytes));
  }
  if (n + kLengthBytes > file_size) {
    return Invalid("invalid header length",
                   absl::StrCat("header of ", n, " bytes exceeds the file of ",
                                file_size));
  }
  return n;
}

namespace {

// Parses the header's JSON text, refusing duplicate keys. Serde would keep the
// last of two equal keys; a checkpoint with duplicate names is ambiguous, so
// it is refused. A SAX pass finds them: nlohmann's DOM keeps the last
// silently, and its callback parser rescans the parent object after every
// entry, which is quadratic in the number of tensors.
absl::StatusOr<Json> ParseHeaderJson(absl::Span<const uint8_t> text) {
  if (!IsValidUtf8(text))
    return Invalid("invalid header", "header is not valid UTF-8");
  TopLevelKeys keys;
  if (!Json::sax_parse(text.begin(), text.end(), &keys)) {
    return Invalid("invalid header", "header is not valid JSON");
  }
  if (!keys.duplicate.empty()) {
    return Invalid("invalid header", absl::StrCat("duplicate tensor name \"",
                                                  keys.duplicate, "\""));
  }
  Json header = Json::parse(text.begin(), text.end(), nullptr,
                            /*allow_exceptions=*/false);
  if (header.is_discarded())
    return Invalid("invalid header", "header is not valid JSON");
  if (!header.is_object())
    return Invalid("invalid header", "header is not a JSON object");
  return header;
}

absl::Status ParseMetadata(const Json& value, SafetensorsHeader* result) {
  if (!value.is_object()) {
    return Invalid("invalid header", "__metadata__ must be a map of strings");
  }
  for (auto m = value.begin(); m != value.end(); ++m) {
    if (!m.value().is_string()) {
      return Invalid("invalid header",
                     absl::StrCat("__metadata__ value of \"", m.key(),
                                  "\" is not a string"));
    }
    result->metadata.emplace_back(m.key(), m.value().get<std::string>());
  }
  return absl::OkStatus();
}

// Checks that the entries, sorted by offset, tile the data exactly: no gap,
// no overlap, each the size its dtype and shape need, ending at the file's
// end.
absl::Status CheckDataLayout(const SafetensorsHeader& header,
                             uint64_t file_size) {
  uint64_t cursor = 0;
  for (const SafetensorsEntry& entry : header.entries) {
    if (entry.begin != cursor || entry.end < entry.begin) {
      return Invalid(
          "invalid offset",
          absl::StrCat("tensor \"", entry.name, "\" has data_offsets [",
                       entry.begin, ", ", entry.end,
                       "] but the previous tensor ends at ", cursor));
    }
    cursor = entry.end;
    absl::StatusOr<int64_t> bytes = entry.shape == Shape{-1}
                                        ? absl::InvalidArgumentError("")
                                        : NumBytes(entry.dtype, entry.shape);
    if (!bytes.ok()) {
      return Invalid(
          "validation overflow",
          absl::StrCat("size of tensor \"", entry.name, "\" overflows"));
    }
    if (entry.end - entry.begin != static_cast<uint64_t>(*bytes)) {
      return Invalid(
          "tensor invalid info",
          absl::StrCat("tensor \"", entry.name, "\" spans ",
                       entry.end - entry.begin,
                       " bytes but its dtype and shape need ", *bytes));
    }
  }
  if (header.data_start + cursor != file_size) {
    return Invalid(
        "incomplete buffer",
        absl::StrCat("tensors end at byte ", header.data_start + cursor,
                     " but the file has ", file_size));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(
    absl::Span<const uint8_t> prefix, uint64_t file_size) {
  ASSIGN_OR_RETURN(uint64_t n, SafetensorsHeaderLength(prefix, file_size));
  if (prefix.size() < kLengthBytes + n) {
    return Invalid("invalid header length", "header bytes not provided");
  }
  ASSIGN_OR_RETURN(const Json header,
                   ParseHeaderJson(prefix.subspan(kLengthBytes, n)));
  SafetensorsHeader result;
  result.data_start = kLengthBytes + n;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      RETURN_IF_ERROR(ParseMetadata(it.value(), &result));
      continue;
    }
    ASSIGN_OR_RETURN(SafetensorsEntry entry, ParseEntry(it.key(), it.value()));
    result.entries.push_back(std::move(entry));
  }
  // Data order (offsets, then name): the order the writer laid the tensors out
  // in.
  std::sort(result.entries.begin(), result.entries.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
              return std::tie(a.begin, a.end, a.name) <
                     std::tie(b.begin, b.end, b.name);
            });
  RETURN_IF_ERROR(CheckDataLayout(result, file_size));
  return result;
}

absl::StatusOr<SafetensorsFile> ReadSafetensors(
    std::shared_ptr<const Storage> bytes) {
  absl::Span<const uint8_t> all(bytes->data(), bytes->size());
  ASSIGN_OR_RETURN(SafetensorsHeader header,
                   ParseSafetensorsHeader(all, all.size()));
  SafetensorsFile file;
  file.metadata = std::move(header.metadata);
  for (SafetensorsEntry& entry : header.entries) {
    ASSIGN_OR_RETURN(Tensor tensor,
                     Tensor::View(entry.dtype, entry.shape, bytes,
                                  header.data_start + entry.begin));
    RETURN_IF_ERROR(
        file.tensors.Insert(std::move(entry.name), std::move(tensor)));
  }
  return file;
}

namespace {

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

}  // namespace

absl::StatusOr<SafetensorsFile> ReadSafetensorsFile(const std::string& path) {
  Fd file;
  file.fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (file.fd < 0) return ErrnoToStatus(errno, "cannot open", path);
  struct stat info;
  if (fstat(file.fd, &info) != 0)
    return ErrnoToStatus(errno, "cannot stat", path);
  if (!S_ISREG(info.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(info.st_size);
  uint8_t length_bytes[kLengthBytes] = {};
  if (size >= kLengthBytes) {
    RETURN_IF_ERROR(ReadFully(file.fd, 0, length_bytes, kLengthBytes, path));
  }
  absl::Status length =
      SafetensorsHeaderLength({length_bytes, kLengthBytes}, size).status();
  if (!length.ok()) {
    return absl::Status(length.code(),
                        absl::StrCat(path, ": ", length.message()));
  }

  std::shared_ptr<const Storage> bytes;
  if (size >= kMmapThreshold) {
    void* mapping = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, file.fd, 0);
    if (mapping == MAP_FAILED) return ErrnoToStatus(errno, "cannot map", path);
    std::shared_ptr<void> owner(mapping, [size](void* p) { munmap(p, size); });
    bytes = Storage::Borrow(static_cast<const uint8_t*>(mapping), size,
                            std::move(owner));
  } else {
    ASSIGN_OR_RETURN(std::shared_ptr<Storage> buffer, Storage::Allocate(size));
    RETURN_IF_ERROR(ReadFully(file.fd, 0, buffer->mutable_data(), size, path));
    bytes = std::move(buffer);
  }
  absl::StatusOr<SafetensorsFile> parsed = ReadSafetensors(std::move(bytes));
  if (!parsed.ok()) {
    return absl::Status(parsed.status().code(),
                        absl::StrCat(path, ": ", parsed.status().message()));
  }
  return parsed;
}

namespace {

// The order of the tensors' bytes in the file: by element size descending,
// then by name, so that equal inputs give identical files.
std::vector<size_t> DataOrder(
    const std::vector<SafetensorsTensorInfo>& tensors) {
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const size_t sa = ElementSize(tensors[a].dtype);
    const size_t sb = ElementSize(tensors[b].dtype);
    if (sa != sb) return sa > sb;
    return tensors[a].name < tensors[b].name;
  });
  return order;
}

std::string MetadataJson(const SafetensorsMetadata& metadata) {
  if (metadata.empty()) return "";
  std::string json = "\"__metadata__\":{";
  for (size_t i = 0; i < metadata.size(); ++i) {
    absl::StrAppend(&json, i ? "," : "", Json(metadata[i].first).dump(), ":",
                    Json(metadata[i].second).dump());
  }
  return json + "}";
}

// The length prefix, then the JSON padded with spaces to a multiple of 8.
std::string FramedHeader(std::string json) {
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string header(kLengthBytes, '\0');
  const uint64_t n = json.size();
  for (size_t i = 0; i < kLengthBytes; ++i)
    header[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return header + json;
}

}  // namespace

absl::StatusOr<std::pair<std::string, std::vector<size_t>>>
SerializeSafetensorsHeaderFor(const std::vector<SafetensorsTensorInfo>& tensors,
                              const SafetensorsMetadata& metadata) {
  std::vector<size_t> order = DataOrder(tensors);
  absl::flat_hash_set<absl::string_view> names;
  std::string json = "{" + MetadataJson(metadata);
  uint64_t offset = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    const SafetensorsTensorInfo& tensor = tensors[order[i]];
    if (tensor.name == "__metadata__") {
      return absl::InvalidArgumentError(
          "a tensor can't be named \"__metadata__\"");
    }
    if (!names.insert(tensor.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("duplicate tensor name \"", tensor.name, "\""));
    }
    ASSIGN_OR_RETURN(const int64_t bytes, NumBytes(tensor.dtype, tensor.shape));
    const uint64_t end = offset + static_cast<uint64_t>(bytes);
    if (end < offset)
      return absl::InvalidArgumentError("the tensors' total size overflows");
    absl::StrAppend(&json, (i || !metadata.empty()) ? "," : "",
                    Json(tensor.name).dump(), ":{\"dtype\":\"",
                    SafetensorsName(tensor.dtype), "\",\"shape\":[",
                    absl::StrJoin(tensor.shape, ","), "],\"data_offsets\":[",
                    offset, ",", end, "]}");
    offset = end;
  }
  json += "}";
  return std::make_pair(FramedHeader(std::move(json)), std::move(order));
}

absl::StatusOr<std::pair<std::string, std::vector<size_t>>>
SerializeSafetensorsHeader(const StateDict& state,
                           const SafetensorsMetadata& metadata) {
  std::vector<SafetensorsTensorInfo> tensors;
  tensors.reserve(state.size());
  for (const StateDict::Entry& entry : state.entries()) {
    tensors.push_back({entry.key, entry.tensor.dtype(), entry.tensor.shape()});
  }
  return SerializeSafetensorsHeaderFor(tensors, metadata);
}

absl::Status WriteSafetensors(
    const StateDict& state, const SafetensorsMetadata& metadata,
    const std::function<absl::Status(absl::Span<const uint8_t>)>& sink) {
  ASSIGN_OR_RETURN(auto header_and_order,
                   SerializeSafetensorsHeader(state, metadata));
  const std::string& header = header_and_order.first;
  RETURN_IF_ERROR(
      sink({reinterpret_cast<const uint8_t*>(header.data()), header.size()}));
  for (size_t index : header_and_order.second) {
    const Tensor& tensor = state.entries()[index].tensor;
    if (tensor.num_bytes() > 0) RETURN_IF_ERROR(sink(tensor.bytes()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> SerializeSafetensors(
    const StateDict& state, const SafetensorsMetadata& metadata) {
  std::string out;
  RETURN_IF_ERROR(
      WriteSafetensors(state, metadata, [&](absl::Span<const uint8_t> piece) {
        out.append(reinterpret_cast<const char*>(piece.data()), piece.size());
        return absl::OkStatus();
      }));
  return out;
}

absl::Status WriteSafetensorsFile(const std::string& path,
                                  const StateDict& state,
                                  const SafetensorsMetadata& metadata) {
  Fd file;
  file.fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (file.fd < 0) return ErrnoToStatus(errno, "cannot create", path);
  return WriteSafetensors(
      state, metadata, [&](absl::Span<const uint8_t> piece) {
        return WriteAll(file.fd, piece.data(), piece.size(), path);
      });
}

namespace {

// Creates a new file for writing next to `path`, named after it but hidden
// (".NAME.tmp.PID.N"), so the rename that publishes it stays in one
// directory and thus one file system. Returns its name and descriptor.
absl::StatusOr<std::pair<std::string, int>> CreateTemporaryBeside(
    const std::string& path) {
  static std::atomic<uint64_t> counter{0};
  const size_t slash = path.rfind('/');
  const std::string dir =
      slash == std::string::npos ? "" : path.substr(0, slash + 1);
  const std::string base =
      slash == std::string::npos ? path : path.substr(slash + 1);
  for (int attempt = 0;; ++attempt) {
    const std::string name = absl::StrCat(dir, ".", base, ".tmp.", getpid(),
                                          ".", counter.fetch_add(1));
    const int fd =
        open(name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0) return std::make_pair(name, fd);
    if (errno != EEXIST || attempt == 100)
      return ErrnoToStatus(errno, "cannot create", name);
  }
}

// The directory part of `path`, "." when it has none.
std::string DirectoryOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

absl::Status SyncDirectory(const std::string& dir) {
  Fd handle;
  handle.fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (handle.fd < 0) return ErrnoToStatus(errno, "cannot open", dir);
  if (fsync(handle.fd) != 0) return ErrnoToStatus(errno, "cannot fsync", dir);
  return absl::OkStatus();
}

}  // namespace

SafetensorsStreamWriter::SafetensorsStreamWriter(std::string path,
                                                 std::string temporary_path,
                                                 int fd, Options options)
    : path_(std::move(path)),
      temporary_path_(std::move(temporary_path)),
      fd_(fd),
      options_(options) {}

SafetensorsStreamWriter::~SafetensorsStreamWriter() {
  if (!committed_) Discard();
}

absl::StatusOr<std::unique_ptr<SafetensorsStreamWriter>>
SafetensorsStreamWriter::Create(const std::string& path,
                                std::vector<SafetensorsTensorInfo> tensors,
                                const SafetensorsMetadata& metadata,
                                Options options) {
  ASSIGN_OR_RETURN(auto header_and_order,
                   SerializeSafetensorsHeaderFor(tensors, metadata));
  ASSIGN_OR_RETURN(auto temporary, CreateTemporaryBeside(path));
  // From here on the writer owns the file and removes it on any error.
  std::unique_ptr<SafetensorsStreamWriter> writer(new SafetensorsStreamWriter(
      path, std::move(temporary.first), temporary.second, options));
  const std::string& header = header_and_order.first;
  writer->PlaceTensors(std::move(tensors), header_and_order.second,
                       header.size());
  RETURN_IF_ERROR(WriteAll(writer->fd_, header.data(), header.size(),
                           writer->temporary_path_));
  // The final size up front: a file system that cannot hold it (or a file
  // size limit) fails here, before any tensor is fetched for nothing.
  if (ftruncate(writer->fd_, static_cast<off_t>(writer->file_bytes_)) != 0)
    return ErrnoToStatus(errno, "cannot resize", writer->temporary_path_);
  return writer;
}

void SafetensorsStreamWriter::PlaceTensors(
    std::vector<SafetensorsTensorInfo> tensors,
    const std::vector<size_t>& order, uint64_t header_bytes) {
  slots_.resize(tensors.size());
  index_.reserve(tensors.size());
  uint64_t offset = header_bytes;
  for (size_t i : order) {
    Slot& slot = slots_[i];
    slot.name = std::move(tensors[i].name);
    slot.dtype = tensors[i].dtype;
    slot.shape = std::move(tensors[i].shape);
    slot.offset = offset;
    // Checked by SerializeSafetensorsHeaderFor.
    slot.bytes =
        static_cast<uint64_t>(NumBytes(slot.dtype, slot.shape).value());
    offset += slot.bytes;
    index_.emplace(slot.name, i);
  }
  file_bytes_ = offset;
}

absl::StatusOr<SafetensorsStreamWriter::Slot*>
SafetensorsStreamWriter::FindSlot(const std::string& name) {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor \"", name, "\" is not one of the file's"));
  }
  return &slots_[it->second];
}

absl::Status SafetensorsStreamWriter::WriteTensor(const std::string& name,
                                                  const Tensor& tensor) {
  ASSIGN_OR_RETURN(Slot * slot, FindSlot(name));
  if (slot->written || slot->filled > 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor \"", name, "\" was written already"));
  }
  if (tensor.dtype() != slot->dtype || tensor.shape() != slot->shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor \"", name, "\" is ", SafetensorsName(tensor.dtype()), " ",
        TorchSizeString(tensor.shape()), " but the header says ",
        SafetensorsName(slot->dtype), " ", TorchSizeString(slot->shape)));
  }
  const absl::Span<const uint8_t> bytes = tensor.bytes();
  RETURN_IF_ERROR(WriteFullyAt(fd_, slot->offset, bytes.data(), bytes.size(),
                               temporary_path_));
  slot->written = true;
  return absl::OkStatus();
}

absl::Status SafetensorsStreamWriter::WritePiece(const std::string& name,
                                                 uint64_t offset,
                                                 absl::string_view piece) {
  ASSIGN_OR_RETURN(Slot * slot, FindSlot(name));
  if (slot->written || offset != slot->filled ||
      piece.size() > slot->bytes - slot->filled) {
    return absl::InvalidArgumentError(absl::StrCat(
        "piece of ", piece.size(), " bytes at offset ", offset, " of tensor \"",
        name, "\" (", slot->bytes, " bytes, ", slot->filled, " written",
        slot->written ? ", complete" : "", ")"));
  }
  RETURN_IF_ERROR(WriteFullyAt(fd_, slot->offset + offset, piece.data(),
                               piece.size(), temporary_path_));
  slot->filled += piece.size();
  slot->written = slot->filled == slot->bytes;
  return absl::OkStatus();
}

absl::Status SafetensorsStreamWriter::CheckAllWritten() const {
  for (const Slot& slot : slots_) {
    if (!slot.written && slot.bytes > 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("tensor \"", slot.name, "\" was never written"));
    }
  }
  return absl::OkStatus();
}

absl::Status SafetensorsStreamWriter::Commit() {
  if (committed_) return absl::FailedPreconditionError("committed already");
  absl::Status status = CheckAllWritten();
  if (status.ok()) status = Publish();
  if (!status.ok()) {
    Discard();
    return status;
  }
  committed_ = true;
  if (options_.fsync) {
    // The rename is durable only once the directory is.
    RETURN_IF_ERROR(SyncDirectory(DirectoryOf(path_)));
    synced_ = true;
  }
  return absl::OkStatus();
}

absl::Status SafetensorsStreamWriter::Publish() {
  if (fd_ < 0) return absl::FailedPreconditionError("writer failed earlier");
  if (options_.fsync && fsync(fd_) != 0)
    return ErrnoToStatus(errno, "cannot fsync", temporary_path_);
  const int fd = fd_;
  fd_ = -1;
  // close reports write-back errors of some file systems (NFS).
  if (close(fd) != 0)
    return ErrnoToStatus(errno, "cannot close", temporary_path_);
  if (rename(temporary_path_.c_str(), path_.c_str()) != 0)
    return ErrnoToStatus(errno, "cannot rename to", path_);
  return absl::OkStatus();
}

void SafetensorsStreamWriter::Discard() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  unlink(temporary_path_.c_str());
}

}  // namespace modelstate
