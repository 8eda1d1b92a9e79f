// flowrl::PolicyClient: a blocking C++ client of flowrl's policy server (flowrl/deploy/policy.proto).
// Observations in, action chunks (env units) out; float32 tensors travel as raw little-endian bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "policy.grpc.pb.h"

namespace flowrl {

namespace pb = ::flowrl::deploy::v1;

// A failed call: the gRPC status code (INVALID_ARGUMENT for a malformed request, NOT_FOUND for an
// unknown policy, UNAVAILABLE when no server answers) and the server's one-line message.
class PolicyError : public std::runtime_error {
 public:
  PolicyError(grpc::StatusCode code, const std::string& message);
  grpc::StatusCode code() const { return code_; }

 private:
  grpc::StatusCode code_;
};

struct PolicyInfo {
  std::string name, task, backend;
  uint32_t obs_dim = 0, act_dim = 0, obs_history = 0, horizon = 0, act_steps = 0, k = 0;
  std::vector<float> action_low, action_high;
};

// One reply: actions of shape (batch, horizon, act_dim), row-major.
struct ActionChunk {
  std::vector<int64_t> shape;
  std::vector<float> actions;
  uint32_t act_steps = 0;
  double inference_ms = 0.0;
  uint64_t request_id = 0;
};

class PolicyClient {
 public:
  // `address` is host:port; `policy` a served policy's name (empty: the server's default).
  explicit PolicyClient(const std::string& address, std::string policy = "", int timeout_ms = 5000);

  // "SERVING" or "NOT_SERVING"; throws PolicyError when the server cannot be reached.
  std::string Health();
  PolicyInfo Info();
  // obs: batch x obs_history x obs_dim floats (shape {batch, obs_history, obs_dim}); noise (optional):
  // batch x horizon x act_dim floats of initial noise, empty to let the server draw it. Values that do
  // not fill their shape throw std::invalid_argument before anything is sent.
  ActionChunk Act(const std::vector<float>& obs, const std::vector<int64_t>& obs_shape,
                  const std::vector<float>& noise = {}, const std::vector<int64_t>& noise_shape = {});
  // Act over one long-lived StreamAct stream (what a control loop at a fixed rate uses): Open, then Next
  // per observation, then Close.
  void OpenStream();
  ActionChunk Next(const std::vector<float>& obs, const std::vector<int64_t>& obs_shape);
  void CloseStream();

 private:
  pb::ActRequest MakeRequest(const std::vector<float>& obs, const std::vector<int64_t>& obs_shape,
                             const std::vector<float>& noise, const std::vector<int64_t>& noise_shape);
  void SetDeadline(grpc::ClientContext& context) const;

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::PolicyService::Stub> stub_;
  std::string policy_;
  int timeout_ms_;
  uint64_t next_id_ = 1;
  std::unique_ptr<grpc::ClientContext> stream_context_;
  std::unique_ptr<grpc::ClientReaderWriter<pb::ActRequest, pb::ActReply>> stream_;
};

}  // namespace flowrl
