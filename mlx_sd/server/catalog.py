"""The models and LoRAs a server offers: the entries of its folders, which requests name and never give as paths."""

import re
from dataclasses import dataclass
from pathlib import Path

from ..hub import DEFAULT_MODEL
from .payloads import RequestError

MAX_ENTRIES = 1000  # files or folders listed per folder
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # owner/name


@dataclass(frozen=True)
class ModelEntry:
    title: str  # what clients select it by (A1111 sd_model_checkpoint, OpenAI model)
    model_name: str  # the title without a .safetensors suffix
    source: str  # what StableDiffusion.from_pretrained loads


class ModelCatalog:
    """Models in `models_dir` (diffusers / converted folders, single-file .safetensors), plus the `model` the
    server was started with (a name in the folder, a path, or a Hub id). With allow_hub, requests may also name
    Hub ids (owner/name)."""

    def __init__(self, models_dir=None, model=None, allow_hub=False):
        self.models_dir = None if models_dir is None else Path(models_dir).expanduser()
        self.allow_hub = allow_hub
        self.initial = self._initial(model)

    def _initial(self, model):
        listed = self._listed()
        if model is None:
            return listed[0] if listed else ModelEntry(DEFAULT_MODEL, DEFAULT_MODEL, DEFAULT_MODEL)
        model = str(model)
        named = [e for e in listed if model in (e.title, e.model_name)]
        if named:
            return named[0]
        path = Path(model).expanduser()
        if path.exists():
            return ModelEntry(path.name, path.stem if path.is_file() else path.name, str(path))
        return ModelEntry(model, model, model)

    def _listed(self):
        entries = []
        for path in _folder(self.models_dir):
            if path.is_dir() and (path / "model_index.json").is_file():
                entries.append(ModelEntry(path.name, path.name, str(path)))
            elif path.suffix == ".safetensors" and path.is_file():
                entries.append(ModelEntry(path.name, path.stem, str(path)))
        return entries

    def entries(self):
        """The models on offer, the starting model first (the folder is read again on every call)."""
        return [self.initial] + [e for e in self._listed() if e.title != self.initial.title]

    def find(self, name, field):
        """The entry a request names by title or model name (or a Hub id with allow_hub); RequestError naming
        `field` otherwise."""
        if not isinstance(name, str):
            raise RequestError(f"{field} must be a model name (string)", field)
        entries = self.entries()
        for entry in entries:
            if name in (entry.title, entry.model_name):
                return entry
        if self.allow_hub and HUB_ID.match(name) and ".." not in name:
            return ModelEntry(name, name, name)
        offered = ", ".join(e.title for e in entries[:20])
        raise RequestError(f"{field}: unknown model {name[:200]!r}; this server offers: {offered}", field)


def lora_names(lora_dir):
    """The LoRAs in `lora_dir`: the names (file stems) of its .safetensors files, sorted."""
    return [p.stem for p in _folder(lora_dir) if p.suffix == ".safetensors" and p.is_file()]


def _folder(folder):
    """The visible entries of `folder` (none when it is None or missing), sorted, at most MAX_ENTRIES."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).expanduser().iterdir() if not p.name.startswith("."))[:MAX_ENTRIES]
