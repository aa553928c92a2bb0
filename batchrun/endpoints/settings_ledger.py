"""The ledger of a Dedicated endpoint's settings: what the user had, what the job changed, what goes back.

Before the job changes anything the ledger saves the user's settings (saved_settings.py); an earlier run
that changed the endpoint and died (SIGKILL) left its file behind, and the ledger adopts what that run
found instead of what it set. The shards of one job share a file in their output (shared_endpoint.py); the first
of them also carries a single run's file left on this machine into it (the host record). At the release
the ledger says what ``on_finish`` comes to and which settings to put back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from batchrun.endpoints.control_plane import ControlPlane, EndpointSnapshot
from batchrun.endpoints.saved_settings import SavedSettings, UserSettings, endpoint_state_path
from batchrun.endpoints.shared_endpoint import SharedUse
from batchrun.facts import IDLE_BACKSTOP_S, POLL_INTERVAL_S, READY_TIMEOUT_S

__all__ = ["RESUMABLE", "SETTINGS", "Changes", "LifecycleSettings", "SettingsLedger"]

#: The states from which a resume brings the endpoint up.
RESUMABLE = {"paused", "scaledToZero"}
#: The settings a job may change, and the snapshot fields they are read from.
SETTINGS = ("min_replica", "max_replica", "scale_to_zero_timeout")


@dataclass(frozen=True, slots=True, kw_only=True)
class LifecycleSettings:
    """How a job drives its endpoint; built from the spec's `endpoint:` section."""

    scale_min: int | None = None
    scale_max: int | None = None
    ready_timeout_s: float = READY_TIMEOUT_S
    on_finish: str | None = None  # "pause" | "scale-to-zero" | "keep"; None: pause unless it was already running
    idle_backstop_s: float | None = IDLE_BACKSTOP_S
    poll_interval_s: float = POLL_INTERVAL_S
    supported_tasks: tuple[str, ...] = ()
    # Where the user's settings are kept while the job has changed them. None: the endpoint's own file
    # in batchrun's state folder (endpoint_state_path), shared by every job on that endpoint.
    state_file: str | None = None
    # The shards of one job share the endpoint through their output folder (shared_endpoint.py): the last one
    # out puts it down. None: this job is the endpoint's only user.
    shared: SharedUse | None = None


@dataclass(frozen=True, slots=True)
class Changes:
    """What a job's start comes to: the user's endpoint, the settings to send, the idle backstop."""

    original: EndpointSnapshot  # the user's endpoint: as found, or as an earlier run that died found it
    values: dict[str, int]  # the settings the job sets on it
    backstop_min: int | None  # the idle backstop in minutes; None: the job leaves the endpoint up


class SettingsLedger:
    """One endpoint's settings, from the check to the put-back. See the module docstring."""

    def __init__(self, control: ControlPlane, settings: LifecycleSettings,
                 on_event: Callable[[str], None] = lambda message: None) -> None:
        self.control = control
        self.settings = settings
        self._on_event = on_event
        self.original: EndpointSnapshot | None = None  # the user's endpoint, as the check saw it
        self.changed: dict[str, int] = {}  # what the acquire changed, to be put back by the release
        self.initial_state: str | None = None  # as an earlier, killed run found it
        self._saved: SavedSettings | None = None

    @property
    def ref(self) -> str:
        return f"{self.control.namespace}/{self.control.name}"

    @property
    def saved(self) -> SavedSettings:
        """The file of the user's settings. Made on first use: the control-plane base (part of its name) may
        be set only then."""
        if self._saved is None:
            self._saved = SavedSettings(self.state_path(), self.ref, self.control.api_url,
                                        shared=self.settings.shared is not None)
        return self._saved

    def state_path(self) -> str:
        """The file that keeps the user's settings while the job has changed them."""
        if self._saved is not None:
            return self._saved.path
        if self.settings.shared is not None:
            return str(self.settings.shared.settings_path)
        if self.settings.state_file:
            return self.settings.state_file
        return str(endpoint_state_path(self.control.api_url, self.control.namespace, self.control.name))

    # ------------------------------------------------------------------ the start

    def start(self, current: EndpointSnapshot) -> Changes:
        """Adopt what an earlier run left, decide the job's changes, save the user's settings before any."""
        original = self.adopt_left(current)
        changes = self.changes(original)
        if changes.values or self.saved.owned or original.state in RESUMABLE:
            self.saved.save(original)
        self.changed.update(changes.values)
        return changes

    def adopt_left(self, original: EndpointSnapshot) -> EndpointSnapshot:
        """An earlier run that changed the endpoint and died left the user's settings on disk: restore those."""
        left = self.saved.load()
        from_host = False
        if left is None and self.settings.shared is not None:
            left = self._take_host_record(original)
            from_host = left is not None
        if self.saved.foreign_owner is not None:
            self._on_event(
                f"another batchrun run ({self.saved.foreign_owner}) is using {self.ref} and will put it back; "
                "this job leaves its saved settings alone"
            )
        if left is None:
            return original
        self.initial_state = left.initial_state
        adopted = dataclasses.replace(
            original,
            min_replica=left.min_replica,
            max_replica=left.max_replica,
            scale_to_zero_timeout=left.scale_to_zero_timeout,
        )
        self.original = adopted
        found = (f"min_replica={adopted.min_replica}, max_replica={adopted.max_replica}, "
                 f"scale_to_zero_timeout={adopted.scale_to_zero_timeout}")
        if self.settings.shared is not None and not from_host:
            self._on_event(f"{self.ref} is shared with the job's other shards; the settings its first user found "
                           f"({found}) are restored by the last one out")
        else:
            self._on_event(f"an earlier run left {self.ref} changed; the settings it found are restored at the end "
                           f"({found})")
        # Whatever differs from the user's settings now is put back at the release, changed by us or not.
        for key in SETTINGS:
            if getattr(original, key) != getattr(adopted, key):
                self.changed.setdefault(key, 0)
        return adopted

    def _take_host_record(self, current: EndpointSnapshot) -> UserSettings | None:
        """A single run killed earlier on this machine left the user's settings in batchrun's own state folder:
        the first shard carries them into the shards' shared file, so that the last one out restores those
        (not what the killed run set) and the machine's file is done with."""
        host = SavedSettings(endpoint_state_path(self.control.api_url, self.control.namespace, self.control.name),
                             self.ref, self.control.api_url)
        left = host.load()  # None when there is none, or its writer still runs (it will put the endpoint back)
        if left is None:
            return None
        self.saved.save(dataclasses.replace(
            current, state=left.initial_state, min_replica=left.min_replica, max_replica=left.max_replica,
            scale_to_zero_timeout=left.scale_to_zero_timeout,
        ))
        host.release(forget=True)
        return left

    def changes(self, original: EndpointSnapshot) -> Changes:
        """The settings the job sets on the user's endpoint ``original``, and the idle backstop."""
        s = self.settings
        values: dict[str, int] = {}
        if s.scale_min is not None and s.scale_min != original.min_replica:
            values["min_replica"] = s.scale_min
        if s.scale_max is not None and s.scale_max != original.max_replica:
            values["max_replica"] = s.scale_max
        backstop_min = None
        if s.idle_backstop_s is not None and self.final_action(original) != "keep":
            # The server-side safety net should this process die with SIGKILL or the machine lose power:
            # the endpoint's own idle timeout. Set whenever the job will put the endpoint down at the end.
            backstop_min = max(1, round(s.idle_backstop_s / 60))
            if backstop_min != original.scale_to_zero_timeout:
                values["scale_to_zero_timeout"] = backstop_min
            min_after = values.get("min_replica", original.min_replica)
            if min_after > 0:
                self._on_event(
                    f"note: the idle backstop ({backstop_min} min) only scales an endpoint to zero when min_replica "
                    f"is 0; with min_replica={min_after}, a job killed with SIGKILL leaves it running until "
                    f"`batchrun endpoint pause {self.control.name} --namespace {self.control.namespace}`"
                )
        return Changes(original=original, values=values, backstop_min=backstop_min)

    def min_target(self, original: EndpointSnapshot) -> int:
        """The ready replicas the job waits for: its scale_min within its scale_max, else the user's, at least 1."""
        wanted = self.settings.scale_min if self.settings.scale_min is not None else original.min_replica
        top = self.settings.scale_max if self.settings.scale_max is not None else original.max_replica
        return max(1, min(wanted, top) if top else wanted)

    # ------------------------------------------------------------------ the put-back

    def final_action(self, original: EndpointSnapshot) -> str:
        """``on_finish`` if the spec says it, else pause, or keep an endpoint that was running before the job."""
        if self.settings.on_finish is not None:
            return self.settings.on_finish
        started = self.initial_state or original.state
        return "keep" if started == "running" else "pause"

    def restore(self, original: EndpointSnapshot) -> dict[str, int]:
        """The user's values of the settings the job (or an earlier run) changed: what the release puts back."""
        restore = {key: getattr(original, key) for key in self.changed}
        return {key: value for key, value in restore.items() if value is not None}
