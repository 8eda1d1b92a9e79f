// flowrl_client: a command-line client of flowrl's policy server, written on flowrl::PolicyClient.
//
//   flowrl_client --address HOST:PORT [--policy NAME] [--batch B] [--obs FILE] [--noise FILE] [--out FILE]
//                 [--requests N] [--stream] [--timeout-ms T]
//
// Checks health, prints the policy's facts, sends one observation history (from --obs: raw little-endian
// float32, batch x obs_history x obs_dim; default: a fixed pattern) with optional initial noise, writes
// the action chunk to --out (raw float32) and prints its first action. With --requests N it then times N
// round trips (unary Act, or one StreamAct stream with --stream) and prints p50/p99/max in ms.
// Exit codes: 0 ok, 2 bad arguments or files, 3 an error reply from the server (code and message printed).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "policy_client.h"

namespace {

const char* const kUsage =
    "usage: flowrl_client --address HOST:PORT [--policy NAME] [--batch B] [--obs FILE] [--noise FILE] "
    "[--out FILE] [--requests N] [--stream] [--timeout-ms T]\n";

[[noreturn]] void Usage(const std::string& problem) {
  std::cerr << "flowrl_client: " << problem << "\n" << kUsage;
  std::exit(2);
}

std::vector<float> ReadFloats(const std::string& path, size_t expected, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Usage(std::string(what) + ": cannot read " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() != expected * sizeof(float)) {
    Usage(std::string(what) + ": " + path + " holds " + std::to_string(bytes.size()) + " bytes, expected " +
          std::to_string(expected * sizeof(float)) + " (" + std::to_string(expected) + " float32)");
  }
  std::vector<float> values(expected);
  std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(values.data()));
  return values;
}

double Percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * (v.size() - 1);
  const size_t lo = static_cast<size_t>(pos), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - lo) * (v[hi] - v[lo]);
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> opt{{"--policy", ""}, {"--batch", "1"}, {"--requests", "0"},
                                         {"--timeout-ms", "5000"}};
  bool stream = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--stream") {
      stream = true;
    } else if (a == "--help" || a == "-h") {
      std::cout << "flowrl_client: a C++ client of `flowrl serve` (see the comment at the top of flowrl_client.cc)\n"
                << kUsage;
      return 0;
    } else if (opt.count(a) || a == "--address" || a == "--obs" || a == "--noise" || a == "--out") {
      if (i + 1 >= argc) Usage(a + " needs a value");
      opt[a] = argv[++i];
    } else {
      Usage("unknown argument " + a);
    }
  }
  if (!opt.count("--address")) Usage("--address is required");
  int batch = 0, requests = 0, timeout_ms = 0;
  try {
    batch = std::stoi(opt["--batch"]);
    requests = std::stoi(opt["--requests"]);
    timeout_ms = std::stoi(opt["--timeout-ms"]);
  } catch (const std::exception&) {
    Usage("--batch, --requests and --timeout-ms take integers");
  }
  if (batch < 1 || requests < 0 || timeout_ms < 1) Usage("--batch and --timeout-ms must be >= 1, --requests >= 0");

  try {
    flowrl::PolicyClient client(opt["--address"], opt["--policy"], timeout_ms);
    const std::string health = client.Health();
    std::cout << "health " << health << "\n";
    if (health != "SERVING") return 3;
    const flowrl::PolicyInfo info = client.Info();
    std::cout << "policy " << info.name << " task " << info.task << " backend " << info.backend << " obs_history "
              << info.obs_history << " obs_dim " << info.obs_dim << " horizon " << info.horizon << " act_dim "
              << info.act_dim << " act_steps " << info.act_steps << " K " << info.k << "\n";

    const std::vector<int64_t> obs_shape{batch, info.obs_history, info.obs_dim};
    const size_t obs_n = static_cast<size_t>(batch) * info.obs_history * info.obs_dim;
    std::vector<float> obs(obs_n);
    if (opt.count("--obs")) {
      obs = ReadFloats(opt["--obs"], obs_n, "--obs");
    } else {
      for (size_t i = 0; i < obs_n; ++i) obs[i] = 0.1f * std::sin(0.37f * static_cast<float>(i));
    }
    std::vector<float> noise;
    std::vector<int64_t> noise_shape;
    if (opt.count("--noise")) {
      noise_shape = {batch, info.horizon, info.act_dim};
      noise = ReadFloats(opt["--noise"], static_cast<size_t>(batch) * info.horizon * info.act_dim, "--noise");
    }

    const flowrl::ActionChunk chunk = client.Act(obs, obs_shape, noise, noise_shape);
    std::cout << "actions " << chunk.shape[0] << "x" << chunk.shape[1] << "x" << chunk.shape[2] << " act_steps "
              << chunk.act_steps << " inference_ms " << chunk.inference_ms << " first";
    for (uint32_t j = 0; j < info.act_dim; ++j) std::cout << " " << chunk.actions[j];
    std::cout << "\n";
    if (opt.count("--out")) {
      std::ofstream out(opt["--out"], std::ios::binary);
      out.write(reinterpret_cast<const char*>(chunk.actions.data()), chunk.actions.size() * sizeof(float));
      if (!out) Usage("--out: cannot write " + opt["--out"]);
    }

    if (requests > 0) {
      std::vector<double> ms;
      ms.reserve(requests);
      if (stream) client.OpenStream();
      for (int r = 0; r < requests; ++r) {
        const auto start = std::chrono::steady_clock::now();
        if (stream) {
          client.Next(obs, obs_shape);
        } else {
          client.Act(obs, obs_shape);
        }
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      }
      if (stream) client.CloseStream();
      std::printf("round trip (%s, %d requests) p50 %.3f ms p99 %.3f ms max %.3f ms\n", stream ? "stream" : "unary",
                  requests, Percentile(ms, 0.5), Percentile(ms, 0.99), *std::max_element(ms.begin(), ms.end()));
    }
  } catch (const flowrl::PolicyError& e) {
    std::cerr << "flowrl_client: server error " << static_cast<int>(e.code()) << ": " << e.what() << "\n";
    return 3;
  }
  return 0;
}
