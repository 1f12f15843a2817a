// Every proto <-> core mapping, field by field: each test sets every field to
// a value other than its default, so a field dropped in either direction
// fails.
#include "proto/convert.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/test_util.h"

namespace modelstate {
namespace {

using testing::ElementsAre;
using testing::Pair;
using testing::UnorderedElementsAre;

FetchRequest EveryFetchField() {
  FetchRequest request;
  request.model = "policy";
  request.version = 7;
  request.min_version = 6;
  request.offset = uint64_t{5} << 32;
  request.module = "encoder.0";
  request.keep_module_prefix = false;
  request.keys = {"a.weight", "a.bias"};
  request.recurse = false;
  request.include_buffers = false;
  request.dtype = DType::kBFloat16;
  return request;
}

TEST(ConvertTest, FetchRequestMapsEveryFieldToTheV1Names) {
  const v1::StateDictRequest proto = ToProto(EveryFetchField());
  EXPECT_EQ(proto.model(), "policy");
  EXPECT_EQ(proto.version(), 7);
  EXPECT_EQ(proto.min_version(), 6);
  EXPECT_EQ(proto.offset(), uint64_t{5} << 32);
  EXPECT_EQ(proto.module(), "encoder.0");
  EXPECT_TRUE(proto.strip_module_prefix());
  EXPECT_THAT(proto.keys(), ElementsAre("a.weight", "a.bias"));
  EXPECT_TRUE(proto.own_tensors_only());
  EXPECT_TRUE(proto.exclude_buffers());
  EXPECT_EQ(proto.cast_floating_to(), v1::BFLOAT16);
  EXPECT_EQ(proto.chunk_bytes(), 0u);  // The transport's, not the request's.

  const FetchRequest back = FromProto(proto).value();
  EXPECT_EQ(back.model, "policy");
  EXPECT_EQ(back.version, 7);
  EXPECT_EQ(back.min_version, 6);
  EXPECT_EQ(back.offset, uint64_t{5} << 32);
  EXPECT_EQ(back.module, "encoder.0");
  EXPECT_FALSE(back.keep_module_prefix);
  EXPECT_THAT(back.keys, ElementsAre("a.weight", "a.bias"));
  EXPECT_FALSE(back.recurse);
  EXPECT_FALSE(back.include_buffers);
  EXPECT_EQ(back.dtype, DType::kBFloat16);
}

TEST(ConvertTest, AnEmptyFetchRequestMeansTorchsDefaults) {
  const FetchRequest request = FromProto(v1::StateDictRequest()).value();
  EXPECT_TRUE(request.keep_module_prefix);
  EXPECT_TRUE(request.recurse);
  EXPECT_TRUE(request.include_buffers);
  EXPECT_FALSE(request.dtype.has_value());
  v1::StateDictRequest bad;
  bad.set_cast_floating_to(static_cast<v1::DType>(99));
  EXPECT_EQ(FromProto(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConvertTest, GetModelSelectsModelModuleVersionAndMinVersion) {
  const v1::GetModelRequest proto = ToGetModelRequest(EveryFetchField());
  EXPECT_EQ(proto.model(), "policy");
  EXPECT_EQ(proto.module(), "encoder.0");
  EXPECT_EQ(proto.version(), 7);
  EXPECT_EQ(proto.min_version(), 6);
  const FetchRequest back = FromProto(proto);
  EXPECT_EQ(back.model, "policy");
  EXPECT_EQ(back.module, "encoder.0");
  EXPECT_EQ(back.version, 7);
  EXPECT_EQ(back.min_version, 6);
  EXPECT_EQ(back.offset, 0u);  // GetModel has no data to offset.
}

TEST(ConvertTest, LoadRequestMapsEveryField) {
  LoadRequest request;
  request.model = "policy";
  request.module = "head";
  request.strict = false;
  request.assign = true;
  request.expected_version = 0;  // "must not exist" is a real value.
  request.create_if_missing = true;
  request.buffer_keys = {"running_mean"};
  request.class_names = {{"", "Net"}, {"head", "Linear"}};
  StateDict state;
  state.Set("weight", FullTensor(DType::kFloat32, {2}, 1));
  state.Set("running_mean", FullTensor(DType::kFloat32, {2}, 0));
  const v1::LoadHeader header = ToLoadHeader(request, state, 16);
  EXPECT_EQ(header.model(), "policy");
  EXPECT_EQ(header.module(), "head");
  EXPECT_TRUE(header.non_strict());
  EXPECT_TRUE(header.assign());
  EXPECT_TRUE(header.has_expected_version());
  EXPECT_EQ(header.expected_version(), 0);
  EXPECT_TRUE(header.create_if_missing());
  EXPECT_EQ(header.total_bytes(), 16u);
  ASSERT_EQ(header.tensors_size(), 2);
  EXPECT_EQ(header.tensors(0).kind(), v1::PARAMETER);
  EXPECT_EQ(header.tensors(1).kind(), v1::BUFFER);
  EXPECT_THAT(header.class_names(),
              UnorderedElementsAre(Pair("", "Net"), Pair("head", "Linear")));

  const LoadRequest back = FromProto(header).value();
  EXPECT_EQ(back.model, "policy");
  EXPECT_EQ(back.module, "head");
  EXPECT_FALSE(back.strict);
  EXPECT_TRUE(back.assign);
  EXPECT_EQ(back.expected_version, 0);
  EXPECT_TRUE(back.create_if_missing);
  EXPECT_THAT(back.buffer_keys, ElementsAre("running_mean"));
  EXPECT_EQ(back.class_names, request.class_names);
}

TEST(ConvertTest, ALoadHeaderWithoutExpectedVersionSetsNone) {
  v1::LoadHeader header;
  header.set_expected_version(3);  // Ignored without has_expected_version.
  const LoadRequest request = FromProto(header).value();
  EXPECT_FALSE(request.expected_version.has_value());
  EXPECT_TRUE(request.strict);
  header.add_tensors()->set_kind(static_cast<v1::TensorKind>(9));
  EXPECT_EQ(FromProto(header).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ConvertTest, TensorDescriptionsAndManifests) {
  const TensorDescription tensor{
      "bn.running_var", TensorKind::kBuffer, DType::kFloat16, {3, 2}, 12,
      0xabcdef};
  const v1::TensorInfo info = ToProto(tensor);
  const TensorDescription back = FromProto(info).value();
  EXPECT_EQ(back.name, tensor.name);
  EXPECT_EQ(back.kind, tensor.kind);
  EXPECT_EQ(back.dtype, tensor.dtype);
  EXPECT_EQ(back.shape, tensor.shape);
  EXPECT_EQ(back.num_bytes, tensor.num_bytes);
  EXPECT_EQ(back.checksum, tensor.checksum);
  v1::TensorInfo wrong_size = info;
  wrong_size.set_num_bytes(13);
  EXPECT_EQ(FromProto(wrong_size).status().code(),
            absl::StatusCode::kInvalidArgument);

  ModelManifest manifest;
  manifest.summary = ModelSummary{"policy", 9, 1, 12, "Net"};
  manifest.version = 8;
  manifest.retained_versions = {9, 8};
  manifest.tensors = {tensor};
  manifest.architecture_json = "{}";
  manifest.class_names = {{"", "Net"}, {"fc", "Linear"}};
  manifest.epoch = 0x9f3c2a1b4d5e6f70;
  const ModelManifest round = FromProto(ToProto(manifest)).value();
  EXPECT_EQ(round.summary.name, "policy");
  EXPECT_EQ(round.summary.version, 9);
  EXPECT_EQ(round.summary.num_tensors, 1);
  EXPECT_EQ(round.summary.num_bytes, 12u);
  EXPECT_EQ(round.summary.root_class, "Net");
  EXPECT_EQ(round.version, 8);
  EXPECT_THAT(round.retained_versions, ElementsAre(9, 8));
  ASSERT_EQ(round.tensors.size(), 1u);
  EXPECT_EQ(round.tensors[0].name, "bn.running_var");
  EXPECT_EQ(round.architecture_json, "{}");
  EXPECT_EQ(round.class_names, manifest.class_names);
  EXPECT_EQ(round.epoch, 0x9f3c2a1b4d5e6f70u);
  EXPECT_EQ(ToProto(manifest).epoch(), 0x9f3c2a1b4d5e6f70u);
}

TEST(ConvertTest, FetchPlanManifest) {
  FetchPlan plan;
  plan.model = "policy";
  plan.version = 4;
  plan.epoch = 0xab;
  StateDict state;
  state.Set("w", FullTensor(DType::kFloat32, {2}, 1));
  plan.state = std::make_shared<const StateDict>(state);
  const v1::Manifest manifest = ToManifest(plan, 8);
  EXPECT_EQ(manifest.model(), "policy");
  EXPECT_EQ(manifest.version(), 4);
  EXPECT_EQ(manifest.total_bytes(), 8u);
  EXPECT_EQ(manifest.epoch(), 0xabu);
  ASSERT_EQ(manifest.tensors_size(), 1);
  EXPECT_EQ(manifest.tensors(0).xxh3_64(), state.Find("w")->Checksum());
}

TEST(ConvertTest, LoadOutcomeAndEvents) {
  const LoadOutcome outcome{5, {"m"}, {"u"}, true};
  const LoadOutcome back = FromProto(ToProto(outcome));
  EXPECT_EQ(back.version, 5);
  EXPECT_THAT(back.missing_keys, ElementsAre("m"));
  EXPECT_THAT(back.unexpected_keys, ElementsAre("u"));
  EXPECT_TRUE(back.created);

  for (ModelEvent::Type type :
       {ModelEvent::Type::kCreated, ModelEvent::Type::kUpdated,
        ModelEvent::Type::kDeleted, ModelEvent::Type::kCurrent,
        ModelEvent::Type::kAbsent, ModelEvent::Type::kListed}) {
    const ModelEvent event =
        FromProto(ToProto(ModelEvent{type, "m", 3, 0xfeedu})).value();
    EXPECT_EQ(event.type, type);
    EXPECT_EQ(event.model, "m");
    EXPECT_EQ(event.version, 3);
    EXPECT_EQ(event.epoch, 0xfeedu);
  }
  v1::WatchModelResponse unknown;
  EXPECT_EQ(FromProto(unknown).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ConvertTest, EnumsRejectUnknownNumbers) {
  EXPECT_EQ(FromProto(v1::BUFFER).value(), TensorKind::kBuffer);
  EXPECT_EQ(FromProto(v1::TENSOR_KIND_UNSPECIFIED).value(),
            TensorKind::kParameter);
  EXPECT_FALSE(FromProto(static_cast<v1::TensorKind>(3)).ok());
  EXPECT_FALSE(FromProto(v1::DTYPE_UNSPECIFIED).ok());
  EXPECT_EQ(FromProto(ToProto(DType::kFloat8E5M2)).value(), DType::kFloat8E5M2);
}

}  // namespace
}  // namespace modelstate
