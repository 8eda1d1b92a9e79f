#include "policy_client.h"

#include <chrono>
#include <cstring>
#include <numeric>
#include <utility>

namespace flowrl {

namespace {

int64_t Elements(const std::vector<int64_t>& shape) {
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
}

void FillTensor(pb::Tensor* tensor, const std::vector<float>& values, const std::vector<int64_t>& shape,
                const char* what) {
  if (shape.empty() || Elements(shape) != static_cast<int64_t>(values.size())) {
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(values.size()) +
                                " values do not fill the given shape");
  }
  for (int64_t s : shape) tensor->add_shape(s);
  tensor->set_raw(values.data(), values.size() * sizeof(float));  // little-endian float32, as the server reads
}

ActionChunk FromReply(const pb::ActReply& reply) {
  ActionChunk chunk;
  const pb::Tensor& t = reply.actions();
  chunk.shape.assign(t.shape().begin(), t.shape().end());
  const int64_t n = Elements(chunk.shape);
  chunk.actions.resize(n);
  if (!t.raw().empty()) {
    if (static_cast<int64_t>(t.raw().size()) != n * static_cast<int64_t>(sizeof(float))) {
      throw PolicyError(grpc::StatusCode::INTERNAL, "reply: raw bytes do not match the actions' shape");
    }
    std::memcpy(chunk.actions.data(), t.raw().data(), t.raw().size());
  } else {
    if (t.data_size() != n) throw PolicyError(grpc::StatusCode::INTERNAL, "reply: values do not match the shape");
    std::copy(t.data().begin(), t.data().end(), chunk.actions.begin());
  }
  chunk.act_steps = reply.act_steps();
  chunk.inference_ms = reply.inference_ms();
  chunk.request_id = reply.request_id();
  return chunk;
}

void Check(const grpc::Status& status) {
  if (!status.ok()) throw PolicyError(status.error_code(), status.error_message());
}

}  // namespace

PolicyError::PolicyError(grpc::StatusCode code, const std::string& message)
    : std::runtime_error(message), code_(code) {}

PolicyClient::PolicyClient(const std::string& address, std::string policy, int timeout_ms)
    : channel_(grpc::CreateChannel(address, grpc::InsecureChannelCredentials())),
      stub_(pb::PolicyService::NewStub(channel_)),
      policy_(std::move(policy)),
      timeout_ms_(timeout_ms) {}

void PolicyClient::SetDeadline(grpc::ClientContext& context) const {
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms_));
}

std::string PolicyClient::Health() {
  grpc::ClientContext context;
  SetDeadline(context);
  pb::HealthReply reply;
  Check(stub_->Health(&context, pb::HealthRequest(), &reply));
  return pb::HealthReply::Status_Name(reply.status());
}

PolicyInfo PolicyClient::Info() {
  grpc::ClientContext context;
  SetDeadline(context);
  pb::InfoRequest request;
  request.set_policy(policy_);
  pb::PolicyInfo reply;
  Check(stub_->Info(&context, request, &reply));
  PolicyInfo info;
  info.name = reply.name();
  info.task = reply.task();
  info.backend = reply.backend();
  info.obs_dim = reply.obs_dim();
  info.act_dim = reply.act_dim();
  info.obs_history = reply.obs_history();
  info.horizon = reply.horizon();
  info.act_steps = reply.act_steps();
  info.k = reply.k();
  info.action_low.assign(reply.action_low().begin(), reply.action_low().end());
  info.action_high.assign(reply.action_high().begin(), reply.action_high().end());
  return info;
}

pb::ActRequest PolicyClient::MakeRequest(const std::vector<float>& obs, const std::vector<int64_t>& obs_shape,
                                         const std::vector<float>& noise, const std::vector<int64_t>& noise_shape) {
  pb::ActRequest request;
  request.set_policy(policy_);
  request.set_request_id(next_id_++);
  request.set_raw_reply(true);
  FillTensor(request.mutable_obs(), obs, obs_shape, "obs");
  if (!noise.empty()) FillTensor(request.mutable_noise(), noise, noise_shape, "noise");
  return request;
}

ActionChunk PolicyClient::Act(const std::vector<float>& obs, const std::vector<int64_t>& obs_shape,
                              const std::vector<float>& noise, const std::vector<int64_t>& noise_shape) {
  const pb::ActRequest request = MakeRequest(obs, obs_shape, noise, noise_shape);
  grpc::ClientContext context;
  SetDeadline(context);
  pb::ActReply reply;
  Check(stub_->Act(&context, request, &reply));
  return FromReply(reply);
}

void PolicyClient::OpenStream() {
  stream_context_ = std::make_unique<grpc::ClientContext>();
  stream_ = stub_->StreamAct(stream_context_.get());
}

ActionChunk PolicyClient::Next(const std::vector<float>& obs, const std::vector<int64_t>& obs_shape) {
  if (!stream_) throw std::logic_error("Next() before OpenStream()");
  pb::ActReply reply;
  if (!stream_->Write(MakeRequest(obs, obs_shape, {}, {})) || !stream_->Read(&reply)) {
    CloseStream();  // throws the server's status when it ended the stream with an error
    throw PolicyError(grpc::StatusCode::UNKNOWN, "the stream ended without a reply");
  }
  return FromReply(reply);
}

void PolicyClient::CloseStream() {
  if (!stream_) return;
  auto stream = std::move(stream_);
  stream->WritesDone();
  grpc::Status status = stream->Finish();
  stream_context_.reset();
  Check(status);
}

}  // namespace flowrl
