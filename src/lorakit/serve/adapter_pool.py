"""The adapters a server knows, and which of them are in memory (vLLM's semantics).

- Known: registered at start (`--adapter` / `--lora-modules`), through the load endpoints, or found by name under
  `--adapter-root` on the first request for it.
- Resident: loaded into the model; at most `max_cpu_loras`, the least recently used one that no running row
  needs is unloaded to make room, and loaded again from its directory when next asked for.
- A request holds its adapter from submission until it finishes. Deleting hides the adapter at once (later
  requests get 404) and forgets it when its last request finishes, so no request fails or runs under another
  adapter.

Every method that touches the model runs with the engine's model lock held (the caller's duty).
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict

from ..adapters.model import LoraModel
from ..variants.registry import read_config
from .errors import Conflict, InvalidRequest, NotAllowed, NotFound

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a module-dict key: no '.', no '/'


class AdapterPool:
    def __init__(self, engine, adapter_root: str | None, max_cpu_loras: int):
        self.engine = engine
        self.adapter_root = adapter_root
        self.max_cpu_loras = max_cpu_loras
        self.registry = threading.Lock()  # known / in_use / deleting (never held while waiting for the model lock)
        self.known: dict[str, str] = {}        # name -> adapter directory
        self.resident: OrderedDict[str, None] = OrderedDict()  # loaded in the model, least recently used first
        self.in_use: dict[str, int] = {}       # name -> requests submitted and not finished
        self.deleting: set[str] = set()        # deleted by a client, forgotten when its last request finishes
        self.details: dict[str, dict] = {}     # name -> what GET /v1/adapters shows
        self.loads = self.hits = self.evictions = 0

    def names(self) -> list[str]:
        """The adapters requests may name (known and not being deleted)."""
        return sorted(n for n in self.known if n not in self.deleting)

    # --- registering ---------------------------------------------------------------------------
    def check_new(self, name: str, path: str, check_root: bool) -> str:
        """The directory for a new adapter `name` (validated; nothing loaded yet)."""
        base_name = self.engine.base_name
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name == base_name:
            raise InvalidRequest(f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-' (starting "
                                 f"with a letter or digit), other than the base model's name {base_name!r}",
                                 "invalid_name")
        if "\x00" in path:
            raise InvalidRequest("adapter path must not contain a NUL character", "invalid_path")
        if name in self.deleting:
            raise Conflict(f"adapter {name!r} is being deleted (requests still use it); retry shortly",
                           "adapter_being_deleted")
        if name in self.known:
            raise Conflict(f"adapter {name!r} is already loaded", "adapter_exists")
        if check_root:
            path = self.under_root(path)
        if not os.path.isdir(path):
            raise NotFound(f"adapter directory {path!r} not found", "adapter_not_found")
        try:
            read_config(path)
        except (ValueError, OSError) as e:
            raise InvalidRequest(f"cannot load adapter {name!r}: {e}", "bad_adapter") from None
        return path

    def under_root(self, path: str) -> str:
        root = self.adapter_root
        if not root:
            raise NotAllowed("loading adapters at runtime is disabled (start the server with --adapter-root)",
                             "adapter_loading_disabled")
        real_root = os.path.realpath(root)
        real = os.path.realpath(os.path.join(real_root, path))
        if os.path.commonpath([real, real_root]) != real_root:
            raise NotAllowed(f"adapter path {path!r} is outside the adapter root", "path_outside_root")
        return real

    def register(self, name: str, path: str, check_root: bool = True) -> None:
        """Validate, load (checking the files), and keep `name` known; it stays resident while there is room."""
        path = self.check_new(name, path, check_root)
        self._load(name, path)
        with self.registry:
            self.known[name] = path
        if not self._shrink(keep=self.engine.running_adapters() | {name}):
            self._unload(name)  # no room now: loaded again when a request needs it

    def find_lazily(self, name: str) -> bool:
        """A request names an adapter not known yet: register the directory of that name under the adapter
        root, if there is one (loaded when the request is scheduled)."""
        if not self.adapter_root or not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) \
                or name == self.engine.base_name:
            return False
        path = os.path.join(os.path.realpath(self.adapter_root), name)
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            return False
        path = self.check_new(name, name, True)
        with self.registry:
            self.known.setdefault(name, path)
        return True

    # --- memory ----------------------------------------------------------------------------------
    def _load(self, name: str, path: str) -> None:
        engine = self.engine
        try:
            if isinstance(engine.model, LoraModel):
                engine.model.load_adapter(path, adapter_name=name)
            else:
                engine.model = LoraModel.from_pretrained(engine.model, path, adapter_name=name)
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            if name in getattr(engine.model, "peft_config", {}):
                engine.model.delete_adapter(name)
            raise InvalidRequest(f"cannot load adapter {name!r}: {e}", "bad_adapter") from None
        self.resident[name] = None
        self.loads += 1
        engine.adapters_changed()
        self.details[name] = self._describe(name, path)

    def _unload(self, name: str) -> None:
        self.engine.model.delete_adapter(name)
        self.resident.pop(name, None)
        self.engine.adapters_changed()
        self.engine.prefix_cache.clear_adapter(name)

    def _shrink(self, keep: set) -> bool:
        """Unload least recently used adapters not in `keep` until at most max_cpu_loras stay; False when that
        cannot be done."""
        for name in list(self.resident):
            if len(self.resident) <= self.max_cpu_loras:
                break
            if name not in keep:
                self._unload(name)
                self.evictions += 1
        return len(self.resident) <= self.max_cpu_loras

    def make_resident(self, name: str, running: set) -> bool:
        """Load `name` if it is not in memory, unloading an idle one when full; False when every resident
        adapter is needed by a running row (the request waits)."""
        if name in self.resident:
            self.resident.move_to_end(name)
            self.hits += 1
            return True
        if len(self.resident) >= self.max_cpu_loras and not (set(self.resident) - running):
            return False
        self._load(name, self.known[name])
        self._shrink(keep=running | {name})
        return True

    def _describe(self, name: str, path: str) -> dict:
        """Form, rank, alpha, targets, parameter count and bytes of a loaded adapter."""
        model = self.engine.model
        config = model.peft_config[name]
        tensors = [p for n, p in model.named_parameters() if f".{name}." in n]
        targets = config.target_modules
        return {"id": name, "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
                "r": getattr(config, "r", None), "lora_alpha": getattr(config, "lora_alpha", None),
                "use_dora": bool(getattr(config, "use_dora", False)),
                "target_modules": sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
                "parameters": sum(p.numel() for p in tensors),
                "bytes": sum(p.numel() * p.element_size() for p in tensors), "source": path}

    # --- requests holding adapters -----------------------------------------------------------
    def hold(self, name: str | None) -> None:
        """A request for `name` is accepted (checked again: it may have been deleted since it was resolved)."""
        if name is None:
            return
        with self.registry:
            if name not in self.known or name in self.deleting:
                raise NotFound(f"model {name!r} not found (deleted); available: "
                               f"{[self.engine.base_name, *self.names()]}", "model_not_found")
            self.in_use[name] = self.in_use.get(name, 0) + 1

    def release(self, names: list[str | None]) -> None:
        """The requests for these adapters are finished; forget deleted adapters no request uses any more."""
        to_forget = []
        with self.registry:
            for name in names:
                if name is None:
                    continue
                self.in_use[name] -= 1
                if not self.in_use[name]:
                    del self.in_use[name]
                    if name in self.deleting:
                        to_forget.append(name)
        for name in to_forget:
            self._forget(name)

    def delete(self, name: str) -> bool:
        """Hide `name` now; forget it now if no request uses it (True), else when the last one finishes."""
        with self.registry:
            if name not in self.names():
                raise NotFound(f"adapter {name!r} is not loaded", "adapter_not_found")
            self.deleting.add(name)
            now = not self.in_use.get(name)
        if now:
            with self.engine.lock:
                self._forget(name)
        return now

    def _forget(self, name: str) -> None:
        if name in self.resident:
            self._unload(name)
        self.engine.prefix_cache.clear_adapter(name)
        self.details.pop(name, None)
        with self.registry:
            self.known.pop(name, None)
            self.deleting.discard(name)
