"""Training chat templates chosen by name, never by path (torch-free: the gateway checks names with it).

A job may ask `hyperparameters.chat_template: NAME` for a base model whose own template grape cannot make
training-compatible (trainer.chat_templates). A name is looked up, first match wins, in:

1. the operator's directory `GRAPE_CHAT_TEMPLATE_DIR`: the file `NAME.jinja`;
2. grape's own templates (`BUILTIN`);
3. TRL's shipped training templates (`trl/chat_templates/NAME_training.jinja`, when TRL is installed).

A name is a plain file stem (`NAME_PATTERN`), so it can never reach outside those places; a template file
is read only up to `MAX_TEMPLATE_BYTES`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
MAX_TEMPLATE_BYTES = 256 * 1024

CHATML_TRAINING = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' and default_system %}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML with the assistant content and its end-of-turn token inside the generation markers. The
`default_system` variable (a system prompt added when the conversation has none) is set by whoever uses it."""

BUILTIN: dict[str, str] = {
    "chatml": "{%- set default_system = '' %}" + CHATML_TRAINING,
}
"""grape's own training templates, by name."""


class UnknownTemplate(ValueError):
    """A chat template name that is malformed or names no template."""


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def trl_templates() -> dict[str, Path]:
    """TRL's shipped training templates, name -> file ({} when TRL is not installed). TRL is not imported."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    out = {}
    for p in folder.glob("*_training.jinja"):
        name = p.name.removesuffix("_training.jinja")
        if valid_name(name):
            out[name] = p
    return out


def operator_templates(directory: Path | None) -> dict[str, Path]:
    """The operator's templates, name -> file: `DIR/NAME.jinja` ({} without a directory)."""
    if directory is None or not Path(directory).is_dir():
        return {}
    return {p.stem: p for p in Path(directory).glob("*.jinja") if valid_name(p.stem) and p.is_file()}


def known_names(directory: Path | None) -> list[str]:
    return sorted(set(operator_templates(directory)) | set(BUILTIN) | set(trl_templates()))


def load_template(name: str, directory: Path | None) -> str:
    """The Jinja text of the template `name`; `UnknownTemplate` naming the known ones otherwise."""
    if not valid_name(name):
        raise UnknownTemplate(f"hyperparameters.chat_template {name!r}: a name matching {NAME_PATTERN}, not a path")
    own = operator_templates(directory)
    if name in own:
        return _read(own[name])
    if name in BUILTIN:
        return BUILTIN[name]
    shipped = trl_templates()
    if name in shipped:
        return _read(shipped[name])
    where = f"GRAPE_CHAT_TEMPLATE_DIR={directory}" if directory else "GRAPE_CHAT_TEMPLATE_DIR is not set"
    known = ", ".join(known_names(directory))
    raise UnknownTemplate(f"hyperparameters.chat_template {name!r}: no such template ({where}); known: {known}")


def _read(path: Path) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_TEMPLATE_BYTES + 1)
    if len(data) > MAX_TEMPLATE_BYTES:
        raise UnknownTemplate(f"chat template {path.name} is larger than {MAX_TEMPLATE_BYTES} bytes")
    return data.decode("utf-8")
