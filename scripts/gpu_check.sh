#!/usr/bin/env bash
# The GPU check: the CUDA tests, `padst bench kernels --device cuda` and `padst bench model
# --device cuda`, every figure in one JSON file (OUT_DIR/gpu_check.json). Sized for under
# 8 minutes on one GPU. Needs torch with CUDA and triton in the environment (for example
# `make TORCH_SPEC="torch" test` once, or your own environment with PYTHON=...).
#
#   scripts/gpu_check.sh [OUT_DIR]        (default: gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
python=${PYTHON:-.venv/bin/python}
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: error: no CUDA GPU is visible to torch ($python)" >&2
    exit 2
fi
mkdir -p "$out"
status=0
# the CUDA tests, and every test that compiles or runs a Triton kernel
timeout 240 "$python" -m pytest -q -p no:cacheprovider -m cuda tests/kernels \
    --junitxml "$out/tests.xml" > "$out/tests.txt" 2>&1 || status=1
timeout 120 "$python" -m padst_compiler.cli bench kernels --device cuda --repeats 5 \
    --out "$out/kernels.json" > "$out/kernels.txt" 2>&1 || status=1
timeout 120 "$python" -m padst_compiler.cli bench model --device cuda --layers 12 --repeats 5 \
    --out "$out/model.json" > "$out/model.txt" 2>&1 || status=1
"$python" - "$out" <<'PY' || status=1
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out = Path(sys.argv[1])
report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
try:
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    report["tests"] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError) as error:
    report["tests"] = {"error": str(error)}
for name in ("kernels", "model"):
    path = out / f"{name}.json"
    report[name] = json.loads(path.read_text()) if path.exists() else {"error": f"no {path.name}: see {name}.txt"}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps({k: report[k] for k in ("device", "torch", "tests")}))
PY
echo "gpu_check: figures in $out/gpu_check.json (logs beside it); exit $status"
exit $status
