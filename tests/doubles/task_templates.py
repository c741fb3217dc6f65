"""The templates of a running task (TaskRunner's half that renders them): the first render
before the task starts, re-renders after a variable write once quiet, change modes, and
reads by workload identity. Follows client/allocrunner/taskrunner/template/template.go and
consul-template's runner (quiescence, retries).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.doubles import templates
from tests.doubles.acl import workload_variables

SECOND = 1_000_000_000


def retry_total(attempts: int = 12, backoff: float = 0.25, max_backoff: float = 60.0) -> float:
    """Seconds consul-template sleeps between a failing read's retries before it gives up:
    config/retry.go RetryFunc (backoff doubling from `backoff`, `max_backoff` from the
    retry log2(max/backoff) on), with client/config/config.go's default NomadRetry."""
    until_max = int(math.log2(max_backoff / backoff))
    return sum(max_backoff if r > until_max else backoff * 2 ** r for r in range(attempts))


NOMAD_RETRY_S = retry_total()   # 303.75 s


def parse_signal(name: str) -> signal.Signals:
    upper = name.upper()
    try:
        return signal.Signals[upper if upper.startswith("SIG") else "SIG" + upper]
    except KeyError:
        raise ValueError(f'invalid signal "{name}"') from None


class TemplateMixin:
    """Mixed into tasks.TaskRunner; uses its task, alloc, cluster, dirs, env and events."""

    cluster: Any
    alloc: Any
    task: dict[str, Any]
    name: str
    dirs: dict[str, str]
    env: dict[str, str]
    stopping: bool
    restart_now: bool
    wake: asyncio.Event
    rendered: dict[str, str]
    changed_first: float
    changed_last: float
    quiescing: asyncio.Task[Any] | None

    if TYPE_CHECKING:   # TaskRunner's, which this half calls
        ts: dict[str, Any]

        def event(self, kind: str, message: str = "", **extra: Any) -> None: ...
        def _fail(self, kind: str, message: str, **extra: Any) -> None: ...
        def send(self, sig: signal.Signals) -> None: ...
        async def _terminate(self, grace_cap: float | None = None) -> None: ...

    async def _render_all(self) -> bool:
        """Render every template, waiting while a variable is missing. False: the task
        failed (a template error)."""
        waiting_logged = False
        denied_since: float | None = None
        while not self.stopping:
            self.wake.clear()
            try:
                for i, tmpl in enumerate(self.task.get("Templates") or []):
                    self._write(i, tmpl)
                return True
            except (templates.MissingVariable, templates.Denied) as exc:
                if not waiting_logged:   # a refused read is a missing dependency meanwhile
                    self.event("Template", f"Missing: nomad.var.block({exc}@default.global)")
                    waiting_logged = True
                if isinstance(exc, templates.Denied):
                    denied_since = denied_since or time.monotonic()
                    if not await self._retry_denied(str(exc), denied_since):
                        return False
                    continue
            except (templates.TemplateError, OSError, ValueError) as exc:
                self._fail("Failed Templating", str(exc), SetupError=str(exc))
                return False
            await self.wake.wait()
        return True

    async def _retry_denied(self, path: str, since: float) -> bool:
        """A 403 on a variable read: consul-template's view retries it on the client's
        nomad_retry schedule (watch/view.go poll, config/retry.go RetryFunc), then the
        runner's error kills the task, failed (template.go handleFirstRender, "Template
        failed: %v"; the dependency's error is wrapped with its String(), the API's
        "Unexpected response code: 403 (Permission denied)"). False: the task failed."""
        budget = self.cluster.state.faults.nomad_retry_s
        left = (NOMAD_RETRY_S if budget is None else budget) - (time.monotonic() - since)
        if left <= 0:
            self._fail("Killing", f"Template failed: nomad.var.block({path}@default.global): "
                                  f"Unexpected response code: 403 (Permission denied)")
            return False
        try:   # a variable write or a kill wakes it; ACLs turned off let it render
            await asyncio.wait_for(self.wake.wait(), timeout=left)
        except TimeoutError:
            pass
        return True

    def _write(self, index: int, tmpl: dict[str, Any]) -> bool:
        """Render template `index` to its DestPath; True when the content changed."""
        if tmpl.get("SourcePath"):
            raise templates.TemplateError("the double supports EmbeddedTmpl only")
        content = templates.render(tmpl.get("EmbeddedTmpl") or "", self.cluster.state.variables,
                                   self._readable())
        dest = self._dest(tmpl.get("DestPath") or "")
        if self.rendered.get(str(dest)) == content and dest.exists():
            return False
        perms = int(tmpl.get("Perms") or "0644", 8)
        tmp = dest.with_name(dest.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, perms)
        with os.fdopen(fd, "w") as fh:
            fh.write(content)
        os.chmod(tmp, perms)   # umask must not widen or narrow what the job asked for
        os.replace(tmp, dest)
        self.rendered[str(dest)] = content
        return True

    def _readable(self) -> set[str] | None:
        acl = self.cluster.acl
        if acl is None or not acl.enabled:
            return None
        return workload_variables(self.alloc.job_id, self.alloc.group, self.name)

    def _dest(self, raw: str) -> Path:
        path = templates.interpolate(raw, self.env, {})
        task_dir = Path(self.dirs["task"])
        dest = (task_dir / path).resolve() if not os.path.isabs(path) else Path(path).resolve()
        if not str(dest).startswith(str(self.alloc.dir.resolve()) + "/"):
            raise templates.TemplateError(f"template destination {raw!r} escapes the alloc dir")
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    async def variables_changed(self, paths: set[str]) -> None:
        """A variable changed: its templates re-render once it has been quiet for the
        template's Wait.Min (at most Wait.Max after the first change); the client's default
        is min 5s, max 4m (client/config/config.go DefaultTemplateConfig; consul-template's
        quiescence timers, manager/runner.go). The change mode then fires after a random
        delay below the template's Splay (template.go handleTemplateRerenders)."""
        self.wake.set()
        if self.ts["State"] != "running" or not self._reading(paths):
            return
        now = time.monotonic()
        if self.quiescing is None or self.quiescing.done():
            self.changed_first = now
            self.changed_last = now
            self.quiescing = self.cluster.spawn(self._quiesce(paths))
        else:
            self.changed_last = now

    def _reading(self, paths: set[str]) -> list[tuple[int, dict[str, Any]]]:
        return [(i, t) for i, t in enumerate(self.task.get("Templates") or [])
                if templates.variable_paths(t.get("EmbeddedTmpl") or "") & paths]

    async def _quiesce(self, paths: set[str]) -> None:
        reading = self._reading(paths)
        wait_min, wait_max = _wait(reading[0][1])
        while not self.stopping:
            due = min(self.changed_last + wait_min, self.changed_first + wait_max)
            if time.monotonic() >= due:
                break
            await asyncio.sleep(min(0.05, due - time.monotonic()))
        delay = self.cluster.state.faults.template_delay_s
        if delay:
            await asyncio.sleep(delay)
        if self.stopping or self.ts["State"] != "running":
            return
        changed = []
        for i, tmpl in reading:
            try:
                if self._write(i, tmpl):
                    changed.append(tmpl)
            except (templates.MissingVariable, templates.TemplateError, OSError) as exc:
                self.event("Template", f"Template re-render failed: {exc}")
        if not changed:
            return
        splay = max((t.get("Splay") or 0) for t in changed) / SECOND
        if splay:
            await asyncio.sleep(random.uniform(0, splay))
        for tmpl in changed:
            await self._on_change(tmpl)

    async def _on_change(self, tmpl: dict[str, Any]) -> None:
        mode = tmpl.get("ChangeMode") or "restart"
        if mode == "signal":
            sig = parse_signal(tmpl.get("ChangeSignal") or "")
            self.event("Signaling", "Template re-rendered", TaskSignal=sig.name,
                       TaskSignalReason="Template re-rendered")
            self.send(sig)
        elif mode == "restart":
            self.event("Restart Signaled", "Template with change_mode restart re-rendered",
                       RestartReason="Template with change_mode restart re-rendered")
            self.restart_now = True
            await self._terminate()


def _wait(tmpl: dict[str, Any]) -> tuple[float, float]:
    """(min, max) seconds of a template's quiescence: its own Wait, else the client's."""
    wait = tmpl.get("Wait")
    if not wait:
        return 5.0, 240.0
    low = (wait.get("Min") or 0) / SECOND
    high = wait.get("Max")
    # consul-template config/wait.go Finalize: Max defaults to 4 x Min
    return low, (high / SECOND) if high is not None else 4 * low
