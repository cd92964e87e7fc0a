#!/usr/bin/env bash
# The engine (one aggregated `tandem up` worker) vs llama.cpp's llama-server on the same GGUF, the
# same bench.serve workload and the same machine, at 1, 8 and 32 concurrent streams.
#   LLAMA_SERVER=/path/to/llama-server bash bench/compare_llama_server.sh
# Build llama-server (benchmark only; not in CI, not committed) from the llama-cpp-python sdist:
#   pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
#   cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
#     -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
#     -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
#     && cmake --build build --target llama-server llama-batched-bench -j2
# Name the CPU's features explicitly (add -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
# -DGGML_AMX_TILE=ON ... where lscpu lists them): GGML_NATIVE=ON died with an illegal instruction on
# an AMX Xeon.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_SERVER:?set LLAMA_SERVER to the llama-server binary}"
GGUF=$(.venv/bin/python -c "from engine.loader.default_model import default_model_path; print(default_model_path())")
run_bench () {  # $1 label, $2 base URL
  for c in 1 8 32; do
    n=$(( c < 8 ? 8 : 2 * c ))
    .venv/bin/python -m bench.serve --url "$2" --workload sharegpt --num-sessions $n --rate inf --concurrency $c \
      --max-prompt 256 --max-answer 128 --slo-ttft-ms 3000 --slo-tpot-ms 300 --seed $((100 + c)) \
      --out "bench/results/peer_$1_c$c" --no-progress | sed "s/target/$1 c=$c/"
  done
}
"$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port 18090 -np 32 -c 12288 -t 2 --no-webui > /tmp/llama_server.log 2>&1 &
LLAMA_PID=$!
for _ in $(seq 1 120); do curl -sf http://127.0.0.1:18090/health > /dev/null && break; sleep 1; done
run_bench llamacpp http://127.0.0.1:18090
kill "$LLAMA_PID"; wait "$LLAMA_PID" 2> /dev/null || true
.venv/bin/tandem up --prefill 0 --decode 0 --both 1 --http-port 18091 --grpc-port 0 > /tmp/tandem_up.out &
UP_PID=$!
for _ in $(seq 1 180); do grep -q READY /tmp/tandem_up.out && break; sleep 1; done
run_bench tandem http://127.0.0.1:18091
kill -TERM "$UP_PID"; wait "$UP_PID"
