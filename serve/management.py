"""Model management with Triton's names: control modes, load / unload / index, polling.

``model_control_mode`` (settings.py) decides who changes what is served:

- ``none``: every model is loaded at start and nothing changes after; load and unload are
  refused (503 / UNAVAILABLE, as Triton answers them);
- ``explicit``: the ``load_model`` ones (``*``: every one; none by default) are loaded at start,
  then POST /v2/repository/models/NAME/load and /unload (or gRPC) change what is served;
- ``poll``: every model is loaded at start, then the repository is scanned every
  ``repository_poll_secs``: a new model or version folder, or a changed model.onnx or
  config.pbtxt, is loaded; a removed one is unloaded. Load and unload requests are refused.

A load verifies every version its config.pbtxt's version_policy selects, as startup does
(models.load_version), beside what is served and in a thread of its own (the event loop keeps
answering). A version whose files are as they were (size and mtime, else their sha256) keeps its
session. Then the model's versions are swapped in one assignment: a request admitted before
keeps the version it was given and finishes on it (Service.run runs it there: in that version's
batcher while it is open, else on its own). A version no longer served is drained: its batcher
closes once the requests queued or running on it are done, and its session goes with the last
request holding it. A version that does not load is refused whole, in one log line, and what was
serving keeps serving; poll mode does not try it again until its files change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartmixed.contract import CONFIG_FILE, MODEL_FILE
from smartmixed.serve.models import (
    MAX_CONFIG_BYTES,
    BadRequest,
    LoadError,
    ModelVersion,
    NotFound,
    Repository,
    ServeError,
    load_repository,
    load_version,
    model_folders,
    read_repository_file,
    selected_versions,
)
from smartmixed.serve.settings import ServeSettings

if TYPE_CHECKING:  # app.py imports this module
    from smartmixed.serve.app import Service

log = logging.getLogger("smartmixed.serve")

EVERY_MODEL = "*"  # --load-model '*': every model of the repository, as Triton accepts
DRAIN_CHECK_S = 0.01  # how often a drain looks at the requests still in progress
DRAIN_GRACE_S = 5.0  # beyond the longest an admitted request can take (body + deadline)


def models_at_start(settings: ServeSettings) -> list[str] | None:
    """The models to load at start: None for every one (modes none and poll, or ``*``)."""
    if settings.model_control_mode != "explicit" or EVERY_MODEL in settings.load_model:
        return None
    return list(dict.fromkeys(settings.load_model))


def load_at_start(settings: ServeSettings) -> Repository:
    """The repository as the model control mode loads it at start (models.load_repository:
    a bad entry stops startup unless ``skip_bad_models``)."""
    return load_repository(
        settings.repository,
        device=settings.device,
        threads=settings.intra_op_threads,
        skip_bad_models=settings.skip_bad_models,
        max_model_bytes=settings.max_model_bytes,
        names=models_at_start(settings),
    )


@dataclass(frozen=True)
class FileState:
    """What stat says of a file (symlinks followed): a change of either means a new file."""

    size: int
    mtime_ns: int


def file_state(path: Path) -> FileState | None:
    try:
        stat = path.stat()
    except OSError:  # missing, or unreadable: loading says why
        return None
    return FileState(stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class Source:
    """The files a served version was loaded from: stat before they were read, and their
    contents' sha256 (None: no config.pbtxt)."""

    model: FileState | None
    config: FileState | None
    model_sha256: str
    config_sha256: str | None


# One model's files as a poll sees them: (version, model.onnx, config.pbtxt) per version the
# policy selects, or the one-line reason it selects none.
Scan = tuple[tuple[str, FileState | None, FileState | None], ...] | str


class ModelManager:
    """Loads, swaps and drains the model versions ``service`` serves (Service.load_model,
    unload_model and repository_index call it; in poll mode its poller does)."""

    def __init__(self, service: Service) -> None:
        self.service, self.settings = service, service.settings
        self.sources: dict[tuple[str, str], Source] = {}  # of each version served
        self.refused: dict[str, Scan] = {}  # poll: the files of a model that did not load
        self.retiring: list[ModelVersion] = []  # versions swapped out, being drained
        self._lock = asyncio.Lock()  # one change at a time, as Triton serializes them
        self._loader: ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task] = set()  # the poller, the drains

    # ---- lifecycle (Service.start / stop) ---------------------------------------------------

    async def start(self) -> None:
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="smartmixed-load")
        repo = self.service.repo
        if self.settings.model_control_mode == "none":
            return
        loop = asyncio.get_running_loop()
        for name, versions in repo.models.items():
            for version, model in versions.items():
                self.sources[(name, version)] = await loop.run_in_executor(
                    self._loader, self._source_of, model
                )
        if self.settings.model_control_mode == "poll":
            # a model that failed at start is tried again once its files change
            for name in repo.failed:
                self.refused[name] = await loop.run_in_executor(
                    self._loader, self._scan, repo.root / name
                )
            self._spawn(self._poll_forever())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- explicit load / unload -------------------------------------------------------------

    def check_control(self) -> None:
        mode = self.settings.model_control_mode
        if mode != "explicit":
            # Triton's answer (UNAVAILABLE), with its words first, then why
            raise ServeError(
                f"explicit model load / unload is not allowed: model_control_mode is {mode} "
                "(start the server with --model-control-mode explicit)",
                503,
            )

    async def load(self, name: str) -> None:
        """Load or reload NAME (BadRequest naming the file and problem: nothing changes)."""
        async with self._lock:
            self._entry(name)
            try:
                await self._load(name)
            except LoadError as e:
                raise BadRequest(self._refusal(name, e)) from None

    async def unload(self, name: str) -> None:
        """Stop admitting requests for NAME, wait for those admitted, close its batchers.

        Runs to its end in a task of its own, also when the caller goes away (a gRPC client
        cancelling): a model half unloaded would keep batchers open that nothing uses."""
        await asyncio.shield(self._spawn(self._unload_named(name)))

    async def _unload_named(self, name: str) -> None:
        async with self._lock:
            repo = self.service.repo
            if name not in repo.models:
                if name in repo.failed:
                    del repo.failed[name]
                    return
                if name in repo.entries or name in self._entries():
                    return  # not loaded: nothing to do, as in Triton
                raise NotFound(f"unknown model {name!r}")
            await self._unload(name)

    def _entries(self) -> set[str]:
        """The repository's model folders now (the last ones seen if it cannot be listed)."""
        repo = self.service.repo
        try:
            repo.entries = {f.name for f in model_folders(repo.root)}
        except LoadError as e:
            log.error("%s", e)
        return repo.entries

    def _entry(self, name: str) -> None:
        """NotFound unless NAME is a model folder of the repository (never ``..``)."""
        if name not in self._entries():
            raise NotFound(
                f"unknown model {name!r}: the repository {self.service.repo.root} has no "
                "such folder"
            )

    def _refusal(self, name: str, error: LoadError) -> str:
        """The one log line (and answer) of a load refused; the model's state is kept."""
        repo = self.service.repo
        served = repo.models.get(name)
        keeping = (
            f"; still serving version(s) {', '.join(sorted(served, key=int))}" if served else ""
        )
        message = f"failed to load {name!r}: {error}{keeping}"
        log.error("%s", message)
        if not served:
            repo.failed[name] = str(error)
        return message

    # ---- loading and swapping ---------------------------------------------------------------

    async def _load(self, name: str) -> None:
        """Verify and load NAME's versions beside what is served (in the loader thread), then
        swap them in. LoadError: nothing changes."""
        service = self.service
        repo = service.repo
        current = dict(repo.models.get(name, {}))
        sources = {v: self.sources[(name, v)] for v in current if (name, v) in self.sources}
        loop = asyncio.get_running_loop()
        versions, new_sources = await loop.run_in_executor(
            self._loader, self._prepare, repo.root / name, current, sources
        )
        for version, source in new_sources.items():
            self.sources[(name, version)] = source
        self.refused.pop(name, None)
        repo.failed.pop(name, None)
        if versions.keys() == current.keys() and all(versions[v] is current[v] for v in versions):
            return  # the same files: the same sessions
        for version in current.keys() - versions.keys():
            self.sources.pop((name, version), None)
        self._swap(name, current, versions)

    def _prepare(
        self, entry: Path, current: dict[str, ModelVersion], sources: dict[str, Source]
    ) -> tuple[dict[str, ModelVersion], dict[str, Source]]:
        """(In the loader thread.) NAME's versions as its files are now: the served object
        where they have not changed, else a new one, verified (models.load_version)."""
        settings, root = self.settings, self.service.repo.root
        versions: dict[str, ModelVersion] = {}
        new_sources: dict[str, Source] = {}
        for folder in selected_versions(entry, root=root):
            version = folder.name
            model_path, config_path = folder / MODEL_FILE, entry / CONFIG_FILE
            model_state, config_state = file_state(model_path), file_state(config_path)
            served, source = current.get(version), sources.get(version)
            if served is not None and source is not None:
                if (model_state, config_state) == (source.model, source.config):
                    versions[version] = served
                    continue
                same = (
                    self._sha256(model_path, settings.max_model_bytes),
                    self._sha256(config_path, MAX_CONFIG_BYTES),
                ) == (source.model_sha256, source.config_sha256)
                if same:  # touched, not changed
                    versions[version] = served
                    new_sources[version] = Source(
                        model_state, config_state, source.model_sha256, source.config_sha256
                    )
                    continue
            loaded = load_version(
                entry.name,
                folder,
                device=settings.device,
                threads=settings.intra_op_threads,
                root=root,
                max_model_bytes=settings.max_model_bytes,
            )
            versions[version] = loaded
            new_sources[version] = Source(
                model_state,
                config_state,
                loaded.sha256,
                self._sha256(config_path, MAX_CONFIG_BYTES),
            )
        return versions, new_sources

    def _sha256(self, path: Path, limit: int) -> str | None:
        """sha256 of a repository file (read as loading reads it); None when absent."""
        if not path.exists() and not path.is_symlink():
            return None
        data = read_repository_file(path, root=self.service.repo.root, limit=limit)
        return hashlib.sha256(data).hexdigest()

    def _source_of(self, model: ModelVersion) -> Source:
        """(In the loader thread.) The Source of a version loaded at start."""
        config_path = model.path.parent.parent / CONFIG_FILE
        try:
            config_sha256 = self._sha256(config_path, MAX_CONFIG_BYTES)
        except LoadError:
            config_sha256 = None
        return Source(file_state(model.path), file_state(config_path), model.sha256, config_sha256)

    def _swap(self, name: str, old: dict[str, ModelVersion], new: dict[str, ModelVersion]) -> None:
        """Serve ``new`` for NAME from now on (no await: a request sees the old versions or the
        new), and drain the old versions it does not keep."""
        service = self.service
        retired = []
        for version, model in old.items():
            if new.get(version) is not model:
                key = (name, version)
                batcher = service.batchers.get(key) if service.batched.get(key) is model else None
                retired.append((model, batcher))
        for model in new.values():
            if old.get(model.version) is not model:
                service.serve_version(model)
        service.repo.models[name] = new
        log.info(
            "%s: serving version(s) %s%s",
            name,
            ", ".join(f"{v} ({m.sha256[:12]})" for v, m in sorted(new.items())),
            f"; draining {', '.join(m.version for m, _ in retired)}" if retired else "",
        )
        for model, batcher in retired:
            self.retiring.append(model)
            self._spawn(self._retire(model, batcher))

    async def _retire(self, model: ModelVersion, batcher) -> None:
        """Close a swapped-out version once the requests queued or running on it are done
        (at once when the server stops)."""
        where = f"{model.name}/{model.version}"
        try:
            await self._drained(lambda: model.pending == 0, where)
        finally:
            self._forget(model)
            self.retiring.remove(model)
            if batcher is not None:
                await batcher.close()
        log.info("%s (%s): drained and closed", where, model.sha256[:12])

    async def _unload(self, name: str) -> None:
        service = self.service
        repo = service.repo
        versions = repo.models.pop(name)  # from now on, NAME's requests are refused (404)
        repo.unloading[name] = versions
        batchers = [
            service.batchers[key]
            for key in ((name, v) for v in versions)
            if key in service.batchers and service.batched[key] is versions[key[1]]
        ]
        log.info("%s: unloading (waiting for the requests in progress)", name)
        try:
            await self._drained(
                lambda: (
                    service.in_flight.get(name, 0) == 0
                    and all(m.pending == 0 for m in versions.values())
                ),
                name,
            )
        finally:  # also when the server stops meanwhile
            for model in versions.values():
                self._forget(model)
                self.sources.pop((name, model.version), None)
            del repo.unloading[name]
            await asyncio.gather(*(batcher.close() for batcher in batchers))
        log.info("%s: unloaded", name)

    async def _drained(self, done, what: str) -> None:
        """Wait until ``done()``; past the longest an admitted request can take, go on with a
        warning (its deadline has answered it 503 by then)."""
        settings = self.settings
        limit = settings.body_timeout_s + settings.request_timeout_s + DRAIN_GRACE_S
        loop = asyncio.get_running_loop()
        give_up = loop.time() + limit
        while not done():
            if loop.time() > give_up:
                log.warning("%s: requests still in progress after %.0f s; closing", what, limit)
                return
            await asyncio.sleep(DRAIN_CHECK_S)

    def _forget(self, model: ModelVersion) -> None:
        """Route nothing more to ``model``'s batcher, and drop its version's entries and
        statistics, unless a newer object serves that version (no await: ``run`` sees the
        batcher open or gone)."""
        service = self.service
        key = (model.name, model.version)
        if service.batched.get(key) is model:
            del service.batched[key]
            service.batchers.pop(key, None)
            service.batching.pop(key, None)
            service.stats.remove(*key)

    # ---- the index --------------------------------------------------------------------------

    def index(self, *, ready_only: bool) -> list[dict[str, str]]:
        """Triton's repository index: every version served (READY), being drained
        (UNLOADING), and each model folder not loaded (UNAVAILABLE, with the reason: why it
        failed, else "unloaded")."""
        repo = self.service.repo
        entries = self._entries()
        rows: list[dict[str, str]] = []
        for name in sorted({*entries, *repo.models, *repo.failed, *repo.unloading}):
            served = repo.models.get(name, {})
            for version in sorted(served, key=int):
                rows.append({"name": name, "version": version, "state": "READY"})
            if ready_only:
                continue
            draining = {m.version for m in self.retiring if m.name == name} - served.keys()
            draining |= repo.unloading.get(name, {}).keys()
            for version in sorted(draining, key=int):
                rows.append({"name": name, "version": version, "state": "UNLOADING"})
            if not served and name not in repo.unloading:
                reason = repo.failed.get(name, "unloaded")
                rows.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
        return rows

    # ---- poll mode --------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        period = self.settings.repository_poll_secs
        while True:
            await asyncio.sleep(period)
            try:
                await self.poll()
            except Exception:  # the poller must outlive any surprise; the log says what
                log.exception("repository poll failed")

    async def poll(self) -> None:
        """One scan: load what is new or changed, unload what is gone."""
        repo = self.service.repo
        loop = asyncio.get_running_loop()
        try:
            folders = await loop.run_in_executor(self._loader, model_folders, repo.root)
        except LoadError as e:
            log.error("%s; serving what is loaded", e)
            return
        names = {f.name for f in folders}
        repo.entries = names
        async with self._lock:
            for name in sorted({*repo.models, *repo.failed} - names):
                repo.failed.pop(name, None)
                self.refused.pop(name, None)
                if name in repo.models:
                    await self._unload(name)
            scans = await loop.run_in_executor(self._loader, self._scan_all, folders)
            for name, scan in scans.items():
                if scan == self._served_scan(name) or scan == self.refused.get(name):
                    continue
                try:
                    await self._load(name)
                except LoadError as e:
                    self._refusal(name, e)
                    self.refused[name] = scan

    def _scan_all(self, folders: list[Path]) -> dict[str, Scan]:
        return {folder.name: self._scan(folder) for folder in folders}

    def _scan(self, entry: Path) -> Scan:
        """(In the loader thread.) What a poll compares: each selected version's files."""
        try:
            selected = selected_versions(entry, root=self.service.repo.root, warn=False)
        except LoadError as e:
            return str(e)
        config = file_state(entry / CONFIG_FILE)
        return tuple((f.name, file_state(f / MODEL_FILE), config) for f in selected)

    def _served_scan(self, name: str) -> Scan | None:
        served = self.service.repo.models.get(name)
        if not served:
            return None
        scan = []
        for version in sorted(served, key=int):
            source = self.sources.get((name, version))
            if source is None:
                return None
            scan.append((version, source.model, source.config))
        return tuple(scan)

    # ---- statistics -------------------------------------------------------------------------

    def statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        """{"model_stats": [...]}: every version served, NAME's, or NAME/VERSION's."""
        repo, stats = self.service.repo, self.service.stats
        if not name:
            keys = [(n, v) for n in sorted(repo.models) for v in sorted(repo.models[n], key=int)]
        elif version:
            keys = [(name, repo.get(name, version).version)]
        else:
            repo.get(name)  # NotFound / NotReady as the other routes answer
            keys = [(name, v) for v in sorted(repo.models[name], key=int)]
        return stats.report(keys)
