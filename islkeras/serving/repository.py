"""The model repository: the versions of each model under a base folder, loaded once each (newest first,
older ones on first use, newer exports picked up by a rescan and loaded in the background)."""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Union

from islkeras.serving.protocol import CALLABLE_SIGNATURES, HTTPError, InputSpec, read_signature_defs


def _is_version(text: str) -> bool:
    """A TF Serving version folder / URL part: ASCII digits only (``str.isdigit`` also accepts "²")."""
    return text.isascii() and text.isdigit()


class ModelVersion:
    """One ``BASE/<name>/<version>/`` folder; the SavedModel loads once, on first use (thread-safe)."""

    RETRY_S = 10.0  #: a failed load is not retried sooner (a flood of requests must not reload it each time)

    def __init__(self, name: str, version: int, path: Path):
        self.name, self.version, self.path = name, version, path
        self._lock = threading.Lock()
        self._model = None
        self.loading = False
        self.error: Optional[str] = None
        self._failed_at = 0.0
        self.sigdefs: dict = {}
        self.specs: dict[str, InputSpec] = {}

    def _load(self):
        from islkeras.models.savedmodel import ExportedModel

        return ExportedModel(self.path)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self):
        """The loaded ``ExportedModel`` (loads it on first call; a failed load is retried next time)."""
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is None:
                if self.error and time.monotonic() - self._failed_at < self.RETRY_S:
                    raise self._load_error()
                self.loading = True
                try:
                    model = self._load()
                    sigdefs = read_signature_defs(self.path)
                    specs = {s: InputSpec.from_sigdef(s, sigdefs[s]) for s in CALLABLE_SIGNATURES if s in sigdefs}
                except Exception as e:  # noqa: BLE001 -- reported as the version's status and a 500
                    self.error, self._failed_at = f"{type(e).__name__}: {str(e)[:1000]}", time.monotonic()
                    sys.stderr.write(f"islkeras serve: loading {self.path} failed: {self.error}\n")
                    raise self._load_error() from None
                finally:
                    self.loading = False
                self.sigdefs, self.specs, self.error = sigdefs, specs, None
                self._model = model
        return self._model

    def _load_error(self) -> HTTPError:
        return HTTPError(500, f"model {self.name} version {self.version} failed to load: {self.error}")

    def load_in_background(self) -> None:
        def load():
            with contextlib.suppress(HTTPError):  # the failure is kept in self.error (status "END")
                self.get()

        if self._model is None and not self.loading and not self._lock.locked():
            threading.Thread(target=load, daemon=True, name=f"load-{self.name}-{self.version}").start()


class ModelRepository:
    """The models of a base folder: ``BASE/<name>/<version>/`` (or ``BASE/<version>/`` for one model), in TF
    Serving's layout or a Triton model repository's (``BASE/<name>/<version>/model.savedmodel/``)."""

    def __init__(self, base: Union[str, Path], rescan_s: float = 2.0):
        self.base = Path(base).resolve()
        if not self.base.is_dir():
            from islkeras.errors import UserError

            raise UserError(f"{self.base}: no such model base folder (expected BASE/<name>/<version>/saved_model.pb)")
        self.rescan_s = rescan_s
        self._lock = threading.Lock()
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._scanned = -1e9
        self.refresh(force=True)

    @staticmethod
    def _versions(d: Path) -> dict[int, Path]:
        """``{version: SavedModel folder}``: ``<v>/saved_model.pb`` (TF Serving), ``<v>/model.savedmodel/`` (Triton)."""
        out = {}
        with contextlib.suppress(OSError):
            for p in d.iterdir():
                if _is_version(p.name):
                    for sm in (p, p / "model.savedmodel"):
                        if (sm / "saved_model.pb").is_file():
                            out[int(p.name)] = sm
                            break
        return out

    def _scan(self) -> dict[str, dict[int, Path]]:
        own = self._versions(self.base)
        if own:  # BASE is itself one model's folder
            return {self.base.name: own}
        found = {}
        with contextlib.suppress(OSError):
            for d in sorted(self.base.iterdir()):
                if d.is_dir() and not d.name.startswith("."):
                    v = self._versions(d)
                    if v:
                        found[d.name] = v
        return found

    def refresh(self, force: bool = False) -> None:
        """Rescan the base folder if the last scan is older than ``rescan_s`` (``force``: 0.2 s)."""
        now = time.monotonic()
        if now - self._scanned < (0.2 if force else self.rescan_s):
            return
        found = self._scan()
        with self._lock:
            models = {}
            for name, versions in found.items():
                old = self._models.get(name, {})
                models[name] = {v: old[v] if v in old and old[v].path == p else ModelVersion(name, v, p)
                                for v, p in sorted(versions.items())}
            self._models = models
            self._scanned = now

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> dict[int, ModelVersion]:
        self.refresh()
        with self._lock:
            vs = self._models.get(name)
        if vs is None:
            self.refresh(force=True)
            with self._lock:
                vs = self._models.get(name)
        if not vs:
            known = ", ".join(self.names()) or "none"
            raise HTTPError(404, f"Servable not found for request: Latest({name}); models served: {known}")
        return vs

    def get(self, name: str, version: Optional[int] = None) -> ModelVersion:
        """A version (default: the newest; while a newer version found by a rescan is still loading, in the
        background, the newest loaded one keeps answering)."""
        vs = self.versions(name)
        if version is None:
            newest = vs[max(vs)]
            if newest.loaded:
                return newest
            ready = [mv for v, mv in sorted(vs.items()) if mv.loaded]
            if not ready:
                return newest
            newest.load_in_background()
            return ready[-1]
        if version not in vs:
            self.refresh(force=True)
            vs = self.versions(name)
            if version not in vs:
                raise HTTPError(404, f"Servable not found for request: Specific({name}, {version}); "
                                     f"versions of {name}: {', '.join(map(str, sorted(vs)))}")
        return vs[version]

    def preload(self, which: str = "latest") -> list[ModelVersion]:
        loaded = []
        if which == "none":
            return loaded
        with self._lock:
            models = {n: dict(v) for n, v in self._models.items()}
        for name, vs in models.items():
            for v in (sorted(vs) if which == "all" else [max(vs)]):
                vs[v].get()
                loaded.append(vs[v])
        return loaded
